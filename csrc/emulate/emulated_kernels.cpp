// The CUDA kernels of csrc/cuda/ compiled as host C++ against cuda_emulation.h (tests
// only; see fused_vae/backends/cuda_emulation.py).
#define FUSED_VAE_CUDA_EMULATE 1
#include "../cuda/kernels_instantiate.cu"
