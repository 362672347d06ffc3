// The CUDA kernel's arithmetic (gather_item, msfast/gather.h) run on the CPU, item by item,
// from the same plan the CUDA launcher builds (msfast/gather_plan.h). Not a fast path: it
// lets CPU-only CI test the CUDA path's indexing, descriptors and tables against the
// reference (tests/test_gather.py), selected with msfast._C._set_cpu_runner.
#include <ATen/Parallel.h>

#include <atomic>
#include <string>

#include "msfast/gather_plan.h"

namespace msfast {

std::atomic<int>& cpu_runner() {
  // 0: the CPU kernels, 1: gather_item, 2: CPU kernels without the stencil and window,
  // 3: CPU kernels without the small-plane path
  static std::atomic<int> runner{0};
  return runner;
}

bool cpu_stencil_enabled() { return cpu_runner().load() != 2; }

bool cpu_small_planes_enabled() { return cpu_runner().load() != 3; }

std::atomic<int64_t>& small_jobs_planned() {
  static std::atomic<int64_t> n{0};
  return n;
}

std::atomic<int64_t>& stencil_terms_planned() {
  static std::atomic<int64_t> n{0};
  return n;
}

std::atomic<int64_t>& stream_bytes() {
  static std::atomic<int64_t> n{int64_t{16} << 20};  // 16 MiB; see JobPlan::stream
  return n;
}

std::atomic<bool>& staged_rows() {
  static std::atomic<bool> on{__builtin_cpu_is("intel") != 0};  // see JobPlan::stream
  return on;
}

std::atomic<int64_t>& streamed_calls() {
  static std::atomic<int64_t> n{0};
  return n;
}

void set_cpu_runner(const std::string& name) {
  TORCH_CHECK_VALUE(
      name == "native" || name == "no-stencil" || name == "no-small" || name == "gather" || name == "gather64",
      "msfast: cpu runner must be 'native', 'no-stencil', 'no-small', 'gather' or 'gather64', got '", name, "'");
  gather_force_int64().store(name == "gather64");
  cpu_runner().store(name == "native" ? 0 : name == "no-stencil" ? 2 : name == "no-small" ? 3 : 1);
}

void run_gather_cpu(const std::vector<Job>& jobs) {
  const auto [st, dt] = check_jobs(jobs, c10::DeviceType::CPU);
  with_types(st, dt, [&](auto s, auto d, auto a) {
    using S = decltype(s);
    using D = decltype(d);
    using A = decltype(a);
    with_gather_plan<A>(jobs, [&](const auto& g) {
      using Plan = std::decay_t<decltype(g)>;
      using I = typename Plan::index_t;
      using U = std::make_unsigned_t<I>;
      at::parallel_for(0, g.total, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          gather_item<typename Plan::Shape, S, D, A, I>(g.jobs.data(), static_cast<int>(g.jobs.size()), g.terms.data(), g.starts.data(),
                                  g.weights.data(), static_cast<U>(i));
      });
    });
  });
}

}  // namespace msfast
