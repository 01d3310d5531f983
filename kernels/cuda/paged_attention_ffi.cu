// XLA FFI handler of the CUDA paged decode attention: checks the buffers, splits long contexts so that
// the grid fills the GPU, takes the split-K scratch from XLA's allocator and launches on XLA's stream.
#include "paged_attention_ffi.h"

#include <algorithm>
#include <string>

#include "paged_attention_kernels.cuh"

namespace ffi = xla::ffi;

namespace neo_kernels {
namespace {

// Resident CTAs per SM to aim for: the kernels hold 4-5 CTAs of 128 threads per SM at the common shapes.
constexpr int kTargetCtasPerSm = 4;

int ceil_div(int a, int b) { return (a + b - 1) / b; }

int multiprocessor_count(cudaStream_t stream) {
  int device = 0, count = 0;
  if (cudaStreamGetDevice(stream, &device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 132;
  }
  return count;
}

// KV blocks per split: enough splits for kTargetCtasPerSm CTAs per SM, at least one block per warp, and at
// most kMaxPartitionTokens tokens (the shared-memory logits).
int choose_partition_blocks(int base_ctas, int max_blocks, int block_size, int num_sms) {
  const int wanted_splits = ceil_div(num_sms * kTargetCtasPerSm, base_ctas);
  const int partition = ceil_div(max_blocks, wanted_splits);
  return std::clamp(partition, std::min(kNumWarps, max_blocks), kMaxPartitionTokens / block_size);
}

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

ffi::Error paged_decode_attention(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                                  ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                                  ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> context_lens,
                                  ffi::Result<ffi::AnyBuffer> out, float scale, int32_t partition_blocks) {
  if (ffi::Error error = check_shapes(q, k_cache, v_cache, block_tables, context_lens); error.failure()) {
    return error;
  }
  const auto q_dims = q.dimensions(), k_dims = k_cache.dimensions();
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
  params.num_cache_blocks = static_cast<int>(k_dims[0]);
  params.max_blocks = static_cast<int>(block_tables.dimensions()[1]);
  params.scale = scale;
  const int head_dim = static_cast<int>(q_dims[2]), block_size = static_cast<int>(k_dims[2]);
  if (params.batch == 0) return ffi::Error::Success();

  int group_tile = 1;
  while (group_tile < std::min(params.group_size, kMaxGroupTile)) group_tile *= 2;
  params.head_tiles = ceil_div(params.group_size, group_tile);
  const int base_ctas = params.batch * params.num_kv_heads * params.head_tiles;
  params.partition_blocks =
      partition_blocks > 0 ? std::min(partition_blocks, kMaxPartitionTokens / block_size)
                           : choose_partition_blocks(base_ctas, params.max_blocks, block_size,
                                                     multiprocessor_count(stream));
  params.num_splits = ceil_div(params.max_blocks, params.partition_blocks);
  if (params.num_splits > 1) {
    const size_t rows = static_cast<size_t>(params.batch) * params.num_heads * params.num_splits;
    const size_t out_bytes = (rows * head_dim * sizeof(float) + 255) / 256 * 256;
    auto buffer = scratch.Allocate(out_bytes + rows * sizeof(float), 256);
    if (!buffer.has_value()) return ffi::Error::Internal("paged_decode_attention: no scratch for split-K");
    params.partial_out = static_cast<float*>(*buffer);
    params.partial_lse = reinterpret_cast<float*>(static_cast<char*>(*buffer) + out_bytes);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(kPagedDecodeAttention, neo_kernels::paged_decode_attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()          // q
                                  .Arg<ffi::AnyBuffer>()          // k_cache
                                  .Arg<ffi::AnyBuffer>()          // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // block_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()  // context_lens
                                  .Ret<ffi::AnyBuffer>()          // out
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("partition_blocks"));
