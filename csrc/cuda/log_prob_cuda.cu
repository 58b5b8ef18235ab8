// CUDA implementation of fused_vae::gaussian_log_prob_fwd / _bwd: the ATen glue (checks
// and allocation: op_common.h; kernels: log_prob_kernels.cuh through log_prob_launch.h;
// what the glue of every op family shares: cuda_glue.h).
//
// With FUSED_VAE_CUDA_EMULATE (tests only, csrc/emulate/) this file compiles as host C++
// and registers the same functions as fused_vae::cuda_emu_gaussian_log_prob_fwd / _bwd.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda_glue.h"
#include "fused_vae/elementwise.h"
#include "fused_vae/op_common.h"
#include "log_prob_launch.h"

namespace fused_vae {
namespace {

using namespace cuda_glue;

// The input pointers of either direction's params.
template <typename scalar_t, typename T>
void set_inputs(cuda::LogProbInputs<T>& p, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar) {
  p.x = data_in<scalar_t>(x);
  p.mu = data_in<scalar_t>(mu);
  p.lv = data_in<scalar_t>(logvar);
}

at::Tensor log_prob_fwd_cuda(FV_LOG_PROB_FWD_ARGS) {
  check_log_prob(x_in, mu_in, logvar_in, reduction);
  check_kernel_device(x_in);
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const RowShape shape = row_shape(x);
  at::Tensor out = alloc_reduced(x, reduction);
  if (shape.N == 0) {
    fill_empty_reduced(out, reduction, shape.B);
    return out;
  }
  poison(out);
  const cuda::LaunchTarget target = launch_target(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_log_prob_fwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using acc_t = cuda::acc_type_t<T>;
    const int64_t ws_elems = cuda::reduced_workspace_elems<T>(shape.B, shape.D, reduction);
    at::Tensor workspace = at::empty({ws_elems}, x.options().dtype(acc_dtype(x.scalar_type())));
    poison(workspace);
    cuda::LogProbParams<T> p;
    set_inputs<scalar_t>(p, x, mu, logvar);
    p.out_elem = reduction == kReduceElementwise ? data_out<scalar_t>(out) : nullptr;
    p.out = reduction >= kReducePerSample ? out.mutable_data_ptr<acc_t>() : nullptr;
    p.workspace = ws_elems > 0 ? workspace.mutable_data_ptr<acc_t>() : nullptr;
    p.reduction = reduction;
    set_rows_and_clamp(p, shape, clamp_lo, clamp_hi);
    FV_CUDA_CHECK(cuda::launch_log_prob_fwd<T>(p, target));
  });
  return out;
}

LogProbGrads log_prob_bwd_cuda(FV_LOG_PROB_BWD_ARGS) {
  check_log_prob_bwd(grad_in, x_in, mu_in, logvar_in, reduction);
  check_kernel_device(x_in);
  const DeviceGuard guard(x_in.device());
  at::Tensor grad_x = alloc_grad(x_in);
  at::Tensor grad_mu = alloc_grad(x_in);
  at::Tensor grad_lv = alloc_grad(x_in);
  const RowShape shape = row_shape(x_in);
  if (shape.N == 0) return {grad_x, grad_mu, grad_lv};
  if (!given(grad_in)) {
    zero_all({&grad_x, &grad_mu, &grad_lv});
    return {grad_x, grad_mu, grad_lv};
  }
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  bool bcast = false;
  const at::Tensor grad = grad_for_kernel(grad_in, reduction <= kReducePerSample, &bcast);
  const cuda::LaunchTarget target = launch_target(x);
  poison_all({&grad_x, &grad_mu, &grad_lv});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_log_prob_bwd_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    cuda::LogProbGradParams<T> p;
    p.grad = reduced_grad<scalar_t>(grad, bcast, reduction);
    set_inputs<scalar_t>(p, x, mu, logvar);
    p.grad_x = data_out<scalar_t>(grad_x);
    p.grad_mu = data_out<scalar_t>(grad_mu);
    p.grad_lv = data_out<scalar_t>(grad_lv);
    set_rows_and_clamp(p, shape, clamp_lo, clamp_hi);
    FV_CUDA_CHECK(cuda::launch_log_prob_bwd<T>(p, target));
  });
  return {grad_x, grad_mu, grad_lv};
}

}  // namespace

FV_CUDA_IMPL(gaussian_log_prob, log_prob_fwd_cuda, log_prob_bwd_cuda)

}  // namespace fused_vae
