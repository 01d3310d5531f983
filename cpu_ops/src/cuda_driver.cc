#include "cuda_driver.h"

#include <dlfcn.h>

#include <stdexcept>

namespace neo {
namespace {

struct LoadResult {
  CudaDriver driver{};
  bool ok = false;
  std::string status;
};

// Entry points whose ABI changed carry a _v2 suffix in libcuda; the plain name is the old ABI.
template <typename Fn>
bool bind(void* library, Fn& slot, const char* name, std::string& missing) {
  std::string versioned = std::string(name) + "_v2";
  void* symbol = dlsym(library, versioned.c_str());
  if (symbol == nullptr) symbol = dlsym(library, name);
  if (symbol == nullptr) {
    missing = name;
    return false;
  }
  slot = reinterpret_cast<Fn>(symbol);
  return true;
}

LoadResult load() {
  LoadResult result;
  void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* why = dlerror();
    result.status = std::string("libcuda.so.1 not loaded: ") + (why ? why : "unknown error");
    return result;
  }
  CudaDriver& d = result.driver;
  std::string missing;
  bool all = bind(library, d.cuInit, "cuInit", missing) &&
             bind(library, d.cuGetErrorString, "cuGetErrorString", missing) &&
             bind(library, d.cuDeviceGetCount, "cuDeviceGetCount", missing) &&
             bind(library, d.cuDeviceGet, "cuDeviceGet", missing) &&
             bind(library, d.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", missing) &&
             bind(library, d.cuCtxGetCurrent, "cuCtxGetCurrent", missing) &&
             bind(library, d.cuCtxSetCurrent, "cuCtxSetCurrent", missing) &&
             bind(library, d.cuStreamGetCtx, "cuStreamGetCtx", missing) &&
             bind(library, d.cuStreamCreate, "cuStreamCreate", missing) &&
             bind(library, d.cuStreamWaitEvent, "cuStreamWaitEvent", missing) &&
             bind(library, d.cuStreamWriteValue32, "cuStreamWriteValue32", missing) &&
             bind(library, d.cuStreamWaitValue32, "cuStreamWaitValue32", missing) &&
             bind(library, d.cuEventCreate, "cuEventCreate", missing) &&
             bind(library, d.cuEventRecord, "cuEventRecord", missing) &&
             bind(library, d.cuEventQuery, "cuEventQuery", missing) &&
             bind(library, d.cuEventSynchronize, "cuEventSynchronize", missing) &&
             bind(library, d.cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync", missing) &&
             bind(library, d.cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync", missing) &&
             bind(library, d.cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync", missing) &&
             bind(library, d.cuMemAlloc, "cuMemAlloc", missing) &&
             bind(library, d.cuMemHostAlloc, "cuMemHostAlloc", missing) &&
             bind(library, d.cuMemHostGetDevicePointer, "cuMemHostGetDevicePointer", missing) &&
             bind(library, d.cuMemFreeHost, "cuMemFreeHost", missing);
  if (!all) {
    result.status = "libcuda.so.1 lacks " + missing;
    return result;
  }
  CUresult init = d.cuInit(0);
  int devices = 0;
  if (init == kCudaSuccess) init = d.cuDeviceGetCount(&devices);
  if (init != kCudaSuccess || devices == 0) {
    result.status = init != kCudaSuccess ? cuda_error_text("cuInit", init) : "no CUDA device";
    return result;
  }
  result.ok = true;
  result.status = "libcuda.so.1 loaded, " + std::to_string(devices) + " device(s)";
  return result;
}

const LoadResult& loaded() {
  static const LoadResult result = load();
  return result;
}

}  // namespace

const CudaDriver* cuda_driver() { return loaded().ok ? &loaded().driver : nullptr; }

std::string cuda_driver_status() { return loaded().status; }

std::string cuda_error_text(const char* call, CUresult result) {
  const char* text = nullptr;
  if (loaded().driver.cuGetErrorString != nullptr) loaded().driver.cuGetErrorString(result, &text);
  return std::string(call) + ": " + (text ? text : "CUDA error " + std::to_string(result));
}

CUcontext make_primary_context_current(const CudaDriver& cuda) {
  static const CUcontext context = [&cuda] {
    CUdevice device = 0;
    CUcontext retained = nullptr;
    CUresult result = cuda.cuDeviceGet(&device, 0);
    if (result == kCudaSuccess) result = cuda.cuDevicePrimaryCtxRetain(&retained, device);
    if (result != kCudaSuccess) throw std::runtime_error(cuda_error_text("cuDevicePrimaryCtxRetain", result));
    return retained;
  }();
  CUresult result = cuda.cuCtxSetCurrent(context);
  if (result != kCudaSuccess) throw std::runtime_error(cuda_error_text("cuCtxSetCurrent", result));
  return context;
}

}  // namespace neo
