// CUDA implementation of fused_vae::reparam_kl_fwd / reparam_kl_bwd: the ATen glue.
//
// Argument checks and output allocation are shared with the CPU backend (op_common.h);
// the kernels are in reparam_kl_kernels.cuh, compiled once in kernels_instantiate.cu and
// called through reparam_kl_launch.h; what the glue of every op family shares (devices,
// streams, poisoning on the emulated device, expanded gradients) is cuda_glue.h. The
// kernels read the seed from device memory: no host synchronisation. The schemas and the
// autograd kernel are in csrc/ops.cpp, the fake (meta) impls in
// fused_vae/backends/registration.py, shared with the CPU backend.
//
// With FUSED_VAE_CUDA_EMULATE (tests only, csrc/emulate/) this file compiles as host C++
// and registers the same functions as fused_vae::cuda_emu_reparam_kl_fwd / _bwd.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda_glue.h"
#include "fused_vae/elementwise.h"
#include "fused_vae/op_common.h"
#include "reparam_kl_launch.h"

namespace fused_vae {
namespace {

using namespace cuda_glue;

ReparamKlOutputs reparam_kl_fwd_cuda(FV_REPARAM_KL_FWD_ARGS) {
  check_reparam(mu_in, logvar_in, prior_mu_in, prior_logvar_in, seed, num_samples, kl_mode, logq_mode);
  check_kernel_device(mu_in);
  const DeviceGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const at::Tensor prior_mu = contiguous_or_none(prior_mu_in);
  const at::Tensor prior_logvar = contiguous_or_none(prior_logvar_in);
  const RowShape shape = row_shape(mu);
  at::Tensor z = alloc_z(mu, num_samples);
  at::Tensor kl = alloc_reduced(mu, kl_mode);
  at::Tensor logq = alloc_logq(mu, num_samples, logq_mode);
  if (num_samples == 0 && kl_mode == kReduceSkip) return {z, kl, logq};  // logq_mode is 0 too
  if (shape.N == 0) {
    // Rows without elements: their sums are 0, the total 0, batchmean 0 / B (NaN for B == 0).
    fill_empty_reduced(kl, kl_mode, shape.B);
    zero_all({&logq});
    return {z, kl, logq};
  }
  poison_all({&z, &kl, &logq});
  // The kernels read the seed from mu's device (check_reparam checked where it is).
  const int64_t* seed_ptr = num_samples > 0 ? seed.const_data_ptr<int64_t>() : nullptr;
  const cuda::LaunchTarget target = launch_target(mu);
  const auto acc_options = mu.options().dtype(acc_dtype(mu.scalar_type()));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_fwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using acc_t = cuda::acc_type_t<T>;
    const cuda::ReparamWorkspace ws = cuda::reparam_workspace<T>(shape.B, shape.D, num_samples, kl_mode, logq_mode);
    at::Tensor workspace = at::empty({ws.kl_elems + ws.logq_elems}, acc_options);
    poison(workspace);
    acc_t* const ws_ptr = workspace.numel() > 0 ? workspace.mutable_data_ptr<acc_t>() : nullptr;
    cuda::FwdParams<T> p;
    p.mu = data_in<scalar_t>(mu);
    p.lv = data_in<scalar_t>(logvar);
    p.pm = data_in<scalar_t>(prior_mu);
    p.pl = data_in<scalar_t>(prior_logvar);
    p.z = data_out<scalar_t>(z);
    p.kl_elem = kl_mode == kReduceElementwise ? data_out<scalar_t>(kl) : nullptr;
    p.kl_out = kl_mode >= kReducePerSample ? kl.mutable_data_ptr<acc_t>() : nullptr;
    p.workspace = ws.kl_elems > 0 ? ws_ptr : nullptr;
    p.logq_out = logq_mode != kLogqSkip ? logq.mutable_data_ptr<acc_t>() : nullptr;
    p.logq_partials = ws.logq_elems > 0 ? ws_ptr + ws.kl_elems : nullptr;
    p.seed_ptr = seed_ptr;
    p.num_samples = num_samples;
    p.kl_mode = kl_mode;
    p.logq_mode = logq_mode;
    set_rows_and_clamp(p, shape, clamp_lo, clamp_hi);
    FV_CUDA_CHECK(cuda::launch_reparam_kl_fwd<T>(p, target));
  });
  return {z, kl, logq};
}

ReparamKlGrads reparam_kl_bwd_cuda(FV_REPARAM_KL_BWD_ARGS) {
  check_reparam_bwd(grad_z_in, grad_kl_in, grad_logq_in, mu_in, logvar_in, prior_mu_in, prior_logvar_in, seed,
                    num_samples, kl_mode, logq_mode);
  check_kernel_device(mu_in);
  const DeviceGuard guard(mu_in.device());
  const bool has_prior = given(prior_mu_in);
  at::Tensor grad_mu = alloc_grad(mu_in);
  at::Tensor grad_lv = alloc_grad(mu_in);
  at::Tensor grad_pm = alloc_grad(mu_in, has_prior);
  at::Tensor grad_pl = alloc_grad(mu_in, has_prior);
  const RowShape shape = row_shape(mu_in);
  if (shape.N == 0) return {grad_mu, grad_lv, grad_pm, grad_pl};
  if (!given(grad_z_in) && !given(grad_kl_in) && !given(grad_logq_in)) {  // every output gradient is zero
    zero_all({&grad_mu, &grad_lv, &grad_pm, &grad_pl});
    return {grad_mu, grad_lv, grad_pm, grad_pl};
  }
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const at::Tensor prior_mu = contiguous_or_none(prior_mu_in);
  const at::Tensor prior_logvar = contiguous_or_none(prior_logvar_in);
  // Expanded scalars (autograd's gradient of sum()) are read in place, not materialised.
  bool gz_bcast = false, gkl_bcast = false, glq_bcast = false;
  const at::Tensor grad_z = grad_for_kernel(grad_z_in, true, &gz_bcast);
  const at::Tensor grad_kl = grad_for_kernel(grad_kl_in, kl_mode <= kReducePerSample, &gkl_bcast);
  const at::Tensor grad_logq = grad_for_kernel(grad_logq_in, true, &glq_bcast);
  const bool needs_noise = grad_z.defined() || grad_logq.defined();
  const int64_t* seed_ptr = needs_noise ? seed.const_data_ptr<int64_t>() : nullptr;
  const cuda::LaunchTarget target = launch_target(mu);
  poison_all({&grad_mu, &grad_lv, &grad_pm, &grad_pl});

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_bwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using acc_t = cuda::acc_type_t<T>;
    cuda::BwdParams<T> p;
    p.grad_z = data_in<scalar_t>(grad_z);
    p.grad_z_bcast = gz_bcast;
    p.grad_kl = reduced_grad<scalar_t>(grad_kl, gkl_bcast, kl_mode);
    p.grad_logq = grad_logq.defined() ? grad_logq.const_data_ptr<acc_t>() : nullptr;
    p.grad_logq_bcast = glq_bcast;
    p.mu = data_in<scalar_t>(mu);
    p.lv = data_in<scalar_t>(logvar);
    p.pm = data_in<scalar_t>(prior_mu);
    p.pl = data_in<scalar_t>(prior_logvar);
    p.grad_mu = data_out<scalar_t>(grad_mu);
    p.grad_lv = data_out<scalar_t>(grad_lv);
    p.grad_pm = data_out<scalar_t>(grad_pm);
    p.grad_pl = data_out<scalar_t>(grad_pl);
    p.seed_ptr = seed_ptr;
    p.num_samples = num_samples;
    p.logq_mode = logq_mode;
    set_rows_and_clamp(p, shape, clamp_lo, clamp_hi);
    FV_CUDA_CHECK(cuda::launch_reparam_kl_bwd<T>(p, target));
  });
  return {grad_mu, grad_lv, grad_pm, grad_pl};
}

}  // namespace

FV_CUDA_IMPL(reparam_kl, reparam_kl_fwd_cuda, reparam_kl_bwd_cuda)

}  // namespace fused_vae
