#include "handoff_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "stream_copy.h"

namespace neo {
namespace {

bool to_dtype(ffi::DataType type, DType* dtype) {
  switch (type) {
    case ffi::DataType::F32: *dtype = DType::kFloat32; return true;
    case ffi::DataType::F16: *dtype = DType::kFloat16; return true;
    case ffi::DataType::BF16: *dtype = DType::kBFloat16; return true;
    case ffi::DataType::S32: *dtype = DType::kInt32; return true;
    default: return false;
  }
}

std::string shape_text(ffi::AnyBuffer buffer) {
  std::string text = "[";
  for (int64_t dim : buffer.dimensions()) text += (text.size() > 1 ? ", " : "") + std::to_string(dim);
  return text + "]";
}

// "" when buffer has the dtype and the dims (-1: any size); else "op: name must be ...".
std::string expect(const char* op, const char* name, ffi::AnyBuffer buffer, DType dtype,
                   std::initializer_list<int64_t> dims, const char* dims_text) {
  DType actual;
  bool known = to_dtype(buffer.element_type(), &actual);
  bool match = known && actual == dtype && buffer.dimensions().size() == dims.size();
  if (match) {
    auto it = buffer.dimensions().begin();
    for (int64_t dim : dims) match = match && (dim < 0 || dim == *it++);
  }
  if (match) return "";
  return std::string(op) + ": " + name + " must be " + dtype_name(dtype) + " " + dims_text +
         ", got " + (known ? dtype_name(actual) : "an unsupported dtype") + " " + shape_text(buffer);
}

std::string layer_index(const char* op, const HostKvPool& pool, const int32_t* layer,
                        int64_t* index) {
  *index = *layer;
  if (*index >= 0 && *index < pool.num_layers()) return "";
  return std::string(op) + ": layer " + std::to_string(*index) + " is outside [0, " +
         std::to_string(pool.num_layers()) + ")";
}

struct LayerRun {
  int64_t layer, begin, end;  // rows [begin, end) of one layer
};

// The rows as runs of one layer each (a single run when the layer is shared); "" or the error naming the first
// layer outside the pool.
std::string layer_runs(const char* op, const HostKvPool& pool, const KvRowsOperands& operands,
                       std::vector<LayerRun>* runs) {
  if (!operands.layer_per_row) {
    int64_t layer = 0;
    std::string error = layer_index(op, pool, operands.layer, &layer);
    runs->push_back({layer, 0, operands.num_rows});
    return error;
  }
  for (int64_t row = 0; row < operands.num_rows; ++row) {
    int64_t layer = operands.layer[row];
    if (layer < 0 || layer >= pool.num_layers())
      return std::string(op) + ": layer[" + std::to_string(row) + "] = " + std::to_string(layer) +
             " is outside [0, " + std::to_string(pool.num_layers()) + ")";
    if (runs->empty() || runs->back().layer != layer) runs->push_back({layer, row, row});
    runs->back().end = row + 1;
  }
  return "";
}

// Rows [begin, end) of k_rows / v_rows read from their slots (slot -1: zeros), on the calling thread.
void gather_rows(const PagedKvCache& cache, const int32_t* slot_mapping, int64_t begin, int64_t end,
                 char* k_rows, char* v_rows) {
  size_t head_bytes = cache.head_dim * dtype_bytes(cache.dtype);
  size_t row_bytes = cache.num_kv_heads * head_bytes;
  for (int64_t row = begin; row < end; ++row) {
    int64_t slot = slot_mapping[row];
    for (int64_t head = 0; head < cache.num_kv_heads; ++head) {
      char* k_dst = k_rows + row * row_bytes + head * head_bytes;
      char* v_dst = v_rows + row * row_bytes + head * head_bytes;
      if (slot < 0) {
        std::memset(k_dst, 0, head_bytes);
        std::memset(v_dst, 0, head_bytes);
        continue;
      }
      int64_t block = slot / cache.block_size, offset = slot % cache.block_size;
      size_t src = ((block * cache.num_kv_heads + head) * cache.block_size + offset) * head_bytes;
      stream_copy(k_dst, static_cast<const char*>(cache.k) + src, head_bytes);
      stream_copy(v_dst, static_cast<const char*>(cache.v) + src, head_bytes);
    }
  }
  stream_fence();
}

// A swap moves ~40k rows of 32 layers: one parallel_for over chunks of every layer's rows, each chunk
// large enough that taking it (two atomics every worker shares) costs little next to its copies.
constexpr int64_t kRowsPerTask = 64;

void for_row_chunks(const std::vector<LayerRun>& runs, const std::function<void(const LayerRun&)>& body) {
  std::vector<LayerRun> chunks;
  for (const LayerRun& run : runs)
    for (int64_t begin = run.begin; begin < run.end; begin += kRowsPerTask)
      chunks.push_back({run.layer, begin, std::min(run.end, begin + kRowsPerTask)});
  default_thread_pool().parallel_for(static_cast<int64_t>(chunks.size()),
                                     [&](int64_t i, int) { body(chunks[i]); });
}

}  // namespace

std::shared_ptr<HostKvPool> pool_for_call(const char* op, int64_t pool_id, std::string* error) {
  std::shared_ptr<HostKvPool> pool = find_pool(pool_id);
  if (!pool) *error = std::string(op) + ": pool_id " + std::to_string(pool_id) + " is not a live HostKvPool";
  return pool;
}

std::string check_attention_operands(const HostKvPool& pool, ffi::AnyBuffer q, ffi::AnyBuffer k_new,
                                     ffi::AnyBuffer v_new, ffi::AnyBuffer layer,
                                     ffi::AnyBuffer slot_mapping, ffi::AnyBuffer block_tables,
                                     ffi::AnyBuffer context_lens, AttentionShape* shape) {
  const char* op = "cpu_attention_start";
  const PagedKvCache& kv = pool.geometry();
  if (q.dimensions().size() != 3 || !to_dtype(q.element_type(), &shape->q_dtype) ||
      shape->q_dtype == DType::kInt32 || q.dimensions()[2] != kv.head_dim)
    return std::string(op) + ": q must be a float [num_reqs, num_q_heads, " +
           std::to_string(kv.head_dim) + "] array, got " + shape_text(q);
  shape->num_reqs = q.dimensions()[0];
  shape->num_q_heads = q.dimensions()[1];
  if (shape->num_q_heads <= 0 || shape->num_q_heads % kv.num_kv_heads != 0)
    return std::string(op) + ": q has " + std::to_string(shape->num_q_heads) +
           " heads, not a positive multiple of the pool's " + std::to_string(kv.num_kv_heads) + " kv heads";
  shape->head_dim = kv.head_dim;
  shape->max_blocks_per_req =
      block_tables.dimensions().size() == 2 ? block_tables.dimensions()[1] : -1;
  int64_t n = shape->num_reqs;
  std::string rows = "[num_reqs, " + std::to_string(kv.num_kv_heads) + ", " + std::to_string(kv.head_dim) + "]";
  for (std::string error :
       {expect(op, "k_new", k_new, kv.dtype, {n, kv.num_kv_heads, kv.head_dim}, rows.c_str()),
        expect(op, "v_new", v_new, kv.dtype, {n, kv.num_kv_heads, kv.head_dim}, rows.c_str()),
        expect(op, "layer", layer, DType::kInt32, {}, "[]"),
        expect(op, "slot_mapping", slot_mapping, DType::kInt32, {n}, "[num_reqs]"),
        expect(op, "block_tables", block_tables, DType::kInt32, {n, -1}, "[num_reqs, max_blocks]"),
        expect(op, "context_lens", context_lens, DType::kInt32, {n}, "[num_reqs]")}) {
    if (!error.empty()) return error;
  }
  return "";
}

std::string check_kv_rows_operands(const char* op, const HostKvPool& pool, ffi::AnyBuffer k_rows,
                                   ffi::AnyBuffer v_rows, ffi::AnyBuffer layer,
                                   ffi::AnyBuffer slot_mapping) {
  const PagedKvCache& kv = pool.geometry();
  int64_t m = slot_mapping.dimensions().size() == 1 ? slot_mapping.dimensions()[0] : -1;
  std::string rows = "[num_rows, " + std::to_string(kv.num_kv_heads) + ", " + std::to_string(kv.head_dim) + "]";
  for (std::string error :
       {expect(op, "slot_mapping", slot_mapping, DType::kInt32, {-1}, "[num_rows]"),
        layer.dimensions().size() == 1 ? expect(op, "layer", layer, DType::kInt32, {m}, "[] or [num_rows]")
                                        : expect(op, "layer", layer, DType::kInt32, {}, "[] or [num_rows]"),
        expect(op, "k_rows", k_rows, kv.dtype, {m, kv.num_kv_heads, kv.head_dim}, rows.c_str()),
        expect(op, "v_rows", v_rows, kv.dtype, {m, kv.num_kv_heads, kv.head_dim}, rows.c_str())}) {
    if (!error.empty()) return error;
  }
  return "";
}

std::string run_attention(const HostKvPool& pool, const AttentionShape& shape,
                          const AttentionOperands& operands) {
  const char* op = "cpu_attention_start";
  int64_t layer = 0;
  std::string error = layer_index(op, pool, operands.layer, &layer);
  PagedKvCache cache = pool.layer(error.empty() ? layer : 0);
  DecodeBatch batch;
  batch.q = operands.q;
  batch.out = operands.out;
  batch.dtype = shape.q_dtype;
  batch.num_reqs = shape.num_reqs;
  batch.num_q_heads = shape.num_q_heads;
  batch.block_tables = operands.block_tables;
  batch.max_blocks_per_req = shape.max_blocks_per_req;
  batch.context_lens = operands.context_lens;
  batch.scale = 1.0f / std::sqrt(static_cast<float>(cache.head_dim));
  KvAppend append;
  append.k_new = operands.k_new;
  append.v_new = operands.v_new;
  append.slot_mapping = operands.slot_mapping;
  append.num_tokens = shape.num_reqs;
  if (error.empty()) error = validate(cache, append);
  if (error.empty()) error = validate(cache, batch);
  if (!error.empty()) {
    std::memset(operands.out, 0, shape.q_bytes());
    return error.rfind(op, 0) == 0 ? error : std::string(op) + ": " + error;
  }
  append_kv(cache, append, default_thread_pool());
  paged_decode_attention(cache, batch, default_thread_pool(), best_isa());
  return "";
}

std::string run_store(const HostKvPool& pool, const KvRowsOperands& operands) {
  const char* op = "host_kv_store";
  std::vector<LayerRun> runs;
  std::string error = layer_runs(op, pool, operands, &runs);
  if (!error.empty()) return error;
  for (const LayerRun& run : runs) {  // every run is checked before any is written
    KvAppend append;
    append.k_new = static_cast<const char*>(operands.k_rows) + run.begin * pool.row_bytes();
    append.v_new = static_cast<const char*>(operands.v_rows) + run.begin * pool.row_bytes();
    append.slot_mapping = operands.slot_mapping + run.begin;
    append.num_tokens = run.end - run.begin;
    error = validate(pool.layer(run.layer), append);
    if (!error.empty() && runs.size() > 1)
      error += " (indices from row " + std::to_string(run.begin) + ", the first of layer " +
               std::to_string(run.layer) + ")";
    if (!error.empty()) return std::string(op) + ": " + error;
  }
  KvAppend rows{operands.k_rows, operands.v_rows, operands.slot_mapping, operands.num_rows};
  for_row_chunks(runs, [&](const LayerRun& chunk) {
    append_kv_rows(pool.layer(chunk.layer), rows, chunk.begin, chunk.end);
  });
  return "";
}

std::string run_load(const HostKvPool& pool, const KvRowsOperands& operands) {
  const char* op = "host_kv_load";
  std::vector<LayerRun> runs;
  std::string error = layer_runs(op, pool, operands, &runs);
  for (int64_t row = 0; error.empty() && row < operands.num_rows; ++row) {
    int64_t slot = operands.slot_mapping[row];
    if (slot < -1 || slot >= pool.num_slots())
      error = std::string(op) + ": slot_mapping[" + std::to_string(row) + "] = " + std::to_string(slot) +
              " is outside [-1, " + std::to_string(pool.num_slots()) + ")";
  }
  if (!error.empty()) {
    std::memset(operands.k_rows, 0, operands.num_rows * pool.row_bytes());
    std::memset(operands.v_rows, 0, operands.num_rows * pool.row_bytes());
    return error;
  }
  for_row_chunks(runs, [&](const LayerRun& chunk) {
    gather_rows(pool.layer(chunk.layer), operands.slot_mapping, chunk.begin, chunk.end,
                static_cast<char*>(operands.k_rows), static_cast<char*>(operands.v_rows));
  });
  return "";
}

}  // namespace neo
