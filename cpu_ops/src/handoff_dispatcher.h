// The host side of the GPU->CPU->GPU handoff: one thread that takes the calls in sequence order,
// spins until the GPU rings the doorbell for a call (its inputs have landed in pinned memory), runs
// the call's host work and publishes the call's sequence number in the done word that the GPU
// waits on. It makes no CUDA calls; both words live in mapped pinned memory. With its queue empty it
// polls for spin_us before it sleeps, like the workers: a call comes every layer, and waking a sleeping
// thread (a futex call in the launching thread, an interrupt to an idle vCPU) is slower than the layer's
// own handoff.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace neo {

// Sequence numbers wrap; a is at or after b when it is less than 2^31 ahead (the GPU's
// CU_STREAM_WAIT_VALUE_GEQ compares the same way).
inline bool seq_reached(uint32_t a, uint32_t b) { return static_cast<int32_t>(a - b) >= 0; }

class HandoffDispatcher {
 public:
  // doorbell: written by the GPU; done: written here, read by the GPU and the host.
  HandoffDispatcher(const uint32_t* doorbell, uint32_t* done, int spin_us);
  ~HandoffDispatcher();

  // Queues the work of call `seq`; calls must be submitted in sequence order. The work returns an
  // error text ("" when fine); the first error is kept for take_error().
  void submit(uint32_t seq, std::function<std::string()> work);

  uint32_t completed() const { return __atomic_load_n(done_, __ATOMIC_ACQUIRE); }
  std::string take_error();

  // Until every submitted call has completed; false on timeout.
  bool wait_idle(double timeout_s);

  // Finishes the queued calls whose doorbells ring within drain_timeout_s, then releases the GPU
  // from any call left (its output is not computed) and joins the thread. Idempotent.
  void shutdown(double drain_timeout_s);

 private:
  struct Queued {
    uint32_t seq;
    std::function<std::string()> work;
  };

  void loop();
  // Polls until a call is queued or spin_us has passed (then loop() sleeps on queued_).
  void poll_queue() const;
  bool wait_for_doorbell(uint32_t seq);
  void publish_done(uint32_t seq) { __atomic_store_n(done_, seq, __ATOMIC_RELEASE); }

  const uint32_t* doorbell_;
  uint32_t* done_;
  std::mutex mutex_;
  std::condition_variable queued_;
  std::deque<Queued> queue_;
  std::atomic<size_t> queue_size_{0};  // queue_.size(), for polling without the mutex
  int spin_us_;
  uint32_t last_submitted_;
  std::string error_;
  std::atomic<bool> stopping_{false};
  double drain_timeout_s_ = 0;
  std::thread thread_;
};

}  // namespace neo
