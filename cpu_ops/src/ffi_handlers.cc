// XLA FFI handlers (CPU platform) for the attention op and the KV append, so jitted JAX code on the
// CPU backend calls them without leaving XLA. Bad arguments return InvalidArgument naming them.
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <string_view>

#include "attention.h"
#include "cpu_features.h"
#include "thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace py = pybind11;
namespace ffi = xla::ffi;

namespace neo {
namespace {

// "" or the error naming the buffer.
std::string tensor_of(const ffi::AnyBuffer& buffer, const char* name, Tensor* tensor) {
  switch (buffer.element_type()) {
    case ffi::DataType::F32: tensor->dtype = DType::kFloat32; break;
    case ffi::DataType::F16: tensor->dtype = DType::kFloat16; break;
    case ffi::DataType::BF16: tensor->dtype = DType::kBFloat16; break;
    case ffi::DataType::S32: tensor->dtype = DType::kInt32; break;
    default: return std::string(name) + " has an unsupported dtype (float32, float16, bfloat16 or int32)";
  }
  tensor->data = buffer.untyped_data();
  auto dims = buffer.dimensions();
  tensor->shape.assign(dims.begin(), dims.end());
  return "";
}

std::string isa_of(std::string_view name, Isa* isa) {
  if (name.empty()) {
    *isa = best_isa();
    return "";
  }
  if (!isa_from_name(std::string(name), isa)) return "isa must be one of scalar, avx2, avx512, avx512_bf16";
  if (*isa > cpu_isa_limit()) return "isa '" + std::string(name) + "' is not available on this CPU";
  return "";
}

ffi::Error decode_attention_impl(ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                                 ffi::AnyBuffer block_tables, ffi::AnyBuffer context_lens,
                                 ffi::Result<ffi::AnyBuffer> out, float scale, std::string_view isa_name_attr) {
  Tensor tq, tk, tv, tables, lens, tout;
  Isa isa;
  std::string error = tensor_of(q, "q", &tq);
  if (error.empty()) error = tensor_of(k_cache, "k_cache", &tk);
  if (error.empty()) error = tensor_of(v_cache, "v_cache", &tv);
  if (error.empty()) error = tensor_of(block_tables, "block_tables", &tables);
  if (error.empty()) error = tensor_of(context_lens, "context_lens", &lens);
  if (error.empty()) error = tensor_of(*out, "out", &tout);
  if (error.empty()) error = isa_of(isa_name_attr, &isa);
  PagedKvCache cache;
  DecodeBatch batch;
  if (error.empty()) error = check_decode_args(tq, tk, tv, tables, lens, tout, scale, &cache, &batch);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  paged_decode_attention(cache, batch, default_thread_pool(), isa);
  return ffi::Error::Success();
}

// The outputs alias the caches (input_output_aliases); should XLA hand over distinct buffers, the
// caches are copied into them first, so the result is the same either way.
ffi::Error append_kv_impl(ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache, ffi::AnyBuffer k_new,
                          ffi::AnyBuffer v_new, ffi::AnyBuffer slot_mapping,
                          ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out) {
  Tensor tk, tv, tk_new, tv_new, slots;
  std::string error = tensor_of(k_cache, "k_cache", &tk);
  if (error.empty()) error = tensor_of(v_cache, "v_cache", &tv);
  if (error.empty()) error = tensor_of(k_new, "k_new", &tk_new);
  if (error.empty()) error = tensor_of(v_new, "v_new", &tv_new);
  if (error.empty()) error = tensor_of(slot_mapping, "slot_mapping", &slots);
  PagedKvCache cache;
  KvAppend rows;
  if (error.empty()) error = check_append_args(tk, tv, tk_new, tv_new, slots, &cache, &rows);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  cache.k = k_out->untyped_data();
  cache.v = v_out->untyped_data();
  if (cache.k != tk.data) std::memcpy(cache.k, tk.data, k_cache.size_bytes());
  if (cache.v != tv.data) std::memcpy(cache.v, tv.data, v_cache.size_bytes());
  append_kv(cache, rows, default_thread_pool());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kPagedDecodeAttentionHandler, decode_attention_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<std::string_view>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kAppendKvHandler, append_kv_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

void register_ffi_targets(py::module_& m) {
  m.def("cpu_ffi_targets", [] {
        py::dict targets;
        targets["neo_paged_decode_attention"] = py::capsule(reinterpret_cast<void*>(kPagedDecodeAttentionHandler));
        targets["neo_append_kv"] = py::capsule(reinterpret_cast<void*>(kAppendKvHandler));
        return targets;
      }, "XLA FFI handlers for the CPU platform, by target name.");
}

}  // namespace neo
