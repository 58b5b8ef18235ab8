// Small kernels that show the emulator's checks fire (tests/test_cuda_emulated.py):
// fused_vae::cuda_emu_selftest(case) runs one and returns "ok: <result>" or the
// launch error with the fault's description.
#define FUSED_VAE_CUDA_EMULATE 1
#include "cuda_emulation.h"

#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace fused_vae {
namespace emu {
namespace {

constexpr int kBlock = 64;

// Each thread adds its lane id over the warp: every lane should get 496.
__global__ void warp_sum_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x % 32);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Reverses the block's ids through shared memory (needs the barrier).
__global__ void reverse_kernel(int* out, bool with_barrier) {
  FV_SHARED(int, buf, kBlock);
  buf[threadIdx.x] = static_cast<int>(threadIdx.x);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// What each block's shared array holds before the block writes it (0xffffffff), then
// the block's id: a value from another block would show up as a different number.
__global__ void fresh_shared_kernel(unsigned* out) {
  FV_SHARED(unsigned, buf, kBlock);
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[threadIdx.x];
  __syncthreads();
  buf[threadIdx.x] = blockIdx.x;
}

__global__ void misaligned_vector_kernel(const float* p) {
  struct alignas(16) F4 {
    float v[4];
  };
  FV_ASSERT_ALIGNED16(p + 1);
  (void)*reinterpret_cast<const F4*>(p);
}

__global__ void divergent_shuffle_kernel(int* out) {
  int v = 1;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  out[threadIdx.x] = v;
}

__global__ void shuffle_after_exit_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

__global__ void barrier_after_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void barrier_in_divergent_code_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();  // the other warps never arrive: they wait at the shuffle below
  }
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

template <typename T>
std::string summary(const std::vector<T>& v) {
  std::string s;
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

std::string run_case(const std::string& name) {
  const int blocks = 3;
  std::vector<int> out(blocks * kBlock, -1);
  std::vector<unsigned> uout(blocks * kBlock, 0);
  std::vector<float> data(8, 1.0f);
  cudaGetLastError();
  if (name == "warp_sum") {
    FV_LAUNCH(warp_sum_kernel, blocks, kBlock, nullptr, out.data());
  } else if (name == "reverse_with_barrier") {
    FV_LAUNCH(reverse_kernel, blocks, kBlock, nullptr, out.data(), true);
  } else if (name == "fresh_shared") {
    FV_LAUNCH(fresh_shared_kernel, blocks, kBlock, nullptr, uout.data());
  } else if (name == "misaligned_vector") {
    FV_LAUNCH(misaligned_vector_kernel, 1, kBlock, nullptr, data.data());
  } else if (name == "divergent_shuffle") {
    FV_LAUNCH(divergent_shuffle_kernel, 1, kBlock, nullptr, out.data());
  } else if (name == "shuffle_after_exit") {
    FV_LAUNCH(shuffle_after_exit_kernel, 1, kBlock, nullptr, out.data());
  } else if (name == "barrier_after_exit") {
    FV_LAUNCH(barrier_after_exit_kernel, 1, kBlock, nullptr, out.data());
  } else if (name == "barrier_in_divergent_code") {
    FV_LAUNCH(barrier_in_divergent_code_kernel, 1, kBlock, nullptr, out.data());
  } else if (name == "empty_grid") {
    FV_LAUNCH(warp_sum_kernel, 0, kBlock, nullptr, out.data());
  } else {
    throw std::invalid_argument("unknown emulator self-test case " + name);
  }
  try {
    throw_on_error(cudaGetLastError());
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "ok: " + (name == "fresh_shared" ? summary(uout) : summary(out));
}

}  // namespace
}  // namespace emu
}  // namespace fused_vae

TORCH_LIBRARY_FRAGMENT(fused_vae, m) {
  m.def("cuda_emu_selftest(str case_name) -> str", [](const std::string& name) {
    return fused_vae::emu::run_case(name);
  });
}
