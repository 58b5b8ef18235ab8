// What the ATen glue of every CUDA op family shares (reparam_kl_cuda.cu, log_prob_cuda.cu):
// the device checks, guard and stream, the launch target, output poisoning on the
// emulated device, torch's storage types as the kernels' CUDA types, and the detection of
// expanded (broadcast) output gradients.
//
// Everything runs on the current stream of the inputs' device, allocates through the
// caching allocator and never synchronises with the host, so the ops can be captured in
// CUDA graphs. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs
// the cuBLAS / cuSPARSE / cuSOLVER headers).
//
// With FUSED_VAE_CUDA_EMULATE (tests only, csrc/emulate/) the glue compiles as host C++
// and registers its functions as fused_vae::cuda_emu_<op>_fwd / _bwd for CPU tensors,
// which stand for device memory; the device-specific pieces are the few lines in the #if
// below.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <limits>

#if defined(FUSED_VAE_CUDA_EMULATE)
#include "cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "fused_vae/op_common.h"
#include "launch_common.h"

// Registers an op family's forward and backward: for CUDA tensors as
// fused_vae::<family>_fwd / _bwd, or, emulated, for CPU tensors as
// fused_vae::cuda_emu_<family>_fwd / _bwd (schemas: csrc/ops.cpp and
// csrc/emulate/emulated_ops.cpp).
#if defined(FUSED_VAE_CUDA_EMULATE)
#define FV_CUDA_IMPL(family, fwd, bwd) FV_IMPL_OP_PAIR(CPU, "cuda_emu_", family, fwd, bwd)
#else
#define FV_CUDA_IMPL(family, fwd, bwd) FV_IMPL_OP_PAIR(CUDA, "", family, fwd, bwd)
#endif

namespace fused_vae {
namespace cuda_glue {

#if defined(FUSED_VAE_CUDA_EMULATE)
#define FV_CUDA_CHECK(expr) ::fused_vae::emu::throw_on_error(expr)
constexpr const char* kKernelDevice = "CPU tensors (emulated CUDA device)";
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
inline cudaStream_t current_stream(int) { return nullptr; }
// Memory from the caching allocator holds old data on a GPU: the emulator fills outputs
// and scratch with NaN so that an element the kernels never write fails the tests.
inline void poison(at::Tensor& t) {
  if (t.defined() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
}
#else
#define FV_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
constexpr const char* kKernelDevice = "CUDA tensors";
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
inline cudaStream_t current_stream(int device) { return c10::cuda::getCurrentCUDAStream(device).stream(); }
inline void poison(at::Tensor&) {}
#endif

inline void poison_all(std::initializer_list<at::Tensor*> tensors) {
  for (at::Tensor* t : tensors) poison(*t);
}

// The inputs must be on the device the kernels run on (the reference input's device; the
// shared checks compared the others with it).
inline void check_kernel_device(const at::Tensor& ref) {
  TORCH_CHECK_VALUE(on_kernel_device(ref), "fused_vae: the CUDA kernels need ", kKernelDevice, ", got ",
                    ref.device());
}

// torch's storage types -> the CUDA types the kernels are instantiated for.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(at::Half) == sizeof(__half), "at::Half must match __half");
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16), "at::BFloat16 must match __nv_bfloat16");

// A tensor's data as the kernels' type, or null for an undefined tensor.
template <typename scalar_t>
const typename CudaType<scalar_t>::type* data_in(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.const_data_ptr<scalar_t>())
                     : nullptr;
}
template <typename scalar_t>
typename CudaType<scalar_t>::type* data_out(at::Tensor& t) {
  return t.defined() && t.numel() > 0
             ? reinterpret_cast<typename CudaType<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>())
             : nullptr;
}

inline int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int n = 0;
  FV_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < static_cast<int>(cache.size())) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

inline cuda::LaunchTarget launch_target(const at::Tensor& ref) {
  cuda::LaunchTarget target;
  target.device = ref.get_device();
  target.num_sms = sm_count(target.device);
  target.stream = current_stream(target.device);
  return target;
}

// A tensor that holds one value for every element (an expanded scalar, as autograd
// produces for sum()): its single element can be read in place.
inline bool is_broadcast_scalar(const at::Tensor& t) {
  if (t.numel() <= 1) return t.numel() == 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != 0) return false;
  }
  return true;
}

// An optional tensor made contiguous (undefined when absent).
// The [B, D] view of the inputs and the clamp, which every kernel's params struct holds.
template <typename Params>
void set_rows_and_clamp(Params& p, const RowShape& s, const c10::optional<double>& lo,
                        const c10::optional<double>& hi) {
  p.N = s.N;
  p.B = s.B;
  p.D = s.D;
  p.clamp = make_clamp(lo, hi);
}

// An output gradient as a kernel reads it: an expanded scalar in place (when `bcast_ok`
// and it is one), else contiguous; undefined when absent. `bcast` says which.
inline at::Tensor grad_for_kernel(const OptTensor& g, bool bcast_ok, bool* bcast) {
  *bcast = given(g) && bcast_ok && is_broadcast_scalar(*g);
  if (!given(g)) return at::Tensor();
  return *bcast ? *g : g->contiguous();
}

// The gradient of a reduced output of `mode` for the kernels (ReducedGrad): elementwise in
// the input dtype, the others in the accumulation dtype; expanded elementwise / per_sample
// gradients are read in place.
template <typename scalar_t>
cuda::ReducedGrad<typename CudaType<scalar_t>::type> reduced_grad(const at::Tensor& g, bool bcast, int64_t mode) {
  using T = typename CudaType<scalar_t>::type;
  cuda::ReducedGrad<T> r;
  r.mode = mode;
  r.bcast = bcast;
  if (!g.defined()) return r;
  if (mode == kReduceElementwise) {
    r.elem = data_in<scalar_t>(g);
  } else {
    r.red = g.const_data_ptr<cuda::acc_type_t<T>>();
  }
  return r;
}

// A reduced output of a problem without elements: 0, or NaN for batchmean of B = 0.
inline void fill_empty_reduced(at::Tensor& out, int64_t mode, int64_t batch) {
  if (mode >= kReducePerSample) out.fill_(empty_value(mode, batch));
}

inline void zero_all(std::initializer_list<at::Tensor*> tensors) {
  for (at::Tensor* t : tensors) {
    if (t->numel() > 0) t->zero_();
  }
}

}  // namespace cuda_glue
}  // namespace fused_vae
