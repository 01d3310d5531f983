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

std::string check_attention_operands(const HostKvPool& pool, ffi::AnyBuffer rows, ffi::AnyBuffer layer,
                                     ffi::AnyBuffer requests, int64_t num_reqs, int64_t num_q_heads,
                                     std::string_view q_dtype, AttentionShape* shape) {
  const char* op = "cpu_attention_start";
  const PagedKvCache& kv = pool.geometry();
  bool known_dtype = false;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    if (q_dtype == dtype_name(dtype)) {
      shape->q_dtype = dtype;
      known_dtype = true;
    }
  if (!known_dtype)
    return std::string(op) + ": q_dtype must be float32, float16 or bfloat16, got " + std::string(q_dtype);
  if (num_reqs < 0) return std::string(op) + ": num_reqs must be >= 0, got " + std::to_string(num_reqs);
  if (num_q_heads <= 0 || num_q_heads % kv.num_kv_heads != 0)
    return std::string(op) + ": q has " + std::to_string(num_q_heads) +
           " heads, not a positive multiple of the pool's " + std::to_string(kv.num_kv_heads) + " kv heads";
  shape->num_reqs = num_reqs;
  shape->num_q_heads = num_q_heads;
  shape->num_kv_heads = kv.num_kv_heads;
  shape->head_dim = kv.head_dim;
  shape->kv_dtype = kv.dtype;
  int64_t requests_size = requests.dimensions().size() == 1 ? requests.dimensions()[0] : -1;
  bool requests_fit = requests.element_type() == ffi::DataType::S32 && requests_size >= 2 * num_reqs &&
                      (num_reqs == 0 ? requests_size == 0 : requests_size % num_reqs == 0);
  if (!requests_fit)
    return std::string(op) + ": requests must be int32 [num_reqs * (2 + max_blocks)] (slot_mapping, "
           "context_lens, block_tables) for num_reqs = " + std::to_string(num_reqs) + ", got " + shape_text(requests);
  shape->max_blocks_per_req = num_reqs == 0 ? 0 : requests_size / num_reqs - 2;
  int64_t rows_bytes = static_cast<int64_t>(shape->rows_bytes());
  if (rows.element_type() != ffi::DataType::U8 || rows.dimensions().size() != 1 || rows.dimensions()[0] != rows_bytes)
    return std::string(op) + ": rows must be uint8 [" + std::to_string(rows_bytes) + "] (q, k_new and v_new of " +
           std::to_string(num_reqs) + " requests, " + std::to_string(num_q_heads) + " q heads in " +
           std::string(q_dtype) + ", " + std::to_string(kv.num_kv_heads) + " kv heads in " + dtype_name(kv.dtype) +
           "), got " + shape_text(rows);
  return expect(op, "layer", layer, DType::kInt32, {}, "[]");
}

AttentionOperands unpack_attention_operands(const AttentionShape& shape, const char* rows, const int32_t* layer,
                                            const int32_t* requests, void* out) {
  int64_t n = shape.num_reqs;
  return AttentionOperands{rows, rows + shape.q_bytes(), rows + shape.q_bytes() + shape.kv_bytes(),
                           layer, requests, requests + 2 * n, requests + n, out};
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
