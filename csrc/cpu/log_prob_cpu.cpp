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

template <typename scalar_t>
struct LogProbArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* mu;
  const scalar_t* lv;
  scalar_t* out_elem;     // reduction "none", else null
  RowSums<acc_t>* rows;   // reduced outputs, else null
  ClampSpec clamp;
};

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
struct LogProbGradArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_elem;  // reduction "none", else null
  const acc_t* grad_row;      // per_sample, else null
  acc_t grad_scalar;          // sum / batchmean (divided by B)
  const scalar_t* x;
  const scalar_t* mu;
  const scalar_t* lv;
  scalar_t* grad_x;
  scalar_t* grad_mu;
  scalar_t* grad_lv;
  ClampSpec clamp;
};

template <typename scalar_t>
FV_INLINE void log_prob_grad_tile(const LogProbGradArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  alignas(64) acc_t g[kTile];
  const int64_t n = t.len;
  if (a.grad_elem != nullptr) {
    const scalar_t* __restrict ge = a.grad_elem + t.j0;
    for (int64_t k = 0; k < n; ++k) g[k] = io::load(ge, k);
  } else if (a.grad_row != nullptr) {
    fill_rows(a.grad_row, t, plan.s.D, g);
  } else {
    for (int64_t k = 0; k < n; ++k) g[k] = a.grad_scalar;
  }
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
  FV_CLONES void log_prob_grad_tile_##suffix(const LogProbGradArgs<scalar_t>& a, const TilePlan& plan,       \
                                             const Tile& t) {                                                 \
    log_prob_grad_tile<scalar_t>(a, plan, t);                                                                 \
  }                                                                                                           \
  inline void log_prob_grad_tile_dispatch(const LogProbGradArgs<scalar_t>& a, const TilePlan& plan,          \
                                          const Tile& t) {                                                    \
    log_prob_grad_tile_##suffix(a, plan, t);                                                                  \
  }
FV_LOG_PROB_TILES(float, f32)
FV_LOG_PROB_TILES(double, f64)
FV_LOG_PROB_TILES(at::Half, f16)
FV_LOG_PROB_TILES(at::BFloat16, bf16)

at::Tensor log_prob_fwd_cpu(const at::Tensor& x_in, const at::Tensor& mu_in, const at::Tensor& logvar_in,
                            int64_t reduction, c10::optional<double> clamp_lo, c10::optional<double> clamp_hi) {
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
    LogProbArgs<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.mu = mu.const_data_ptr<scalar_t>();
    a.lv = logvar.const_data_ptr<scalar_t>();
    a.out_elem = reduction == kReduceElementwise ? out.mutable_data_ptr<scalar_t>() : nullptr;
    a.rows = RowSums<acc_t>::is_reduced(reduction) ? &rows : nullptr;
    a.clamp = make_clamp(clamp_lo, clamp_hi);
    at::parallel_for(0, plan.num_tiles, grain_tiles(plan), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) log_prob_tile_dispatch(a, plan, plan.tile(t));
    });
    rows.finish(out, reduction, shape.B, plan);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_bwd_cpu(const OptTensor& grad_in, const at::Tensor& x_in,
                                                                const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                                int64_t reduction, c10::optional<double> clamp_lo,
                                                                c10::optional<double> clamp_hi) {
  check_log_prob(x_in, mu_in, logvar_in, reduction);
  check_grad("log_prob", grad_in, nullptr, reduced_numel(x_in, reduction), reduced_dtype(x_in, reduction), x_in,
             "x");
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
    LogProbGradArgs<scalar_t> a;
    a.grad_elem = reduction == kReduceElementwise ? grad.const_data_ptr<scalar_t>() : nullptr;
    a.grad_row = reduction == kReducePerSample ? grad.const_data_ptr<acc_t>() : nullptr;
    a.grad_scalar = 0;
    if (reduction >= kReduceSum && shape.N > 0) {
      a.grad_scalar = grad.item<acc_t>();
      if (reduction == kReduceBatchMean) a.grad_scalar /= static_cast<acc_t>(shape.B);
    }
    a.x = x.const_data_ptr<scalar_t>();
    a.mu = mu.const_data_ptr<scalar_t>();
    a.lv = logvar.const_data_ptr<scalar_t>();
    a.grad_x = grad_x.mutable_data_ptr<scalar_t>();
    a.grad_mu = grad_mu.mutable_data_ptr<scalar_t>();
    a.grad_lv = grad_lv.mutable_data_ptr<scalar_t>();
    a.clamp = make_clamp(clamp_lo, clamp_hi);
    at::parallel_for(0, plan.num_tiles, grain_tiles(plan), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) log_prob_grad_tile_dispatch(a, plan, plan.tile(t));
    });
  });
  return {grad_x, grad_mu, grad_lv};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fused_vae, CPU, m) {
  m.impl("gaussian_log_prob_fwd", &cpu::log_prob_fwd_cpu);
  m.impl("gaussian_log_prob_bwd", &cpu::log_prob_bwd_cpu);
}

}  // namespace fused_vae
