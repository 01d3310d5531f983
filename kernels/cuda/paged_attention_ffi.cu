// XLA FFI handler of the CUDA paged decode attention: checks the buffers and the launch parameters (chosen by
// kernels/paged_attention.py, which also sizes the split-K workspace as two extra results: XLA's GPU runtime
// gives FFI handlers no scratch allocator) and launches on XLA's stream.
#include "paged_attention_ffi.h"

#include <algorithm>
#include <string>

#include "paged_attention_kernels.cuh"

namespace ffi = xla::ffi;

namespace neo_kernels {
namespace {

int ceil_div(int a, int b) { return (a + b - 1) / b; }

ffi::Error check_shapes(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k_cache, const ffi::AnyBuffer& v_cache,
                        const ffi::Buffer<ffi::S32>& block_tables, const ffi::Buffer<ffi::S32>& context_lens) {
  const auto q_dims = q.dimensions(), k_dims = k_cache.dimensions(), v_dims = v_cache.dimensions();
  if (q_dims.size() != 3) return ffi::Error::InvalidArgument("q must be [batch, num_heads, head_dim]");
  if (k_dims.size() != 4) {
    return ffi::Error::InvalidArgument("k_cache must be [num_blocks, num_kv_heads, block_size, head_dim]");
  }
  if (!std::equal(k_dims.begin(), k_dims.end(), v_dims.begin(), v_dims.end())) {
    return ffi::Error::InvalidArgument("v_cache must have k_cache's shape");
  }
  if (k_cache.element_type() != q.element_type() || v_cache.element_type() != q.element_type()) {
    return ffi::Error::InvalidArgument("k_cache and v_cache must have q's dtype");
  }
  if (k_dims[3] != q_dims[2]) return ffi::Error::InvalidArgument("k_cache head_dim differs from q's");
  if (q_dims[2] != 64 && q_dims[2] != 128) return ffi::Error::InvalidArgument("head_dim must be 64 or 128");
  if (k_dims[2] != 16 && k_dims[2] != 32) return ffi::Error::InvalidArgument("block_size must be 16 or 32");
  if (q_dims[0] > 65535) return ffi::Error::InvalidArgument("batch must be at most 65535");
  if (q_dims[1] % k_dims[1] != 0) {
    return ffi::Error::InvalidArgument("q's num_heads must be a multiple of k_cache's num_kv_heads");
  }
  const auto table_dims = block_tables.dimensions(), lens_dims = context_lens.dimensions();
  if (table_dims.size() != 2 || table_dims[0] != q_dims[0] || table_dims[1] < 1) {
    return ffi::Error::InvalidArgument("block_tables must be int32 [batch, max_blocks >= 1]");
  }
  if (lens_dims.size() != 1 || lens_dims[0] != q_dims[0]) {
    return ffi::Error::InvalidArgument("context_lens must be int32 [batch]");
  }
  return ffi::Error::Success();
}

ffi::Error paged_decode_attention(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                                  ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> block_tables,
                                  ffi::Buffer<ffi::S32> context_lens, ffi::Result<ffi::AnyBuffer> out,
                                  ffi::Result<ffi::Buffer<ffi::F32>> partial_out,
                                  ffi::Result<ffi::Buffer<ffi::F32>> partial_lse, float scale,
                                  int32_t partition_blocks, int32_t group_tile) {
  if (ffi::Error error = check_shapes(q, k_cache, v_cache, block_tables, context_lens); error.failure()) {
    return error;
  }
  const auto q_dims = q.dimensions(), k_dims = k_cache.dimensions();
  const int head_dim = static_cast<int>(q_dims[2]), block_size = static_cast<int>(k_dims[2]);
  if (partition_blocks < 1 || partition_blocks * block_size > kMaxPartitionTokens) {
    return ffi::Error::InvalidArgument("partition_blocks must be in [1, " +
                                       std::to_string(kMaxPartitionTokens / block_size) + "]");
  }
  if (group_tile != 1 && group_tile != 2 && group_tile != 4 && group_tile != kMaxGroupTile) {
    return ffi::Error::InvalidArgument("group_tile must be 1, 2, 4 or 8");
  }
  AttentionParams params{};
  params.q = q.untyped_data();
  params.k_cache = k_cache.untyped_data();
  params.v_cache = v_cache.untyped_data();
  params.block_tables = block_tables.typed_data();
  params.context_lens = context_lens.typed_data();
  params.out = out->untyped_data();
  params.batch = static_cast<int>(q_dims[0]);
  params.num_heads = static_cast<int>(q_dims[1]);
  params.num_kv_heads = static_cast<int>(k_dims[1]);
  params.group_size = params.num_heads / params.num_kv_heads;
  params.head_tiles = ceil_div(params.group_size, group_tile);
  params.num_cache_blocks = static_cast<int>(k_dims[0]);
  params.max_blocks = static_cast<int>(block_tables.dimensions()[1]);
  params.partition_blocks = partition_blocks;
  params.num_splits = ceil_div(params.max_blocks, partition_blocks);
  params.scale = scale;
  if (params.batch == 0) return ffi::Error::Success();
  if (params.num_splits > 1) {
    const size_t rows = static_cast<size_t>(params.batch) * params.num_heads * params.num_splits;
    if (partial_out->element_count() < rows * head_dim || partial_lse->element_count() < rows) {
      return ffi::Error::InvalidArgument("split-K workspace smaller than batch * num_heads * num_splits rows");
    }
    params.partial_out = partial_out->typed_data();
    params.partial_lse = partial_lse->typed_data();
  }

  cudaError_t status;
  switch (q.element_type()) {
    case ffi::DataType::BF16:
      status = launch_paged_attention<__nv_bfloat16>(params, head_dim, block_size, group_tile, stream);
      break;
    case ffi::DataType::F16:
      status = launch_paged_attention<__half>(params, head_dim, block_size, group_tile, stream);
      break;
    case ffi::DataType::F32:
      status = launch_paged_attention<float>(params, head_dim, block_size, group_tile, stream);
      break;
    default:
      return ffi::Error::InvalidArgument("paged_decode_attention: q dtype must be bfloat16, float16 or float32");
  }
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("paged_decode_attention launch: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace neo_kernels

// The handler only launches kernels on XLA's stream, so XLA may record it into a command buffer (CUDA graph)
// with the step's other kernels instead of launching them one by one.
XLA_FFI_DEFINE_HANDLER_SYMBOL(kPagedDecodeAttention, neo_kernels::paged_decode_attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k_cache
                                  .Arg<ffi::AnyBuffer>()          // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // context_lens
                                  .Ret<ffi::AnyBuffer>()          // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // partial_out, split-K workspace
                                  .Ret<ffi::Buffer<ffi::F32>>()  // partial_lse, split-K workspace
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("partition_blocks")
                                  .Attr<int32_t>("group_tile"),
                              {ffi::Traits::kCmdBufferCompatible});
