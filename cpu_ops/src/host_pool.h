// The host KV pool: K and V caches of every layer in host memory, each layer
// [num_blocks, num_kv_heads, block_size, head_dim], pinned through the CUDA driver when a GPU is
// present (so the GPU can copy blocks in and out at full speed) and 64-byte aligned ordinary memory
// otherwise. Pools live in a process-wide registry under an integer id, which jitted programs carry
// as a static attribute of their custom calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>

#include "attention.h"

namespace neo {

// Thrown when the pool's memory cannot be allocated; the message names the size.
class HostAllocError : public std::bad_alloc {
 public:
  explicit HostAllocError(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

class HostKvPool {
 public:
  // Throws std::invalid_argument for a non-positive size or a non-float dtype, HostAllocError when
  // allocation fails. The memory starts zeroed.
  HostKvPool(int64_t num_layers, int64_t num_blocks, int64_t num_kv_heads, int64_t block_size,
             int64_t head_dim, DType dtype);
  ~HostKvPool();
  HostKvPool(const HostKvPool&) = delete;
  HostKvPool& operator=(const HostKvPool&) = delete;

  int64_t num_layers() const { return num_layers_; }
  int64_t num_slots() const { return cache_.num_blocks * cache_.block_size; }
  DType dtype() const { return cache_.dtype; }
  bool pinned() const { return pinned_; }
  size_t layer_bytes() const { return layer_bytes_; }
  size_t total_bytes() const { return 2 * num_layers_ * layer_bytes_; }
  // All K layers, then all V layers: [2, num_layers, num_blocks, num_kv_heads, block_size, head_dim].
  char* data() const { return data_; }

  // The caches of one layer (0 <= layer < num_layers) as the attention kernel takes them.
  PagedKvCache layer(int64_t layer) const;
  // Bytes of one token row (num_kv_heads * head_dim elements) in k_new / k_rows layouts.
  size_t row_bytes() const { return cache_.num_kv_heads * cache_.head_dim * dtype_bytes(cache_.dtype); }
  const PagedKvCache& geometry() const { return cache_; }

 private:
  int64_t num_layers_;
  PagedKvCache cache_;  // geometry and dtype; k / v unset
  size_t layer_bytes_ = 0;
  char* data_ = nullptr;
  bool pinned_ = false;
};

// The registry. Ids start at 1 and are never reused; find_pool returns nullptr for an unknown id.
int64_t register_pool(std::shared_ptr<HostKvPool> pool);
bool release_pool(int64_t pool_id);
std::shared_ptr<HostKvPool> find_pool(int64_t pool_id);

}  // namespace neo
