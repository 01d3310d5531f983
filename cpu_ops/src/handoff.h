// The handoff custom calls, each registered under one name for platform "cpu" (computes in place,
// synchronously) and "CUDA" (hands off to the CPU on a side stream, see handoff_cuda.h):
//   neo_cpu_attention_start(rows, layer, requests, dep) -> token, where rows packs q, k_new and v_new (their
//     bytes, flattened, in that order) and requests packs slot_mapping, context_lens and block_tables (flattened,
//     in that order): on a GPU each operand is one device copy per call, and a call comes every layer
//   neo_cpu_attention_wait(token, dep) -> out
//   neo_host_kv_store(k_rows, v_rows, layer, slot_mapping) -> token
//   neo_host_kv_load(layer, slot_mapping, dep) -> (k_rows, v_rows)
// Every call has the attribute pool_id (int64); the start also num_reqs, num_q_heads (int64) and q_dtype
// ("float32", "float16" or "bfloat16"). Tokens are int32 scalars holding the call's number.
#pragma once

#include <string_view>

#include "xla/ffi/api/ffi.h"

namespace pybind11 {
class module_;
}

namespace neo {

namespace ffi = xla::ffi;

inline auto bind_attention_start() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // rows: uint8, q | k_new | v_new
      .Arg<ffi::AnyBuffer>()  // layer
      .Arg<ffi::AnyBuffer>()  // requests: int32, slot_mapping | context_lens | block_tables
      .Arg<ffi::AnyBuffer>()  // dep: unread; the call follows the op that makes it (XLA keeps no other order)
      .Ret<ffi::AnyBuffer>()  // token
      .Attr<int64_t>("pool_id")
      .Attr<int64_t>("num_reqs")
      .Attr<int64_t>("num_q_heads")
      .Attr<std::string_view>("q_dtype");
}

inline auto bind_attention_wait() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // token
      .Arg<ffi::AnyBuffer>()  // dep
      .Ret<ffi::AnyBuffer>()  // out
      .Attr<int64_t>("pool_id");
}

inline auto bind_kv_store() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // k_rows
      .Arg<ffi::AnyBuffer>()  // v_rows
      .Arg<ffi::AnyBuffer>()  // layer
      .Arg<ffi::AnyBuffer>()  // slot_mapping
      .Ret<ffi::AnyBuffer>()  // token
      .Attr<int64_t>("pool_id");
}

inline auto bind_kv_load() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // layer
      .Arg<ffi::AnyBuffer>()  // slot_mapping
      .Arg<ffi::AnyBuffer>()  // dep
      .Ret<ffi::AnyBuffer>()  // k_rows
      .Ret<ffi::AnyBuffer>()  // v_rows
      .Attr<int64_t>("pool_id");
}

// Exposes the pool, the handler capsules and the CUDA handoff's controls to Python.
void register_handoff(pybind11::module_& m);

}  // namespace neo

XLA_FFI_DECLARE_HANDLER_SYMBOL(NeoCpuAttentionStartCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NeoCpuAttentionWaitCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NeoHostKvStoreCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NeoHostKvLoadCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NeoCpuAttentionStartCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NeoCpuAttentionWaitCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NeoHostKvStoreCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(NeoHostKvLoadCuda);
