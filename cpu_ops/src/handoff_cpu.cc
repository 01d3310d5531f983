// Platform "cpu" handlers of the handoff custom calls: XLA's CPU backend runs them in program order
// with host buffers, so each call computes at once. The attention's output waits in a table under
// the call's number (the token) until its cpu_attention_wait copies it out.
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "handoff.h"
#include "handoff_ops.h"

namespace neo {
namespace {

// Calls started and not yet waited for; more means a program drops its tokens.
constexpr size_t kMaxPendingOutputs = 4096;

struct PendingOutputs {
  std::mutex mutex;
  uint32_t next_call = 1;
  std::unordered_map<uint32_t, std::vector<char>> outputs;
};

PendingOutputs& pending() {
  static PendingOutputs* instance = new PendingOutputs();
  return *instance;
}

uint32_t next_call_number() {
  std::lock_guard<std::mutex> lock(pending().mutex);
  return pending().next_call++;
}

ffi::Error attention_start(ffi::AnyBuffer rows, ffi::AnyBuffer layer, ffi::AnyBuffer requests, ffi::AnyBuffer,
                           ffi::Result<ffi::AnyBuffer> token, int64_t pool_id, int64_t num_reqs,
                           int64_t num_q_heads, std::string_view q_dtype) {
  std::string error;
  std::shared_ptr<HostKvPool> pool = pool_for_call("cpu_attention_start", pool_id, &error);
  AttentionShape shape;
  if (pool) error = check_attention_operands(*pool, rows, layer, requests, num_reqs, num_q_heads, q_dtype, &shape);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  std::vector<char> out(shape.q_bytes());
  AttentionOperands operands = unpack_attention_operands(
      shape, static_cast<const char*>(rows.untyped_data()), static_cast<const int32_t*>(layer.untyped_data()),
      static_cast<const int32_t*>(requests.untyped_data()), out.data());
  error = run_attention(*pool, shape, operands);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  std::lock_guard<std::mutex> lock(pending().mutex);
  if (pending().outputs.size() >= kMaxPendingOutputs)
    return ffi::Error::Internal("cpu_attention_start: " + std::to_string(kMaxPendingOutputs) +
                                " calls are still waiting for their cpu_attention_wait");
  uint32_t call = pending().next_call++;
  pending().outputs.emplace(call, std::move(out));
  *static_cast<int32_t*>(token->untyped_data()) = static_cast<int32_t>(call);
  return ffi::Error::Success();
}

ffi::Error attention_wait(ffi::AnyBuffer token, ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer> out, int64_t) {
  uint32_t call = static_cast<uint32_t>(*static_cast<const int32_t*>(token.untyped_data()));
  std::vector<char> result;
  {
    std::lock_guard<std::mutex> lock(pending().mutex);
    auto it = pending().outputs.find(call);
    if (it == pending().outputs.end())
      return ffi::Error::InvalidArgument("cpu_attention_wait: token " + std::to_string(call) +
                                         " names no pending cpu_attention_start");
    result = std::move(it->second);
    pending().outputs.erase(it);
  }
  if (result.size() != out->size_bytes())
    return ffi::Error::InvalidArgument("cpu_attention_wait: out has " + std::to_string(out->size_bytes()) +
                                       " bytes, the started call produced " + std::to_string(result.size()));
  std::memcpy(out->untyped_data(), result.data(), result.size());
  return ffi::Error::Success();
}

ffi::Error kv_store(ffi::AnyBuffer k_rows, ffi::AnyBuffer v_rows, ffi::AnyBuffer layer,
                    ffi::AnyBuffer slot_mapping, ffi::Result<ffi::AnyBuffer> token, int64_t pool_id) {
  std::string error;
  std::shared_ptr<HostKvPool> pool = pool_for_call("host_kv_store", pool_id, &error);
  if (pool) error = check_kv_rows_operands("host_kv_store", *pool, k_rows, v_rows, layer, slot_mapping);
  if (error.empty())
    error = run_store(*pool, KvRowsOperands{slot_mapping.dimensions()[0],
                                            static_cast<const int32_t*>(layer.untyped_data()),
                                            static_cast<const int32_t*>(slot_mapping.untyped_data()),
                                            k_rows.untyped_data(), v_rows.untyped_data(),
                                            layer.dimensions().size() == 1});
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  *static_cast<int32_t*>(token->untyped_data()) = static_cast<int32_t>(next_call_number());
  return ffi::Error::Success();
}

ffi::Error kv_load(ffi::AnyBuffer layer, ffi::AnyBuffer slot_mapping, ffi::AnyBuffer,
                   ffi::Result<ffi::AnyBuffer> k_rows, ffi::Result<ffi::AnyBuffer> v_rows,
                   int64_t pool_id) {
  std::string error;
  std::shared_ptr<HostKvPool> pool = pool_for_call("host_kv_load", pool_id, &error);
  if (pool) error = check_kv_rows_operands("host_kv_load", *pool, *k_rows, *v_rows, layer, slot_mapping);
  if (error.empty())
    error = run_load(*pool, KvRowsOperands{slot_mapping.dimensions()[0],
                                           static_cast<const int32_t*>(layer.untyped_data()),
                                           static_cast<const int32_t*>(slot_mapping.untyped_data()),
                                           k_rows->untyped_data(), v_rows->untyped_data(),
                                           layer.dimensions().size() == 1});
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace neo

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoCpuAttentionStartCpu, neo::attention_start, neo::bind_attention_start());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoCpuAttentionWaitCpu, neo::attention_wait, neo::bind_attention_wait());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoHostKvStoreCpu, neo::kv_store, neo::bind_kv_store());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoHostKvLoadCpu, neo::kv_load, neo::bind_kv_load());
