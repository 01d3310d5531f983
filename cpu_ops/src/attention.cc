// Splits a decode batch into (request, kv head, chunk) tasks, runs them on the pool with the kernel
// of the chosen ISA, merges the chunks of long contexts by log-sum-exp, and appends new K/V rows.
//
// A request's chunks depend only on its own context length and fixed constants, and its chunks are
// merged in order, so its output bits are the same whatever else shares the call and however many
// threads run it (the engine relies on this for reproducible batches).
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_isa.h"
#include "float_convert.h"
#include "stream_copy.h"

namespace neo {
namespace {

// Tokens per online-softmax tile (rounded to whole blocks).
constexpr int64_t kTileTokens = 128;
constexpr int64_t kFloatsPerLine = 16;

using ChunkKernel = void (*)(const ChunkWork&);

ChunkKernel chunk_kernel(Isa isa, int64_t head_dim) {
  if (isa >= Isa::kAvx512Bf16 && head_dim % 16 == 0) return attend_chunk_avx512_bf16;
  if (isa >= Isa::kAvx512 && head_dim % 16 == 0) return attend_chunk_avx512;
  if (isa >= Isa::kAvx2 && head_dim % 8 == 0) return attend_chunk_avx2;
  return attend_chunk_scalar;
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Tokens per chunk of a context of `length` (> 0) tokens: near-equal whole-block chunks of about
// chunk_target_tokens() each.
int64_t chunk_tokens(int64_t length, int64_t block_size) {
  const int64_t target = chunk_target_tokens();
  const int64_t num_chunks = (length + target - 1) / target;
  return round_up((length + num_chunks - 1) / num_chunks, block_size);
}

struct ChunkTask {
  int64_t req, kv_head, begin, end;
  int64_t partial;  // index of its partial slot, or -1 when it is the request's only chunk
};

struct MergeTask {
  int64_t req, kv_head, first_partial, num_chunks;
};

// Per calling thread, reused across calls so that steady-state calls allocate nothing.
struct Workspace {
  std::vector<float> scratch;
  std::vector<float> partials;
  std::vector<ChunkTask> tasks;
  std::vector<MergeTask> merges;
};

float* align_line(float* p) {
  auto address = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<float*>(round_up(static_cast<int64_t>(address), 64));
}

// Lays one worker's ChunkScratch out from `base` (every array on its own cache lines); returns
// the floats it takes.
int64_t carve_scratch(float* base, int64_t group, int64_t head_dim, int64_t block_size, ChunkScratch* s) {
  const int64_t rows = round_up(group * head_dim, kFloatsPerLine);
  const int64_t heads = round_up(group, kFloatsPerLine);
  s->tile_tokens = round_up(std::max(kTileTokens, block_size), block_size);
  s->score_stride = round_up(s->tile_tokens, kFloatsPerLine);
  if (base != nullptr) {
    s->q = base;
    s->q_bf16 = reinterpret_cast<uint16_t*>(base + rows);  // half of its floats are used
    s->acc = base + 2 * rows;
    s->max = base + 3 * rows;
    s->sum = base + 3 * rows + heads;
    s->scores = base + 3 * rows + 2 * heads;
  }
  return 3 * rows + 2 * heads + kHeadsPerPass * s->score_stride;
}

void merge_chunks(const MergeTask& merge, const float* partials, const PagedKvCache& cache,
                  const DecodeBatch& batch, float* acc) {
  const int64_t d = cache.head_dim, group = batch.num_q_heads / cache.num_kv_heads;
  for (int64_t h = 0; h < group; ++h) {
    float max = -INFINITY;
    for (int64_t c = 0; c < merge.num_chunks; ++c)
      max = std::max(max, partials[((merge.first_partial + c) * group + h) * (2 + d)]);
    float sum = 0.f;
    std::fill(acc, acc + d, 0.f);
    for (int64_t c = 0; c < merge.num_chunks; ++c) {
      const float* part = partials + ((merge.first_partial + c) * group + h) * (2 + d);
      const float weight = std::exp(part[0] - max);
      sum += weight * part[1];
      for (int64_t j = 0; j < d; ++j) acc[j] += weight * part[2 + j];
    }
    const int64_t offset = (merge.req * batch.num_q_heads + merge.kv_head * group + h) * d;
    store_row(batch.dtype, batch.out, offset, acc, d, 1.f / sum);
  }
}

}  // namespace

// Long enough that merging and dispatch cost little next to reading a chunk's K/V, short enough that one
// request of a few thousand tokens spreads over every core. A 1k context is then one task, no merge: on the
// H200 host 1024 read 6-30% faster than 512 in issue 4's goal cells at 9f42652, 10-12% at 256 requests and
// level at 64 at 9d4d8ba (benchmarks/results/cpu_attention_h200_host.md).
int64_t chunk_target_tokens() {
  static const int64_t tokens = env_int("NEO_CPU_CHUNK_TOKENS", 1024);
  return tokens;
}

void paged_decode_attention(const PagedKvCache& cache, const DecodeBatch& batch, ThreadPool& pool, Isa isa) {
  static thread_local Workspace ws;
  const int64_t group = batch.num_q_heads / cache.num_kv_heads, d = cache.head_dim;
  const int64_t row_bytes = batch.num_q_heads * d * static_cast<int64_t>(dtype_bytes(batch.dtype));

  ws.tasks.clear();
  ws.merges.clear();
  int64_t num_partials = 0;
  for (int64_t r = 0; r < batch.num_reqs; ++r) {
    const int64_t length = batch.context_lens[r];
    if (length == 0) {
      std::memset(static_cast<char*>(batch.out) + r * row_bytes, 0, row_bytes);
      continue;
    }
    const int64_t chunk = chunk_tokens(length, cache.block_size);
    const int64_t num_chunks = (length + chunk - 1) / chunk;
    for (int64_t h = 0; h < cache.num_kv_heads; ++h) {
      if (num_chunks > 1) ws.merges.push_back(MergeTask{r, h, num_partials, num_chunks});
      for (int64_t c = 0; c < num_chunks; ++c) {
        int64_t partial = num_chunks > 1 ? num_partials++ : -1;
        ws.tasks.push_back(ChunkTask{r, h, c * chunk, std::min(length, (c + 1) * chunk), partial});
      }
    }
  }
  // Longest first, so that the last tasks handed out are short ones.
  std::stable_sort(ws.tasks.begin(), ws.tasks.end(), [](const ChunkTask& a, const ChunkTask& b) {
    return a.end - a.begin > b.end - b.begin;
  });

  ChunkScratch layout;
  const int64_t scratch_floats = carve_scratch(nullptr, group, d, cache.block_size, &layout);
  ws.scratch.resize(pool.num_threads() * scratch_floats + kFloatsPerLine);
  ws.partials.resize(num_partials * group * (2 + d));
  float* scratch_base = align_line(ws.scratch.data());
  float* partials = ws.partials.data();
  const ChunkKernel kernel = chunk_kernel(isa, d);
  const std::vector<ChunkTask>& tasks = ws.tasks;

  pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i, int worker) {
    const ChunkTask& task = tasks[i];
    ChunkWork work;
    work.cache = &cache;
    work.batch = &batch;
    work.req = task.req;
    work.kv_head = task.kv_head;
    work.token_begin = task.begin;
    work.token_end = task.end;
    carve_scratch(scratch_base + worker * scratch_floats, group, d, cache.block_size, &work.scratch);
    work.partial = task.partial < 0 ? nullptr : partials + task.partial * group * (2 + d);
    kernel(work);
  });
  const std::vector<MergeTask>& merges = ws.merges;
  pool.parallel_for(static_cast<int64_t>(merges.size()), [&](int64_t i, int worker) {
    merge_chunks(merges[i], partials, cache, batch, scratch_base + worker * scratch_floats);
  });
}

void append_kv_rows(const PagedKvCache& cache, const KvAppend& append, int64_t begin, int64_t end) {
  const int64_t row_bytes = cache.head_dim * static_cast<int64_t>(dtype_bytes(cache.dtype));
  for (int64_t i = begin; i < end; ++i) {
    const int32_t slot = append.slot_mapping[i];
    if (slot < 0) continue;
    const int64_t block = slot / cache.block_size, offset = slot % cache.block_size;
    for (int64_t h = 0; h < cache.num_kv_heads; ++h) {
      const int64_t dst = ((block * cache.num_kv_heads + h) * cache.block_size + offset) * row_bytes;
      const int64_t src = (i * cache.num_kv_heads + h) * row_bytes;
      stream_copy(static_cast<char*>(cache.k) + dst, static_cast<const char*>(append.k_new) + src, row_bytes);
      stream_copy(static_cast<char*>(cache.v) + dst, static_cast<const char*>(append.v_new) + src, row_bytes);
    }
  }
  stream_fence();
}

void append_kv(const PagedKvCache& cache, const KvAppend& append, ThreadPool& pool) {
  // Small appends (a decode step's rows) run on the caller alone; a prefill's are spread out.
  constexpr int64_t kTokensPerTask = 64;
  pool.parallel_for((append.num_tokens + kTokensPerTask - 1) / kTokensPerTask, [&](int64_t task, int) {
    append_kv_rows(cache, append, task * kTokensPerTask, std::min(append.num_tokens, (task + 1) * kTokensPerTask));
  });
}

}  // namespace neo
