// A STREAM-like read of a large array on the op's own thread pool: the memory read bandwidth the
// attention op is measured against (same threads, same pinning, so the bar is fair).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <vector>

#include "thread_pool.h"

namespace py = pybind11;

namespace neo {
namespace {

// Four independent sums so the adds keep up with the loads.
uint64_t sum_words(const uint64_t* words, int64_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += words[i];
    s1 += words[i + 1];
    s2 += words[i + 2];
    s3 += words[i + 3];
  }
  for (; i < n; ++i) s0 += words[i];
  return s0 + s1 + s2 + s3;
}

std::vector<double> read_bandwidth_probe(int64_t num_bytes, int repeats) {
  if (num_bytes < (1 << 20)) throw py::value_error("num_bytes must be at least 1 MiB");
  if (repeats < 1) throw py::value_error("repeats must be >= 1");
  py::gil_scoped_release release;
  ThreadPool& pool = default_thread_pool();
  const int64_t words = num_bytes / 8;
  const int64_t slices = pool.num_threads() * 4;
  const int64_t per_slice = (words + slices - 1) / slices;
  std::unique_ptr<uint64_t, decltype(&std::free)> data(
      static_cast<uint64_t*>(std::aligned_alloc(64, (words * 8 + 63) / 64 * 64)), &std::free);
  if (!data) throw std::bad_alloc();
  std::vector<uint64_t> sums(slices);
  auto slice_range = [&](int64_t slice, int64_t* begin, int64_t* end) {
    *begin = std::min(words, slice * per_slice);
    *end = std::min(words, *begin + per_slice);
  };
  pool.parallel_for(slices, [&](int64_t slice, int) {  // first touch by the threads that read
    int64_t begin, end;
    slice_range(slice, &begin, &end);
    for (int64_t i = begin; i < end; ++i) data.get()[i] = static_cast<uint64_t>(i);
  });
  std::vector<double> gbps;
  for (int r = 0; r < repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    pool.parallel_for(slices, [&](int64_t slice, int) {
      int64_t begin, end;
      slice_range(slice, &begin, &end);
      sums[slice] = sum_words(data.get() + begin, end - begin);
    });
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    gbps.push_back(static_cast<double>(words * 8) / seconds / 1e9);
  }
  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  if (total != static_cast<uint64_t>(words) * (words - 1) / 2) throw std::runtime_error("read probe checksum mismatch");
  return gbps;
}

}  // namespace

void register_bandwidth_probe(py::module_& m) {
  m.def("read_bandwidth_probe", &read_bandwidth_probe, py::arg("num_bytes") = int64_t{1} << 30,
        py::arg("repeats") = 5,
        "GB/s of a multithreaded sum over num_bytes (pick it larger than the caches), once per repeat.");
}

}  // namespace neo
