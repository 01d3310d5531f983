// The few CUDA driver API calls the handoff needs, loaded from libcuda.so.1 with dlopen at run time,
// so that the extension builds without a CUDA toolkit and imports on machines without a GPU.
// Types and constants are declared here with the driver's ABI (cuda.h, CUDA >= 11.7).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st* CUcontext;
typedef struct CUstream_st* CUstream;
typedef struct CUevent_st* CUevent;

namespace neo {

constexpr CUresult kCudaSuccess = 0;
constexpr CUresult kCudaErrorNotReady = 600;
constexpr unsigned kStreamNonBlocking = 0x1;            // CU_STREAM_NON_BLOCKING
constexpr unsigned kEventDisableTiming = 0x2;           // CU_EVENT_DISABLE_TIMING
constexpr unsigned kMemHostAllocDeviceMap = 0x2;        // CU_MEMHOSTALLOC_DEVICEMAP
constexpr unsigned kStreamWaitValueGeq = 0x0;           // CU_STREAM_WAIT_VALUE_GEQ (cyclic >=)
constexpr unsigned kStreamWriteValueDefault = 0x0;      // with a memory barrier before the write

struct CudaDriver {
  CUresult (*cuInit)(unsigned flags);
  CUresult (*cuGetErrorString)(CUresult error, const char** text);
  CUresult (*cuDeviceGetCount)(int* count);
  CUresult (*cuDeviceGet)(CUdevice* device, int ordinal);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext* ctx, CUdevice device);
  CUresult (*cuCtxGetCurrent)(CUcontext* ctx);
  CUresult (*cuCtxSetCurrent)(CUcontext ctx);
  CUresult (*cuStreamGetCtx)(CUstream stream, CUcontext* ctx);
  CUresult (*cuStreamCreate)(CUstream* stream, unsigned flags);
  CUresult (*cuStreamWaitEvent)(CUstream stream, CUevent event, unsigned flags);
  CUresult (*cuStreamWriteValue32)(CUstream stream, CUdeviceptr addr, uint32_t value, unsigned flags);
  CUresult (*cuStreamWaitValue32)(CUstream stream, CUdeviceptr addr, uint32_t value, unsigned flags);
  CUresult (*cuEventCreate)(CUevent* event, unsigned flags);
  CUresult (*cuEventRecord)(CUevent event, CUstream stream);
  CUresult (*cuEventQuery)(CUevent event);
  CUresult (*cuEventSynchronize)(CUevent event);
  CUresult (*cuMemcpyDtoHAsync)(void* dst, CUdeviceptr src, size_t bytes, CUstream stream);
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream);
  CUresult (*cuMemcpyDtoDAsync)(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream);
  CUresult (*cuMemAlloc)(CUdeviceptr* ptr, size_t bytes);
  CUresult (*cuMemHostAlloc)(void** ptr, size_t bytes, unsigned flags);
  CUresult (*cuMemHostGetDevicePointer)(CUdeviceptr* dptr, void* ptr, unsigned flags);
  CUresult (*cuMemFreeHost)(void* ptr);
};

// The driver if libcuda.so.1 loads, exports every entry point above and cuInit succeeds with at least
// one device; nullptr otherwise (why: cuda_driver_status()).
const CudaDriver* cuda_driver();
std::string cuda_driver_status();

// "cuMemcpyDtoHAsync: out of memory"-style text for a failed call.
std::string cuda_error_text(const char* call, CUresult result);

// Makes the primary context of device 0 (the one XLA uses) current on this thread; returns it.
CUcontext make_primary_context_current(const CudaDriver& cuda);

}  // namespace neo
