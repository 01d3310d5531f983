// Argument checks for the attention op and the KV append: everything is verified here, before any
// thread reads or writes the cache, and each error names the argument it is about.
#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "attention.h"

namespace neo {
namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream text;
  text << "(";
  for (size_t i = 0; i < shape.size(); ++i) text << (i ? ", " : "") << shape[i];
  text << (shape.size() == 1 ? ",)" : ")");
  return text.str();
}

std::string expect_rank(const Tensor& tensor, const char* name, size_t rank, const char* layout) {
  if (tensor.shape.size() == rank) return "";
  return std::string(name) + " must be " + std::to_string(rank) + "-d " + layout + ", got shape " +
         shape_text(tensor.shape);
}

std::string expect_float(const Tensor& tensor, const char* name) {
  if (tensor.dtype != DType::kInt32) return "";
  return std::string(name) + " must be float32, float16 or bfloat16, got int32";
}

std::string expect_int32(const Tensor& tensor, const char* name) {
  if (tensor.dtype == DType::kInt32) return "";
  return std::string(name) + " must be int32, got " + dtype_name(tensor.dtype);
}

std::string expect_like(const Tensor& tensor, const char* name, const Tensor& model, const char* model_name) {
  if (tensor.dtype != model.dtype)
    return std::string(name) + " dtype " + dtype_name(tensor.dtype) + " does not match " + model_name +
           " dtype " + dtype_name(model.dtype);
  if (tensor.shape != model.shape)
    return std::string(name) + " shape " + shape_text(tensor.shape) + " does not match " + model_name +
           " shape " + shape_text(model.shape);
  return "";
}

std::string expect_dim(const Tensor& tensor, const char* name, size_t axis, int64_t want, const char* what) {
  if (tensor.shape[axis] == want) return "";
  return std::string(name) + " shape " + shape_text(tensor.shape) + ": axis " + std::to_string(axis) +
         " must be " + what + " = " + std::to_string(want);
}

// The cache pair: [num_blocks, num_kv_heads, block_size, head_dim], same dtype and shape.
std::string check_cache(const Tensor& k_cache, const Tensor& v_cache, PagedKvCache* cache) {
  std::string error = expect_rank(k_cache, "k_cache", 4, "[num_blocks, num_kv_heads, block_size, head_dim]");
  if (error.empty()) error = expect_float(k_cache, "k_cache");
  if (error.empty()) error = expect_like(v_cache, "v_cache", k_cache, "k_cache");
  if (!error.empty()) return error;
  for (size_t axis = 1; axis < 4; ++axis) {
    if (k_cache.shape[axis] <= 0)
      return "k_cache shape " + shape_text(k_cache.shape) + " has an empty axis " + std::to_string(axis);
  }
  *cache = PagedKvCache{k_cache.data, v_cache.data, k_cache.dtype, k_cache.shape[0],
                        k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]};
  return "";
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
  }
  return "unknown";
}

size_t dtype_bytes(DType dtype) { return dtype == DType::kFloat16 || dtype == DType::kBFloat16 ? 2 : 4; }

std::string check_decode_args(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                              const Tensor& block_tables, const Tensor& context_lens,
                              const Tensor& out, float scale, PagedKvCache* cache,
                              DecodeBatch* batch) {
  std::string error = check_cache(k_cache, v_cache, cache);
  if (error.empty()) error = expect_rank(q, "q", 3, "[num_reqs, num_q_heads, head_dim]");
  if (error.empty()) error = expect_float(q, "q");
  if (error.empty()) error = expect_dim(q, "q", 2, cache->head_dim, "k_cache's head_dim");
  if (error.empty() && (q.shape[1] <= 0 || q.shape[1] % cache->num_kv_heads != 0))
    error = "q has " + std::to_string(q.shape[1]) + " heads, not a positive multiple of k_cache's " +
            std::to_string(cache->num_kv_heads) + " kv heads";
  if (error.empty()) error = expect_rank(block_tables, "block_tables", 2, "[num_reqs, max_blocks_per_req]");
  if (error.empty()) error = expect_int32(block_tables, "block_tables");
  if (error.empty()) error = expect_dim(block_tables, "block_tables", 0, q.shape[0], "q's num_reqs");
  if (error.empty()) error = expect_rank(context_lens, "context_lens", 1, "[num_reqs]");
  if (error.empty()) error = expect_int32(context_lens, "context_lens");
  if (error.empty()) error = expect_dim(context_lens, "context_lens", 0, q.shape[0], "q's num_reqs");
  if (error.empty()) error = expect_like(out, "out", q, "q");
  if (error.empty() && !std::isfinite(scale)) error = "scale must be finite, got " + std::to_string(scale);
  if (!error.empty()) return error;
  *batch = DecodeBatch{q.data, out.data, q.dtype, q.shape[0], q.shape[1],
                       static_cast<const int32_t*>(block_tables.data), block_tables.shape[1],
                       static_cast<const int32_t*>(context_lens.data), scale};
  return validate(*cache, *batch);
}

std::string check_append_args(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k_new,
                              const Tensor& v_new, const Tensor& slot_mapping, PagedKvCache* cache,
                              KvAppend* append) {
  std::string error = check_cache(k_cache, v_cache, cache);
  if (error.empty()) error = expect_rank(k_new, "k_new", 3, "[num_tokens, num_kv_heads, head_dim]");
  if (error.empty() && k_new.dtype != k_cache.dtype)
    error = std::string("k_new dtype ") + dtype_name(k_new.dtype) + " does not match k_cache dtype " +
            dtype_name(k_cache.dtype);
  if (error.empty()) error = expect_dim(k_new, "k_new", 1, cache->num_kv_heads, "k_cache's num_kv_heads");
  if (error.empty()) error = expect_dim(k_new, "k_new", 2, cache->head_dim, "k_cache's head_dim");
  if (error.empty()) error = expect_like(v_new, "v_new", k_new, "k_new");
  if (error.empty()) error = expect_rank(slot_mapping, "slot_mapping", 1, "[num_tokens]");
  if (error.empty()) error = expect_int32(slot_mapping, "slot_mapping");
  if (error.empty()) error = expect_dim(slot_mapping, "slot_mapping", 0, k_new.shape[0], "k_new's num_tokens");
  if (!error.empty()) return error;
  *append = KvAppend{k_new.data, v_new.data, static_cast<const int32_t*>(slot_mapping.data), k_new.shape[0]};
  return validate(*cache, *append);
}

std::string validate(const PagedKvCache& cache, const DecodeBatch& batch) {
  if (cache.num_kv_heads <= 0 || cache.block_size <= 0 || cache.head_dim <= 0 || cache.num_blocks < 0)
    return "k_cache dimensions must be positive";
  if (batch.num_q_heads <= 0 || batch.num_q_heads % cache.num_kv_heads != 0)
    return "q's num_q_heads must be a positive multiple of num_kv_heads";
  if (batch.dtype == DType::kInt32 || cache.dtype == DType::kInt32) return "q and k_cache must be floating point";
  const int64_t capacity = batch.max_blocks_per_req * cache.block_size;
  for (int64_t r = 0; r < batch.num_reqs; ++r) {
    const int64_t length = batch.context_lens[r];
    if (length < 0 || length > capacity)
      return "context_lens[" + std::to_string(r) + "] = " + std::to_string(length) +
             " is outside [0, max_blocks_per_req * block_size = " + std::to_string(capacity) + "]";
    const int32_t* row = batch.block_tables + r * batch.max_blocks_per_req;
    for (int64_t b = 0; b < (length + cache.block_size - 1) / cache.block_size; ++b) {
      if (row[b] < 0 || row[b] >= cache.num_blocks)
        return "block_tables[" + std::to_string(r) + ", " + std::to_string(b) + "] = " +
               std::to_string(row[b]) + " is outside [0, num_blocks = " + std::to_string(cache.num_blocks) + ")";
    }
  }
  return "";
}

std::string validate(const PagedKvCache& cache, const KvAppend& append) {
  if (cache.num_kv_heads <= 0 || cache.block_size <= 0 || cache.head_dim <= 0 || cache.num_blocks < 0)
    return "k_cache dimensions must be positive";
  const int64_t num_slots = cache.num_blocks * cache.block_size;
  std::vector<int32_t> used;
  used.reserve(append.num_tokens);
  for (int64_t i = 0; i < append.num_tokens; ++i) {
    const int32_t slot = append.slot_mapping[i];
    if (slot == -1) continue;
    if (slot < 0 || slot >= num_slots)
      return "slot_mapping[" + std::to_string(i) + "] = " + std::to_string(slot) +
             " is outside [0, num_blocks * block_size = " + std::to_string(num_slots) + ") and not -1";
    used.push_back(slot);
  }
  std::sort(used.begin(), used.end());
  auto repeated = std::adjacent_find(used.begin(), used.end());
  if (repeated != used.end())
    return "slot_mapping holds slot " + std::to_string(*repeated) + " more than once";
  return "";
}

}  // namespace neo
