// Linked instead of the CUDA sources in a CPU-only build.
namespace msfast {
bool cuda_kernels_built() { return false; }
}  // namespace msfast
