#include "host_pool.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <unordered_map>

#include "cuda_driver.h"

namespace neo {
namespace {

constexpr size_t kAlignment = 64;

std::string gib(size_t bytes) {
  char text[64];
  std::snprintf(text, sizeof(text), "%zu bytes (%.2f GiB)", bytes, bytes / double(1ull << 30));
  return text;
}

size_t checked_product(std::initializer_list<int64_t> factors) {
  size_t product = 1;
  for (int64_t factor : factors) {
    if (__builtin_mul_overflow(product, static_cast<size_t>(factor), &product))
      throw HostAllocError("HostKvPool: the requested size overflows 64 bits");
  }
  return product;
}

struct Registry {
  std::mutex mutex;
  std::unordered_map<int64_t, std::shared_ptr<HostKvPool>> pools;
  int64_t next_id = 1;
};

Registry& registry() {
  static Registry* instance = new Registry();  // outlives static destructors that may still look up
  return *instance;
}

}  // namespace

HostKvPool::HostKvPool(int64_t num_layers, int64_t num_blocks, int64_t num_kv_heads,
                       int64_t block_size, int64_t head_dim, DType dtype)
    : num_layers_(num_layers) {
  const std::pair<const char*, int64_t> sizes[] = {{"num_layers", num_layers},
                                                   {"num_blocks", num_blocks},
                                                   {"num_kv_heads", num_kv_heads},
                                                   {"block_size", block_size},
                                                   {"head_dim", head_dim}};
  for (const auto& [name, value] : sizes) {
    if (value <= 0)
      throw std::invalid_argument(std::string("HostKvPool: ") + name + " must be positive, got " +
                                  std::to_string(value));
  }
  if (dtype == DType::kInt32)
    throw std::invalid_argument("HostKvPool: dtype must be float32, float16 or bfloat16, got int32");
  cache_.dtype = dtype;
  cache_.num_blocks = num_blocks;
  cache_.num_kv_heads = num_kv_heads;
  cache_.block_size = block_size;
  cache_.head_dim = head_dim;
  layer_bytes_ = checked_product({num_blocks, num_kv_heads, block_size, head_dim,
                                  static_cast<int64_t>(dtype_bytes(dtype))});
  size_t total = checked_product({2, num_layers, static_cast<int64_t>(layer_bytes_)});

  if (const CudaDriver* cuda = cuda_driver()) {
    make_primary_context_current(*cuda);
    void* ptr = nullptr;
    CUresult result = cuda->cuMemHostAlloc(&ptr, total, 0);
    if (result != kCudaSuccess)
      throw HostAllocError("HostKvPool: cannot allocate " + gib(total) + " of pinned host memory (" +
                           cuda_error_text("cuMemHostAlloc", result) + ")");
    data_ = static_cast<char*>(ptr);
    pinned_ = true;
  } else {
    data_ = static_cast<char*>(std::aligned_alloc(kAlignment, (total + kAlignment - 1) / kAlignment * kAlignment));
    if (data_ == nullptr) throw HostAllocError("HostKvPool: cannot allocate " + gib(total) + " of host memory");
  }
  std::memset(data_, 0, total);
}

HostKvPool::~HostKvPool() {
  if (pinned_) {
    cuda_driver()->cuMemFreeHost(data_);
  } else {
    std::free(data_);
  }
}

PagedKvCache HostKvPool::layer(int64_t layer) const {
  PagedKvCache cache = cache_;
  cache.k = data_ + layer * layer_bytes_;
  cache.v = data_ + (num_layers_ + layer) * layer_bytes_;
  return cache;
}

int64_t register_pool(std::shared_ptr<HostKvPool> pool) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  int64_t id = r.next_id++;
  r.pools.emplace(id, std::move(pool));
  return id;
}

bool release_pool(int64_t pool_id) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.pools.erase(pool_id) > 0;
}

std::shared_ptr<HostKvPool> find_pool(int64_t pool_id) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.pools.find(pool_id);
  return it == r.pools.end() ? nullptr : it->second;
}

}  // namespace neo
