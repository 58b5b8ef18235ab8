// fused_vae::cuda_emu_<op>_fwd / _bwd: the CUDA backend's ATen glue (csrc/cuda/*.cu) and
// kernels compiled as host C++ for CPU tensors, a test device (see cuda_emulation.h). The
// schemas are those of <op>_fwd / _bwd (fused_vae/schemas.h; tests/test_op_protocol.py
// checks them).
#define FUSED_VAE_CUDA_EMULATE 1
#include <torch/library.h>

#include "../cuda/log_prob_cuda.cu"
#include "../cuda/reparam_kl_cuda.cu"
#include "fused_vae/schemas.h"

TORCH_LIBRARY_FRAGMENT(fused_vae, m) {
#define FV_DEFINE_EMULATED_OP(name, fwd_schema, bwd_schema) \
  m.def("cuda_emu_" #name "_fwd" fwd_schema);                \
  m.def("cuda_emu_" #name "_bwd" bwd_schema);
  FV_FOR_EACH_OP(FV_DEFINE_EMULATED_OP)
#undef FV_DEFINE_EMULATED_OP
}
