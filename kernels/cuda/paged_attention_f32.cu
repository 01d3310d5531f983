// The paged attention kernels for float caches (one translation unit per dtype: parallel builds).
#include "paged_attention_launch.cuh"

namespace neo_kernels {
template cudaError_t launch_paged_attention<float>(const AttentionParams&, int, int, int, cudaStream_t);
}  // namespace neo_kernels
