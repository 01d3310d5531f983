// The kernel for AVX-512 CPUs with AVX512_BF16 (built with -mavx512bf16 on top of AVX-512F/BW/VL):
// with a bf16 cache and a bf16 q, q.k runs on vdpbf16ps (32 products per instruction, accumulated
// in fp32; the products of two bf16 values are exact). Other dtypes take the converting path.
#include "ops_avx512.h"

namespace neo {
namespace {

struct DotBf16Qk {
  static constexpr bool kUsesBf16Q = true;

  template <int heads>
  static void scores(const float*, const uint16_t* q, const Bf16* k, int64_t n, int64_t head_dim,
                     float* out, int64_t stride) {
    for (int64_t t = 0; t < n; ++t) {
      const Bf16* row = k + t * head_dim;
      __m512 acc[heads];
      for (int h = 0; h < heads; ++h) acc[h] = _mm512_setzero_ps();
      for (int64_t j = 0; j < head_dim; j += 32) {
        __m512bh key = (__m512bh)_mm512_loadu_si512(row + j);
        for (int h = 0; h < heads; ++h)
          acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)_mm512_loadu_si512(q + h * head_dim + j), key);
      }
      for (int h = 0; h < heads; ++h) out[h * stride + t] = _mm512_reduce_add_ps(acc[h]);
    }
  }
};

}  // namespace

void attend_chunk_avx512_bf16(const ChunkWork& work) {
  if (work.cache->dtype == DType::kBFloat16 && work.batch->dtype == DType::kBFloat16 &&
      work.cache->head_dim % 32 == 0) {
    attend_chunk<Avx512Ops, Bf16, DotBf16Qk>(work);
    return;
  }
  attend_chunk_converting<Avx512Ops>(work);
}

}  // namespace neo
