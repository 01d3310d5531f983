// Run-time choice among the kernels' template instantiations for one cache dtype and head_dim. Included only
// by the instantiation sources that CMake generates per (dtype, head_dim), so that nvcc compiles them in parallel.
#pragma once

#include "paged_attention_kernels.cuh"

namespace neo_kernels {

template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GROUP>
cudaError_t launch_split_and_merge(const AttentionParams& params, cudaStream_t stream) {
  const dim3 grid(params.num_splits, params.num_kv_heads * params.head_tiles, params.batch);
  paged_attention_split_kernel<T, HEAD_DIM, BLOCK_SIZE, GROUP><<<grid, kThreads, 0, stream>>>(params);
  if (params.num_splits > 1) {
    merge_splits_kernel<T, HEAD_DIM><<<dim3(params.num_heads, params.batch), HEAD_DIM, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE>
cudaError_t launch_for_group(const AttentionParams& params, int group_tile, cudaStream_t stream) {
  switch (group_tile) {
    case 1: return launch_split_and_merge<T, HEAD_DIM, BLOCK_SIZE, 1>(params, stream);
    case 2: return launch_split_and_merge<T, HEAD_DIM, BLOCK_SIZE, 2>(params, stream);
    case 4: return launch_split_and_merge<T, HEAD_DIM, BLOCK_SIZE, 4>(params, stream);
    case 8: return launch_split_and_merge<T, HEAD_DIM, BLOCK_SIZE, 8>(params, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int HEAD_DIM>
cudaError_t launch_for_head_dim(const AttentionParams& params, int block_size, int group_tile,
                                cudaStream_t stream) {
  switch (block_size) {
    case 16: return launch_for_group<T, HEAD_DIM, 16>(params, group_tile, stream);
    case 32: return launch_for_group<T, HEAD_DIM, 32>(params, group_tile, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace neo_kernels
