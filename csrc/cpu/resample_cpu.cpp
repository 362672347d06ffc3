// The CPU backend: checks a call's jobs, picks the widest kernel build this processor runs
// (MSFAST_CPU_ISA=base forces the baseline one), and registers the CPU kernels.
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "cpu/cpu_includes.h"

#define MSFAST_CPU_ISA base
#include "cpu/resample_kernels.h"
#undef MSFAST_CPU_ISA

namespace msfast {

const char* cpu_isa() {
  static const char* isa = [] {
    const char* forced = std::getenv("MSFAST_CPU_ISA");
    if (forced && std::strcmp(forced, "base") == 0) return "base";
#if defined(__x86_64__) || defined(__i386__)
    if (avx2::compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      if (!(forced && std::strcmp(forced, "avx2") == 0) && __builtin_cpu_supports("avx512f") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512bf16"))
        return "avx512bf16";
      return "avx2";
    }
#endif
    return "base";
  }();
  return isa;
}

std::atomic<int>& cpu_runner();                      // csrc/cpu/gather_cpu.cpp
void run_gather_cpu(const std::vector<Job>& jobs);  // the CUDA kernel's code, for tests

namespace {

void run_cpu(const std::vector<Job>& jobs) {
  if (jobs.empty() || jobs[0].terms.empty()) return;
  const int runner = cpu_runner().load();
  if (runner == 1 || runner == 4) return run_gather_cpu(jobs);  // the CUDA kernels' code
  const auto [st, dt] = check_jobs(jobs, c10::DeviceType::CPU);
  if (std::strcmp(cpu_isa(), "base") != 0) return avx2::run_jobs(jobs, st, dt);
  base::run_jobs(jobs, st, dt);
}

}  // namespace
}  // namespace msfast

TORCH_LIBRARY_IMPL(msfast, CPU, m) { msfast::Kernels<msfast::run_cpu>::register_all(m); }
