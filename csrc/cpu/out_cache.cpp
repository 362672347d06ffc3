// Output memory for the CPU kernels. A fresh multi-megabyte tensor comes from glibc's mmap
// and costs a page fault per 4 KiB page on its first write: for fpn_concat's 192 MB output
// that is several times the time of computing it. msfast keeps the blocks of its freed
// outputs of 64 KiB or more (those of 2 MiB or more 2 MiB aligned, transparent huge pages
// requested) and hands them out again, as PyTorch's CUDA caching allocator does on the GPU.
// The cache is bounded (MSFAST_CPU_CACHE_MB, default 1024; 0 disables it) and
// msfast.empty_cache() empties it.
//
// Why from 64 KiB: glibc's free() of a chunk of 64 KiB or more may trim the top of its heap,
// returning to the system whatever other code freed there. With outputs from 1 MiB only, a
// bfloat16 preprocess call (msfast bench) freed its 0.6 MB level through glibc, and after an
// eager call that had freed its own tensors, that free took 2-4 ms of the call's 4 ms in
// about half the calls (unmapping eager's memory; MALLOC_TRIM_THRESHOLD_ set huge removed it).
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "msfast/ops.h"

namespace msfast {
namespace {

constexpr size_t kHuge = size_t{2} << 20;      // a huge page: the unit of blocks from 2 MiB
constexpr size_t kSmall = size_t{64} << 10;    // the unit of smaller blocks
constexpr size_t kMinBytes = kSmall;           // smaller outputs use torch's allocator

size_t unit_of(size_t n) { return n >= kHuge ? kHuge : kSmall; }

size_t cache_limit() {
  static const size_t limit = [] {
    const char* env = std::getenv("MSFAST_CPU_CACHE_MB");
    long mb = env ? std::strtol(env, nullptr, 10) : 1024;
    return static_cast<size_t>(mb < 0 ? 0 : mb) << 20;
  }();
  return limit;
}

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t unit = unit_of(n), cap = (n + unit - 1) / unit * unit;
    void* p = take(n);
    if (!p) {
      p = std::aligned_alloc(unit == kHuge ? kHuge : 64, cap);
      TORCH_CHECK(p != nullptr, "msfast: out of memory allocating ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (unit == kHuge) madvise(p, cap, MADV_HUGEPAGE);  // a hint: fewer, larger page faults on first touch
#endif
      std::lock_guard<std::mutex> g(mu_);
      sizes_[p] = cap;
    }
    return {p, p, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &OutputCache::release; }
  void copy_data(void* dst, const void* src, std::size_t count) const override { std::memcpy(dst, src, count); }

  void empty() {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& kv : free_) {
      sizes_.erase(kv.second);
      std::free(kv.second);
    }
    free_.clear();
    idle_ = 0;
  }

  static OutputCache& get() {
    static OutputCache* c = new OutputCache();  // never destroyed: tensors may outlive statics
    return *c;
  }

 private:
  // The smallest idle block that fits and wastes at most a quarter of itself.
  void* take(size_t n) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = free_.lower_bound(n);
    if (it == free_.end() || it->first > n + n / 4 + unit_of(n)) return nullptr;
    void* p = it->second;
    idle_ -= it->first;
    free_.erase(it);
    return p;
  }

  static void release(void* p) {
    OutputCache& c = get();
    std::lock_guard<std::mutex> g(c.mu_);
    const size_t cap = c.sizes_.at(p);
    if (c.idle_ + cap <= cache_limit()) {
      c.free_.emplace(cap, p);
      c.idle_ += cap;
    } else {
      c.sizes_.erase(p);
      std::free(p);
    }
  }

  std::mutex mu_;
  std::multimap<size_t, void*> free_;  // capacity -> idle block
  std::map<void*, size_t> sizes_;      // every block this cache owns -> capacity
  size_t idle_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts, bool channels_last) {
  const auto fmt = format_of(channels_last);
  if (!opts.device().is_cpu() || cache_limit() == 0) return at::empty(sizes, opts.memory_format(fmt));
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (bytes < kMinBytes) return at::empty(sizes, opts.memory_format(fmt));
  return at::detail::empty_generic(sizes, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), fmt);
}

void empty_cpu_cache() { OutputCache::get().empty(); }

}  // namespace msfast
