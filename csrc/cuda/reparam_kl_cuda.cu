// CUDA implementation of fused_vae::reparam_kl_fwd / reparam_kl_bwd: the ATen glue.
//
// Argument checks and output allocation are shared with the CPU backend (op_common.h);
// the kernels are in reparam_kl_kernels.cuh, compiled once in kernels_instantiate.cu and
// called through reparam_kl_launch.h. Everything runs on the current stream of the
// inputs' device, allocates through the caching allocator and never synchronises with
// the host (the seed is read by the kernels from device memory), so the ops can be
// captured in CUDA graphs. The schemas and the autograd kernel are in csrc/ops.cpp, the
// fake (meta) impls in fused_vae/backends/registration.py, shared with the CPU backend.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs the cuBLAS /
// cuSPARSE / cuSOLVER headers).
//
// With FUSED_VAE_CUDA_EMULATE (tests only, csrc/emulate/) this file compiles as host C++
// and registers the same functions as fused_vae::cuda_emu_reparam_kl_fwd / _bwd for CPU
// tensors, which stand for device memory; the device-specific pieces are the few lines
// in the #if below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
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

#include "fused_vae/elementwise.h"
#include "fused_vae/op_common.h"
#include "reparam_kl_launch.h"

namespace fused_vae {
namespace {

#if defined(FUSED_VAE_CUDA_EMULATE)
#define FV_CUDA_CHECK(expr) ::fused_vae::emu::throw_on_error(expr)
constexpr const char* kKernelDevice = "CPU tensors (emulated CUDA device)";
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
cudaStream_t current_stream(int) { return nullptr; }
// Memory from the caching allocator holds old data on a GPU: the emulator fills outputs
// and scratch with NaN so that an element the kernels never write fails the tests.
void poison(at::Tensor& t) {
  if (t.defined() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
}
#else
#define FV_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
constexpr const char* kKernelDevice = "CUDA tensors";
using DeviceGuard = c10::cuda::CUDAGuard;
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
cudaStream_t current_stream(int device) { return c10::cuda::getCurrentCUDAStream(device).stream(); }
void poison(at::Tensor&) {}
#endif

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

int sm_count(int device) {
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

cuda::LaunchTarget launch_target(const at::Tensor& mu) {
  cuda::LaunchTarget target;
  target.device = mu.get_device();
  target.num_sms = sm_count(target.device);
  target.stream = current_stream(target.device);
  return target;
}

// A tensor that holds one value for every element (an expanded scalar, as autograd
// produces for sum()): its single element can be read in place.
bool is_broadcast_scalar(const at::Tensor& t) {
  if (t.numel() <= 1) return t.numel() == 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != 0) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> reparam_kl_fwd_cuda(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                       const at::Tensor& seed, int64_t num_samples,
                                                       int64_t kl_mode, c10::optional<double> clamp_lo,
                                                       c10::optional<double> clamp_hi) {
  check_common(mu_in, logvar_in, seed, num_samples, kl_mode);
  TORCH_CHECK_VALUE(on_kernel_device(mu_in), "fused_vae: the CUDA kernels need ", kKernelDevice, ", got ",
                    mu_in.device());
  const DeviceGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const RowShape shape = row_shape(mu);
  at::Tensor z = alloc_z(mu, num_samples);
  at::Tensor kl = alloc_kl(mu, kl_mode);
  if (num_samples == 0 && kl_mode == kKlSkip) return {z, kl};
  if (shape.N == 0) {
    // Empty rows: per-row sums are 0, the total 0, and batchmean 0 / B (NaN for B == 0).
    if (kl_mode == kKlPerSample || kl_mode == kKlSum) kl.zero_();
    if (kl_mode == kKlBatchMean) {
      kl.fill_(shape.B > 0 ? 0.0 : std::numeric_limits<double>::quiet_NaN());
    }
    return {z, kl};
  }
  poison(z);
  poison(kl);
  // The kernels read the seed from mu's device (check_common checked where it is): no host sync.
  const int64_t* seed_ptr = num_samples > 0 ? seed.const_data_ptr<int64_t>() : nullptr;
  const cuda::LaunchTarget target = launch_target(mu);
  const at::ScalarType acc_type = reduced_kl_dtype(mu.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_fwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using acc_t = cuda::acc_type_t<T>;
    const int64_t ws_elems = cuda::fwd_workspace_elems<T>(shape.B, shape.D, kl_mode);
    at::Tensor workspace = ws_elems > 0 ? at::empty({ws_elems}, mu.options().dtype(acc_type)) : at::Tensor();
    poison(workspace);
    cuda::FwdParams<T> p;
    p.mu = reinterpret_cast<const T*>(mu.const_data_ptr<scalar_t>());
    p.lv = reinterpret_cast<const T*>(logvar.const_data_ptr<scalar_t>());
    p.z = num_samples > 0 ? reinterpret_cast<T*>(z.mutable_data_ptr<scalar_t>()) : nullptr;
    p.kl_elem = kl_mode == kKlElementwise ? reinterpret_cast<T*>(kl.mutable_data_ptr<scalar_t>()) : nullptr;
    p.kl_out = kl_mode >= kKlPerSample ? kl.mutable_data_ptr<acc_t>() : nullptr;
    p.workspace = ws_elems > 0 ? workspace.mutable_data_ptr<acc_t>() : nullptr;
    p.seed_ptr = seed_ptr;
    p.N = shape.N;
    p.B = shape.B;
    p.D = shape.D;
    p.num_samples = num_samples;
    p.kl_mode = kl_mode;
    p.clamp = make_clamp(clamp_lo, clamp_hi);
    FV_CUDA_CHECK(cuda::launch_reparam_kl_fwd<T>(p, target));
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparam_kl_bwd_cuda(const c10::optional<at::Tensor>& grad_z_in,
                                                       const c10::optional<at::Tensor>& grad_kl_in,
                                                       const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                       const at::Tensor& seed, int64_t num_samples, int64_t kl_mode,
                                                       c10::optional<double> clamp_lo,
                                                       c10::optional<double> clamp_hi) {
  check_common(mu_in, logvar_in, seed, num_samples, kl_mode);
  check_grads(grad_z_in, grad_kl_in, mu_in, num_samples, kl_mode);
  TORCH_CHECK_VALUE(on_kernel_device(mu_in), "fused_vae: the CUDA kernels need ", kKernelDevice, ", got ",
                    mu_in.device());
  const DeviceGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const bool has_gz = grad_z_in.has_value() && grad_z_in->defined();
  const bool has_gkl = grad_kl_in.has_value() && grad_kl_in->defined();
  const RowShape shape = row_shape(mu);
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_lv = at::empty_like(grad_mu);
  if (shape.N == 0) return {grad_mu, grad_lv};

  // Expanded scalars (autograd's gradient of sum()) are read in place, not materialised.
  const bool gz_bcast = has_gz && is_broadcast_scalar(*grad_z_in);
  const bool gkl_bcast = has_gkl && kl_mode <= kKlPerSample && is_broadcast_scalar(*grad_kl_in);
  const at::Tensor grad_z = has_gz ? (gz_bcast ? *grad_z_in : grad_z_in->contiguous()) : at::Tensor();
  const at::Tensor grad_kl = has_gkl ? (gkl_bcast ? *grad_kl_in : grad_kl_in->contiguous()) : at::Tensor();
  const int64_t* seed_ptr = has_gz ? seed.const_data_ptr<int64_t>() : nullptr;
  const cuda::LaunchTarget target = launch_target(mu);
  poison(grad_mu);
  poison(grad_lv);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_bwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using acc_t = cuda::acc_type_t<T>;
    cuda::BwdParams<T> p;
    p.grad_z = has_gz ? reinterpret_cast<const T*>(grad_z.const_data_ptr<scalar_t>()) : nullptr;
    p.grad_z_bcast = gz_bcast;
    if (has_gkl && kl_mode == kKlElementwise) {
      p.grad_kl_elem = reinterpret_cast<const T*>(grad_kl.const_data_ptr<scalar_t>());
    } else if (has_gkl) {
      p.grad_kl_red = grad_kl.const_data_ptr<acc_t>();
    }
    p.grad_kl_bcast = gkl_bcast;
    p.mu = reinterpret_cast<const T*>(mu.const_data_ptr<scalar_t>());
    p.lv = reinterpret_cast<const T*>(logvar.const_data_ptr<scalar_t>());
    p.grad_mu = reinterpret_cast<T*>(grad_mu.mutable_data_ptr<scalar_t>());
    p.grad_lv = reinterpret_cast<T*>(grad_lv.mutable_data_ptr<scalar_t>());
    p.seed_ptr = seed_ptr;
    p.N = shape.N;
    p.B = shape.B;
    p.D = shape.D;
    p.num_samples = num_samples;
    p.kl_mode = kl_mode;
    p.clamp = make_clamp(clamp_lo, clamp_hi);
    FV_CUDA_CHECK(cuda::launch_reparam_kl_bwd<T>(p, target));
  });
  return {grad_mu, grad_lv};
}

}  // namespace

#if defined(FUSED_VAE_CUDA_EMULATE)
// Schemas: csrc/emulate/emulated_ops.cpp.
TORCH_LIBRARY_IMPL(fused_vae, CPU, m) {
  m.impl("cuda_emu_reparam_kl_fwd", &reparam_kl_fwd_cuda);
  m.impl("cuda_emu_reparam_kl_bwd", &reparam_kl_bwd_cuda);
}
#else
TORCH_LIBRARY_IMPL(fused_vae, CUDA, m) {
  m.impl("reparam_kl_fwd", &reparam_kl_fwd_cuda);
  m.impl("reparam_kl_bwd", &reparam_kl_bwd_cuda);
}
#endif

}  // namespace fused_vae
