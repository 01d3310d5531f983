// A pool of pinned worker threads for the CPU attention op. The calling thread works too, so a pool
// of N threads starts N-1 workers. Workers spin for a short while after each call (the op runs once
// per layer, so the next call usually comes soon), then sleep on a condition variable. No OpenMP.
// Sleepers are woken in a chain: the caller wakes one and starts on the tasks, each woken worker wakes
// the next while tasks are left. Waking them all from the caller put every wake-up (a futex call, and
// in a VM an interrupt to an idle vCPU) ahead of the call's first task, a likely reason why on the H200
// host the time a one-request CPU attention added to a pipelined step fell from 425 to 170 us per layer
// going from 32 threads to 16.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace neo {

// Logical CPU ids this process may run on, one per physical core (the first sibling of each).
std::vector<int> physical_core_cpus();

class ThreadPool {
 public:
  // num_threads counts the caller; pin puts worker i on physical core i (the caller keeps core 0's
  // slot, unpinned). spin_us: how long an idle worker polls before it sleeps.
  ThreadPool(int num_threads, bool pin, int spin_us);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Runs task(i, worker) for every i in [0, num_tasks), handing tasks out one at a time to whichever
  // thread is free; worker is in [0, num_threads()) and unique among the threads running at once
  // (scratch memory can be indexed by it). Returns when all tasks are done and rethrows the first
  // exception a task threw. Calls from several threads are serialized; a task must not call
  // parallel_for on the same pool.
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t task, int worker)>& task);

  // Joins the workers and starts num_threads - 1 new ones; waits for a running call to finish.
  void resize(int num_threads);

  // Joins the workers; later calls run on the calling thread alone. Idempotent.
  void shutdown();

 private:
  using Task = std::function<void(int64_t, int)>;
  struct Job {
    const Task* task = nullptr;
    int64_t num_tasks = 0;
  };
  // A job slot read by workers while the caller may be filling it for a later call (seqlock-style,
  // validated by the epoch in work_), hence atomic fields.
  struct JobSlot {
    std::atomic<const Task*> task{nullptr};
    std::atomic<int64_t> num_tasks{0};
  };

  void start_workers(int num_threads);
  void stop_workers();
  void worker_loop(int worker, int cpu);
  // Takes and runs tasks of the call `epoch` until none is left.
  void run_tasks(uint32_t epoch, const Job& job, int worker);
  bool snapshot(uint32_t epoch, Job& job) const;
  // Wakes one sleeping worker if the call `epoch` has a task left beyond the one the waker takes next.
  void wake_one_if_tasks_left(uint32_t epoch, int64_t num_tasks);

  bool pin_;
  int spin_us_;
  int num_threads_ = 1;
  std::mutex call_mutex_;  // one call (or resize) at a time
  // High 32 bits: the epoch of the current call; low 32 bits: the next task index to hand out.
  std::atomic<uint64_t> work_{0};
  JobSlot jobs_[2];  // the job of epoch e lives in jobs_[e & 1], written before work_ names e
  std::atomic<int64_t> tasks_done_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::mutex error_mutex_;
  std::exception_ptr error_;
  std::vector<std::thread> workers_;
};

// The physical cores this process may use, or half of them on a machine with a CUDA GPU.
int default_num_threads();

// How long idle workers poll before they sleep: 200 us, or 20 ms on a machine with a CUDA GPU.
int default_spin_us();

// The environment variable `name` as an integer in [1, 2**20), else `fallback`.
int env_int(const char* name, int fallback);

// The process-wide pool: NEO_CPU_THREADS threads (default: default_num_threads()),
// pinned, idle workers polling NEO_CPU_SPIN_US microseconds (default: default_spin_us()) before they sleep.
ThreadPool& default_thread_pool();

}  // namespace neo
