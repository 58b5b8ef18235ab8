// What the CPU and CUDA kernels share (torch-free, host and device): the op protocol's
// KL modes and the per-element math of the fused op,
//   z   = mu + exp(0.5 * lv) * eps
//   kl  = 0.5 * (mu^2 + exp(lv) - lv - 1)
//   dmu = sum_s gz_s + gkl * mu
//   dlv = 0.5 * exp(0.5 * lv) * sum_s(gz_s * eps_s) + gkl * 0.5 * (exp(lv) - 1)
// where lv is logvar after the optional clamp, whose gradient is zero outside [lo, hi].
#pragma once

#include <cstdint>

#include "fused_vae/fast_math.h"

namespace fused_vae {

// How the KL output is produced; the numbers are part of the op schema and equal the
// KL_* constants of fused_vae/backends/protocol.py (a test compares them).
enum KlMode : int64_t {
  kKlSkip = 0,         // no KL output (reparameterize)
  kKlElementwise = 1,  // reduction "none": mu's shape and dtype
  kKlPerSample = 2,    // [B], accumulation dtype
  kKlSum = 3,          // scalar, accumulation dtype
  kKlBatchMean = 4,    // scalar sum / B, accumulation dtype
};

// Optional clamp of logvar. Absent bounds are -inf / +inf, so apply() is branch-free.
struct ClampSpec {
  bool active = false;  // any bound given
  float lo_f = -INFINITY, hi_f = INFINITY;
  double lo_d = -INFINITY, hi_d = INFINITY;

  FV_HD float lo(float) const { return lo_f; }
  FV_HD double lo(double) const { return lo_d; }
  FV_HD float hi(float) const { return hi_f; }
  FV_HD double hi(double) const { return hi_d; }

  // NaN stays NaN (as torch.clamp does).
  template <typename acc_t>
  FV_HD acc_t apply(acc_t lv) const {
    const acc_t out = lv < lo(lv) ? lo(lv) : lv;
    return out > hi(lv) ? hi(lv) : out;
  }

  // Whether the gradient flows through the clamp (torch.clamp's rule: lo <= lv <= hi).
  // Without a clamp it always flows, so NaN gradients propagate.
  template <typename acc_t>
  FV_HD bool passes(acc_t lv) const {
    return !active | ((lv >= lo(lv)) & (lv <= hi(lv)));
  }
};

template <typename acc_t>
FV_HD acc_t kl_term(acc_t mu, acc_t lv, acc_t std) {
  return acc_t(0.5) * (mu * mu + std * std - lv - acc_t(1));
}

template <typename acc_t>
FV_HD acc_t grad_logvar_term(acc_t std, acc_t gz_eps_sum, acc_t gkl) {
  return acc_t(0.5) * std * gz_eps_sum + gkl * acc_t(0.5) * (std * std - acc_t(1));
}

}  // namespace fused_vae
