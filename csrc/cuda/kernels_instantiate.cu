// The CUDA kernels of the fused_vae ops, instantiated for float32, float64, float16 and
// bfloat16. Compiled without torch headers (tests/test_cuda_build.py compiles it with
// plain nvcc for sm_80 and sm_90); reparam_kl_cuda.cu calls the launchers. The emulated
// build (csrc/emulate/) compiles this file as host C++.
#include "reparam_kl_kernels.cuh"

namespace fused_vae {
namespace cuda {

#define FV_CUDA_INSTANTIATE(T)                                                             \
  template cudaError_t launch_reparam_kl_fwd<T>(const FwdParams<T>&, const LaunchTarget&); \
  template cudaError_t launch_reparam_kl_bwd<T>(const BwdParams<T>&, const LaunchTarget&);
FV_CUDA_INSTANTIATE(float)
FV_CUDA_INSTANTIATE(double)
FV_CUDA_INSTANTIATE(__half)
FV_CUDA_INSTANTIATE(__nv_bfloat16)
#undef FV_CUDA_INSTANTIATE

}  // namespace cuda
}  // namespace fused_vae
