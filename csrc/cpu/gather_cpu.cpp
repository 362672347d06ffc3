// The CUDA kernel's arithmetic (gather_item, msfast/gather.h) run on the CPU, item by item,
// from the same plan the CUDA launcher builds (msfast/gather_plan.h). Not a fast path: it
// lets CPU-only CI test the CUDA path's indexing, descriptors and tables against the
// reference (tests/test_gather.py), selected with msfast._C._set_cpu_runner.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "msfast/gather_plan.h"

namespace msfast {

std::atomic<int>& cpu_runner() {
  // 0: the CPU kernels, 1: gather_item, 2: CPU kernels without the stencil and window,
  // 3: CPU kernels without the small-plane path, 4: the tiled path where a call fits it,
  // gather_item otherwise
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

std::atomic<int64_t>& tiled_calls() {
  static std::atomic<int64_t> n{0};
  return n;
}

std::atomic<bool>& table_cache_check() {
  static std::atomic<bool> on{false};
  return on;
}

std::atomic<int64_t>& table_cache_hits() {
  static std::atomic<int64_t> n{0};
  return n;
}

std::atomic<int64_t>& table_cache_misses() {
  static std::atomic<int64_t> n{0};
  return n;
}

namespace {
// Whether environment variable `name` is `value`: the CUDA switches' defaults, read at first use.
bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::string(e) == value;
}
std::atomic<bool>& cuda_tiles_flag() {
  static std::atomic<bool> f{env_is("MSFAST_CUDA_TILES", "1")};
  return f;
}
std::atomic<bool>& cuda_grid_flag() {
  static std::atomic<bool> f{env_is("MSFAST_CUDA_GRID", "resident")};
  return f;
}
}  // namespace

bool cuda_tiles_enabled() { return cuda_tiles_flag().load(); }

bool set_cuda_tiles(bool on) { return cuda_tiles_flag().exchange(on); }

bool cuda_grid_resident() { return cuda_grid_flag().load(); }

bool set_cuda_grid_resident(bool on) { return cuda_grid_flag().exchange(on); }

void set_cpu_runner(const std::string& name) {
  TORCH_CHECK_VALUE(name == "native" || name == "no-stencil" || name == "no-small" || name == "gather" ||
                        name == "gather64" || name == "tiles" || name == "tiles64",
                    "msfast: cpu runner must be 'native', 'no-stencil', 'no-small', 'gather', 'gather64', 'tiles' "
                    "or 'tiles64', got '", name, "'");
  gather_force_int64().store(name == "gather64" || name == "tiles64");
  cpu_runner().store(name == "native"       ? 0
                     : name == "no-stencil" ? 2
                     : name == "no-small"   ? 3
                     : name.rfind("tiles", 0) == 0 ? 4
                                             : 1);
}

// The CUDA tiled path's code, a tile at a time as a CUDA block runs it: each thread's share of
// the window copied into a buffer (the block's shared memory), then each thread's column
// computed from there.
template <typename S, typename D, typename A, typename Plan>
void run_tiles_cpu(const Plan& g, const TilePlan<typename Plan::index_t>& tp) {
  using I = typename Plan::index_t;
  using U = std::make_unsigned_t<I>;
  at::parallel_for(0, tp.tiles, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> win(tp.window);
    for (int64_t t = begin; t < end; ++t) {
      const TilePos<I> p = tile_pos<I>(tp.jobs.data(), g.jobs.data(), static_cast<int>(g.jobs.size()), g.terms.data(),
                                       g.tab->starts.data(), static_cast<U>(t));
      const GJob<I>& j = g.jobs[p.job];
      const GTerm<I>& tm = g.terms[j.first_term];
      for (I th = 0; th < kTileThreads; ++th) tile_stage<S, A, I>(tm, p, win.data(), th, I{kTileThreads});
      for (I th = 0; th < kTileThreads; ++th)
        tile_column<D, A, I>(j, tm, p, g.tab->starts.data(), g.tab->weights.data(), win.data(), th,
                             I{kTileThreads});
    }
  });
  tiled_calls().fetch_add(1);
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
      if constexpr (std::is_same_v<typename Plan::Shape, UpscaleShape>) {
        if (cpu_runner().load() == 4) {
          const auto tp = make_tile_plan<A>(jobs, g);
          if (tp.tiles > 0) return run_tiles_cpu<S, D, A>(g, tp);
        }
      }
      at::parallel_for(0, g.total, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          gather_item<typename Plan::Shape, S, D, A, I>(g.jobs.data(), static_cast<int>(g.jobs.size()),
                                                        g.terms.data(), g.tab->starts.data(),
                                                        g.tab->weights.data(), static_cast<U>(i));
      });
    });
  });
}

}  // namespace msfast
