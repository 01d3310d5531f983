// Flash-decoding paged attention: one CTA per (split of the context, kv head tile, request).
//
// A CTA attends the GROUP query heads that share one kv head to the KV blocks of one partition of the
// request's context, so each K/V byte is read once. Warps take whole KV blocks in turn; inside a warp,
// `kLanesPerToken` lanes cover one token's head_dim with 16-byte loads, so a warp reads `kTokensPerPass`
// tokens per load and issues every load of a block before using any. Phase 1 writes the partition's
// logits to shared memory, phase 2 accumulates softmax(logits) x V in registers. With one split the CTA
// writes the output; otherwise it writes a normalized partial and its log-sum-exp, merged by
// merge_splits_kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace neo_kernels {

constexpr int kWarpSize = 32;
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * kWarpSize;
constexpr int kMaxPartitionTokens = 512;
constexpr int kMaxGroupTile = 8;

struct AttentionParams {
  const void* q;                // [batch, num_heads, head_dim]
  const void* k_cache;          // [num_cache_blocks, num_kv_heads, block_size, head_dim]
  const void* v_cache;          // same as k_cache
  const int32_t* block_tables;  // [batch, max_blocks]
  const int32_t* context_lens;  // [batch]
  void* out;                    // [batch, num_heads, head_dim]
  float* partial_out;           // [batch, num_heads, num_splits, head_dim], used when num_splits > 1
  float* partial_lse;           // [batch, num_heads, num_splits]
  int batch, num_heads, num_kv_heads, group_size, head_tiles;
  int num_cache_blocks, max_blocks, partition_blocks, num_splits;
  float scale;
};

// 16 bytes of T <-> floats.
template <typename T>
struct Vec16;

template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* out) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};

template <>
struct Vec16<__half> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* out) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
      out[2 * i] = pair.x;
      out[2 * i + 1] = pair.y;
    }
  }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half(x); }
};

template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void to_float(const uint4& raw, float* out) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GROUP>
__global__ void __launch_bounds__(kThreads) paged_attention_split_kernel(AttentionParams p) {
  using Vec = Vec16<T>;
  constexpr int kElems = Vec::kElems;
  constexpr int kLanesPerToken = HEAD_DIM / kElems;
  constexpr int kTokensPerPass = kWarpSize / kLanesPerToken;
  constexpr int kPasses = BLOCK_SIZE / kTokensPerPass;
  static_assert(kLanesPerToken <= kWarpSize && kWarpSize % kLanesPerToken == 0, "head_dim per warp");
  static_assert(BLOCK_SIZE % kTokensPerPass == 0, "block_size per pass");
  constexpr int kLogitsFloats = GROUP * kMaxPartitionTokens;
  constexpr int kWarpAccFloats = kNumWarps * GROUP * HEAD_DIM;
  // Phase 1-2 logits [GROUP][kMaxPartitionTokens]; after phase 2, per-warp accumulators [warp][GROUP][HEAD_DIM].
  __shared__ float shared[kLogitsFloats > kWarpAccFloats ? kLogitsFloats : kWarpAccFloats];
  __shared__ int block_ids[kMaxPartitionTokens / BLOCK_SIZE];
  __shared__ float head_max[GROUP], head_sum[GROUP];

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / p.head_tiles;
  const int first_head_in_group = (blockIdx.y % p.head_tiles) * GROUP;
  const int request = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int lane_in_token = lane % kLanesPerToken, token_in_pass = lane / kLanesPerToken;
  const int num_heads_here = min(GROUP, p.group_size - first_head_in_group);
  const int64_t first_out_row = static_cast<int64_t>(request) * p.num_heads + kv_head * p.group_size +
                                first_head_in_group;

  const int context_len = p.context_lens[request];
  const int first_block = split * p.partition_blocks;
  const int num_partition_blocks =
      min(p.partition_blocks, (context_len + BLOCK_SIZE - 1) / BLOCK_SIZE - first_block);
  if (num_partition_blocks <= 0) {  // a padding row or a split past this request's context
    for (int i = threadIdx.x; i < num_heads_here * HEAD_DIM; i += kThreads) {
      const int64_t row = first_out_row + i / HEAD_DIM;
      if (p.num_splits == 1) {
        static_cast<T*>(p.out)[row * HEAD_DIM + i % HEAD_DIM] = Vec::from_float(0.f);
      } else if (i % HEAD_DIM == 0) {
        p.partial_lse[row * p.num_splits + split] = -INFINITY;
      }
    }
    return;
  }
  const int first_token = first_block * BLOCK_SIZE;
  const int num_tokens = min(num_partition_blocks * BLOCK_SIZE, context_len - first_token);

  const int32_t* table = p.block_tables + static_cast<int64_t>(request) * p.max_blocks + first_block;
  for (int i = threadIdx.x; i < num_partition_blocks; i += kThreads) {
    block_ids[i] = min(max(table[i], 0), p.num_cache_blocks - 1);  // out-of-range ids clamp, as jnp indexing
  }
  float q[GROUP][kElems];
  const T* q_base = static_cast<const T*>(p.q) + first_out_row * HEAD_DIM + lane_in_token * kElems;
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    if (g < num_heads_here) {
      Vec::to_float(__ldg(reinterpret_cast<const uint4*>(q_base + g * HEAD_DIM)), q[g]);
#pragma unroll
      for (int e = 0; e < kElems; ++e) q[g][e] *= p.scale;
    } else {
#pragma unroll
      for (int e = 0; e < kElems; ++e) q[g][e] = 0.f;
    }
  }
  __syncthreads();

  constexpr int64_t kHeadStride = BLOCK_SIZE * HEAD_DIM;
  const int64_t block_stride = p.num_kv_heads * kHeadStride;
  const int64_t lane_offset = kv_head * kHeadStride + token_in_pass * HEAD_DIM + lane_in_token * kElems;
  const T* k_cache = static_cast<const T*>(p.k_cache) + lane_offset;
  const T* v_cache = static_cast<const T*>(p.v_cache) + lane_offset;
  float* logits = shared;

  for (int i = warp; i < num_partition_blocks; i += kNumWarps) {
    const T* k_block = k_cache + block_ids[i] * block_stride;
    uint4 k_raw[kPasses];
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      k_raw[pass] = __ldg(reinterpret_cast<const uint4*>(k_block + pass * kTokensPerPass * HEAD_DIM));
    }
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      float k[kElems];
      Vec::to_float(k_raw[pass], k);
      float dots[GROUP];
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        dots[g] = 0.f;
#pragma unroll
        for (int e = 0; e < kElems; ++e) dots[g] = fmaf(q[g][e], k[e], dots[g]);
      }
#pragma unroll
      for (int offset = kLanesPerToken / 2; offset > 0; offset /= 2) {
#pragma unroll
        for (int g = 0; g < GROUP; ++g) dots[g] += __shfl_xor_sync(0xffffffffu, dots[g], offset);
      }
      const int token = i * BLOCK_SIZE + pass * kTokensPerPass + token_in_pass;
      if (lane_in_token == 0) {
#pragma unroll
        for (int g = 0; g < GROUP; ++g) logits[g * kMaxPartitionTokens + token] = dots[g];
      }
    }
  }
  __syncthreads();

  for (int g = warp; g < GROUP; g += kNumWarps) {
    float* row = logits + g * kMaxPartitionTokens;
    float row_max = -INFINITY;
    for (int t = lane; t < num_tokens; t += kWarpSize) row_max = fmaxf(row_max, row[t]);
    row_max = warp_max(row_max);
    float row_sum = 0.f;
    for (int t = lane; t < num_tokens; t += kWarpSize) {
      const float weight = __expf(row[t] - row_max);
      row[t] = weight;
      row_sum += weight;
    }
    row_sum = warp_sum(row_sum);
    if (lane == 0) {
      head_max[g] = row_max;
      head_sum[g] = row_sum;
    }
  }
  __syncthreads();

  float acc[GROUP][kElems];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[g][e] = 0.f;
  }
  for (int i = warp; i < num_partition_blocks; i += kNumWarps) {
    const T* v_block = v_cache + block_ids[i] * block_stride;
    uint4 v_raw[kPasses];
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      v_raw[pass] = __ldg(reinterpret_cast<const uint4*>(v_block + pass * kTokensPerPass * HEAD_DIM));
    }
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int token = i * BLOCK_SIZE + pass * kTokensPerPass + token_in_pass;
      if (token < num_tokens) {  // slots past the context may hold anything, NaN included
        float v[kElems];
        Vec::to_float(v_raw[pass], v);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float weight = logits[g * kMaxPartitionTokens + token];
#pragma unroll
          for (int e = 0; e < kElems; ++e) acc[g][e] = fmaf(weight, v[e], acc[g][e]);
        }
      }
    }
  }
#pragma unroll
  for (int offset = kLanesPerToken; offset < kWarpSize; offset *= 2) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
    }
  }
  __syncthreads();  // logits are dead; their memory takes the per-warp accumulators
  float* warp_acc = shared;
  if (token_in_pass == 0) {
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        warp_acc[(warp * GROUP + g) * HEAD_DIM + lane_in_token * kElems + e] = acc[g][e];
      }
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < num_heads_here * HEAD_DIM; i += kThreads) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) total += warp_acc[(w * GROUP + g) * HEAD_DIM + d];
    const float value = total / head_sum[g];
    const int64_t row = first_out_row + g;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[row * HEAD_DIM + d] = Vec::from_float(value);
    } else {
      p.partial_out[(row * p.num_splits + split) * HEAD_DIM + d] = value;
      if (d == 0) p.partial_lse[row * p.num_splits + split] = head_max[g] + logf(head_sum[g]);
    }
  }
}

// One CTA per (query head, request), one thread per output element: out = sum_s w_s o_s / sum_s w_s with
// w_s = exp(lse_s - max lse). Splits past the request's context carry lse = -inf and are skipped.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM) merge_splits_kernel(AttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.y) * p.num_heads + blockIdx.x;
  const int d = threadIdx.x;
  const float* lse = p.partial_lse + row * p.num_splits;
  float max_lse = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) max_lse = fmaxf(max_lse, lse[s]);
  float value = 0.f;
  if (max_lse != -INFINITY) {
    float weight_sum = 0.f, weighted = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      if (lse[s] == -INFINITY) continue;
      const float weight = __expf(lse[s] - max_lse);
      weight_sum += weight;
      weighted = fmaf(weight, p.partial_out[(row * p.num_splits + s) * HEAD_DIM + d], weighted);
    }
    value = weighted / weight_sum;
  }
  static_cast<T*>(p.out)[row * HEAD_DIM + d] = Vec16<T>::from_float(value);
}

// Launches the split kernel (and the merge when num_splits > 1) for one cache dtype and head_dim; block_size
// 16 or 32, group_tile 1, 2, 4 or 8 (cudaErrorInvalidValue otherwise). Instantiated per (T, HEAD_DIM) in the
// sources that kernels/CMakeLists.txt generates.
template <typename T, int HEAD_DIM>
cudaError_t launch_for_head_dim(const AttentionParams& params, int block_size, int group_tile, cudaStream_t stream);

// The same for head_dim 64 or 128.
template <typename T>
cudaError_t launch_paged_attention(const AttentionParams& params, int head_dim, int block_size, int group_tile,
                                   cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch_for_head_dim<T, 64>(params, block_size, group_tile, stream);
    case 128: return launch_for_head_dim<T, 128>(params, block_size, group_tile, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace neo_kernels
