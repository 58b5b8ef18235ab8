// Schema of the fused_vae ops. Device implementations live in cpu/ and cuda/;
// fake (meta) and autograd registrations are in fused_vae/_ops.py.
#include <torch/library.h>

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
