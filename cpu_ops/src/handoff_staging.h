// Recycled transfer buffers for the CUDA handoff: pinned host memory (the operands copied from the
// GPU and the CPU's output) and device memory (the output, prefetched before XLA's stream needs it),
// plus timing-free events. Buffers come in power-of-two size classes and go back to a free list when
// the call that used them has retired, so a steady stream of calls allocates nothing.
#pragma once

#include <cstddef>
#include <map>
#include <vector>

#include "cuda_driver.h"

namespace neo {

struct StagingBuffer {
  char* host = nullptr;      // pinned, host_bytes long (or nullptr)
  CUdeviceptr device = 0;    // device_bytes long (or 0)
  size_t host_bytes = 0;
  size_t device_bytes = 0;
};

// Offsets of a call's operands inside one staging buffer, each aligned for any element type.
class StagingLayout {
 public:
  size_t add(size_t bytes) {
    size_t offset = size_;
    size_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return offset;
  }
  size_t size() const { return size_; }

 private:
  static constexpr size_t kAlign = 256;
  size_t size_ = 0;
};

// Not thread-safe: the CUDA handoff calls it under its own lock. Throws std::runtime_error (with
// the size) when the driver cannot allocate.
class StagingBuffers {
 public:
  explicit StagingBuffers(const CudaDriver& cuda) : cuda_(cuda) {}
  StagingBuffers(const StagingBuffers&) = delete;
  StagingBuffers& operator=(const StagingBuffers&) = delete;

  // What a buffer of `bytes` takes: its power-of-two size class (0 for none).
  static size_t allocated_bytes(size_t bytes);
  StagingBuffer acquire(size_t host_bytes, size_t device_bytes);
  void release(const StagingBuffer& buffer);
  CUevent acquire_event();
  void release_event(CUevent event) { free_events_.push_back(event); }

 private:
  const CudaDriver& cuda_;
  std::map<size_t, std::vector<char*>> free_host_;
  std::map<size_t, std::vector<CUdeviceptr>> free_device_;
  std::vector<CUevent> free_events_;
};

}  // namespace neo
