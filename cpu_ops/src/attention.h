// Paged decode attention over a KV cache in host memory, and the KV append that fills it.
//
// Layouts (row-major, contiguous):
//   q, out          [num_reqs, num_q_heads, head_dim]                   model dtype (f32/f16/bf16)
//   k_cache, v_cache [num_blocks, num_kv_heads, block_size, head_dim]    cache dtype (f32/f16/bf16)
//   block_tables    int32 [num_reqs, max_blocks_per_req]; context_lens int32 [num_reqs]
//   k_new, v_new    [num_tokens, num_kv_heads, head_dim] (cache dtype); slot_mapping int32 [num_tokens]
// Request r attends to tokens [0, context_lens[r]); token t lives in block block_tables[r][t / block_size]
// at offset t % block_size. A context length of 0 (a padding request) gives a zero output row; a slot
// of -1 (a padding token) is skipped by the append. Only the block table entries a request uses are
// read, so the rest of a row may hold anything.
//
// Callers check their arguments first (check_*_args from tensors, or validate() on structs they
// built) and run the op only when that returned ""; the op itself trusts them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "thread_pool.h"

namespace neo {

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3 };

const char* dtype_name(DType dtype);
size_t dtype_bytes(DType dtype);

// A dense row-major array as a binding layer sees it.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
};

struct PagedKvCache {
  void* k = nullptr;  // [num_blocks, num_kv_heads, block_size, head_dim]
  void* v = nullptr;  // [num_blocks, num_kv_heads, block_size, head_dim]
  DType dtype = DType::kBFloat16;
  int64_t num_blocks = 0;
  int64_t num_kv_heads = 0;
  int64_t block_size = 0;
  int64_t head_dim = 0;
};

struct DecodeBatch {
  const void* q = nullptr;             // [num_reqs, num_q_heads, head_dim]
  void* out = nullptr;                 // [num_reqs, num_q_heads, head_dim]
  DType dtype = DType::kBFloat16;      // of q and out
  int64_t num_reqs = 0;
  int64_t num_q_heads = 0;             // a multiple of the cache's num_kv_heads
  const int32_t* block_tables = nullptr;  // [num_reqs, max_blocks_per_req]
  int64_t max_blocks_per_req = 0;
  const int32_t* context_lens = nullptr;  // [num_reqs]
  float scale = 0.f;                   // applied to q.k; callers default it to 1/sqrt(head_dim)
};

struct KvAppend {
  const void* k_new = nullptr;            // [num_tokens, num_kv_heads, head_dim], the cache's dtype
  const void* v_new = nullptr;            // [num_tokens, num_kv_heads, head_dim], the cache's dtype
  const int32_t* slot_mapping = nullptr;  // [num_tokens]; block_id * block_size + offset, or -1
  int64_t num_tokens = 0;
};

// Shapes, dtypes and contents (context lengths, the block ids they reach, slots). On success fills
// the structs and returns ""; otherwise returns an error that names the offending argument.
std::string check_decode_args(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                              const Tensor& block_tables, const Tensor& context_lens,
                              const Tensor& out, float scale, PagedKvCache* cache,
                              DecodeBatch* batch);
std::string check_append_args(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_new,
                              const Tensor& v_new, const Tensor& slot_mapping, PagedKvCache* cache,
                              KvAppend* append);

// The same content checks on structs a caller filled itself ("" when fine).
std::string validate(const PagedKvCache& cache, const DecodeBatch& batch);
std::string validate(const PagedKvCache& cache, const KvAppend& append);

// Target tokens per chunk of a long context: NEO_CPU_CHUNK_TOKENS (default 1024), read once per process, so
// that a request's output bits depend on nothing else in its batch.
int64_t chunk_target_tokens();

// Runs on `pool` with the kernels of `isa` (at most cpu_isa_limit()). Softmax in fp32.
void paged_decode_attention(const PagedKvCache& cache, const DecodeBatch& batch, ThreadPool& pool,
                            Isa isa);
void append_kv(const PagedKvCache& cache, const KvAppend& append, ThreadPool& pool);
// Rows [begin, end) of `append`, on the calling thread.
void append_kv_rows(const PagedKvCache& cache, const KvAppend& append, int64_t begin, int64_t end);

}  // namespace neo
