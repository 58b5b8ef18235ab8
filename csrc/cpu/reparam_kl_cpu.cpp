// CPU implementation of fused_vae::reparam_kl_fwd / reparam_kl_bwd: the sample, its KL to
// N(0, I) or to a learned prior, and its log density (elementwise.h has the math).
//
// Tiles and reductions: cpu_tiles.h (docs/design.md section 9). A work item is one tile of
// one sample; the KL is made with sample 0 and the log density's row sums with every
// sample ([S, B] rows). Within a tile the noise is made into a small buffer (explicit
// AVX-512/AVX2 Philox, philox_simd.h) and the element loop reads the inputs once and
// writes each output once. The forward and backward tiles are compiled per dtype and per
// prior (with / without), each for AVX-512, AVX2 and baseline x86-64 (target_clones).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_tiles.h"
#include "fused_vae/elementwise.h"
#include "fused_vae/op_common.h"
#include "fused_vae/philox.h"
#include "philox_simd.h"

namespace fused_vae {
namespace cpu {
namespace {

constexpr int64_t kBatch = 64;  // Philox groups generated per inner batch

// Writes the normals of groups [g0, g0 + ngroups) to out, 4 per group, lane-minor.
// Philox runs in explicit SIMD (philox_simd.h); Box-Muller is vectorised by the compiler.
FV_CLONES void normals_for_groups(uint64_t seed, uint64_t g0, int64_t ngroups, float* out) {
  alignas(64) uint32_t r0[kBatch], r1[kBatch], r2[kBatch], r3[kBatch];
  alignas(64) float n0[kBatch], n1[kBatch], n2[kBatch], n3[kBatch];
  const PhiloxBatchFn philox = philox_batch();
  for (int64_t base = 0; base < ngroups; base += kBatch) {
    const int64_t cnt = std::min(kBatch, ngroups - base);
    philox(seed, g0 + static_cast<uint64_t>(base), cnt, r0, r1, r2, r3);
    for (int64_t k = 0; k < cnt; ++k) {
      box_muller(uint_to_uniform(r0[k]), uint_to_uniform(r1[k]), n0[k], n1[k]);
      box_muller(uint_to_uniform(r2[k]), uint_to_uniform(r3[k]), n2[k], n3[k]);
    }
    float* dst = out + 4 * base;
    for (int64_t k = 0; k < cnt; ++k) {
      dst[4 * k + 0] = n0[k];
      dst[4 * k + 1] = n1[k];
      dst[4 * k + 2] = n2[k];
      dst[4 * k + 3] = n3[k];
    }
  }
}

// Normals for flat stream positions [first, first + n): returns a pointer into buf,
// which must hold n + 8 floats.
FV_INLINE const float* stream_normals(uint64_t seed, uint64_t first, int64_t n, float* buf) {
  const uint64_t g0 = first / 4;
  const int64_t lane0 = static_cast<int64_t>(first % 4);
  const int64_t ngroups = (lane0 + n + 3) / 4;
  normals_for_groups(seed, g0, ngroups, buf);
  return buf + lane0;
}

template <typename scalar_t>
struct FwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* mu;
  const scalar_t* lv;
  const scalar_t* pm;  // prior mu / logvar, null without a prior
  const scalar_t* pl;
  scalar_t* z;            // null when no sample is drawn
  scalar_t* kl_elem;      // null unless kl_mode == elementwise
  RowSums<acc_t>* kl;     // row sums of a reduced KL, or null
  RowSums<acc_t>* logq;   // [S, B] row sums of the log density, or null
  int64_t logq_mode;
  ClampSpec clamp;
  uint64_t seed;
  int64_t num_samples;
};

// What a forward tile with a prior or a log density computes once for all its samples.
template <typename acc_t>
struct TermBuffers {
  alignas(64) acc_t l[kTile];     // clamped logvar
  alignas(64) acc_t sd[kTile];    // exp(0.5 * l)
  alignas(64) acc_t p_lv[kTile];  // clamped prior logvar (with a prior)
  alignas(64) acc_t ipv[kTile];   // exp(-p_lv) (with a prior)
};

// The per-sample element loop of a forward tile with a prior or a log density: z and, with
// kLogq, the log density (kRatio: log q - log p). l, sd, the prior's clamped logvar and ipv
// come from the tile's buffers (the same for every sample). The kinds are template flags so
// that the loop vectorises (GCC does not vectorise a select on a run-time flag here).
template <typename scalar_t, bool kPrior, bool kLogq, bool kRatio>
FV_INLINE void sample_loop(const scalar_t* __restrict mu, const scalar_t* __restrict pm,
                           const TermBuffers<at::opmath_type<scalar_t>>& tb, const float* __restrict eps,
                           scalar_t* __restrict z, at::opmath_type<scalar_t>* __restrict lq_buf, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  const acc_t* __restrict l = tb.l;
  const acc_t* __restrict sd = tb.sd;
  const acc_t* __restrict p_lv = tb.p_lv;
  const acc_t* __restrict ipv = tb.ipv;
  FV_IVDEP
  for (int64_t k = 0; k < n; ++k) {
    const acc_t e = static_cast<acc_t>(eps[k]);
    const acc_t zz = io::load(mu, k) + sd[k] * e;
    io::store(z, k, zz);
    if (kLogq) {
      const acc_t zp = kPrior ? zz - io::load(pm, k) : zz;
      lq_buf[k] = logq_term(e, l[k], zp, kPrior ? p_lv[k] : acc_t(0), kPrior ? ipv[k] : acc_t(1), kRatio);
    }
  }
}

// Forward of the plain op (no prior, no log density) for sample s; the KL is produced with
// sample 0 (want_kl).
template <typename scalar_t>
FV_INLINE void plain_forward(const FwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t, int64_t s,
                             bool want_kl, at::opmath_type<scalar_t>* __restrict kl_buf) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  alignas(64) float eps_buf[kTile + 8];
  const scalar_t* __restrict mu = a.mu + t.j0;
  const scalar_t* __restrict lv = a.lv + t.j0;
  const ClampSpec clamp = a.clamp;
  const int64_t n = t.len;
  if (a.z != nullptr) {
    const int64_t flat0 = s * plan.s.N + t.j0;
    const float* __restrict eps = stream_normals(a.seed, static_cast<uint64_t>(flat0), n, eps_buf);
    scalar_t* __restrict z = a.z + flat0;
    if (want_kl) {
      for (int64_t k = 0; k < n; ++k) {
        const acc_t m = io::load(mu, k);
        const acc_t l = clamp.apply(io::load(lv, k));
        const acc_t sd = op_exp(acc_t(0.5) * l);
        io::store(z, k, m + sd * static_cast<acc_t>(eps[k]));
        kl_buf[k] = kl_term(m, l, sd);
      }
    } else {
      for (int64_t k = 0; k < n; ++k) {
        const acc_t m = io::load(mu, k);
        const acc_t l = clamp.apply(io::load(lv, k));
        const acc_t sd = op_exp(acc_t(0.5) * l);
        io::store(z, k, m + sd * static_cast<acc_t>(eps[k]));
      }
    }
  } else if (want_kl) {
    FV_IVDEP
    for (int64_t k = 0; k < n; ++k) {
      const acc_t m = io::load(mu, k);
      const acc_t l = clamp.apply(io::load(lv, k));
      kl_buf[k] = kl_term(m, l, op_exp(acc_t(0.5) * l));
    }
  }
}

// Forward of one sample's z and the KL to a prior without a log density in one pass over the
// tile (a hierarchical VAE's layer); kDraw: a sample is drawn (else the KL alone).
template <typename scalar_t, bool kDraw>
FV_INLINE void prior_forward_one_pass(const FwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t, int64_t s,
                                      at::opmath_type<scalar_t>* __restrict kl_buf) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  alignas(64) float eps_buf[kTile + 8];
  const scalar_t* __restrict mu = a.mu + t.j0;
  const scalar_t* __restrict lv = a.lv + t.j0;
  const scalar_t* __restrict pm = a.pm + t.j0;
  const scalar_t* __restrict pl = a.pl + t.j0;
  const ClampSpec clamp = a.clamp;
  const int64_t n = t.len;
  const int64_t flat0 = s * plan.s.N + t.j0;
  const float* __restrict eps = kDraw ? stream_normals(a.seed, static_cast<uint64_t>(flat0), n, eps_buf) : nullptr;
  scalar_t* __restrict z = kDraw ? a.z + flat0 : nullptr;
  FV_IVDEP
  for (int64_t k = 0; k < n; ++k) {
    const acc_t m = io::load(mu, k);
    const acc_t l = clamp.apply(io::load(lv, k));
    const acc_t sd = op_exp(acc_t(0.5) * l);
    if (kDraw) io::store(z, k, m + sd * static_cast<acc_t>(eps[k]));
    const acc_t p_lv = clamp.apply(io::load(pl, k));
    kl_buf[k] = kl_prior_term(m, l, sd, io::load(pm, k), p_lv, op_exp(-p_lv));
  }
}

// Forward of one tile for samples [s0, s1): the KL (produced by the work item holding sample 0),
// z and the log density of each sample. With more than one sample, a prior or a log density
// the per-element terms that do not depend on the noise (logvar's exp, the prior's, the KL)
// are computed once for all the samples.
template <typename scalar_t, bool kPrior>
FV_INLINE void forward_tile(const FwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t, int64_t s0,
                            int64_t s1) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  alignas(64) acc_t kl_buf[kTile];
  const bool want_kl = s0 == 0 && (a.kl_elem != nullptr || a.kl != nullptr);
  const bool want_lq = a.logq != nullptr;
  const int64_t n = t.len;
  if (!kPrior && !want_lq && s1 - s0 == 1) {
    plain_forward(a, plan, t, s0, want_kl, kl_buf);
  } else if (kPrior && !want_lq && s1 - s0 == 1) {
    if (a.z != nullptr) {
      prior_forward_one_pass<scalar_t, true>(a, plan, t, s0, kl_buf);
    } else {
      prior_forward_one_pass<scalar_t, false>(a, plan, t, s0, kl_buf);
    }
  } else {
    TermBuffers<acc_t> tb;
    alignas(64) float eps_buf[kTile + 8];
    alignas(64) acc_t lq_buf[kTile];
    const scalar_t* __restrict mu = a.mu + t.j0;
    const scalar_t* __restrict lv = a.lv + t.j0;
    const scalar_t* __restrict pm = kPrior ? a.pm + t.j0 : nullptr;
    const scalar_t* __restrict pl = kPrior ? a.pl + t.j0 : nullptr;
    const ClampSpec clamp = a.clamp;
    FV_IVDEP
    for (int64_t k = 0; k < n; ++k) {
      const acc_t m = io::load(mu, k);
      const acc_t l = clamp.apply(io::load(lv, k));
      const acc_t sd = op_exp(acc_t(0.5) * l);
      tb.l[k] = l;
      tb.sd[k] = sd;
      if (kPrior) {
        const acc_t p_lv = clamp.apply(io::load(pl, k));
        const acc_t ipv = op_exp(-p_lv);
        tb.p_lv[k] = p_lv;
        tb.ipv[k] = ipv;
        kl_buf[k] = kl_prior_term(m, l, sd, io::load(pm, k), p_lv, ipv);
      } else {
        kl_buf[k] = kl_term(m, l, sd);
      }
    }
    const bool ratio = logq_is_ratio(a.logq_mode);
    for (int64_t s = s0; s < s1 && a.z != nullptr; ++s) {
      const int64_t flat0 = s * plan.s.N + t.j0;
      const float* __restrict eps = stream_normals(a.seed, static_cast<uint64_t>(flat0), n, eps_buf);
      scalar_t* __restrict z = a.z + flat0;
      if (!want_lq) {
        sample_loop<scalar_t, kPrior, false, false>(mu, pm, tb, eps, z, lq_buf, n);
        continue;
      }
      if (ratio) {
        sample_loop<scalar_t, kPrior, true, true>(mu, pm, tb, eps, z, lq_buf, n);
      } else {
        sample_loop<scalar_t, kPrior, true, false>(mu, pm, tb, eps, z, lq_buf, n);
      }
      const int64_t rows_before = s * plan.s.B;
      reduce_tile(lq_buf, plan, t, a.logq->rows + rows_before,
                  a.logq->chunks != nullptr ? a.logq->chunks + rows_before * plan.chunks_per_row : nullptr);
    }
  }
  if (!want_kl) return;
  if (a.kl_elem != nullptr) {
    scalar_t* __restrict out = a.kl_elem + t.j0;
    for (int64_t k = 0; k < n; ++k) io::store(out, k, kl_buf[k]);
    return;
  }
  reduce_tile(kl_buf, plan, t, a.kl->rows, a.kl->chunks);
}

#define FV_FWD_TILE(scalar_t, suffix)                                                                     \
  FV_CLONES void forward_tile_##suffix(const FwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t,  \
                                       int64_t s0, int64_t s1) {                                         \
    forward_tile<scalar_t, false>(a, plan, t, s0, s1);                                                    \
  }                                                                                                       \
  FV_CLONES void forward_tile_prior_##suffix(const FwdArgs<scalar_t>& a, const TilePlan& plan,           \
                                             const Tile& t, int64_t s0, int64_t s1) {                    \
    forward_tile<scalar_t, true>(a, plan, t, s0, s1);                                                     \
  }                                                                                                       \
  inline void forward_tile_dispatch(const FwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t,     \
                                    int64_t s0, int64_t s1) {                                            \
    if (a.pm != nullptr) {                                                                                \
      forward_tile_prior_##suffix(a, plan, t, s0, s1);                                                    \
    } else {                                                                                              \
      forward_tile_##suffix(a, plan, t, s0, s1);                                                          \
    }                                                                                                     \
  }
FV_FWD_TILE(float, f32)
FV_FWD_TILE(double, f64)
FV_FWD_TILE(at::Half, f16)
FV_FWD_TILE(at::BFloat16, bf16)

uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.device().is_cpu(), "fused_vae: seed must be a CPU tensor for CPU inputs");
  return static_cast<uint64_t>(seed.item<int64_t>());
}

ReparamKlOutputs reparam_kl_fwd_cpu(FV_REPARAM_KL_FWD_ARGS) {
  check_reparam(mu_in, logvar_in, prior_mu_in, prior_logvar_in, seed, num_samples, kl_mode, logq_mode);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const at::Tensor prior_mu = contiguous_or_none(prior_mu_in);
  const at::Tensor prior_logvar = contiguous_or_none(prior_logvar_in);
  const RowShape shape = row_shape(mu);
  const TilePlan plan(shape);
  at::Tensor z = alloc_z(mu, num_samples);
  at::Tensor kl = alloc_reduced(mu, kl_mode);
  at::Tensor logq = alloc_logq(mu, num_samples, logq_mode);
  const auto acc_options = mu.options().dtype(acc_dtype(mu.scalar_type()));
  const uint64_t seed_value = num_samples > 0 ? read_seed(seed) : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RowSums<acc_t> kl_rows(kl, kl_mode, shape.B, plan, acc_options);
    RowSums<acc_t> logq_rows(logq, logq_mode != kLogqSkip ? kReducePerSample : kReduceSkip, num_samples * shape.B,
                             plan, acc_options);
    FwdArgs<scalar_t> a;
    a.mu = mu.const_data_ptr<scalar_t>();
    a.lv = logvar.const_data_ptr<scalar_t>();
    a.pm = data_or_null<scalar_t>(prior_mu);
    a.pl = data_or_null<scalar_t>(prior_logvar);
    a.z = num_samples > 0 ? z.mutable_data_ptr<scalar_t>() : nullptr;
    a.kl_elem = kl_mode == kReduceElementwise ? kl.mutable_data_ptr<scalar_t>() : nullptr;
    a.kl = RowSums<acc_t>::is_reduced(kl_mode) ? &kl_rows : nullptr;
    a.logq = logq_mode != kLogqSkip ? &logq_rows : nullptr;
    a.logq_mode = logq_mode;
    a.clamp = make_clamp(clamp_lo, clamp_hi);
    a.seed = seed_value;
    a.num_samples = num_samples;
    // A work item is one tile and a run of its samples: enough runs per tile to give every
    // thread two items, each run as long as that allows (the noise-free terms are made once
    // per item). Every output is written by one item, so the results do not depend on this.
    const int64_t passes = std::max<int64_t>(num_samples, 1);
    const int64_t wanted_runs = std::clamp<int64_t>(
        (2 * at::get_num_threads() + plan.num_tiles - 1) / std::max<int64_t>(plan.num_tiles, 1), 1, passes);
    const int64_t run_len = (passes + wanted_runs - 1) / wanted_runs;
    const int64_t runs = (passes + run_len - 1) / run_len;
    const int64_t grain = std::max<int64_t>(1, grain_tiles(plan) / run_len);
    at::parallel_for(0, runs * plan.num_tiles, grain, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t s0 = (w / plan.num_tiles) * run_len;
        forward_tile_dispatch(a, plan, plan.tile(w % plan.num_tiles), s0, std::min(s0 + run_len, passes));
      }
    });
    kl_rows.finish(kl, kl_mode, shape.B, plan);
    if (a.logq != nullptr) logq_rows.finish(logq, kReducePerSample, num_samples * shape.B, plan);
  });
  return {z, kl, logq};
}

template <typename scalar_t>
struct BwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_z;        // [S, N] or null
  ReducedGradIn<scalar_t> grad_kl;
  const acc_t* grad_logq;  // [S, B] or null
  int64_t logq_mode;
  const scalar_t* mu;
  const scalar_t* lv;
  const scalar_t* pm;  // null without a prior
  const scalar_t* pl;
  scalar_t* grad_mu;
  scalar_t* grad_lv;
  scalar_t* grad_pm;  // null without a prior
  scalar_t* grad_pl;
  ClampSpec clamp;
  uint64_t seed;
  int64_t num_samples;
};

// The buffers of every backward tile: the noise, the sums of grad_z and of grad_z * eps over
// the samples, and grad_kl of each element.
template <typename acc_t>
struct BwdTileBuffers {
  alignas(64) float eps[kTile + 8];
  alignas(64) acc_t gz_sum[kTile];
  alignas(64) acc_t gz_eps_sum[kTile];
  alignas(64) acc_t gkl[kTile];
};

// Adds one sample's grad_z and grad_z * eps to the tile's sums.
template <typename scalar_t>
FV_INLINE void add_grad_z(const scalar_t* __restrict gz, const float* __restrict eps,
                          BwdTileBuffers<at::opmath_type<scalar_t>>& b, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* __restrict gz_sum = b.gz_sum;
  acc_t* __restrict gz_eps_sum = b.gz_eps_sum;
  FV_IVDEP
  for (int64_t k = 0; k < n; ++k) {
    const acc_t g = Io<scalar_t>::load(gz, k);
    gz_sum[k] += g;
    gz_eps_sum[k] += g * static_cast<acc_t>(eps[k]);
  }
}

// The backward of the sampling op without a prior and without a log density.
template <typename scalar_t>
FV_INLINE void backward_tile_plain(const BwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  BwdTileBuffers<acc_t> b;
  const ClampSpec clamp = a.clamp;
  const int64_t n = t.len;
  const int64_t N = plan.s.N;
  a.grad_kl.spread(plan, t, b.gkl);

  const scalar_t* __restrict mu = a.mu + t.j0;
  const scalar_t* __restrict lv = a.lv + t.j0;
  scalar_t* __restrict gmu = a.grad_mu + t.j0;
  scalar_t* __restrict glv = a.grad_lv + t.j0;
  if (a.grad_z != nullptr && a.num_samples == 1) {
    // One sample: a single pass, no accumulators.
    const float* __restrict eps = stream_normals(a.seed, static_cast<uint64_t>(t.j0), n, b.eps);
    const scalar_t* __restrict gz = a.grad_z + t.j0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t m = io::load(mu, k);
      const acc_t raw = io::load(lv, k);
      const acc_t l = clamp.apply(raw);
      const acc_t sd = op_exp(acc_t(0.5) * l);
      const acc_t g = io::load(gz, k);
      io::store(gmu, k, g + b.gkl[k] * m);
      const acc_t gl = grad_logvar_term(sd, g * static_cast<acc_t>(eps[k]), b.gkl[k]);
      io::store(glv, k, clamp.passes(raw) ? gl : acc_t(0));
    }
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    b.gz_sum[k] = 0;
    b.gz_eps_sum[k] = 0;
  }
  if (a.grad_z != nullptr) {
    for (int64_t s = 0; s < a.num_samples; ++s) {
      const int64_t flat0 = s * N + t.j0;
      add_grad_z(a.grad_z + flat0, stream_normals(a.seed, static_cast<uint64_t>(flat0), n, b.eps), b, n);
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    const acc_t m = io::load(mu, k);
    const acc_t raw = io::load(lv, k);
    const acc_t l = clamp.apply(raw);
    const acc_t sd = op_exp(acc_t(0.5) * l);
    io::store(gmu, k, b.gz_sum[k] + b.gkl[k] * m);
    const acc_t gl = grad_logvar_term(sd, b.gz_eps_sum[k], b.gkl[k]);
    io::store(glv, k, clamp.passes(raw) ? gl : acc_t(0));
  }
}

// The backward of z and the KL to a prior with one sample (or none) and no log density, in one
// pass over the tile (a hierarchical VAE's layer); kGz: grad_z is given.
template <typename scalar_t, bool kGz>
FV_INLINE void prior_kl_one_pass(const BwdArgs<scalar_t>& a, const Tile& t, const at::opmath_type<scalar_t>* gkl,
                                 const float* __restrict eps) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  const scalar_t* __restrict mu = a.mu + t.j0;
  const scalar_t* __restrict lv = a.lv + t.j0;
  const scalar_t* __restrict pm = a.pm + t.j0;
  const scalar_t* __restrict pl = a.pl + t.j0;
  const scalar_t* __restrict gz = kGz ? a.grad_z + t.j0 : nullptr;
  scalar_t* __restrict gmu = a.grad_mu + t.j0;
  scalar_t* __restrict glv = a.grad_lv + t.j0;
  scalar_t* __restrict gpm = a.grad_pm + t.j0;
  scalar_t* __restrict gpl = a.grad_pl + t.j0;
  const ClampSpec clamp = a.clamp;
  FV_IVDEP
  for (int64_t k = 0; k < t.len; ++k) {
    const acc_t m = io::load(mu, k);
    const acc_t raw = io::load(lv, k);
    const acc_t sd = op_exp(acc_t(0.5) * clamp.apply(raw));
    const acc_t raw_p = io::load(pl, k);
    const Grad4<acc_t> kg = kl_prior_grads(m, sd, io::load(pm, k), op_exp(-clamp.apply(raw_p)), gkl[k]);
    const acc_t g = kGz ? io::load(gz, k) : acc_t(0);
    const acc_t g_eps = kGz ? g * static_cast<acc_t>(eps[k]) : acc_t(0);
    io::store(gmu, k, g + kg.mu);
    io::store(glv, k, clamp.passes(raw) ? acc_t(0.5) * sd * g_eps + kg.lv : acc_t(0));
    io::store(gpm, k, kg.pm);
    io::store(gpl, k, clamp.passes(raw_p) ? kg.pl : acc_t(0));
  }
}

// Where backward_tile_terms accumulates the log density's gradients, one array per input.
template <typename acc_t>
struct LogqGradBuffers {
  acc_t* __restrict mu;
  acc_t* __restrict lv;
  acc_t* __restrict pm;
  acc_t* __restrict pl;
};

// One sample's part of the backward with a log density: adds grad_z (kGz) and grad_z * eps to
// the tile's sums and gw times the log-density gradients to `out`, in one pass. The kinds are
// template flags so that the loop vectorises.
template <typename scalar_t, bool kPrior, bool kGz, bool kRatio, bool kPath>
FV_INLINE void sample_grads_loop(const scalar_t* __restrict mu, const scalar_t* __restrict pm,
                                 const scalar_t* __restrict gz, const float* __restrict eps,
                                 const at::opmath_type<scalar_t>* __restrict gw,
                                 const at::opmath_type<scalar_t>* __restrict sd,
                                 const at::opmath_type<scalar_t>* __restrict ipv,
                                 BwdTileBuffers<at::opmath_type<scalar_t>>& b,
                                 const LogqGradBuffers<at::opmath_type<scalar_t>>& out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  acc_t* __restrict gz_sum = b.gz_sum;
  acc_t* __restrict gz_eps_sum = b.gz_eps_sum;
  acc_t* __restrict g_mu = out.mu;
  acc_t* __restrict g_lv = out.lv;
  acc_t* __restrict g_pm = out.pm;
  acc_t* __restrict g_pl = out.pl;
  FV_IVDEP
  for (int64_t k = 0; k < n; ++k) {
    const acc_t e = static_cast<acc_t>(eps[k]);
    if (kGz) {
      const acc_t g = io::load(gz, k);
      gz_sum[k] += g;
      gz_eps_sum[k] += g * e;
    }
    const acc_t zz = io::load(mu, k) + sd[k] * e;
    const acc_t zp = kPrior ? zz - io::load(pm, k) : zz;
    Grad4<acc_t> g;
    add_logq_grads(g, gw[k], e, sd[k], zp, kPrior ? ipv[k] : acc_t(1), kRatio, kPath);
    g_mu[k] += g.mu;
    g_lv[k] += g.lv;
    if (kPrior) {
      g_pm[k] += g.pm;
      g_pl[k] += g.pl;
    }
  }
}

// sample_grads_loop with the log-density kind of the op's mode.
template <typename scalar_t, bool kPrior, bool kGz>
FV_INLINE void sample_grads(int64_t logq_mode, const scalar_t* mu, const scalar_t* pm, const scalar_t* gz,
                            const float* eps, const at::opmath_type<scalar_t>* gw,
                            const at::opmath_type<scalar_t>* sd, const at::opmath_type<scalar_t>* ipv,
                            BwdTileBuffers<at::opmath_type<scalar_t>>& b,
                            const LogqGradBuffers<at::opmath_type<scalar_t>>& out, int64_t n) {
  const bool ratio = logq_is_ratio(logq_mode);
  const bool path = logq_is_path(logq_mode);
  if (ratio && path) {
    sample_grads_loop<scalar_t, kPrior, kGz, true, true>(mu, pm, gz, eps, gw, sd, ipv, b, out, n);
  } else if (ratio) {
    sample_grads_loop<scalar_t, kPrior, kGz, true, false>(mu, pm, gz, eps, gw, sd, ipv, b, out, n);
  } else if (path) {
    sample_grads_loop<scalar_t, kPrior, kGz, false, true>(mu, pm, gz, eps, gw, sd, ipv, b, out, n);
  } else {
    sample_grads_loop<scalar_t, kPrior, kGz, false, false>(mu, pm, gz, eps, gw, sd, ipv, b, out, n);
  }
}

// The backward with a prior and/or a log density: per element, the z gradients summed over
// the samples, each sample's log-density gradients, then the KL's.
template <typename scalar_t, bool kPrior>
FV_INLINE void backward_tile_terms(const BwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  BwdTileBuffers<acc_t> b;
  alignas(64) acc_t gw[kTile];
  alignas(64) acc_t sd_buf[kTile];
  alignas(64) acc_t ipv_buf[kTile];
  alignas(64) acc_t lq_mu[kTile], lq_lv[kTile], lq_pm[kTile], lq_pl[kTile];  // log-density gradients
  const ClampSpec clamp = a.clamp;
  const int64_t n = t.len;
  const int64_t N = plan.s.N;
  const int64_t B = plan.s.B;
  a.grad_kl.spread(plan, t, b.gkl);
  if (kPrior && a.grad_logq == nullptr && a.num_samples <= 1) {
    if (a.grad_z != nullptr) {
      prior_kl_one_pass<scalar_t, true>(a, t, b.gkl, stream_normals(a.seed, static_cast<uint64_t>(t.j0), n, b.eps));
    } else {
      prior_kl_one_pass<scalar_t, false>(a, t, b.gkl, nullptr);
    }
    return;
  }

  const scalar_t* __restrict mu = a.mu + t.j0;
  const scalar_t* __restrict lv = a.lv + t.j0;
  const scalar_t* __restrict pm = kPrior ? a.pm + t.j0 : nullptr;
  const scalar_t* __restrict pl = kPrior ? a.pl + t.j0 : nullptr;
  FV_IVDEP
  for (int64_t k = 0; k < n; ++k) {
    sd_buf[k] = op_exp(acc_t(0.5) * clamp.apply(io::load(lv, k)));
    ipv_buf[k] = kPrior ? op_exp(-clamp.apply(io::load(pl, k))) : acc_t(1);
    b.gz_sum[k] = 0;
    b.gz_eps_sum[k] = 0;
    lq_mu[k] = lq_lv[k] = 0;
    if (kPrior) lq_pm[k] = lq_pl[k] = 0;
  }
  const LogqGradBuffers<acc_t> lq_out{lq_mu, lq_lv, lq_pm, lq_pl};
  for (int64_t s = 0; s < a.num_samples && (a.grad_z != nullptr || a.grad_logq != nullptr); ++s) {
    const int64_t flat0 = s * N + t.j0;
    const float* __restrict eps = stream_normals(a.seed, static_cast<uint64_t>(flat0), n, b.eps);
    const scalar_t* __restrict gz = a.grad_z != nullptr ? a.grad_z + flat0 : nullptr;
    if (a.grad_logq == nullptr) {
      add_grad_z(gz, eps, b, n);
      continue;
    }
    fill_rows(a.grad_logq + s * B, t, plan.s.D, gw);
    if (gz != nullptr) {
      sample_grads<scalar_t, kPrior, true>(a.logq_mode, mu, pm, gz, eps, gw, sd_buf, ipv_buf, b, lq_out, n);
    } else {
      sample_grads<scalar_t, kPrior, false>(a.logq_mode, mu, pm, gz, eps, gw, sd_buf, ipv_buf, b, lq_out, n);
    }
  }
  scalar_t* __restrict gmu = a.grad_mu + t.j0;
  scalar_t* __restrict glv = a.grad_lv + t.j0;
  scalar_t* __restrict gpm = kPrior ? a.grad_pm + t.j0 : nullptr;
  scalar_t* __restrict gpl = kPrior ? a.grad_pl + t.j0 : nullptr;
  FV_IVDEP
  for (int64_t k = 0; k < n; ++k) {
    const acc_t m = io::load(mu, k);
    const acc_t raw = io::load(lv, k);
    const acc_t sd = sd_buf[k];
    acc_t g_mu, g_lv;
    if (kPrior) {
      const Grad4<acc_t> kg = kl_prior_grads(m, sd, io::load(pm, k), ipv_buf[k], b.gkl[k]);
      g_mu = b.gz_sum[k] + kg.mu + lq_mu[k];
      g_lv = acc_t(0.5) * sd * b.gz_eps_sum[k] + kg.lv + lq_lv[k];
      const acc_t g_pl = kg.pl + lq_pl[k];
      io::store(gpm, k, kg.pm + lq_pm[k]);
      io::store(gpl, k, clamp.passes(io::load(pl, k)) ? g_pl : acc_t(0));
    } else {
      g_mu = b.gz_sum[k] + b.gkl[k] * m + lq_mu[k];
      g_lv = grad_logvar_term(sd, b.gz_eps_sum[k], b.gkl[k]) + lq_lv[k];
    }
    io::store(gmu, k, g_mu);
    io::store(glv, k, clamp.passes(raw) ? g_lv : acc_t(0));
  }
}

#define FV_BWD_TILE(scalar_t, suffix)                                                                        \
  FV_CLONES void backward_tile_##suffix(const BwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) {  \
    backward_tile_plain<scalar_t>(a, plan, t);                                                               \
  }                                                                                                          \
  FV_CLONES void backward_tile_terms_##suffix(const BwdArgs<scalar_t>& a, const TilePlan& plan,             \
                                              const Tile& t) {                                              \
    backward_tile_terms<scalar_t, false>(a, plan, t);                                                        \
  }                                                                                                          \
  FV_CLONES void backward_tile_prior_##suffix(const BwdArgs<scalar_t>& a, const TilePlan& plan,             \
                                              const Tile& t) {                                              \
    backward_tile_terms<scalar_t, true>(a, plan, t);                                                         \
  }                                                                                                          \
  inline void backward_tile_dispatch(const BwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) {     \
    if (a.pm != nullptr) {                                                                                   \
      backward_tile_prior_##suffix(a, plan, t);                                                              \
    } else if (a.grad_logq != nullptr) {                                                                     \
      backward_tile_terms_##suffix(a, plan, t);                                                              \
    } else {                                                                                                 \
      backward_tile_##suffix(a, plan, t);                                                                    \
    }                                                                                                        \
  }
FV_BWD_TILE(float, f32)
FV_BWD_TILE(double, f64)
FV_BWD_TILE(at::Half, f16)
FV_BWD_TILE(at::BFloat16, bf16)

ReparamKlGrads reparam_kl_bwd_cpu(FV_REPARAM_KL_BWD_ARGS) {
  check_reparam_bwd(grad_z_in, grad_kl_in, grad_logq_in, mu_in, logvar_in, prior_mu_in, prior_logvar_in, seed,
                    num_samples, kl_mode, logq_mode);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const at::Tensor prior_mu = contiguous_or_none(prior_mu_in);
  const at::Tensor prior_logvar = contiguous_or_none(prior_logvar_in);
  const at::Tensor grad_z = contiguous_or_none(grad_z_in);
  const at::Tensor grad_kl = contiguous_or_none(grad_kl_in);
  const at::Tensor grad_logq = contiguous_or_none(grad_logq_in);
  const bool has_prior = prior_mu.defined();
  const RowShape shape = row_shape(mu);
  const TilePlan plan(shape);
  at::Tensor grad_mu = alloc_grad(mu);
  at::Tensor grad_lv = alloc_grad(mu);
  at::Tensor grad_pm = alloc_grad(mu, has_prior);
  at::Tensor grad_pl = alloc_grad(mu, has_prior);
  const bool needs_noise = grad_z.defined() || grad_logq.defined();
  const uint64_t seed_value = needs_noise ? read_seed(seed) : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BwdArgs<scalar_t> a;
    a.grad_kl = ReducedGradIn<scalar_t>(grad_kl, kl_mode, shape.B);
    a.grad_z = data_or_null<scalar_t>(grad_z);
    a.grad_logq = grad_logq.defined() ? grad_logq.const_data_ptr<acc_t>() : nullptr;
    a.logq_mode = logq_mode;
    a.mu = mu.const_data_ptr<scalar_t>();
    a.lv = logvar.const_data_ptr<scalar_t>();
    a.pm = data_or_null<scalar_t>(prior_mu);
    a.pl = data_or_null<scalar_t>(prior_logvar);
    a.grad_mu = grad_mu.mutable_data_ptr<scalar_t>();
    a.grad_lv = grad_lv.mutable_data_ptr<scalar_t>();
    a.grad_pm = has_prior ? grad_pm.mutable_data_ptr<scalar_t>() : nullptr;
    a.grad_pl = has_prior ? grad_pl.mutable_data_ptr<scalar_t>() : nullptr;
    a.clamp = make_clamp(clamp_lo, clamp_hi);
    a.seed = seed_value;
    a.num_samples = num_samples;
    at::parallel_for(0, plan.num_tiles, grain_tiles(plan), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) backward_tile_dispatch(a, plan, plan.tile(t));
    });
  });
  return {grad_mu, grad_lv, grad_pm, grad_pl};
}

}  // namespace
}  // namespace cpu

FV_IMPL_OP_PAIR(CPU, "", reparam_kl, cpu::reparam_kl_fwd_cpu, cpu::reparam_kl_bwd_cpu)

}  // namespace fused_vae
