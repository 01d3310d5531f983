// Platform "CUDA" handlers of the handoff custom calls: check the operands on the host, then let
// the process's CudaHandoff enqueue the call (see handoff_cuda.h).
#include <stdexcept>

#include "handoff.h"
#include "handoff_cuda.h"

namespace neo {
namespace {

template <typename Body>
ffi::Error guarded(const char* op, Body&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const std::invalid_argument& e) {
    return ffi::Error::InvalidArgument(e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(op) + ": " + e.what());
  }
}

CudaHandoff& handoff(CUstream stream) {
  const CudaDriver* cuda = cuda_driver();
  if (cuda == nullptr) throw std::runtime_error(cuda_driver_status());
  return CudaHandoff::get(*cuda, stream);
}

std::shared_ptr<HostKvPool> pool_or_throw(const char* op, int64_t pool_id) {
  std::string error;
  std::shared_ptr<HostKvPool> pool = pool_for_call(op, pool_id, &error);
  if (!pool) throw std::invalid_argument(error);
  return pool;
}

void throw_if(const std::string& error) {
  if (!error.empty()) throw std::invalid_argument(error);
}

ffi::Error attention_start(ffi::AnyBuffer rows, ffi::AnyBuffer layer, ffi::AnyBuffer requests, ffi::AnyBuffer,
                           ffi::Result<ffi::AnyBuffer> token, int64_t pool_id, int64_t num_reqs,
                           int64_t num_q_heads, std::string_view q_dtype, CUstream stream) {
  return guarded("cpu_attention_start", [&] {
    std::shared_ptr<HostKvPool> pool = pool_or_throw("cpu_attention_start", pool_id);
    AttentionShape shape;
    throw_if(check_attention_operands(*pool, rows, layer, requests, num_reqs, num_q_heads, q_dtype, &shape));
    handoff(stream).start_attention(stream, pool, shape, rows, layer, requests, token->untyped_data());
  });
}

ffi::Error attention_wait(ffi::AnyBuffer token, ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer> out, int64_t,
                          CUstream stream) {
  return guarded("cpu_attention_wait", [&] { handoff(stream).wait_attention(stream, token.untyped_data(), *out); });
}

ffi::Error kv_store(ffi::AnyBuffer k_rows, ffi::AnyBuffer v_rows, ffi::AnyBuffer layer,
                    ffi::AnyBuffer slot_mapping, ffi::Result<ffi::AnyBuffer> token, int64_t pool_id,
                    CUstream stream) {
  return guarded("host_kv_store", [&] {
    std::shared_ptr<HostKvPool> pool = pool_or_throw("host_kv_store", pool_id);
    throw_if(check_kv_rows_operands("host_kv_store", *pool, k_rows, v_rows, layer, slot_mapping));
    handoff(stream).store(stream, pool, k_rows, v_rows, layer, slot_mapping, token->untyped_data());
  });
}

ffi::Error kv_load(ffi::AnyBuffer layer, ffi::AnyBuffer slot_mapping, ffi::AnyBuffer,
                   ffi::Result<ffi::AnyBuffer> k_rows, ffi::Result<ffi::AnyBuffer> v_rows,
                   int64_t pool_id, CUstream stream) {
  return guarded("host_kv_load", [&] {
    std::shared_ptr<HostKvPool> pool = pool_or_throw("host_kv_load", pool_id);
    throw_if(check_kv_rows_operands("host_kv_load", *pool, *k_rows, *v_rows, layer, slot_mapping));
    handoff(stream).load(stream, pool, layer, slot_mapping, *k_rows, *v_rows);
  });
}

}  // namespace
}  // namespace neo

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoCpuAttentionStartCuda, neo::attention_start,
                              neo::bind_attention_start().Ctx<xla::ffi::PlatformStream<CUstream>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoCpuAttentionWaitCuda, neo::attention_wait,
                              neo::bind_attention_wait().Ctx<xla::ffi::PlatformStream<CUstream>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoHostKvStoreCuda, neo::kv_store,
                              neo::bind_kv_store().Ctx<xla::ffi::PlatformStream<CUstream>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NeoHostKvLoadCuda, neo::kv_load,
                              neo::bind_kv_load().Ctx<xla::ffi::PlatformStream<CUstream>>());
