// fused_vae::cuda_emu_reparam_kl_fwd / _bwd: the CUDA backend's ATen glue
// (csrc/cuda/reparam_kl_cuda.cu) and kernels compiled as host C++ for CPU tensors, a test
// device (see cuda_emulation.h). The schemas are those of reparam_kl_fwd / _bwd in
// csrc/ops.cpp (tests/test_cuda_emulated.py checks that they stay identical).
#define FUSED_VAE_CUDA_EMULATE 1
#include <torch/library.h>

#include "../cuda/reparam_kl_cuda.cu"

TORCH_LIBRARY_FRAGMENT(fused_vae, m) {
  m.def(
      "cuda_emu_reparam_kl_fwd(Tensor mu, Tensor logvar, Tensor seed, int num_samples, int kl_mode, "
      "float? clamp_lo, float? clamp_hi) -> (Tensor, Tensor)");
  m.def(
      "cuda_emu_reparam_kl_bwd(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor seed, "
      "int num_samples, int kl_mode, float? clamp_lo, float? clamp_hi) -> (Tensor, Tensor)");
}
