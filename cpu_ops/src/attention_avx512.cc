// The kernel for AVX-512F/BW/VL CPUs without BF16 (built with -mavx512f -mavx512bw -mavx512vl).
#include "ops_avx512.h"

namespace neo {

void attend_chunk_avx512(const ChunkWork& work) { attend_chunk_converting<Avx512Ops>(work); }

}  // namespace neo
