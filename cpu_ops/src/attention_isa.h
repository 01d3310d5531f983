// The contract between the dispatcher (attention.cc) and the per-ISA kernels
// (attention_<isa>.cc): one task attends one request's kv head over one chunk of its context.
#pragma once

#include <cstdint>

#include "attention.h"

namespace neo {

// A worker's private memory for one task; every array starts on a 64-byte boundary.
struct ChunkScratch {
  float* q = nullptr;         // [group, head_dim]: the task's q heads in fp32, unscaled
  uint16_t* q_bf16 = nullptr; // [group, head_dim]: the same rows as bf16 bits (bf16 q only)
  float* acc = nullptr;       // [group, head_dim]: unnormalized sum of p * v
  float* max = nullptr;       // [group]: running max of the scaled scores
  float* sum = nullptr;       // [group]: running sum of exp(score - max)
  float* scores = nullptr;    // [kHeadsPerPass, score_stride]: one tile's scores, then weights
  int64_t tile_tokens = 0;    // a whole number of blocks
  int64_t score_stride = 0;
};

// q heads processed together per pass over a tile; more would spill the vector registers.
constexpr int kHeadsPerPass = 8;

struct ChunkWork {
  const PagedKvCache* cache = nullptr;
  const DecodeBatch* batch = nullptr;
  int64_t req = 0;
  int64_t kv_head = 0;
  int64_t token_begin = 0;  // a multiple of block_size
  int64_t token_end = 0;    // > token_begin, <= the request's context length
  ChunkScratch scratch;
  // nullptr: write the normalized rows to batch->out. Otherwise [group, 2 + head_dim] as
  // (max, sum, acc...) for the log-sum-exp merge of a long context's chunks.
  float* partial = nullptr;
};

void attend_chunk_scalar(const ChunkWork& work);
void attend_chunk_avx2(const ChunkWork& work);
void attend_chunk_avx512(const ChunkWork& work);
void attend_chunk_avx512_bf16(const ChunkWork& work);

}  // namespace neo
