// Everything resample_kernels.h uses, included once before any target pragma so that
// library code is always compiled for the baseline instruction set.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // for resample_cpu_avx2.cpp, whose target pragma makes it usable
#endif

#include "msfast/ops.h"

namespace msfast {
// False under msfast._C._set_cpu_runner("no-stencil"): NCHW rows always take the gather,
// so tests can check the stencil and window paths (resample_kernels.h) against it.
bool cpu_stencil_enabled();  // csrc/cpu/gather_cpu.cpp
std::atomic<int64_t>& stencil_terms_planned();  // how many terms took either: msfast._C._stencil_terms()
// False under msfast._C._set_cpu_runner("no-small"): small NCHW planes take the rows too
// (JobPlan::small); msfast._C._small_plane_jobs() counts the jobs that took the small path.
bool cpu_small_planes_enabled();
std::atomic<int64_t>& small_jobs_planned();
// Calls moving more bytes than this (inputs read and output written) use non-temporal stores
// where they can (JobPlan::stream);
// msfast._C._set_stream_bytes changes it for tests, msfast._C._streamed_calls counts them.
std::atomic<int64_t>& stream_bytes();
std::atomic<int64_t>& streamed_calls();
// Whether 16-bit NCHW blended rows may stream, through a staging buffer (JobPlan::stream): by
// default on Intel processors only; msfast._C._set_staged_rows changes it for tests.
std::atomic<bool>& staged_rows();

const char* cpu_isa();  // csrc/cpu/resample_cpu.cpp

namespace base {
void run_jobs(const std::vector<Job>& jobs, at::ScalarType st, at::ScalarType dt);
}
namespace avx2 {
bool compiled();  // false where the compiler or the architecture cannot build this variant
void run_jobs(const std::vector<Job>& jobs, at::ScalarType st, at::ScalarType dt);
}  // namespace avx2
}  // namespace msfast
