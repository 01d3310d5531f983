#include "thread_pool.h"

#include "cuda_driver.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <set>
#include <string>
#include <utility>

namespace neo {
namespace {

using Clock = std::chrono::steady_clock;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

inline uint32_t epoch_of(uint64_t work) { return static_cast<uint32_t>(work >> 32); }
inline int64_t index_of(uint64_t work) { return static_cast<int64_t>(work & 0xffffffffu); }

int read_int(const std::string& path, int fallback) {
  std::ifstream file(path);
  int value;
  return (file >> value) ? value : fallback;
}

}  // namespace

int env_int(const char* name, int fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  long value = std::strtol(text, &end, 10);
  return (*end == '\0' && value > 0 && value < (1 << 20)) ? static_cast<int>(value) : fallback;
}

std::vector<int> physical_core_cpus() {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return {0};
  std::set<std::pair<int, int>> seen_cores;  // (package, core)
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &allowed)) continue;
    std::string topology = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    int package = read_int(topology + "physical_package_id", 0);
    int core = read_int(topology + "core_id", cpu);
    if (seen_cores.insert({package, core}).second) cpus.push_back(cpu);
  }
  if (cpus.empty()) cpus.push_back(0);
  return cpus;
}

ThreadPool::ThreadPool(int num_threads, bool pin, int spin_us) : pin_(pin), spin_us_(spin_us) {
  start_workers(num_threads);
}

ThreadPool::~ThreadPool() { shutdown(); }

void ThreadPool::start_workers(int num_threads) {
  num_threads_ = num_threads < 1 ? 1 : num_threads;
  stopping_.store(false);
  std::vector<int> cpus = physical_core_cpus();
  for (int worker = 1; worker < num_threads_; ++worker) {
    int cpu = pin_ ? cpus[worker % cpus.size()] : -1;
    workers_.emplace_back([this, worker, cpu] { worker_loop(worker, cpu); });
  }
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    stopping_.store(true);
  }
  wake_.notify_all();
  for (std::thread& worker : workers_) worker.join();
  workers_.clear();
  num_threads_ = 1;
}

void ThreadPool::resize(int num_threads) {
  std::lock_guard<std::mutex> lock(call_mutex_);
  stop_workers();
  start_workers(num_threads);
}

void ThreadPool::shutdown() {
  std::lock_guard<std::mutex> lock(call_mutex_);
  if (!workers_.empty()) stop_workers();
}

bool ThreadPool::snapshot(uint32_t epoch, Job& job) const {
  const JobSlot& slot = jobs_[epoch & 1];
  job.task = slot.task.load(std::memory_order_relaxed);
  job.num_tasks = slot.num_tasks.load(std::memory_order_relaxed);
  // The slot of epoch e is rewritten only for epoch e + 2, after work_ has moved past e.
  std::atomic_thread_fence(std::memory_order_acquire);
  return epoch_of(work_.load(std::memory_order_acquire)) == epoch;
}

void ThreadPool::run_tasks(uint32_t epoch, const Job& job, int worker) {
  uint64_t work = work_.load(std::memory_order_acquire);
  for (;;) {
    if (epoch_of(work) != epoch || index_of(work) >= job.num_tasks) return;
    if (!work_.compare_exchange_weak(work, work + 1, std::memory_order_acq_rel)) continue;
    try {
      (*job.task)(index_of(work), worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
    tasks_done_.fetch_add(1, std::memory_order_acq_rel);
    work = work_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker_loop(int worker, int cpu) {
  if (cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
  }
  uint32_t seen = epoch_of(work_.load(std::memory_order_acquire));
  while (!stopping_.load(std::memory_order_acquire)) {
    uint32_t epoch = epoch_of(work_.load(std::memory_order_acquire));
    if (epoch != seen) {
      seen = epoch;
      Job job;
      if (snapshot(epoch, job)) {
        wake_one_if_tasks_left(epoch, job.num_tasks);
        run_tasks(epoch, job, worker);
      }
      continue;
    }
    auto spin_until = Clock::now() + std::chrono::microseconds(spin_us_);
    while (epoch_of(work_.load(std::memory_order_acquire)) == seen &&
           !stopping_.load(std::memory_order_acquire) && Clock::now() < spin_until) {
      for (int i = 0; i < 64; ++i) cpu_relax();
    }
    if (epoch_of(work_.load(std::memory_order_acquire)) != seen) continue;
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(lock, [&] {
      return stopping_.load(std::memory_order_seq_cst) ||
             epoch_of(work_.load(std::memory_order_seq_cst)) != seen;
    });
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }
}

void ThreadPool::wake_one_if_tasks_left(uint32_t epoch, int64_t num_tasks) {
  if (sleepers_.load(std::memory_order_seq_cst) == 0) return;
  uint64_t work = work_.load(std::memory_order_acquire);
  if (epoch_of(work) != epoch || index_of(work) + 1 >= num_tasks) return;  // the waker takes the last one
  std::lock_guard<std::mutex> lock(sleep_mutex_);
  wake_.notify_one();
}

void ThreadPool::parallel_for(int64_t num_tasks,
                              const std::function<void(int64_t task, int worker)>& task) {
  if (num_tasks <= 0) return;
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  if (workers_.empty() || num_tasks == 1) {
    for (int64_t i = 0; i < num_tasks; ++i) task(i, 0);
    return;
  }
  uint32_t epoch = epoch_of(work_.load(std::memory_order_relaxed)) + 1;
  jobs_[epoch & 1].task.store(&task, std::memory_order_relaxed);
  jobs_[epoch & 1].num_tasks.store(num_tasks, std::memory_order_relaxed);
  tasks_done_.store(0, std::memory_order_relaxed);
  error_ = nullptr;
  work_.store(static_cast<uint64_t>(epoch) << 32, std::memory_order_seq_cst);
  wake_one_if_tasks_left(epoch, num_tasks);
  run_tasks(epoch, Job{&task, num_tasks}, 0);
  for (int spins = 0; tasks_done_.load(std::memory_order_acquire) < num_tasks; ++spins) {
    if (spins < 100000) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

int default_num_threads() {
  int cores = static_cast<int>(physical_core_cpus().size());
  // Where a GPU runs too, XLA's launch threads, the handoff's dispatcher and Python need cores while the
  // workers run, and the slowest worker sets the op's time. On the 32-core H200 host, 16 workers handed off
  // in 71 us per layer and read 8 requests' KV in 10.2 ms; 32 workers took 217 us and 18.1 ms (8: 100 us).
  return cuda_driver() != nullptr ? std::max(1, cores / 2) : cores;
}

int default_spin_us() {
  // A pipelined step calls the op once per layer, every ~300 us for llama-3-8b on the H200. Workers that slept
  // between the layers were woken in a chain at every call: one request x 1k added 107-119 us per layer to the
  // step with 200 us of spin, 55 us with 20 ms (the mechanism alone, one token: 47-51 -> 39 us).
  return cuda_driver() != nullptr ? 20000 : 200;
}

ThreadPool& default_thread_pool() {
  static ThreadPool pool(env_int("NEO_CPU_THREADS", default_num_threads()),
                         /*pin=*/true, env_int("NEO_CPU_SPIN_US", default_spin_us()));
  return pool;
}

}  // namespace neo
