// Host side of the gather kernel (msfast/gather.h): a call's jobs turned into descriptors and
// one starts[] / weights[] pair of arrays holding every tap table (built once per key and
// shared by the calls that have it). Built identically for the CUDA kernel and for the CPU run
// of the same kernel code (csrc/cpu/gather_cpu.cpp).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "msfast/gather.h"
#include "msfast/ops.h"

namespace msfast {

// A call's tap tables: every term's vertical and horizontal tables (start[] as int32, weights
// tap-major) and each job's affine, concatenated in the jobs' and terms' order, with where each
// term's tables and each job's affine sit. A pure function of `key`, so it is built once per key
// and shared (gather_tables): a training or serving loop calls with the same shapes again and
// again, and building the tables took most of the host time of a small call's plan.
template <typename acc_t>
struct GatherTables {
  struct TermTables {
    int64_t ys, yw, xs, xw;  // offsets of the vertical / horizontal start[] and weights
    int32_t Ky, Kx;
    bool operator==(const TermTables& o) const {
      return ys == o.ys && yw == o.yw && xs == o.xs && xw == o.xw && Ky == o.Ky && Kx == o.Kx;
    }
  };
  std::vector<int32_t> starts;
  std::vector<acc_t> weights;
  std::vector<TermTables> terms;  // every term of every job, in order
  std::vector<int64_t> affine;    // per job: offset of scale[C], shift[C] in weights, or -1
  bool short_taps = true;         // every term has 1 or 2 taps along each axis (UpscaleShape)
  // Everything the tables depend on (each term's axes and direction, each job's affine, the
  // accumulation type): equal keys, equal tables. The CUDA launcher keeps device copies by it.
  std::string key;
  bool operator==(const GatherTables& o) const;
};

template <typename acc_t, typename I, typename Shape_>
struct GatherPlan {
  using index_t = I;
  using Shape = Shape_;
  std::vector<GJob<I>> jobs;
  std::vector<GTerm<I>> terms;
  std::shared_ptr<const GatherTables<acc_t>> tab;
  int64_t total = 0;  // work items
};

template <typename T>
void key_append(std::string& k, const T& v) {
  k.append(reinterpret_cast<const char*>(&v), sizeof(v));
}

// Field by field: a struct's padding bytes are not part of its value.
inline void key_append_axis(std::string& k, const Axis& a, bool adjoint) {
  k.push_back('x');  // a tag per segment: no two sequences of segments share a key
  key_append(k, a.mode);
  key_append(k, a.antialias);
  key_append(k, a.align_corners);
  key_append(k, a.in);
  key_append(k, a.out);
  key_append(k, a.scale_opt);
  key_append(k, a.nearest);
  key_append(k, adjoint);
}

// The two item shapes (gather.h: ItemShape). A call whose terms all have 1 or 2 taps per
// axis (copies, nearest, bilinear upscales: fpn_concat and the like) takes the lean one:
// 2 planes x 4 consecutive values, no loop over a tap count, a kernel of few registers. Any
// other call (downscales, antialias, bicubic, gradients) takes 4 planes x 2 values, with
// large NCHW planes lane-strided.
using UpscaleShape = ItemShape<2, 4, false, true>;
using GeneralShape = ItemShape<4, 2, true, false>;

// How gather.h lays out a destination's work items: per group of P planes, either chunks of
// V consecutive values (a row's pixels for NCHW, a pixel's channels for channels_last), or,
// where the shape allows it, for NCHW planes large enough that few lanes idle, lane-strided
// chunks of 32 * V values (32 items): when those chunks are at least 85% full (V = 2: 3136
// values, 100%; 784, 94%; 196, 77%, and 49, 77%, take consecutive chunks).
template <typename Shape>
bool lane_strided(const View& dv) {
  const int64_t hw = dv.H * dv.W, chunk = 32 * Shape::V;
  return Shape::kLanes && !dv.cl && hw * 100 >= 85 * chunk * ((hw + chunk - 1) / chunk);
}
template <typename Shape>
int64_t row_chunks(const View& dv) {
  constexpr int64_t V = Shape::V;
  return dv.cl ? dv.W * ((dv.cp + V - 1) / V) : (dv.W + V - 1) / V;
}
template <typename Shape>
int64_t group_items(const View& dv) {
  const int64_t chunk = 32 * Shape::V;
  return lane_strided<Shape>(dv) ? 32 * ((dv.H * dv.W + chunk - 1) / chunk) : dv.H * row_chunks<Shape>(dv);
}
template <typename Shape>
int64_t job_items(const View& dv) {
  return (dv.planes + Shape::P - 1) / Shape::P * group_items<Shape>(dv);
}

// The largest element offset a tensor's strides reach from its data pointer.
inline int64_t max_offset(const at::Tensor& t) {
  int64_t m = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0) return 0;
    m += (t.size(d) - 1) * t.stride(d);
  }
  return m;
}

// Testing hook (msfast._C._set_cpu_runner("gather64")): plan in 64-bit even where 32 fits,
// so CPU tests cover the 64-bit index path without 2^31-element tensors.
inline std::atomic<bool>& gather_force_int64() {
  static std::atomic<bool> force{false};
  return force;
}

// Calls run on the tiled path (CUDA, or the CPU runner "tiles"): a testing hook
// (msfast._C._tiled_calls), defined in csrc/cpu/gather_cpu.cpp.
std::atomic<int64_t>& tiled_calls();
// Whether CUDA calls that fit the tiled path take it: MSFAST_CUDA_TILES=1 when first asked,
// or msfast._C._set_cuda_tiles (which returns the previous setting). Off by default until the
// path has run on a GPU. Defined in csrc/cpu/gather_cpu.cpp.
bool cuda_tiles_enabled();
bool set_cuda_tiles(bool on);
// Whether the gather kernel's grid is as many blocks as fit at once (MSFAST_CUDA_GRID=resident,
// or msfast._C._set_cuda_grid_resident) instead of 32 an SM. Off by default until measured on a
// GPU. Defined in csrc/cpu/gather_cpu.cpp.
bool cuda_grid_resident();
bool set_cuda_grid_resident(bool on);

// Whether every offset and item index of the call fits the 32-bit path (a margin covers the
// grid stride added to an item index and the weights appended after the tables).
inline bool gather_fits_int32(const std::vector<Job>& jobs) {
  if (gather_force_int64().load()) return false;
  constexpr int64_t lim = (int64_t{1} << 31) - (int64_t{1} << 24);
  int64_t total = 0, taps = 0;
  for (const auto& job : jobs) {
    const View dv = make_view(job.dst, job.channels_last);
    total += dv.planes * dv.H * dv.W * dv.cp + 32;  // values (at least the items) and padding
    if (max_offset(job.dst) >= lim) return false;
    for (const auto& t : job.terms) {
      if (max_offset(t.src) >= lim) return false;
      taps += (t.h.in + t.h.out) * 64 + (t.w.in + t.w.out) * 64;  // generous bound on table sizes
    }
  }
  return total < lim && taps < lim;
}

// A View's strides into a descriptor (GJob and GTerm name them alike).
template <typename I, typename D>
void put_strides(D& d, const View& v) {
  d.s_outer = static_cast<I>(v.s_outer);
  d.s_inner = static_cast<I>(v.s_inner);
  d.row = static_cast<I>(v.row);
  d.px = static_cast<I>(v.px);
}

template <typename acc_t>
bool GatherTables<acc_t>::operator==(const GatherTables& o) const {
  return starts == o.starts && weights == o.weights && terms == o.terms && affine == o.affine &&
         short_taps == o.short_taps && key == o.key;
}

// The key of a call's tables (see GatherTables::key): a tag per job and per axis, so that no
// two sequences of segments share a key.
template <typename acc_t>
std::string tables_key(const std::vector<Job>& jobs) {
  std::string k;
  key_append(k, sizeof(acc_t));
  for (const auto& job : jobs) {
    k.push_back('j');
    key_append(k, job.terms.size());
    for (const auto& t : job.terms) {
      key_append_axis(k, t.h, t.adjoint);
      key_append_axis(k, t.w, t.adjoint);
    }
    if (!job.scale.empty()) {
      k.push_back('a');
      key_append(k, job.scale.size());
      for (size_t c = 0; c < job.scale.size(); ++c) {
        key_append(k, job.scale[c]);
        key_append(k, job.shift[c]);
      }
    }
  }
  return k;
}

template <typename acc_t>
GatherTables<acc_t> build_tables(const std::vector<Job>& jobs, std::string key) {
  GatherTables<acc_t> g;
  g.key = std::move(key);
  // Weights go in tap-major (gather.h: a warp's loads of one tap are then contiguous).
  auto put = [&](const Table<acc_t>& t, int64_t& s, int64_t& w) {
    s = static_cast<int64_t>(g.starts.size());
    for (int64_t v : t.start) g.starts.push_back(static_cast<int32_t>(v));
    w = static_cast<int64_t>(g.weights.size());
    g.weights.resize(g.weights.size() + t.w.size());
    for (int64_t o = 0; o < t.out; ++o)
      for (int64_t k = 0; k < t.K; ++k) g.weights[w + k * t.out + o] = t.w[o * t.K + k];
  };
  for (const auto& job : jobs) {
    for (const auto& t : job.terms) {
      const auto [th, tw] = term_tables<acc_t>(t);
      typename GatherTables<acc_t>::TermTables tt;
      tt.Ky = static_cast<int32_t>(th.K);
      tt.Kx = static_cast<int32_t>(tw.K);
      put(th, tt.ys, tt.yw);
      put(tw, tt.xs, tt.xw);
      g.short_taps = g.short_taps && th.K <= 2 && tw.K <= 2;
      g.terms.push_back(tt);
    }
    g.affine.push_back(job.scale.empty() ? -1 : static_cast<int64_t>(g.weights.size()));
    for (double v : job.scale) g.weights.push_back(static_cast<acc_t>(v));
    for (double v : job.shift) g.weights.push_back(static_cast<acc_t>(v));
  }
  return g;
}

// Testing hooks (msfast._C._table_cache): whether every hit is checked against tables built
// afresh (an internal error where they differ), and the hits and misses so far. Defined in
// csrc/cpu/gather_cpu.cpp.
std::atomic<bool>& table_cache_check();
std::atomic<int64_t>& table_cache_hits();
std::atomic<int64_t>& table_cache_misses();

// A call's tables, from a process-wide cache by key or built now. At most kTablesCacheBytes of
// tables are kept; when full the cache starts over (a shared entry lives on with its users).
template <typename acc_t>
std::shared_ptr<const GatherTables<acc_t>> gather_tables(const std::vector<Job>& jobs) {
  constexpr size_t kTablesCacheBytes = size_t{64} << 20;
  static std::mutex mu;
  static std::unordered_map<std::string, std::shared_ptr<const GatherTables<acc_t>>> cache;
  static size_t bytes = 0;
  std::string key = tables_key<acc_t>(jobs);
  std::shared_ptr<const GatherTables<acc_t>> hit;
  {
    std::lock_guard<std::mutex> g(mu);
    auto it = cache.find(key);
    if (it != cache.end()) hit = it->second;
  }
  if (hit) {
    table_cache_hits().fetch_add(1, std::memory_order_relaxed);
    if (table_cache_check().load())
      TORCH_CHECK(build_tables<acc_t>(jobs, key) == *hit, "msfast: internal: cached tap tables differ from the call's");
    return hit;
  }
  table_cache_misses().fetch_add(1, std::memory_order_relaxed);
  auto t = std::make_shared<const GatherTables<acc_t>>(build_tables<acc_t>(jobs, key));
  const size_t size = t->starts.size() * sizeof(int32_t) + t->weights.size() * sizeof(acc_t) + t->key.size();
  std::lock_guard<std::mutex> g(mu);
  if (bytes + size > kTablesCacheBytes) {
    cache.clear();
    bytes = 0;
  }
  if (size <= kTablesCacheBytes && cache.emplace(std::move(key), t).second) bytes += size;
  return t;
}

template <typename acc_t, typename I, typename Shape>
GatherPlan<acc_t, I, Shape> make_gather_plan(const std::vector<Job>& jobs,
                                             std::shared_ptr<const GatherTables<acc_t>> tab) {
  using U = std::make_unsigned_t<I>;
  GatherPlan<acc_t, I, Shape> g;
  g.tab = std::move(tab);
  auto div = [](int64_t d) { return Divider<I>(static_cast<U>(std::max<int64_t>(d, 1))); };
  size_t term = 0;  // the call's terms in order, as in the tables
  for (size_t ji = 0; ji < jobs.size(); ++ji) {
    const Job& job = jobs[ji];
    const size_t first = term;
    term += job.terms.size();
    const View dv = make_view(job.dst, job.channels_last);
    const int64_t items = job_items<Shape>(dv);
    if (items == 0) continue;
    GJob<I> gj;
    gj.lanes = lane_strided<Shape>(dv);
    // A lane-strided job starts at a multiple of 32 items, so that a warp's lanes are one
    // chunk's; the items skipped decode as past the previous job's last group (no work).
    if (gj.lanes) g.total = (g.total + 31) / 32 * 32;
    gj.dst = job.dst.data_ptr();
    put_strides<I>(gj, dv);
    gj.group = div(group_items<Shape>(dv));
    gj.chunks = div(row_chunks<Shape>(dv));
    gj.cchunks = div((dv.cp + Shape::V - 1) / Shape::V);
    gj.pdiv = div(dv.pdiv);
    gj.W = div(dv.W);
    gj.H = static_cast<I>(dv.H);
    gj.HW = static_cast<I>(dv.H * dv.W);
    gj.planes = static_cast<I>(dv.planes);
    gj.groups = static_cast<I>((dv.planes + Shape::P - 1) / Shape::P);
    gj.first_item = static_cast<U>(g.total);
    gj.first_term = static_cast<int32_t>(g.terms.size());
    gj.n_terms = static_cast<int32_t>(job.terms.size());
    gj.affine = static_cast<I>(g.tab->affine[ji]);
    gj.channels = static_cast<I>(dv.channels);
    gj.cl = dv.cl;
    for (size_t i = 0; i < job.terms.size(); ++i) {
      const Term& t = job.terms[i];
      const auto& tt = g.tab->terms[first + i];
      const View sv = make_view(t.src, job.channels_last);
      GTerm<I> gt;
      gt.src = t.src.data_ptr();
      put_strides<I>(gt, sv);
      gt.Ky = tt.Ky;
      gt.Kx = tt.Kx;
      gt.ys = static_cast<I>(tt.ys);
      gt.yw = static_cast<I>(tt.yw);
      gt.xs = static_cast<I>(tt.xs);
      gt.xw = static_cast<I>(tt.xw);
      g.terms.push_back(gt);
    }
    g.total += items;
    g.jobs.push_back(gj);
  }
  return g;
}

// The tile grid of a call for the tiled path (gather.h: TileJob), or no tiles where the call
// does not fit it: every job NCHW with one term of 1 or 2 taps per axis (a plan of
// UpscaleShape), a source no larger than its output along each axis (upscales and copies:
// the window a tile reads is then about the tile's size or smaller), and starts that never
// decrease. A tile is up to kTileThreads columns wide, with rows for up to about 4096 values
// as long as its window fits kTileWindow values: fpn_concat's 56x56 planes are one tile each.
template <typename I>
struct TilePlan {
  std::vector<TileJob<I>> jobs;  // one per GatherPlan job
  int64_t tiles = 0;
  int64_t window = 0;  // the largest window's values (its shared memory, in acc_t)
};

constexpr int64_t kTileWindow = 4096;

template <typename acc_t, typename I>
TilePlan<I> make_tile_plan(const std::vector<Job>& jobs, const GatherPlan<acc_t, I, UpscaleShape>& g) {
  using U = std::make_unsigned_t<I>;
  TilePlan<I> tp;
  auto none = [] { return TilePlan<I>{}; };
  std::vector<const Job*> live;  // the jobs the plan kept (it drops jobs with no items)
  for (const auto& job : jobs)
    if (job_items<UpscaleShape>(make_view(job.dst, job.channels_last)) > 0) live.push_back(&job);
  if (live.size() != g.jobs.size() || live.empty()) return none();
  const std::vector<int32_t>& starts = g.tab->starts;
  auto monotone = [&](I off, int64_t out) {
    for (int64_t o = 0; o + 1 < out; ++o)
      if (starts[off + o + 1] < starts[off + o]) return false;
    return true;
  };
  // The largest span of starts + taps over runs of n consecutive outputs (starts that never
  // decrease).
  auto span = [&](I off, int64_t out, int64_t K, int64_t n) {
    int64_t m = 0;
    for (int64_t o = 0; o < out; o += n) {
      const int64_t last = std::min(o + n, out) - 1;
      m = std::max<int64_t>(m, starts[off + last] - starts[off + o] + K);
    }
    return m;
  };
  for (size_t i = 0; i < live.size(); ++i) {
    const Job& job = *live[i];
    const GJob<I>& gj = g.jobs[i];
    if (job.channels_last || gj.n_terms != 1) return none();
    const GTerm<I>& gt = g.terms[gj.first_term];
    const Term& t = job.terms[0];
    const int64_t H = gj.H, W = static_cast<int64_t>(gj.W.d);
    if (t.src.size(2) > H || t.src.size(3) > W || !monotone(gt.ys, H) || !monotone(gt.xs, W)) return none();
    // Tiles of about equal size: at most kTileThreads columns (one thread each) and rows for
    // up to about 4096 values, fewer where the window would not fit.
    const int64_t col_cuts = (W + kTileThreads - 1) / kTileThreads, tc = (W + col_cuts - 1) / col_cuts;
    const int64_t cols = span(gt.xs, W, gt.Kx, tc);
    int64_t tr = H, rows = 0;
    for (int64_t rows_max = std::max<int64_t>(1, 4096 / tc);; rows_max = (rows_max + 1) / 2) {
      const int64_t row_cuts = (H + rows_max - 1) / rows_max;
      tr = (H + row_cuts - 1) / row_cuts;
      rows = span(gt.ys, H, gt.Ky, tr);
      if (tr == 1 || rows * cols <= kTileWindow) break;
    }
    if (rows * cols > kTileWindow) return none();
    TileJob<I> tj;
    tj.tr = static_cast<I>(tr);
    tj.tc = static_cast<I>(tc);
    const int64_t col_tiles = (W + tc - 1) / tc, plane_tiles = col_tiles * ((H + tr - 1) / tr);
    tj.col_tiles = Divider<I>(static_cast<U>(col_tiles));
    tj.plane_tiles = Divider<I>(static_cast<U>(plane_tiles));
    tj.first_tile = static_cast<U>(tp.tiles);
    tp.tiles += plane_tiles * static_cast<int64_t>(gj.planes);
    tp.window = std::max(tp.window, rows * cols);
    tp.jobs.push_back(tj);
  }
  return tp;
}

// ------------------------------------------------------------------ device images
// The bytes a launch hands the GPU, built here so that the CPU runs (csrc/cpu/gather_cpu.cpp)
// read the very same layout as the CUDA kernels (csrc/cuda/launch.cuh): offsets, alignment,
// padding. A blob of 16-byte aligned appends.
struct Blob {
  std::vector<char> bytes;
  static size_t aligned(size_t n) { return (n + 15) / 16 * 16; }
  int64_t put(const void* p, size_t n) {
    const size_t off = aligned(bytes.size());
    bytes.resize(off + n);
    if (n) std::memcpy(bytes.data() + off, p, n);
    return static_cast<int64_t>(off);
  }
  // Pads to a whole number of int4 (CUDA blocks copy descriptors as int4) and returns the size.
  int64_t pad() {
    bytes.resize(aligned(bytes.size()));
    return static_cast<int64_t>(bytes.size());
  }
};

// A call's descriptors as a block copies them into shared memory: [tile jobs][jobs][terms]
// (no tile jobs for the gather kernel), then, for the tiled kernel, its window of acc_t.
struct Descriptors {
  Blob blob;
  int64_t jobs_off = 0, terms_off = 0, bytes = 0;  // bytes: the padded size, where a window starts
};

template <typename Plan>
Descriptors describe(const Plan& g, const TilePlan<typename Plan::index_t>* tp = nullptr) {
  using I = typename Plan::index_t;
  Descriptors d;
  if (tp) d.blob.put(tp->jobs.data(), tp->jobs.size() * sizeof(TileJob<I>));
  d.jobs_off = d.blob.put(g.jobs.data(), g.jobs.size() * sizeof(GJob<I>));
  d.terms_off = d.blob.put(g.terms.data(), g.terms.size() * sizeof(GTerm<I>));
  d.bytes = d.blob.pad();
  return d;
}

// A call's tables as one device buffer: [starts (int32)][weights (acc_t), from weights_offset].
template <typename acc_t>
int64_t weights_offset(const GatherTables<acc_t>& t) {
  return static_cast<int64_t>(Blob::aligned(t.starts.size() * sizeof(int32_t)));
}

template <typename acc_t>
Blob tables_blob(const GatherTables<acc_t>& t) {
  Blob b;
  b.put(t.starts.data(), t.starts.size() * sizeof(int32_t));
  TORCH_INTERNAL_ASSERT(b.put(t.weights.data(), t.weights.size() * sizeof(acc_t)) == weights_offset(t));
  return b;
}

// Calls f(plan) with the plan in its item shape (UpscaleShape where every term has 1 or 2 taps
// along each axis) and the narrowest index type the call fits.
template <typename acc_t, typename F>
void with_gather_plan(const std::vector<Job>& jobs, F&& f) {
  const bool i32 = gather_fits_int32(jobs);
  auto tab = gather_tables<acc_t>(jobs);
  if (tab->short_taps) {
    if (i32) return f(make_gather_plan<acc_t, int32_t, UpscaleShape>(jobs, std::move(tab)));
    return f(make_gather_plan<acc_t, int64_t, UpscaleShape>(jobs, std::move(tab)));
  }
  if (i32) return f(make_gather_plan<acc_t, int32_t, GeneralShape>(jobs, std::move(tab)));
  f(make_gather_plan<acc_t, int64_t, GeneralShape>(jobs, std::move(tab)));
}

}  // namespace msfast
