// What the CPU and CUDA kernels share (torch-free, host and device): the op protocol's
// modes and the per-element math of the fused ops (docs/design.md sections 1 and 8), with
// lv = logvar and pl = prior_logvar after the optional clamp (zero gradient outside it):
//
// sampling op (reparam_kl):
//   z    = mu + exp(0.5 * lv) * eps
//   kl   = 0.5 * (mu^2 + exp(lv) - lv - 1)                         (prior N(0, I))
//        = 0.5 * (pl - lv + (exp(lv) + (mu - pm)^2) * exp(-pl) - 1)  (prior N(pm, exp(pl)))
//   logq = -0.5 * eps^2 - 0.5 * lv - 0.5 * log(2 pi)                 (log q(z|x))
//        = -0.5 * eps^2 - 0.5 * lv + 0.5 * (z - pm)^2 * exp(-pl) + 0.5 * pl  (log q - log p)
//   (without a prior pm = 0, pl = 0), summed per sample and row;
// log-density op (gaussian_log_prob):
//   lp   = -0.5 * (x - mu)^2 * exp(-lv) - 0.5 * lv - 0.5 * log(2 pi).
#pragma once

#include <cstdint>

#include "fused_vae/fast_math.h"

namespace fused_vae {

// How a reduced output is produced; the numbers are part of the op schema and equal the
// REDUCE_* constants of fused_vae/backends/protocol.py (a test compares them).
enum ReduceMode : int64_t {
  kReduceSkip = 0,         // no output
  kReduceElementwise = 1,  // reduction "none": the input's shape and dtype
  kReducePerSample = 2,    // [B], accumulation dtype
  kReduceSum = 3,          // scalar, accumulation dtype
  kReduceBatchMean = 4,    // scalar sum / B, accumulation dtype
};

// What the sampling op's [S, B] log-density output holds (LOGQ_* of protocol.py).
enum LogqMode : int64_t {
  kLogqSkip = 0,         // no output
  kLogqDensity = 1,      // log q(z|x)
  kLogqRatio = 2,        // log q(z|x) - log p(z)
  kLogqDensityPath = 3,  // log q(z|x), path gradient (q's parameters constant inside log q)
  kLogqRatioPath = 4,    // log q(z|x) - log p(z), path gradient
};

FV_HD bool logq_is_ratio(int64_t mode) { return mode == kLogqRatio || mode == kLogqRatioPath; }
FV_HD bool logq_is_path(int64_t mode) { return mode == kLogqDensityPath || mode == kLogqRatioPath; }

constexpr double kHalfLog2Pi = 0.91893853320467274178;  // 0.5 * log(2 pi)

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

// ---- sampling op, prior N(0, I) ---------------------------------------------------------

template <typename acc_t>
FV_HD acc_t kl_term(acc_t mu, acc_t lv, acc_t std) {
  return acc_t(0.5) * (mu * mu + std * std - lv - acc_t(1));
}

template <typename acc_t>
FV_HD acc_t grad_logvar_term(acc_t std, acc_t gz_eps_sum, acc_t gkl) {
  return acc_t(0.5) * std * gz_eps_sum + gkl * acc_t(0.5) * (std * std - acc_t(1));
}

// ---- sampling op, learned prior N(pm, exp(pl)); ipv = exp(-pl) --------------------------

template <typename acc_t>
FV_HD acc_t kl_prior_term(acc_t mu, acc_t lv, acc_t std, acc_t pm, acc_t pl, acc_t ipv) {
  const acc_t d = mu - pm;
  return acc_t(0.5) * (pl - lv + (std * std + d * d) * ipv - acc_t(1));
}

// Gradients of the prior KL's element times gkl with respect to (mu, lv, pm, pl).
template <typename acc_t>
struct Grad4 {
  acc_t mu = acc_t(0), lv = acc_t(0), pm = acc_t(0), pl = acc_t(0);
};

template <typename acc_t>
FV_HD Grad4<acc_t> kl_prior_grads(acc_t mu, acc_t std, acc_t pm, acc_t ipv, acc_t gkl) {
  const acc_t d = mu - pm;
  const acc_t g_mu = gkl * d * ipv;
  Grad4<acc_t> g;
  g.mu = g_mu;
  g.lv = gkl * acc_t(0.5) * (std * std * ipv - acc_t(1));
  g.pm = -g_mu;
  g.pl = gkl * acc_t(0.5) * (acc_t(1) - (std * std + d * d) * ipv);
  return g;
}

// ---- sampling op, log density of a sample ------------------------------------------------

// One element's log q(z|x) (kLogqDensity*) or log q(z|x) - log p(z) (kLogqRatio*); zp = z - pm
// (z without a prior), pl = 0 and ipv = 1 without one.
template <typename acc_t>
FV_HD acc_t logq_term(acc_t eps, acc_t lv, acc_t zp, acc_t pl, acc_t ipv, bool ratio) {
  const acc_t log_q = acc_t(-0.5) * eps * eps - acc_t(0.5) * lv;
  return ratio ? log_q + acc_t(0.5) * (zp * zp * ipv + pl) : log_q - acc_t(kHalfLog2Pi);
}

// Adds gw times one sample's log-density gradients with respect to (mu, lv, pm, pl) to g:
// the total derivative through z = mu + std * eps (eps fixed), or with path = true the path
// derivative (q's parameters held constant inside log q). Branch-free, so loops vectorise.
template <typename acc_t>
FV_HD void add_logq_grads(Grad4<acc_t>& g, acc_t gw, acc_t eps, acc_t std, acc_t zp, acc_t ipv, bool ratio,
                          bool path) {
  const acc_t r = ratio ? zp * ipv : acc_t(0);
  const acc_t c_mu = r - (path ? eps / std : acc_t(0));
  const acc_t c_lv = (path ? acc_t(-0.5) * eps * eps : acc_t(-0.5)) + (ratio ? acc_t(0.5) * std * eps * r : acc_t(0));
  g.mu += gw * c_mu;
  g.lv += gw * c_lv;
  g.pm -= gw * r;
  g.pl += ratio ? gw * acc_t(0.5) * (acc_t(1) - zp * r) : acc_t(0);
}

// ---- log-density op ----------------------------------------------------------------------

template <typename acc_t>
FV_HD acc_t log_prob_term(acc_t x, acc_t mu, acc_t lv, acc_t ivar) {
  const acc_t d = x - mu;
  return acc_t(-0.5) * d * d * ivar - acc_t(0.5) * lv - acc_t(kHalfLog2Pi);
}

// Gradients of g * log_prob_term with respect to (x, mu, lv); ivar = exp(-lv).
template <typename acc_t>
struct Grad3 {
  acc_t x, mu, lv;
};

template <typename acc_t>
FV_HD Grad3<acc_t> log_prob_grads(acc_t x, acc_t mu, acc_t ivar, acc_t g) {
  const acc_t d = x - mu;
  const acc_t r = d * ivar;
  return {-g * r, g * r, g * acc_t(0.5) * (d * r - acc_t(1))};
}

}  // namespace fused_vae
