// The paged attention kernels for __nv_bfloat16 caches (one translation unit per dtype: parallel builds).
#include "paged_attention_launch.cuh"

namespace neo_kernels {
template cudaError_t launch_paged_attention<__nv_bfloat16>(const AttentionParams&, int, int, int, cudaStream_t);
}  // namespace neo_kernels
