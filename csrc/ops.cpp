// The fused_vae ops: their schemas and the forward op's autograd kernel (all devices).
//
// fused_vae/backends/protocol.py holds the same schemas (a test compares the texts) and
// docs/design.md section 8 the protocol. Device implementations live in cpu/ and cuda/;
// fake (meta) impls and the backward op's derivative are registered by
// fused_vae/backends/registration.py.
//
// Autograd: backward calls fused_vae::reparam_kl_bwd, which regenerates eps from the
// saved seed; only mu, logvar and the seed are saved. When the backward itself is being
// recorded (create_graph=True) the backward op is called through autograd, which gives it
// its own derivative; otherwise it is called below autograd, so a training step runs no
// Python between the user's code and the kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "fused_vae/elementwise.h"

TORCH_LIBRARY(fused_vae, m) {
  // Returns (z [num_samples, *mu.shape] or [0], kl per kl_mode or [0]).
  m.def(
      "reparam_kl_fwd(Tensor mu, Tensor logvar, Tensor seed, int num_samples, int kl_mode, "
      "float? clamp_lo, float? clamp_hi) -> (Tensor, Tensor)");
  // Returns (grad_mu, grad_logvar); eps is regenerated from seed.
  m.def(
      "reparam_kl_bwd(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor seed, "
      "int num_samples, int kl_mode, float? clamp_lo, float? clamp_hi) -> (Tensor, Tensor)");
}

namespace fused_vae {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptDouble = c10::optional<double>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          int64_t, int64_t, OptDouble, OptDouble)>&
fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_vae::reparam_kl_fwd", "")
                             .typed<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               int64_t, int64_t, OptDouble, OptDouble)>();
  return op;
}

const c10::TypedOperatorHandle<TensorPair(const c10::optional<at::Tensor>&,
                                          const c10::optional<at::Tensor>&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                          OptDouble, OptDouble)>&
bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_vae::reparam_kl_bwd", "")
          .typed<TensorPair(const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                            OptDouble, OptDouble)>();
  return op;
}

class ReparamKl : public torch::autograd::Function<ReparamKl> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const at::Tensor& seed, int64_t num_samples, int64_t kl_mode,
                               OptDouble clamp_lo, OptDouble clamp_hi) {
    at::Tensor z, kl;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(z, kl) = fwd_op().call(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi);
    }
    ctx->save_for_backward({mu, logvar, seed});
    ctx->saved_data["num_samples"] = num_samples;
    ctx->saved_data["kl_mode"] = kl_mode;
    ctx->saved_data["clamp_lo"] = clamp_lo;
    ctx->saved_data["clamp_hi"] = clamp_hi;
    ctx->set_materialize_grads(false);
    if (num_samples == 0) ctx->mark_non_differentiable({z});
    if (kl_mode == kKlSkip) ctx->mark_non_differentiable({kl});
    return {z, kl};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t num_samples = ctx->saved_data["num_samples"].toInt();
    const int64_t kl_mode = ctx->saved_data["kl_mode"].toInt();
    const OptDouble lo = ctx->saved_data["clamp_lo"].toOptional<double>();
    const OptDouble hi = ctx->saved_data["clamp_hi"].toOptional<double>();
    c10::optional<at::Tensor> grad_z, grad_kl;
    if (grads[0].defined() && num_samples > 0) grad_z = grads[0];
    if (grads[1].defined() && kl_mode != kKlSkip) grad_kl = grads[1];
    variable_list out(7);
    if (!grad_z.has_value() && !grad_kl.has_value()) return out;
    at::Tensor grad_mu, grad_lv;
    if (at::GradMode::is_enabled()) {  // create_graph=True: record the backward op too
      std::tie(grad_mu, grad_lv) =
          bwd_op().call(grad_z, grad_kl, saved[0], saved[1], saved[2], num_samples, kl_mode, lo, hi);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grad_mu, grad_lv) =
          bwd_op().call(grad_z, grad_kl, saved[0], saved[1], saved[2], num_samples, kl_mode, lo, hi);
    }
    out[0] = grad_mu;
    out[1] = grad_lv;
    return out;
  }
};

TensorPair reparam_kl_fwd_autograd(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                                   int64_t num_samples, int64_t kl_mode, OptDouble clamp_lo,
                                   OptDouble clamp_hi) {
  auto out = ReparamKl::apply(mu, logvar, seed, num_samples, kl_mode, clamp_lo, clamp_hi);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_vae, Autograd, m) {
  m.impl("reparam_kl_fwd", &reparam_kl_fwd_autograd);
}

}  // namespace fused_vae
