// CPU implementation of fused_vae::gaussian_log_prob_fwd / _bwd: log N(x; mu, exp(logvar))
// per element, reduced as the op's `reduction` says (elementwise.h has the math; tiles
// and reductions: cpu_tiles.h). One pass reads x, mu and logvar once and writes the
// output; the backward reads them and the output gradient once and writes three gradients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu_tiles.h"
#include "fused_vae/elementwise.h"
#include "fused_vae/op_common.h"

namespace fused_vae {
namespace cpu {
namespace {

// What a tile of either direction reads and writes (the fields of the other direction unused).
template <typename scalar_t>
struct LogProbArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* mu;
  const scalar_t* lv;
  ClampSpec clamp;
  // forward
  scalar_t* out_elem;     // reduction "none", else null
  RowSums<acc_t>* rows;   // reduced outputs, else null
  // backward
  ReducedGradIn<scalar_t> grad;
  scalar_t* grad_x;
  scalar_t* grad_mu;
  scalar_t* grad_lv;
};

// The arguments with the inputs and the clamp set, every output pointer null.
template <typename scalar_t>
LogProbArgs<scalar_t> inputs_of(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar,
                                c10::optional<double> clamp_lo, c10::optional<double> clamp_hi) {
  LogProbArgs<scalar_t> a{};
  a.x = x.const_data_ptr<scalar_t>();
  a.mu = mu.const_data_ptr<scalar_t>();
  a.lv = logvar.const_data_ptr<scalar_t>();
  a.clamp = make_clamp(clamp_lo, clamp_hi);
  return a;
}

template <typename scalar_t>
FV_INLINE void log_prob_tile(const LogProbArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  alignas(64) acc_t buf[kTile];
  const scalar_t* __restrict x = a.x + t.j0;
  const scalar_t* __restrict mu = a.mu + t.j0;
  const scalar_t* __restrict lv = a.lv + t.j0;
  const ClampSpec clamp = a.clamp;
  const int64_t n = t.len;
  if (a.out_elem != nullptr) {
    scalar_t* __restrict out = a.out_elem + t.j0;
    FV_IVDEP
    for (int64_t k = 0; k < n; ++k) {
      const acc_t l = clamp.apply(io::load(lv, k));
      io::store(out, k, log_prob_term(io::load(x, k), io::load(mu, k), l, op_exp(-l)));
    }
    return;
  }
  FV_IVDEP
  for (int64_t k = 0; k < n; ++k) {
    const acc_t l = clamp.apply(io::load(lv, k));
    buf[k] = log_prob_term(io::load(x, k), io::load(mu, k), l, op_exp(-l));
  }
  reduce_tile(buf, plan, t, a.rows->rows, a.rows->chunks);
}

template <typename scalar_t>
FV_INLINE void log_prob_grad_tile(const LogProbArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  alignas(64) acc_t g[kTile];
  const int64_t n = t.len;
  a.grad.spread(plan, t, g);
  const scalar_t* __restrict x = a.x + t.j0;
  const scalar_t* __restrict mu = a.mu + t.j0;
  const scalar_t* __restrict lv = a.lv + t.j0;
  scalar_t* __restrict gx = a.grad_x + t.j0;
  scalar_t* __restrict gmu = a.grad_mu + t.j0;
  scalar_t* __restrict glv = a.grad_lv + t.j0;
  const ClampSpec clamp = a.clamp;
  FV_IVDEP
  for (int64_t k = 0; k < n; ++k) {
    const acc_t raw = io::load(lv, k);
    const Grad3<acc_t> d = log_prob_grads(io::load(x, k), io::load(mu, k), op_exp(-clamp.apply(raw)), g[k]);
    io::store(gx, k, d.x);
    io::store(gmu, k, d.mu);
    io::store(glv, k, clamp.passes(raw) ? d.lv : acc_t(0));
  }
}

#define FV_LOG_PROB_TILES(scalar_t, suffix)                                                                   \
  FV_CLONES void log_prob_tile_##suffix(const LogProbArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) { \
    log_prob_tile<scalar_t>(a, plan, t);                                                                      \
  }                                                                                                           \
  inline void log_prob_tile_dispatch(const LogProbArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) {  \
    log_prob_tile_##suffix(a, plan, t);                                                                       \
  }                                                                                                           \
  FV_CLONES void log_prob_grad_tile_##suffix(const LogProbArgs<scalar_t>& a, const TilePlan& plan,       \
                                             const Tile& t) {                                                 \
    log_prob_grad_tile<scalar_t>(a, plan, t);                                                                 \
  }                                                                                                           \
  inline void log_prob_grad_tile_dispatch(const LogProbArgs<scalar_t>& a, const TilePlan& plan,          \
                                          const Tile& t) {                                                    \
    log_prob_grad_tile_##suffix(a, plan, t);                                                                  \
  }
FV_LOG_PROB_TILES(float, f32)
FV_LOG_PROB_TILES(double, f64)
FV_LOG_PROB_TILES(at::Half, f16)
FV_LOG_PROB_TILES(at::BFloat16, bf16)

at::Tensor log_prob_fwd_cpu(FV_LOG_PROB_FWD_ARGS) {
  check_log_prob(x_in, mu_in, logvar_in, reduction);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const RowShape shape = row_shape(x);
  const TilePlan plan(shape);
  at::Tensor out = alloc_reduced(x, reduction);
  const auto acc_options = x.options().dtype(acc_dtype(x.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_log_prob_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RowSums<acc_t> rows(out, reduction, shape.B, plan, acc_options);
    LogProbArgs<scalar_t> a = inputs_of<scalar_t>(x, mu, logvar, clamp_lo, clamp_hi);
    a.out_elem = reduction == kReduceElementwise ? out.mutable_data_ptr<scalar_t>() : nullptr;
    a.rows = RowSums<acc_t>::is_reduced(reduction) ? &rows : nullptr;
    at::parallel_for(0, plan.num_tiles, grain_tiles(plan), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) log_prob_tile_dispatch(a, plan, plan.tile(t));
    });
    rows.finish(out, reduction, shape.B, plan);
  });
  return out;
}

LogProbGrads log_prob_bwd_cpu(FV_LOG_PROB_BWD_ARGS) {
  check_log_prob_bwd(grad_in, x_in, mu_in, logvar_in, reduction);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  at::Tensor grad_x = alloc_grad(x);
  at::Tensor grad_mu = alloc_grad(x);
  at::Tensor grad_lv = alloc_grad(x);
  if (!given(grad_in)) {
    grad_x.zero_();
    grad_mu.zero_();
    grad_lv.zero_();
    return {grad_x, grad_mu, grad_lv};
  }
  const at::Tensor grad = grad_in->contiguous();
  const RowShape shape = row_shape(x);
  const TilePlan plan(shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_log_prob_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    LogProbArgs<scalar_t> a = inputs_of<scalar_t>(x, mu, logvar, clamp_lo, clamp_hi);
    a.grad = ReducedGradIn<scalar_t>(grad, reduction, shape.B);
    a.grad_x = grad_x.mutable_data_ptr<scalar_t>();
    a.grad_mu = grad_mu.mutable_data_ptr<scalar_t>();
    a.grad_lv = grad_lv.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, plan.num_tiles, grain_tiles(plan), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) log_prob_grad_tile_dispatch(a, plan, plan.tile(t));
    });
  });
  return {grad_x, grad_mu, grad_lv};
}

}  // namespace
}  // namespace cpu

FV_IMPL_OP_PAIR(CPU, "", gaussian_log_prob, cpu::log_prob_fwd_cpu, cpu::log_prob_bwd_cpu)

}  // namespace fused_vae
