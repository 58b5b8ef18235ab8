// The CUDA kernels of the fused_vae ops (every op family), instantiated for float32,
// float64, float16 and bfloat16. Compiled without torch headers (tests/test_cuda_build.py
// compiles it with plain nvcc for sm_80 and sm_90); the ATen glue (*_cuda.cu) calls the
// launchers. The emulated build (csrc/emulate/) compiles this file as host C++.
#include "log_prob_kernels.cuh"
#include "reparam_kl_kernels.cuh"

namespace fused_vae {
namespace cuda {

FV_CUDA_LAUNCHERS(, reparam_kl, FwdParams, BwdParams)
FV_CUDA_LAUNCHERS(, log_prob, LogProbParams, LogProbGradParams)

}  // namespace cuda
}  // namespace fused_vae
