// Python bindings of the host KV pool registry, the handoff handlers (as FFI capsules) and the CUDA
// handoff's synchronize / shutdown. neo_jax.cpu_ops.handoff wraps them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "cuda_driver.h"
#include "handoff.h"
#include "handoff_cuda.h"
#include "host_pool.h"

namespace py = pybind11;

namespace neo {
namespace {

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw std::invalid_argument("HostKvPool: dtype must be float32, float16 or bfloat16, got " + name);
}

std::shared_ptr<HostKvPool> registered(int64_t pool_id) {
  std::shared_ptr<HostKvPool> pool = find_pool(pool_id);
  if (!pool) throw std::invalid_argument("pool_id " + std::to_string(pool_id) + " is not a live HostKvPool");
  return pool;
}

// The pool's memory as a flat uint8 array; the array keeps the pool alive.
py::array pool_memory(int64_t pool_id) {
  auto* owner = new std::shared_ptr<HostKvPool>(registered(pool_id));
  py::capsule keep_alive(owner, [](void* p) { delete static_cast<std::shared_ptr<HostKvPool>*>(p); });
  return py::array(py::dtype::of<uint8_t>(), {static_cast<py::ssize_t>((*owner)->total_bytes())},
                   {static_cast<py::ssize_t>(1)}, (*owner)->data(), keep_alive);
}

py::capsule handler(XLA_FFI_Error* (*fn)(XLA_FFI_CallFrame*)) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

py::dict handlers() {
  struct Target {
    const char* name;
    XLA_FFI_Error* (*cpu)(XLA_FFI_CallFrame*);
    XLA_FFI_Error* (*cuda)(XLA_FFI_CallFrame*);
  };
  const Target targets[] = {
      {"neo_cpu_attention_start", NeoCpuAttentionStartCpu, NeoCpuAttentionStartCuda},
      {"neo_cpu_attention_wait", NeoCpuAttentionWaitCpu, NeoCpuAttentionWaitCuda},
      {"neo_host_kv_store", NeoHostKvStoreCpu, NeoHostKvStoreCuda},
      {"neo_host_kv_load", NeoHostKvLoadCpu, NeoHostKvLoadCuda},
  };
  py::dict result;
  for (const Target& target : targets) {
    py::dict platforms;
    platforms["cpu"] = handler(target.cpu);
    if (cuda_driver() != nullptr) platforms["CUDA"] = handler(target.cuda);
    result[target.name] = platforms;
  }
  return result;
}

}  // namespace

void register_handoff(py::module_& m) {
  m.def(
      "host_pool_create",
      [](int64_t num_layers, int64_t num_blocks, int64_t num_kv_heads, int64_t block_size,
         int64_t head_dim, const std::string& dtype) {
        return register_pool(std::make_shared<HostKvPool>(num_layers, num_blocks, num_kv_heads,
                                                          block_size, head_dim, parse_dtype(dtype)));
      },
      "Allocates a host KV pool (zeroed) and registers it; returns its id.");
  m.def("host_pool_release", &release_pool,
        "Drops the registry's reference; memory goes when the last view and call are done.");
  m.def("host_pool_memory", &pool_memory,
        "The pool's memory as a flat uint8 array (zero copy): all K layers, then all V layers.");
  m.def("host_pool_pinned", [](int64_t pool_id) { return registered(pool_id)->pinned(); });
  m.def("handoff_handlers", &handlers,
        "{target name: {platform: FFI handler capsule}}; CUDA handlers only when libcuda loads.");
  m.def("cuda_driver_status", &cuda_driver_status);
  m.attr("HANDOFF_DEVICE_STAGING_BYTES") = kMaxDeviceStagingBytes;
  m.def(
      "handoff_synchronize",
      [](double timeout_s) {
        std::string error;
        {
          py::gil_scoped_release release;
          for (CudaHandoff* cuda : CudaHandoff::existing()) {
            std::string gpu_error = cuda->synchronize(timeout_s);
            if (error.empty()) error = gpu_error;
          }
        }
        if (!error.empty()) throw std::runtime_error(error);
      },
      py::arg("timeout_s"));
  m.def(
      "handoff_shutdown",
      [](double drain_timeout_s) {
        py::gil_scoped_release release;
        for (CudaHandoff* cuda : CudaHandoff::existing()) cuda->shutdown(drain_timeout_s);
      },
      py::arg("drain_timeout_s"));
}

}  // namespace neo
