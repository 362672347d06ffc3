// Everything resample_kernels.h uses, included once before any target pragma so that
// library code is always compiled for the baseline instruction set.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "msfast/ops.h"

namespace msfast {
namespace base {
void run_jobs(const std::vector<Job>& jobs, at::ScalarType st, at::ScalarType dt);
}
namespace avx2 {
bool compiled();  // false where the compiler or the architecture cannot build this variant
void run_jobs(const std::vector<Job>& jobs, at::ScalarType st, at::ScalarType dt);
}  // namespace avx2
}  // namespace msfast
