// pybind11 module neo_jax.kernels._cuda: the FFI handlers of the CUDA kernels as capsules for
// jax.ffi.register_ffi_target(..., platform="CUDA").
#include <pybind11/pybind11.h>

#include "paged_attention_ffi.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "neo-jax CUDA kernels (XLA FFI handlers)";
  m.def("paged_decode_attention_handler", [] { return py::capsule(reinterpret_cast<void*>(kPagedDecodeAttention)); },
        "Capsule of the paged decode attention FFI handler.");
}
