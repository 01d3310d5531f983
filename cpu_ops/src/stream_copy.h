// Copies into memory the CPU will not read again soon: the host KV pool's rows (a swap-out or a prefill's, read
// back a step or more later) and the pinned staging a swap-in's DMA reads. Non-temporal stores skip the
// read-for-ownership of each destination line and leave the caches to the attention's K/V stream; a host scatter
// of 256-byte rows went from 11-13 to 18-21 GB/s with them (2 threads of the CI VM). x86-64 always has SSE2.
#pragma once

#include <emmintrin.h>

#include <cstdint>
#include <cstring>

namespace neo {

inline void stream_copy(void* dst, const void* src, size_t bytes) {
  char* out = static_cast<char*>(dst);
  const char* in = static_cast<const char*>(src);
  if ((reinterpret_cast<uintptr_t>(out) & 15) != 0 || (bytes & 15) != 0) {
    std::memcpy(out, in, bytes);
    return;
  }
  for (size_t i = 0; i < bytes; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(out + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
}

// Orders this thread's streamed stores before what it publishes next (a task's completion).
inline void stream_fence() { _mm_sfence(); }

}  // namespace neo
