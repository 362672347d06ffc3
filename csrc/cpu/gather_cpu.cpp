// The CUDA kernels' arithmetic (gather_item and the tiled path, msfast/gather.h) run on the
// CPU, item by item or tile by tile, from the same plan and the same bytes the CUDA launcher
// builds (msfast/gather_plan.h: the plan, describe, tables_blob). Not a fast path: it lets
// CPU-only CI test the CUDA path's indexing, descriptors and tables against the reference
// (tests/test_gather.py), selected with msfast._C._set_cpu_runner.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
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

// Counters the tests read (msfast._C testing hooks): how often a path was taken.
#define MSFAST_COUNTER(name)              \
  std::atomic<int64_t>& name() {          \
    static std::atomic<int64_t> n{0};     \
    return n;                             \
  }
MSFAST_COUNTER(small_jobs_planned)
MSFAST_COUNTER(stencil_terms_planned)
MSFAST_COUNTER(streamed_calls)
MSFAST_COUNTER(tiled_calls)
MSFAST_COUNTER(table_cache_hits)
MSFAST_COUNTER(table_cache_misses)
#undef MSFAST_COUNTER

std::atomic<int64_t>& stream_bytes() {
  static std::atomic<int64_t> n{int64_t{16} << 20};  // 16 MiB; see JobPlan::stream
  return n;
}

std::atomic<bool>& staged_rows() {
  static std::atomic<bool> on{__builtin_cpu_is("intel") != 0};  // see JobPlan::stream
  return on;
}

std::atomic<bool>& table_cache_check() {
  static std::atomic<bool> on{false};
  return on;
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

namespace {

// A CUDA block's shared memory and the device buffer of tables hold int4s.
struct alignas(16) Int4 {
  int32_t v[4];
};

std::vector<Int4> int4_copy(const Blob& b, int64_t extra_bytes = 0) {
  std::vector<Int4> m((b.bytes.size() + extra_bytes + 15) / 16);
  std::memcpy(m.data(), b.bytes.data(), b.bytes.size());
  return m;
}

// What the CUDA kernels read, in the layout the launch (csrc/cuda/launch.cuh) hands them
// (gather_plan.h: describe, tables_blob), so that these runs check those bytes too: the
// descriptors as a block's shared memory holds them, the tables as one buffer.
template <typename A, typename Plan>
struct Image {
  using I = typename Plan::index_t;
  Descriptors desc;
  std::vector<Int4> tables;
  const int32_t* starts;
  const A* weights;
  Image(const Plan& g, const TilePlan<I>* tp) : desc(describe(g, tp)), tables(int4_copy(tables_blob(*g.tab))) {
    starts = reinterpret_cast<const int32_t*>(tables.data());
    weights = reinterpret_cast<const A*>(reinterpret_cast<const char*>(tables.data()) + weights_offset(*g.tab));
  }
  // A block's shared memory: the descriptors, then `extra` bytes (the tiled kernel's window).
  std::vector<Int4> block_memory(int64_t extra = 0) const { return int4_copy(desc.blob, extra); }
};

template <typename I>
const GJob<I>* jobs_in(const std::vector<Int4>& smem, const Descriptors& d) {
  return reinterpret_cast<const GJob<I>*>(reinterpret_cast<const char*>(smem.data()) + d.jobs_off);
}
template <typename I>
const GTerm<I>* terms_in(const std::vector<Int4>& smem, const Descriptors& d) {
  return reinterpret_cast<const GTerm<I>*>(reinterpret_cast<const char*>(smem.data()) + d.terms_off);
}

// The CUDA tiled path's code, a tile at a time as a CUDA block runs it: each thread's share of
// the window copied into the block's shared memory after the descriptors, then each thread's
// column computed from there.
template <typename S, typename D, typename A, typename Plan>
void run_tiles_cpu(const Plan& g, const TilePlan<typename Plan::index_t>& tp) {
  using I = typename Plan::index_t;
  using U = std::make_unsigned_t<I>;
  const Image<A, Plan> im(g, &tp);
  const int n_jobs = static_cast<int>(g.jobs.size());
  at::parallel_for(0, tp.tiles, 16, [&](int64_t begin, int64_t end) {
    std::vector<Int4> smem = im.block_memory(tp.window * static_cast<int64_t>(sizeof(A)));
    const auto* tjobs = reinterpret_cast<const TileJob<I>*>(smem.data());
    const GJob<I>* jobs = jobs_in<I>(smem, im.desc);
    const GTerm<I>* terms = terms_in<I>(smem, im.desc);
    A* win = reinterpret_cast<A*>(reinterpret_cast<char*>(smem.data()) + im.desc.bytes);
    for (int64_t t = begin; t < end; ++t) {
      const TilePos<I> p = tile_pos<I>(tjobs, jobs, n_jobs, terms, im.starts, static_cast<U>(t));
      const GJob<I>& j = jobs[p.job];
      const GTerm<I>& tm = terms[j.first_term];
      for (I th = 0; th < kTileThreads; ++th) tile_stage<S, A, I>(tm, p, win, th, I{kTileThreads});
      for (I th = 0; th < kTileThreads; ++th)
        tile_column<D, A, I>(j, tm, p, im.starts, im.weights, win, th, I{kTileThreads});
    }
  });
  tiled_calls().fetch_add(1);
}

}  // namespace

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
      const Image<A, Plan> im(g, nullptr);
      const std::vector<Int4> smem = im.block_memory();  // read only: one copy serves every block
      // resample_kernel reads its jobs at the start of shared memory, not at jobs_off
      const auto* gjobs = reinterpret_cast<const GJob<I>*>(smem.data());
      const GTerm<I>* terms = terms_in<I>(smem, im.desc);
      at::parallel_for(0, g.total, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          gather_item<typename Plan::Shape, S, D, A, I>(gjobs, static_cast<int>(g.jobs.size()), terms, im.starts,
                                                        im.weights, static_cast<U>(i));
      });
    });
  });
}

}  // namespace msfast
