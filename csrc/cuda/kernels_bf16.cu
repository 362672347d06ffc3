// The CUDA kernels for at::BFloat16 inputs (every output dtype): see cuda/launch.cuh.
#include "cuda/launch.cuh"

namespace msfast {
namespace cuda {

template void run_src<at::BFloat16>(const std::vector<Job>& jobs, at::ScalarType dst_type);

}  // namespace cuda
}  // namespace msfast
