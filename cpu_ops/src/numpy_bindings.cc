// pybind11 bindings of the attention op and the KV append on NumPy arrays (zero copy; bf16 arrays
// are ml_dtypes.bfloat16). Arguments are checked with the GIL held; the op runs without it.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "attention.h"
#include "cpu_features.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace neo {
namespace {

Tensor tensor_of(const py::object& object, const char* name, bool writable) {
  if (!py::isinstance<py::array>(object))
    throw py::type_error(std::string(name) + " must be a numpy.ndarray, got " +
                         py::str(py::type::of(object)).cast<std::string>());
  auto array = py::reinterpret_borrow<py::array>(object);
  if (!(array.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
  if (writable && !array.writeable()) throw py::value_error(std::string(name) + " must be writable");
  const std::string dtype = py::str(array.dtype()).cast<std::string>();
  Tensor tensor;
  if (dtype == "float32") {
    tensor.dtype = DType::kFloat32;
  } else if (dtype == "float16") {
    tensor.dtype = DType::kFloat16;
  } else if (dtype == "bfloat16") {
    tensor.dtype = DType::kBFloat16;
  } else if (dtype == "int32") {
    tensor.dtype = DType::kInt32;
  } else {
    throw py::value_error(std::string(name) + " has unsupported dtype " + dtype +
                          " (float32, float16, bfloat16 or int32)");
  }
  tensor.data = const_cast<void*>(array.data());
  tensor.shape.assign(array.shape(), array.shape() + array.ndim());
  return tensor;
}

Isa isa_argument(const std::optional<std::string>& name) {
  if (!name) return best_isa();
  Isa isa;
  if (!isa_from_name(*name, &isa))
    throw py::value_error("isa must be one of scalar, avx2, avx512, avx512_bf16, got '" + *name + "'");
  if (isa > cpu_isa_limit())
    throw py::value_error("isa '" + *name + "' is not available on this CPU (best: " +
                          isa_name(cpu_isa_limit()) + ")");
  return isa;
}

void decode_attention(const py::object& q, const py::object& k_cache, const py::object& v_cache,
                      const py::object& block_tables, const py::object& context_lens,
                      const py::object& out, std::optional<float> scale,
                      const std::optional<std::string>& isa_name_arg) {
  const Isa isa = isa_argument(isa_name_arg);
  // One statement each: the checks run, and report, in argument order.
  Tensor tq = tensor_of(q, "q", false);
  Tensor tk = tensor_of(k_cache, "k_cache", false);
  Tensor tv = tensor_of(v_cache, "v_cache", false);
  Tensor tables = tensor_of(block_tables, "block_tables", false);
  Tensor lens = tensor_of(context_lens, "context_lens", false);
  Tensor tout = tensor_of(out, "out", true);
  PagedKvCache cache;
  DecodeBatch batch;
  std::string error = check_decode_args(tq, tk, tv, tables, lens, tout, scale.value_or(1.f), &cache, &batch);
  if (!error.empty()) throw py::value_error(error);
  batch.scale = scale.value_or(1.f / std::sqrt(static_cast<float>(cache.head_dim)));
  py::gil_scoped_release release;
  paged_decode_attention(cache, batch, default_thread_pool(), isa);
}

void append(const py::object& k_cache, const py::object& v_cache, const py::object& k_new,
            const py::object& v_new, const py::object& slot_mapping) {
  Tensor tk = tensor_of(k_cache, "k_cache", true);
  Tensor tv = tensor_of(v_cache, "v_cache", true);
  Tensor tk_new = tensor_of(k_new, "k_new", false);
  Tensor tv_new = tensor_of(v_new, "v_new", false);
  Tensor slots = tensor_of(slot_mapping, "slot_mapping", false);
  PagedKvCache cache;
  KvAppend rows;
  std::string error = check_append_args(tk, tv, tk_new, tv_new, slots, &cache, &rows);
  if (!error.empty()) throw py::value_error(error);
  py::gil_scoped_release release;
  append_kv(cache, rows, default_thread_pool());
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    if (isa <= cpu_isa_limit()) names.push_back(isa_name(isa));
  }
  return names;
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("paged_decode_attention", &decode_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("out"), py::arg("scale") = py::none(),
        py::arg("isa") = py::none(),
        "Writes the decode attention of q over the paged cache into out (scale: 1/sqrt(head_dim) if None).");
  m.def("append_kv", &append, py::arg("k_cache"), py::arg("v_cache"), py::arg("k_new"), py::arg("v_new"),
        py::arg("slot_mapping"), "Writes k_new/v_new rows into the cache slots of slot_mapping.");
  m.def("available_isas", &available_isas, "Instruction sets this CPU can run, lowest first.");
  m.def("num_threads", [] { return default_thread_pool().num_threads(); },
        "Threads of the op's pool, the calling thread included.");
  m.def("physical_cores", [] { return static_cast<int>(physical_core_cpus().size()); },
        "Physical cores this process may run on (one CPU per core).");
  m.def("set_num_threads", [](int num_threads) {
        if (num_threads < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
        py::gil_scoped_release release;
        default_thread_pool().resize(num_threads);
      }, py::arg("num_threads"), "Restarts the pool with num_threads threads (the caller included).");
  m.def("shutdown_threads", [] {
        py::gil_scoped_release release;
        default_thread_pool().shutdown();
      }, "Joins the pool's workers; later calls run on the calling thread.");
}

}  // namespace neo
