// The CUDA side of the handoff. XLA runs a custom call's handler on the host when it enqueues the
// call's thunk, long before the GPU gets there, so every handler only enqueues work and gives the
// call its own sequence number and staging buffers; nothing is decided at execution time.
//
//   start:  XLA's stream copies the three operands (a few KB per request; the caller packs q, k and v into
//           one and the request table into another) into one device staging buffer,
//           so XLA may reuse their buffers at once: a scan carry or a copy XLA inserts cannot hand the
//           side stream a stale buffer. XLA's stream then records an event; the to-host side stream
//           waits on it, copies the staged operands to pinned memory in one piece and rings the
//           doorbell (cuStreamWriteValue32 <- seq), while XLA's stream goes on. The dispatcher thread
//           sees the doorbell, runs append + attention into the pinned output and publishes seq in the
//           done word. The from-host side stream waits for done >= seq (cuStreamWaitValue32) and
//           prefetches the output into device staging. (Before, XLA's stream waited for the side
//           stream's seven per-operand copies to pinned memory: 47 us per start on the H200.)
//   wait:   XLA's stream waits for that prefetch and copies the output into its own buffer: it
//           stalls only if the CPU is late.
//   store:  its operands staged like start's (over kMaxDeviceStagingBytes: copied straight to pinned memory
//           while XLA's stream waits); the token is written at once.
//   load:   its operands staged like start's; XLA's stream waits until the rows the CPU gathered are
//           copied into its buffers.
// Staging buffers are recycled when their call retires; while the unfinished calls hold more than a cap, a new
// call's handler waits on the host for the oldest to retire (everything they need is already enqueued), so a
// CPU that falls behind slows the launches instead of pinning fresh memory for every call.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cuda_driver.h"
#include "handoff_dispatcher.h"
#include "handoff_ops.h"
#include "handoff_staging.h"

namespace neo {

// A store whose operands (K and V rows, layers, slots, each 256-byte aligned) fit this size is staged on the
// device, so that XLA's stream need not wait for their copy to the host (a 2048-token prefill of llama-3-8b stores
// 8 MB per layer; the engine splits swaps into such stores); larger ones are copied straight to pinned memory while
// XLA's stream waits, sparing device memory outside XLA's pool.
constexpr size_t kMaxDeviceStagingBytes = size_t{16} << 20;

class CudaHandoff {
 public:
  // The handoff of the GPU (CUDA context) that owns XLA's stream, created on that GPU's first call;
  // a tensor-parallel program gets one per GPU, each with its own doorbell and dispatcher thread,
  // all sharing the host worker pool. Methods throw std::invalid_argument for bad use and
  // std::runtime_error for CUDA failures.
  static CudaHandoff& get(const CudaDriver& cuda, CUstream xla_stream);
  // Every handoff created so far (none until a CUDA handler has run).
  static std::vector<CudaHandoff*> existing();

  void start_attention(CUstream xla, std::shared_ptr<HostKvPool> pool, const AttentionShape& shape,
                       ffi::AnyBuffer rows, ffi::AnyBuffer layer, ffi::AnyBuffer requests, void* token);
  void wait_attention(CUstream xla, const void* token,
                      ffi::AnyBuffer out);
  void store(CUstream xla, std::shared_ptr<HostKvPool> pool, ffi::AnyBuffer k_rows,
             ffi::AnyBuffer v_rows, ffi::AnyBuffer layer, ffi::AnyBuffer slot_mapping, void* token);
  void load(CUstream xla, std::shared_ptr<HostKvPool> pool, ffi::AnyBuffer layer,
            ffi::AnyBuffer slot_mapping, ffi::AnyBuffer k_rows, ffi::AnyBuffer v_rows);

  // Until the CPU has finished every call enqueued so far (the GPU must get to them); returns the
  // first error the CPU side met, or a timeout message, or "".
  std::string synchronize(double timeout_s);
  void shutdown(double drain_timeout_s) { dispatcher_->shutdown(drain_timeout_s); }

 private:
  struct Call {
    uint32_t seq = 0;
    std::shared_ptr<HostKvPool> pool;  // the dispatcher may still write it
    StagingBuffer staging;
    CUevent prefetched = nullptr;  // attention: the output has reached staging.device
    CUevent retire = nullptr;      // the last GPU use of the staging buffers
    bool awaiting_wait = false;
    size_t out_offset = 0;         // attention: of the output in both staging buffers
    size_t out_bytes = 0;
  };

  CudaHandoff(const CudaDriver& cuda, CUstream xla_stream);
  void check(CUresult result, const char* call) const;
  // Under mutex_: context checks, an earlier CPU-side error, retiring finished calls.
  void enter(CUstream xla);
  void retire_finished();
  // Retires finished calls; while the unfinished ones hold more than kMaxStagingInFlightBytes with `bytes` more,
  // waits for them (the GPU has all they need enqueued).
  void wait_for_staging(size_t bytes);
  std::shared_ptr<Call> new_call(std::shared_ptr<HostKvPool> pool, size_t host_bytes,
                                 size_t device_bytes);
  // Copies the operands on XLA's stream into call.staging.device at their offsets (short copies, after
  // which XLA may reuse their buffers), then the first `bytes` of it to call.staging.host in one piece on
  // the to-host stream, which XLA's stream does not wait for. Without device staging, copies each operand
  // to call.staging.host on the to-host stream; XLA's stream must then wait before it reuses them.
  void stage_operands(const Call& call, const std::vector<ffi::AnyBuffer>& operands,
                      const std::vector<size_t>& offsets, size_t bytes, CUstream xla);
  // The side stream starts its part of the call only where XLA's stream is now.
  void follow_xla(CUstream xla, CUstream side);
  void ring_doorbell(const Call& call);

  const CudaDriver& cuda_;
  CUcontext context_ = nullptr;
  CUstream to_host_ = nullptr;
  CUstream from_host_ = nullptr;
  CUevent xla_reached_ = nullptr;
  uint32_t* flags_ = nullptr;  // mapped pinned: the doorbell and the done word, a cache line apart
  CUdeviceptr doorbell_device_ = 0;
  CUdeviceptr done_device_ = 0;
  StagingBuffers staging_;
  std::unique_ptr<HandoffDispatcher> dispatcher_;

  std::mutex mutex_;
  uint32_t next_seq_ = 1;
  std::unordered_set<CUstream> checked_streams_;
  std::list<std::shared_ptr<Call>> in_flight_;
  std::unordered_map<const void*, std::shared_ptr<Call>> awaiting_wait_;  // by token address
};

}  // namespace neo
