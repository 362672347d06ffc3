// The CUDA kernels for float inputs (every output dtype): see cuda/launch.cuh.
#include "cuda/launch.cuh"

namespace msfast {
namespace cuda {

template void run_src<float>(const std::vector<Job>& jobs, at::ScalarType dst_type);

}  // namespace cuda
}  // namespace msfast
