// The kernel for AVX-512 CPUs with AVX512_BF16 (built with -mavx512bf16 on top of AVX-512F/BW/VL):
// with a bf16 cache and a bf16 q, q.k runs on vdpbf16ps (32 products per instruction, accumulated
// in fp32; the products of two bf16 values are exact). Other dtypes take the converting path.
#include "ops_avx512.h"

namespace neo {
namespace {

// The horizontal sums of four vectors at once, as lanes 0-3 (a, b, c, d): 13 instructions where four
// separate reductions take about 32, and q.k does one per head for every cached token.
inline __m128 reduce_add4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2, b0+b2, a1+a3, b1+b3
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512d ab_pairs = _mm512_castps_pd(ab), cd_pairs = _mm512_castps_pd(cd);
  __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab_pairs, cd_pairs)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(ab_pairs, cd_pairs)));  // per 128-bit lane
  abcd = _mm512_add_ps(abcd, _mm512_shuffle_f32x4(abcd, abcd, 0x4E));
  abcd = _mm512_add_ps(abcd, _mm512_shuffle_f32x4(abcd, abcd, 0xB1));
  return _mm512_castps512_ps128(abcd);
}

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
      int h = 0;
      for (; h + 4 <= heads; h += 4) {
        alignas(16) float sums[4];
        _mm_store_ps(sums, reduce_add4(acc[h], acc[h + 1], acc[h + 2], acc[h + 3]));
        for (int i = 0; i < 4; ++i) out[(h + i) * stride + t] = sums[i];
      }
      for (; h < heads; ++h) out[h * stride + t] = _mm512_reduce_add_ps(acc[h]);
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
