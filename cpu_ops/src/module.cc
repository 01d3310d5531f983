// pybind11 module neo_jax.cpu_ops._C.
#include <pybind11/pybind11.h>

#include "cpu_features.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "neo-jax CPU attention op";
  m.def("cpu_isa", [] { return neo::isa_name(neo::best_isa()); },
        "The vector instruction set the kernels dispatch to on this CPU.");
}
