#include "handoff_cuda.h"

#include "thread_pool.h"

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace neo {
namespace {

// Staging held by calls the CPU has not finished, host and device together, past which a new call waits for the
// oldest to retire instead of allocating more: when stores come faster than the CPU scatters them (back-to-back
// swap steps), every call used to pin fresh memory, and cuMemHostAlloc of a 256 MB buffer took longer (~30 ms on
// the H200) than the scatter it waited for.
constexpr size_t kMaxStagingInFlightBytes = size_t{512} << 20;
constexpr double kStagingWaitTimeoutS = 60.0;

std::vector<CudaHandoff*> instances;  // one per CUDA context, each lives until exit
std::mutex instance_mutex;

CUdeviceptr device_address(const void* ptr) { return reinterpret_cast<CUdeviceptr>(ptr); }

}  // namespace

CudaHandoff& CudaHandoff::get(const CudaDriver& cuda, CUstream xla_stream) {
  CUcontext context = nullptr;
  CUresult result = cuda.cuStreamGetCtx(xla_stream, &context);
  if (result != kCudaSuccess) throw std::runtime_error(cuda_error_text("cuStreamGetCtx", result));
  std::lock_guard<std::mutex> lock(instance_mutex);
  for (CudaHandoff* handoff : instances)
    if (handoff->context_ == context) return *handoff;
  instances.push_back(new CudaHandoff(cuda, xla_stream));
  return *instances.back();
}

std::vector<CudaHandoff*> CudaHandoff::existing() {
  std::lock_guard<std::mutex> lock(instance_mutex);
  return instances;
}

CudaHandoff::CudaHandoff(const CudaDriver& cuda, CUstream xla_stream) : cuda_(cuda), staging_(cuda) {
  check(cuda_.cuStreamGetCtx(xla_stream, &context_), "cuStreamGetCtx");
  check(cuda_.cuCtxSetCurrent(context_), "cuCtxSetCurrent");
  check(cuda_.cuStreamCreate(&to_host_, kStreamNonBlocking), "cuStreamCreate");
  check(cuda_.cuStreamCreate(&from_host_, kStreamNonBlocking), "cuStreamCreate");
  check(cuda_.cuEventCreate(&xla_reached_, kEventDisableTiming), "cuEventCreate");
  void* flags = nullptr;
  check(cuda_.cuMemHostAlloc(&flags, 4096, kMemHostAllocDeviceMap), "cuMemHostAlloc");
  std::memset(flags, 0, 4096);
  flags_ = static_cast<uint32_t*>(flags);
  CUdeviceptr base = 0;
  check(cuda_.cuMemHostGetDevicePointer(&base, flags, 0), "cuMemHostGetDevicePointer");
  doorbell_device_ = base;
  done_device_ = base + 64 * sizeof(uint32_t);
  dispatcher_ = std::make_unique<HandoffDispatcher>(flags_, flags_ + 64,
                                                    env_int("NEO_CPU_SPIN_US", default_spin_us()));
  checked_streams_.insert(xla_stream);
}

void CudaHandoff::check(CUresult result, const char* call) const {
  if (result != kCudaSuccess) throw std::runtime_error(cuda_error_text(call, result));
}

void CudaHandoff::enter(CUstream xla) {
  if (checked_streams_.count(xla) == 0) {
    CUcontext context = nullptr;
    check(cuda_.cuStreamGetCtx(xla, &context), "cuStreamGetCtx");
    if (context != context_)
      throw std::invalid_argument("a GPU's CPU attention handoff was called from another GPU's stream");
    checked_streams_.insert(xla);
  }
  CUcontext current = nullptr;
  check(cuda_.cuCtxGetCurrent(&current), "cuCtxGetCurrent");
  if (current != context_) check(cuda_.cuCtxSetCurrent(context_), "cuCtxSetCurrent");
  std::string error = dispatcher_->take_error();
  if (!error.empty()) throw std::invalid_argument(error + " (found by the CPU in an earlier call)");
  retire_finished();
}

void CudaHandoff::retire_finished() {
  uint32_t done = dispatcher_->completed();
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    Call& call = **it;
    if (call.awaiting_wait) {
      ++it;
      continue;
    }
    if (!seq_reached(done, call.seq)) break;
    if (call.retire != nullptr) {
      CUresult state = cuda_.cuEventQuery(call.retire);
      if (state == kCudaErrorNotReady) break;
      check(state, "cuEventQuery");
      staging_.release_event(call.retire);
    }
    if (call.prefetched != nullptr) staging_.release_event(call.prefetched);
    staging_.release(call.staging);
    it = in_flight_.erase(it);
  }
}

void CudaHandoff::wait_for_staging(size_t bytes) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(kStagingWaitTimeoutS);
  for (;;) {
    retire_finished();
    size_t held = 0;  // a start whose wait XLA has not enqueued yet cannot retire before this call returns
    for (const std::shared_ptr<Call>& call : in_flight_)
      if (!call->awaiting_wait) held += call->staging.host_bytes + call->staging.device_bytes;
    if (held == 0 || held + bytes <= kMaxStagingInFlightBytes) return;
    if (std::chrono::steady_clock::now() > deadline)
      throw std::runtime_error("the CPU handoff's earlier calls hold " + std::to_string(held) +
                               " bytes of staging and did not finish within " +
                               std::to_string(kStagingWaitTimeoutS) + " s");
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

std::shared_ptr<CudaHandoff::Call> CudaHandoff::new_call(std::shared_ptr<HostKvPool> pool,
                                                         size_t host_bytes, size_t device_bytes) {
  wait_for_staging(StagingBuffers::allocated_bytes(host_bytes) + StagingBuffers::allocated_bytes(device_bytes));
  auto call = std::make_shared<Call>();
  call->seq = next_seq_;
  call->pool = std::move(pool);
  call->staging = staging_.acquire(host_bytes, device_bytes);
  call->retire = staging_.acquire_event();
  return call;
}

void CudaHandoff::stage_operands(const Call& call, const std::vector<ffi::AnyBuffer>& operands,
                                 const std::vector<size_t>& offsets, size_t bytes, CUstream xla) {
  if (call.staging.device == 0) {  // too large to stage on the device: straight from XLA's buffers
    follow_xla(xla, to_host_);
    for (size_t i = 0; i < operands.size(); ++i) {
      if (operands[i].size_bytes() == 0) continue;
      check(cuda_.cuMemcpyDtoHAsync(call.staging.host + offsets[i], device_address(operands[i].untyped_data()),
                                    operands[i].size_bytes(), to_host_),
            "cuMemcpyDtoHAsync");
    }
    return;
  }
  for (size_t i = 0; i < operands.size(); ++i) {
    if (operands[i].size_bytes() == 0) continue;
    check(cuda_.cuMemcpyDtoDAsync(call.staging.device + offsets[i], device_address(operands[i].untyped_data()),
                                  operands[i].size_bytes(), xla),
          "cuMemcpyDtoDAsync");
  }
  follow_xla(xla, to_host_);
  if (bytes > 0)
    check(cuda_.cuMemcpyDtoHAsync(call.staging.host, call.staging.device, bytes, to_host_), "cuMemcpyDtoHAsync");
}

void CudaHandoff::follow_xla(CUstream xla, CUstream side) {
  check(cuda_.cuEventRecord(xla_reached_, xla), "cuEventRecord");
  check(cuda_.cuStreamWaitEvent(side, xla_reached_, 0), "cuStreamWaitEvent");
}

void CudaHandoff::ring_doorbell(const Call& call) {
  check(cuda_.cuStreamWriteValue32(to_host_, doorbell_device_, call.seq, kStreamWriteValueDefault),
        "cuStreamWriteValue32");
}

void CudaHandoff::start_attention(CUstream xla, std::shared_ptr<HostKvPool> pool, const AttentionShape& shape,
                                  ffi::AnyBuffer rows, ffi::AnyBuffer layer, ffi::AnyBuffer requests, void* token) {
  std::lock_guard<std::mutex> lock(mutex_);
  enter(xla);
  StagingLayout layout;
  std::vector<ffi::AnyBuffer> operands{rows, layer, requests};
  std::vector<size_t> offsets;
  for (const ffi::AnyBuffer& operand : operands) offsets.push_back(layout.add(operand.size_bytes()));
  size_t operand_bytes = layout.size();
  size_t out_offset = layout.add(shape.q_bytes());
  std::shared_ptr<Call> call = new_call(pool, layout.size(), layout.size());
  call->prefetched = staging_.acquire_event();
  call->out_offset = out_offset;
  call->out_bytes = shape.q_bytes();

  stage_operands(*call, operands, offsets, operand_bytes, xla);
  ring_doorbell(*call);
  check(cuda_.cuStreamWaitValue32(from_host_, done_device_, call->seq, kStreamWaitValueGeq),
        "cuStreamWaitValue32");
  if (call->out_bytes > 0)
    check(cuda_.cuMemcpyHtoDAsync(call->staging.device + out_offset, call->staging.host + out_offset,
                                  call->out_bytes, from_host_),
          "cuMemcpyHtoDAsync");
  check(cuda_.cuEventRecord(call->prefetched, from_host_), "cuEventRecord");
  check(cuda_.cuStreamWriteValue32(xla, device_address(token), call->seq, kStreamWriteValueDefault),
        "cuStreamWriteValue32");

  char* host = call->staging.host;
  AttentionOperands staged = unpack_attention_operands(shape, host + offsets[0],
                                                       reinterpret_cast<const int32_t*>(host + offsets[1]),
                                                       reinterpret_cast<const int32_t*>(host + offsets[2]),
                                                       host + out_offset);
  dispatcher_->submit(call->seq, [pool, shape, staged] { return run_attention(*pool, shape, staged); });
  call->awaiting_wait = true;
  awaiting_wait_[token] = call;
  in_flight_.push_back(call);
  ++next_seq_;
}

void CudaHandoff::wait_attention(CUstream xla, const void* token, ffi::AnyBuffer out) {
  std::lock_guard<std::mutex> lock(mutex_);
  enter(xla);
  auto it = awaiting_wait_.find(token);
  if (it == awaiting_wait_.end())
    throw std::invalid_argument("cpu_attention_wait: the token comes from no pending cpu_attention_start");
  std::shared_ptr<Call> call = it->second;
  awaiting_wait_.erase(it);
  if (out.size_bytes() != call->out_bytes)
    throw std::invalid_argument("cpu_attention_wait: out has " + std::to_string(out.size_bytes()) +
                                " bytes, the started call produces " + std::to_string(call->out_bytes));
  check(cuda_.cuStreamWaitEvent(xla, call->prefetched, 0), "cuStreamWaitEvent");
  if (call->out_bytes > 0)
    check(cuda_.cuMemcpyDtoDAsync(device_address(out.untyped_data()), call->staging.device + call->out_offset,
                                  call->out_bytes, xla),
          "cuMemcpyDtoDAsync");
  check(cuda_.cuEventRecord(call->retire, xla), "cuEventRecord");
  call->awaiting_wait = false;
}

void CudaHandoff::store(CUstream xla, std::shared_ptr<HostKvPool> pool, ffi::AnyBuffer k_rows,
                        ffi::AnyBuffer v_rows, ffi::AnyBuffer layer, ffi::AnyBuffer slot_mapping,
                        void* token) {
  std::lock_guard<std::mutex> lock(mutex_);
  enter(xla);
  StagingLayout layout;
  size_t k_offset = layout.add(k_rows.size_bytes()), v_offset = layout.add(v_rows.size_bytes());
  size_t layer_offset = layout.add(layer.size_bytes());
  size_t slot_offset = layout.add(slot_mapping.size_bytes());
  bool on_device = layout.size() <= kMaxDeviceStagingBytes;
  std::shared_ptr<Call> call = new_call(pool, layout.size(), on_device ? layout.size() : 0);

  stage_operands(*call, {k_rows, v_rows, layer, slot_mapping}, {k_offset, v_offset, layer_offset, slot_offset},
                 layout.size(), xla);
  ring_doorbell(*call);
  check(cuda_.cuEventRecord(call->retire, to_host_), "cuEventRecord");
  if (!on_device) check(cuda_.cuStreamWaitEvent(xla, call->retire, 0), "cuStreamWaitEvent");  // XLA may reuse them
  check(cuda_.cuStreamWriteValue32(xla, device_address(token), call->seq, kStreamWriteValueDefault),
        "cuStreamWriteValue32");

  char* host = call->staging.host;
  KvRowsOperands staged{slot_mapping.dimensions()[0],
                        reinterpret_cast<const int32_t*>(host + layer_offset),
                        reinterpret_cast<const int32_t*>(host + slot_offset), host + k_offset,
                        host + v_offset, layer.dimensions().size() == 1};
  dispatcher_->submit(call->seq, [pool, staged] { return run_store(*pool, staged); });
  in_flight_.push_back(call);
  ++next_seq_;
}

void CudaHandoff::load(CUstream xla, std::shared_ptr<HostKvPool> pool, ffi::AnyBuffer layer,
                       ffi::AnyBuffer slot_mapping, ffi::AnyBuffer k_rows, ffi::AnyBuffer v_rows) {
  std::lock_guard<std::mutex> lock(mutex_);
  enter(xla);
  StagingLayout layout;
  size_t layer_offset = layout.add(layer.size_bytes());
  size_t slot_offset = layout.add(slot_mapping.size_bytes());
  size_t operand_bytes = layout.size();
  size_t k_offset = layout.add(k_rows.size_bytes()), v_offset = layout.add(v_rows.size_bytes());
  std::shared_ptr<Call> call = new_call(pool, layout.size(), operand_bytes);
  char* host = call->staging.host;

  stage_operands(*call, {layer, slot_mapping}, {layer_offset, slot_offset}, operand_bytes, xla);
  // XLA may use the rows' buffers until here.
  check(cuda_.cuStreamWaitEvent(from_host_, xla_reached_, 0), "cuStreamWaitEvent");
  ring_doorbell(*call);
  check(cuda_.cuStreamWaitValue32(from_host_, done_device_, call->seq, kStreamWaitValueGeq),
        "cuStreamWaitValue32");
  for (auto [rows, offset] : {std::pair{k_rows, k_offset}, std::pair{v_rows, v_offset}}) {
    if (rows.size_bytes() == 0) continue;
    check(cuda_.cuMemcpyHtoDAsync(device_address(rows.untyped_data()), host + offset,
                                  rows.size_bytes(), from_host_),
          "cuMemcpyHtoDAsync");
  }
  check(cuda_.cuEventRecord(call->retire, from_host_), "cuEventRecord");
  check(cuda_.cuStreamWaitEvent(xla, call->retire, 0), "cuStreamWaitEvent");

  KvRowsOperands staged{slot_mapping.dimensions()[0],
                        reinterpret_cast<const int32_t*>(host + layer_offset),
                        reinterpret_cast<const int32_t*>(host + slot_offset), host + k_offset,
                        host + v_offset, layer.dimensions().size() == 1};
  dispatcher_->submit(call->seq, [pool, staged] { return run_load(*pool, staged); });
  in_flight_.push_back(call);
  ++next_seq_;
}

std::string CudaHandoff::synchronize(double timeout_s) {
  bool idle = dispatcher_->wait_idle(timeout_s);
  std::string error = dispatcher_->take_error();
  if (!error.empty()) return error;
  if (!idle)
    return "the CPU handoff did not finish its calls within " + std::to_string(timeout_s) +
           " s; has the GPU run the programs that issued them?";
  return "";
}

}  // namespace neo
