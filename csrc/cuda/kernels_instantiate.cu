// The CUDA kernels of the fused_vae ops (every op family), instantiated for float32,
// float64, float16 and bfloat16. Compiled without torch headers (tests/test_cuda_build.py
// compiles it with plain nvcc for sm_80 and sm_90); the ATen glue (*_cuda.cu) calls the
// launchers. The emulated build (csrc/emulate/) compiles this file as host C++.
#include "log_prob_kernels.cuh"
#include "reparam_kl_kernels.cuh"

namespace fused_vae {
namespace cuda {

#define FV_CUDA_INSTANTIATE(T)                                                                  \
  template cudaError_t launch_reparam_kl_fwd<T>(const FwdParams<T>&, const LaunchTarget&);      \
  template cudaError_t launch_reparam_kl_bwd<T>(const BwdParams<T>&, const LaunchTarget&);      \
  template cudaError_t launch_log_prob_fwd<T>(const LogProbParams<T>&, const LaunchTarget&);    \
  template cudaError_t launch_log_prob_bwd<T>(const LogProbGradParams<T>&, const LaunchTarget&);
FV_CUDA_FOR_EACH_TYPE(FV_CUDA_INSTANTIATE)
#undef FV_CUDA_INSTANTIATE

}  // namespace cuda
}  // namespace fused_vae
