#include "handoff_staging.h"

#include <stdexcept>
#include <string>

namespace neo {
namespace {

void check(CUresult result, const char* call, size_t bytes) {
  if (result != kCudaSuccess)
    throw std::runtime_error(cuda_error_text(call, result) + " (" + std::to_string(bytes) +
                             " bytes of handoff staging)");
}

}  // namespace

size_t StagingBuffers::allocated_bytes(size_t bytes) {
  if (bytes == 0) return 0;
  size_t size = 4096;
  while (size < bytes) size *= 2;
  return size;
}

StagingBuffer StagingBuffers::acquire(size_t host_bytes, size_t device_bytes) {
  StagingBuffer buffer;
  if (host_bytes > 0) {
    buffer.host_bytes = allocated_bytes(host_bytes);
    std::vector<char*>& free = free_host_[buffer.host_bytes];
    if (free.empty()) {
      void* ptr = nullptr;
      check(cuda_.cuMemHostAlloc(&ptr, buffer.host_bytes, 0), "cuMemHostAlloc", buffer.host_bytes);
      buffer.host = static_cast<char*>(ptr);
    } else {
      buffer.host = free.back();
      free.pop_back();
    }
  }
  if (device_bytes > 0) {
    buffer.device_bytes = allocated_bytes(device_bytes);
    std::vector<CUdeviceptr>& free = free_device_[buffer.device_bytes];
    if (free.empty()) {
      check(cuda_.cuMemAlloc(&buffer.device, buffer.device_bytes), "cuMemAlloc", buffer.device_bytes);
    } else {
      buffer.device = free.back();
      free.pop_back();
    }
  }
  return buffer;
}

void StagingBuffers::release(const StagingBuffer& buffer) {
  if (buffer.host != nullptr) free_host_[buffer.host_bytes].push_back(buffer.host);
  if (buffer.device != 0) free_device_[buffer.device_bytes].push_back(buffer.device);
}

CUevent StagingBuffers::acquire_event() {
  if (!free_events_.empty()) {
    CUevent event = free_events_.back();
    free_events_.pop_back();
    return event;
  }
  CUevent event = nullptr;
  CUresult result = cuda_.cuEventCreate(&event, kEventDisableTiming);
  if (result != kCudaSuccess) throw std::runtime_error(cuda_error_text("cuEventCreate", result));
  return event;
}

}  // namespace neo
