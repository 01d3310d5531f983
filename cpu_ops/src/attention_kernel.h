// The decode attention kernel, written once over a vector-ops type and the cache's element type,
// and instantiated by each attention_<isa>.cc under that ISA's compiler flags. Internal linkage
// throughout (see float_convert.h for why).
//
// One task: q heads [kv_head * group, (kv_head + 1) * group) of one request against tokens
// [token_begin, token_end) of its context. The tokens are walked in tiles of whole blocks; per tile
// and per pass of up to kHeadsPerPass q heads: scores = q.K for the tile, an online-softmax update
// (running max, rescaled sum and accumulator), then acc += p.V. All q heads of the kv head read
// the tile's K/V once from memory (later passes hit the cache).
//
// Ops provides: V, kLanes, zero, set1, load(const float*/Bf16*/F16*), store, add, sub, mul, fmadd, max,
// reduce_add, reduce_max, exp. Qk provides scores<heads>(...) and kUsesBf16Q.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention_isa.h"
#include "float_convert.h"

namespace neo {
namespace {

// Cache element tags, so Ops::load can overload on the stored format.
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

// exp(x) for x <= 0 in fp32 (relative error ~1e-7; below -87 it returns ~2^-126, not 0):
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7.
template <class Ops>
typename Ops::V vector_exp(typename Ops::V x) {
  using V = typename Ops::V;
  x = Ops::max(x, Ops::set1(-87.0f));
  V n = Ops::round(Ops::mul(x, Ops::set1(1.44269504088896341f)));
  V r = Ops::fmadd(n, Ops::set1(-0.693145751953125f), x);  // ln2 split in two for exactness
  r = Ops::fmadd(n, Ops::set1(-1.42860682030941723e-6f), r);
  V p = Ops::set1(1.0f / 5040);
  p = Ops::fmadd(p, r, Ops::set1(1.0f / 720));
  p = Ops::fmadd(p, r, Ops::set1(1.0f / 120));
  p = Ops::fmadd(p, r, Ops::set1(1.0f / 24));
  p = Ops::fmadd(p, r, Ops::set1(1.0f / 6));
  p = Ops::fmadd(p, r, Ops::set1(0.5f));
  p = Ops::fmadd(p, r, Ops::set1(1.0f));
  p = Ops::fmadd(p, r, Ops::set1(1.0f));
  return Ops::mul(p, Ops::pow2(n));
}

// Blocks are scattered in the pool, so the hardware prefetchers stop at every block's end. While a
// block's K is scored, its V (for the tile's p.V pass) and the K of the block kPrefetchBlocks ahead are
// prefetched into L2, and the next block's K into L1, in kPrefetchSlices slices spread over the block's
// rows: issued all at once at the block's start, the prefetches queued the cores' loads behind them.
// Measured on a 2-core Zen 4 VM, 64-256 requests x 1k-4k context out of DRAM: one block ahead at once
// 6.7-7.1 GB/s per core, six ahead at once 9.1-9.2, spread over the rows 13.0-13.4 at two blocks ahead
// (7.4 at one, 11.7-12.4 at four, 10.4 at ten); benchmarks/results/cpu_attention_prefetch.md.
constexpr int64_t kPrefetchBlocks = 2;
constexpr int64_t kPrefetchSlices = 16;

template <int kLocality>
inline void prefetch_bytes(const void* ptr, int64_t bytes) {
  const char* bytes_ptr = static_cast<const char*>(ptr);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(bytes_ptr + offset, 0, kLocality);
}

// Scores of `heads` q heads against n cache rows, with K converted to fp32 lane by lane.
template <class Ops, class KvT>
struct ConvertingQk {
  static constexpr bool kUsesBf16Q = false;

  template <int heads>
  static void scores(const float* q, const uint16_t*, const KvT* k, int64_t n, int64_t head_dim,
                     float* out, int64_t stride) {
    for (int64_t t = 0; t < n; ++t) {
      const KvT* row = k + t * head_dim;
      typename Ops::V acc[heads];
      for (int h = 0; h < heads; ++h) acc[h] = Ops::zero();
      for (int64_t j = 0; j < head_dim; j += Ops::kLanes) {
        typename Ops::V key = Ops::load(row + j);
        for (int h = 0; h < heads; ++h) acc[h] = Ops::fmadd(Ops::load(q + h * head_dim + j), key, acc[h]);
      }
      for (int h = 0; h < heads; ++h) out[h * stride + t] = Ops::reduce_add(acc[h]);
    }
  }
};

// row[i] *= scale; returns the max.
template <class Ops>
float scale_and_max(float* row, int64_t n, float scale) {
  int64_t i = 0;
  float best = -std::numeric_limits<float>::infinity();
  if (n >= Ops::kLanes) {
    typename Ops::V vmax = Ops::set1(best), vscale = Ops::set1(scale);
    for (; i + Ops::kLanes <= n; i += Ops::kLanes) {
      typename Ops::V x = Ops::mul(Ops::load(row + i), vscale);
      Ops::store(row + i, x);
      vmax = Ops::max(vmax, x);
    }
    best = Ops::reduce_max(vmax);
  }
  for (; i < n; ++i) {
    row[i] *= scale;
    best = row[i] > best ? row[i] : best;
  }
  return best;
}

// row[i] = exp(row[i] - max); returns the sum.
template <class Ops>
float exp_and_sum(float* row, int64_t n, float max) {
  int64_t i = 0;
  float total = 0.f;
  if (n >= Ops::kLanes) {
    typename Ops::V vsum = Ops::zero(), vmax = Ops::set1(max);
    for (; i + Ops::kLanes <= n; i += Ops::kLanes) {
      typename Ops::V e = Ops::exp(Ops::sub(Ops::load(row + i), vmax));
      Ops::store(row + i, e);
      vsum = Ops::add(vsum, e);
    }
    total = Ops::reduce_add(vsum);
  }
  for (; i < n; ++i) {
    row[i] = std::exp(row[i] - max);
    total += row[i];
  }
  return total;
}

template <class KvT>
struct RequestView {
  const KvT* k;
  const KvT* v;
  const int32_t* block_table;  // this request's row
  int64_t kv_heads, block_size, head_dim, kv_head;

  int64_t block_offset(int64_t token) const {
    return ((static_cast<int64_t>(block_table[token / block_size]) * kv_heads + kv_head) * block_size) *
           head_dim;
  }
};

template <class Ops, class KvT, class Qk, int heads>
void attend_tile(const RequestView<KvT>& view, const ChunkScratch& s, int64_t first_head,
                 int64_t begin, int64_t end, int64_t token_end, float scale) {
  const int64_t d = view.head_dim, bs = view.block_size, stride = s.score_stride;
  const int64_t block_bytes = bs * d * static_cast<int64_t>(sizeof(KvT));
  float* scores = s.scores;
  for (int64_t t0 = begin; t0 < end; t0 += bs) {
    const int64_t offset = view.block_offset(t0), n = end - t0 < bs ? end - t0 : bs;
    auto k_block = [&](int64_t token) {
      return token < token_end ? reinterpret_cast<const char*>(view.k + view.block_offset(token)) : nullptr;
    };
    const char* v_block = reinterpret_cast<const char*>(view.v + offset);
    const char* k_ahead = k_block(t0 + kPrefetchBlocks * bs);
    const char* k_next = k_block(t0 + bs);
    const int64_t rows_per_slice = (n + kPrefetchSlices - 1) / kPrefetchSlices;
    const int64_t slice = block_bytes / kPrefetchSlices;
    for (int64_t row = 0, at = 0; row < n; row += rows_per_slice, at += slice) {
      if (first_head == 0) {  // later passes over the same block find it in cache
        prefetch_bytes<2>(v_block + at, slice);
        if (k_ahead != nullptr) prefetch_bytes<2>(k_ahead + at, slice);
        if (k_next != nullptr) prefetch_bytes<3>(k_next + at, slice);
      }
      const int64_t rows = n - row < rows_per_slice ? n - row : rows_per_slice;
      Qk::template scores<heads>(s.q + first_head * d, s.q_bf16 + first_head * d, view.k + offset + row * d,
                                 rows, d, scores + (t0 - begin) + row, stride);
    }
  }
  for (int h = 0; h < heads; ++h) {
    const int64_t head = first_head + h;
    float* row = scores + h * stride;
    float tile_max = scale_and_max<Ops>(row, end - begin, scale);
    float old_max = s.max[head];
    float new_max = tile_max > old_max ? tile_max : old_max;
    float rescale = std::exp(old_max - new_max);  // 0 on the first tile (old_max = -inf)
    s.sum[head] = s.sum[head] * rescale + exp_and_sum<Ops>(row, end - begin, new_max);
    s.max[head] = new_max;
    if (rescale != 1.f) {
      float* acc = s.acc + head * d;
      for (int64_t j = 0; j < d; j += Ops::kLanes)
        Ops::store(acc + j, Ops::mul(Ops::load(acc + j), Ops::set1(rescale)));
    }
  }
  for (int64_t t0 = begin; t0 < end; t0 += bs) {
    const KvT* v = view.v + view.block_offset(t0);
    const float* p = scores + (t0 - begin);
    int64_t n = end - t0 < bs ? end - t0 : bs;
    for (int64_t j = 0; j < d; j += Ops::kLanes) {
      typename Ops::V out[heads];
      for (int h = 0; h < heads; ++h) out[h] = Ops::load(s.acc + (first_head + h) * d + j);
      for (int64_t t = 0; t < n; ++t) {
        typename Ops::V value = Ops::load(v + t * d + j);
        for (int h = 0; h < heads; ++h) out[h] = Ops::fmadd(Ops::set1(p[h * stride + t]), value, out[h]);
      }
      for (int h = 0; h < heads; ++h) Ops::store(s.acc + (first_head + h) * d + j, out[h]);
    }
  }
}

template <class Ops, class KvT, class Qk>
void attend_tile_heads(int heads, const RequestView<KvT>& view, const ChunkScratch& s,
                       int64_t first_head, int64_t begin, int64_t end, int64_t token_end, float scale) {
  switch (heads) {
    case 1: return attend_tile<Ops, KvT, Qk, 1>(view, s, first_head, begin, end, token_end, scale);
    case 2: return attend_tile<Ops, KvT, Qk, 2>(view, s, first_head, begin, end, token_end, scale);
    case 3: return attend_tile<Ops, KvT, Qk, 3>(view, s, first_head, begin, end, token_end, scale);
    case 4: return attend_tile<Ops, KvT, Qk, 4>(view, s, first_head, begin, end, token_end, scale);
    case 5: return attend_tile<Ops, KvT, Qk, 5>(view, s, first_head, begin, end, token_end, scale);
    case 6: return attend_tile<Ops, KvT, Qk, 6>(view, s, first_head, begin, end, token_end, scale);
    case 7: return attend_tile<Ops, KvT, Qk, 7>(view, s, first_head, begin, end, token_end, scale);
    default: return attend_tile<Ops, KvT, Qk, kHeadsPerPass>(view, s, first_head, begin, end, token_end, scale);
  }
}

template <class Ops, class KvT, class Qk>
void attend_chunk(const ChunkWork& work) {
  const PagedKvCache& cache = *work.cache;
  const DecodeBatch& batch = *work.batch;
  const ChunkScratch& s = work.scratch;
  const int64_t d = cache.head_dim, group = batch.num_q_heads / cache.num_kv_heads;
  const int64_t q_offset = (work.req * batch.num_q_heads + work.kv_head * group) * d;
  load_row_f32(batch.dtype, batch.q, q_offset, group * d, s.q);
  if (Qk::kUsesBf16Q)
    std::memcpy(s.q_bf16, static_cast<const uint16_t*>(batch.q) + q_offset, group * d * sizeof(uint16_t));
  for (int64_t h = 0; h < group; ++h) {
    s.max[h] = -std::numeric_limits<float>::infinity();
    s.sum[h] = 0.f;
  }
  std::memset(s.acc, 0, group * d * sizeof(float));

  RequestView<KvT> view{static_cast<const KvT*>(cache.k), static_cast<const KvT*>(cache.v),
                        batch.block_tables + work.req * batch.max_blocks_per_req,
                        cache.num_kv_heads, cache.block_size, d, work.kv_head};
  for (int64_t begin = work.token_begin; begin < work.token_end; begin += s.tile_tokens) {
    int64_t end = begin + s.tile_tokens < work.token_end ? begin + s.tile_tokens : work.token_end;
    for (int64_t first = 0; first < group; first += kHeadsPerPass) {
      int heads = static_cast<int>(group - first < kHeadsPerPass ? group - first : kHeadsPerPass);
      attend_tile_heads<Ops, KvT, Qk>(heads, view, s, first, begin, end, work.token_end, batch.scale);
    }
  }

  for (int64_t h = 0; h < group; ++h) {
    if (work.partial != nullptr) {
      float* partial = work.partial + h * (2 + d);
      partial[0] = s.max[h];
      partial[1] = s.sum[h];
      std::memcpy(partial + 2, s.acc + h * d, d * sizeof(float));
    } else {
      store_row(batch.dtype, batch.out, q_offset + h * d, s.acc + h * d, d, 1.f / s.sum[h]);
    }
  }
}

// The kernel for whichever element type the cache holds, with K converted to fp32.
template <class Ops>
void attend_chunk_converting(const ChunkWork& work) {
  switch (work.cache->dtype) {
    case DType::kFloat32: return attend_chunk<Ops, float, ConvertingQk<Ops, float>>(work);
    case DType::kFloat16: return attend_chunk<Ops, F16, ConvertingQk<Ops, F16>>(work);
    case DType::kBFloat16: return attend_chunk<Ops, Bf16, ConvertingQk<Ops, Bf16>>(work);
    case DType::kInt32: return;
  }
}

}  // namespace
}  // namespace neo
