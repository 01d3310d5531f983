// pybind11 module neo_jax.cpu_ops._C. Each feature file registers its own functions.
#include <pybind11/pybind11.h>

#include "attention.h"
#include "cpu_features.h"

namespace py = pybind11;

namespace neo {
void register_attention(py::module_& m);
void register_ffi_targets(py::module_& m);
void register_bandwidth_probe(py::module_& m);
void register_handoff(py::module_& m);
}  // namespace neo

PYBIND11_MODULE(_C, m) {
  m.doc() = "neo-jax CPU attention op";
  m.def("cpu_isa", [] { return neo::isa_name(neo::best_isa()); },
        "The vector instruction set the kernels dispatch to on this CPU.");
  m.def("chunk_tokens", [] { return neo::chunk_target_tokens(); },
        "Target tokens per chunk of a long context (NEO_CPU_CHUNK_TOKENS, default 1024).");
  neo::register_attention(m);
  neo::register_ffi_targets(m);
  neo::register_bandwidth_probe(m);
  neo::register_handoff(m);
}
