#include "handoff_dispatcher.h"

#include <chrono>
#include <exception>

namespace neo {
namespace {

using Clock = std::chrono::steady_clock;

Clock::time_point after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// Busy-wait iterations before the spin starts yielding the core: ~1 ms of pause instructions, far
// longer than the doorbell latency the GPU pipeline needs, short enough not to starve the workers.
constexpr int kSpinsBeforeYield = 20000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

HandoffDispatcher::HandoffDispatcher(const uint32_t* doorbell, uint32_t* done, int spin_us)
    : doorbell_(doorbell), done_(done), last_submitted_(__atomic_load_n(done, __ATOMIC_ACQUIRE)), spin_us_(spin_us) {
  thread_ = std::thread([this] { loop(); });
}

HandoffDispatcher::~HandoffDispatcher() { shutdown(0.0); }

void HandoffDispatcher::submit(uint32_t seq, std::function<std::string()> work) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(Queued{seq, std::move(work)});
    queue_size_.store(queue_.size(), std::memory_order_release);
    last_submitted_ = seq;
  }
  queued_.notify_one();
}

std::string HandoffDispatcher::take_error() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string error;
  error.swap(error_);
  return error;
}

bool HandoffDispatcher::wait_idle(double timeout_s) {
  Clock::time_point deadline = after(timeout_s);
  uint32_t target;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    target = last_submitted_;
  }
  while (!seq_reached(completed(), target)) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

void HandoffDispatcher::shutdown(double drain_timeout_s) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return;
    drain_timeout_s_ = drain_timeout_s;
    stopping_ = true;
  }
  queued_.notify_one();
  if (thread_.joinable()) thread_.join();
}

bool HandoffDispatcher::wait_for_doorbell(uint32_t seq) {
  Clock::time_point deadline{};
  for (int spins = 0;; ++spins) {
    if (seq_reached(__atomic_load_n(doorbell_, __ATOMIC_ACQUIRE), seq)) return true;
    if (spins < kSpinsBeforeYield) {
      cpu_relax();
      continue;
    }
    std::this_thread::yield();
    if (!stopping_) continue;
    if (deadline == Clock::time_point{}) deadline = after(drain_timeout_s_);
    if (Clock::now() > deadline) return false;
  }
}

void HandoffDispatcher::poll_queue() const {
  Clock::time_point until = after(spin_us_ * 1e-6);
  while (queue_size_.load(std::memory_order_acquire) == 0 && !stopping_ && Clock::now() < until)
    for (int i = 0; i < 64; ++i) cpu_relax();
}

void HandoffDispatcher::loop() {
  for (;;) {
    poll_queue();
    Queued call;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      queued_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      call = std::move(queue_.front());
      queue_.pop_front();
      queue_size_.store(queue_.size(), std::memory_order_release);
    }
    if (!wait_for_doorbell(call.seq)) {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.clear();
      publish_done(last_submitted_);
      return;
    }
    std::string error;
    try {
      error = call.work();
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (!error.empty()) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (error_.empty()) error_ = std::move(error);
    }
    publish_done(call.seq);
  }
}

}  // namespace neo
