// The CPU kernels compiled for AVX2 + FMA (x86-64 with GCC); chosen at run time when the
// processor has both. Only the kernels below the pragma get the wider instructions.
#include "cpu/cpu_includes.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define MSFAST_HAVE_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MSFAST_CPU_ISA avx2
#define MSFAST_CPU_AVX2 1  // GCC does not define __AVX2__ under a target pragma
#include "cpu/resample_kernels.h"
#undef MSFAST_CPU_AVX2
#undef MSFAST_CPU_ISA
#pragma GCC pop_options
#endif

namespace msfast {
namespace avx2 {
#ifdef MSFAST_HAVE_AVX2_BUILD
bool compiled() { return true; }
#else
bool compiled() { return false; }
void run_jobs(const std::vector<Job>&, at::ScalarType, at::ScalarType) {
  TORCH_CHECK(false, "msfast: the AVX2 kernels were not compiled in");
}
#endif
}  // namespace avx2
}  // namespace msfast
