// Host-side pieces shared by the CPU and CUDA implementations of the fused_vae ops:
// argument checks, output allocation and the shape bookkeeping. The checks raise the
// types and messages of OpSpec.check_fwd_args / check_bwd_args in
// fused_vae/backends/protocol.py (tests/test_op_protocol.py holds every backend to them).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <initializer_list>
#include <string>
#include <utility>

#include "fused_vae/elementwise.h"

namespace fused_vae {

using OptTensor = c10::optional<at::Tensor>;

// The inputs viewed as [B, D] rows; N = B * D. Row b of a reduced output sums over D.
struct RowShape {
  int64_t B = 0;
  int64_t D = 0;
  int64_t N = 0;
};

inline RowShape row_shape(const at::Tensor& t) {
  RowShape s;
  s.N = t.numel();
  s.B = t.size(0);
  s.D = s.B > 0 ? s.N / s.B : 0;
  return s;
}

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// A contiguous copy (or the tensor itself) of an optional input; undefined when absent.
inline at::Tensor contiguous_or_none(const OptTensor& t) { return given(t) ? t->contiguous() : at::Tensor(); }

inline ClampSpec make_clamp(const c10::optional<double>& lo, const c10::optional<double>& hi) {
  ClampSpec c;
  c.active = lo.has_value() || hi.has_value();
  if (lo.has_value()) {
    c.lo_d = *lo;
    c.lo_f = static_cast<float>(*lo);
  }
  if (hi.has_value()) {
    c.hi_d = *hi;
    c.hi_f = static_cast<float>(*hi);
  }
  return c;
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The name Python prints for a dtype ("torch.float32"), so that messages match protocol.py's.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// SUPPORTED_DTYPES of fused_vae/backends/protocol.py; the message is the text of
// protocol.unsupported_dtype.
inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A differentiable input: its name and the tensor, null for an optional input not given.
using NamedInput = std::pair<const char*, const at::Tensor*>;

inline const at::Tensor* opt_ptr(const OptTensor& t) { return given(t) ? &*t : nullptr; }

// The inputs' checks (OpSpec.check_fwd_args): the first is the reference the others match.
inline void check_inputs(std::initializer_list<NamedInput> inputs) {
  const NamedInput& ref = *inputs.begin();
  const at::Tensor& r = *ref.second;
  TORCH_CHECK_VALUE(r.dim() >= 1, "fused_vae: ", ref.first, " must be at least 1-D, got ", r.dim(), "-D");
  for (const NamedInput& in : inputs) {
    if (in.second == nullptr || in.second == &r) continue;
    TORCH_CHECK_VALUE(in.second->sizes() == r.sizes(), "fused_vae: ", in.first, " shape ", in.second->sizes(),
                      " must equal ", ref.first, " shape ", r.sizes());
  }
  TORCH_CHECK_TYPE(supported_dtype(r.scalar_type()), "fused_vae: ", ref.first,
                   " must be float32, float64, float16 or bfloat16, got ", dtype_name(r.scalar_type()));
  for (const NamedInput& in : inputs) {
    if (in.second == nullptr || in.second == &r) continue;
    TORCH_CHECK_TYPE(in.second->scalar_type() == r.scalar_type(), "fused_vae: ", in.first, " dtype ",
                     dtype_name(in.second->scalar_type()), " must equal ", ref.first, " dtype ",
                     dtype_name(r.scalar_type()));
    TORCH_CHECK_VALUE(in.second->device() == r.device(), "fused_vae: ", in.first, " is on ", in.second->device(),
                      " but ", ref.first, " is on ", r.device());
  }
}

inline void check_mode(const char* name, int64_t value, int64_t hi) {
  TORCH_CHECK_VALUE(value >= 0 && value <= hi, "fused_vae: ", name, " must be in [0, ", hi, "], got ", value);
}

// The sampling op's checks (check_fwd_args of protocol.REPARAM).
inline void check_reparam(const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& prior_mu,
                          const OptTensor& prior_logvar, const at::Tensor& seed, int64_t num_samples,
                          int64_t kl_mode, int64_t logq_mode) {
  check_inputs({{"mu", &mu}, {"logvar", &logvar}, {"prior_mu", opt_ptr(prior_mu)},
                {"prior_logvar", opt_ptr(prior_logvar)}});
  TORCH_CHECK_VALUE(given(prior_mu) == given(prior_logvar),
                    "fused_vae: prior_mu and prior_logvar must be given together");
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                   "fused_vae: seed must be a one-element int64 tensor");
  TORCH_CHECK_VALUE(seed.device() == mu.device(), "fused_vae: seed is on ", seed.device(), " but mu is on ",
                    mu.device());
  TORCH_CHECK_VALUE(num_samples >= 0, "fused_vae: num_samples must be >= 0, got ", num_samples);
  check_mode("kl_mode", kl_mode, kReduceBatchMean);
  check_mode("logq_mode", logq_mode, kLogqRatioPath);
  TORCH_CHECK_VALUE(logq_mode == kLogqSkip || num_samples > 0, "fused_vae: logq_mode needs num_samples >= 1");
}

// The log-density op's checks (check_fwd_args of protocol.LOG_PROB).
inline void check_log_prob(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& logvar, int64_t reduction) {
  check_inputs({{"x", &x}, {"mu", &mu}, {"logvar", &logvar}});
  TORCH_CHECK_VALUE(reduction >= kReduceElementwise && reduction <= kReduceBatchMean,
                    "fused_vae: reduction must be in [1, 4], got ", reduction);
}

// One output gradient's checks (check_bwd_args): `absent` says why the forward left the
// output out (nullptr where it made it); `out` is the output the forward allocates.
inline void check_grad(const char* name, const OptTensor& grad, const char* absent, int64_t numel,
                       at::ScalarType dtype, const at::Tensor& ref, const char* ref_name) {
  if (!given(grad)) return;
  TORCH_CHECK_VALUE(absent == nullptr, "fused_vae: grad_", name, " given but ", absent);
  TORCH_CHECK_VALUE(grad->numel() == numel, "fused_vae: grad_", name, " must have ", numel, " elements, got ",
                    grad->numel());
  TORCH_CHECK_TYPE(grad->scalar_type() == dtype, "fused_vae: grad_", name, " dtype ",
                   dtype_name(grad->scalar_type()), " must be ", dtype_name(dtype));
  TORCH_CHECK_VALUE(grad->device() == ref.device(), "fused_vae: grad_", name, " is on ", grad->device(), " but ",
                    ref_name, " is on ", ref.device());
}

// Number of elements and dtype of an output of reduction `mode` (alloc_reduced).
inline int64_t reduced_numel(const at::Tensor& ref, int64_t mode) {
  return mode == kReduceElementwise ? ref.numel() : mode == kReducePerSample ? ref.size(0) : mode == kReduceSkip ? 0 : 1;
}
inline at::ScalarType reduced_dtype(const at::Tensor& ref, int64_t mode) {
  return mode == kReduceElementwise || mode == kReduceSkip ? ref.scalar_type() : acc_dtype(ref.scalar_type());
}

// The C++ argument lists of the ops' implementations (the schemas of schemas.h), written once
// for every device's glue; the tensors end in _in (made contiguous by the glue).
#define FV_REPARAM_KL_FWD_ARGS                                                                                \
  const at::Tensor &mu_in, const at::Tensor &logvar_in, const fused_vae::OptTensor &prior_mu_in,                \
      const fused_vae::OptTensor &prior_logvar_in, const at::Tensor &seed, int64_t num_samples, int64_t kl_mode, \
      int64_t logq_mode, c10::optional<double> clamp_lo, c10::optional<double> clamp_hi
#define FV_REPARAM_KL_BWD_ARGS                                                                          \
  const fused_vae::OptTensor &grad_z_in, const fused_vae::OptTensor &grad_kl_in,                          \
      const fused_vae::OptTensor &grad_logq_in, FV_REPARAM_KL_FWD_ARGS
#define FV_LOG_PROB_FWD_ARGS                                                                  \
  const at::Tensor &x_in, const at::Tensor &mu_in, const at::Tensor &logvar_in, int64_t reduction, \
      c10::optional<double> clamp_lo, c10::optional<double> clamp_hi
#define FV_LOG_PROB_BWD_ARGS const fused_vae::OptTensor &grad_in, FV_LOG_PROB_FWD_ARGS
// Registers the two kernels of op family `family` for dispatch key `key` as the ops
// fused_vae::<prefix><family>_fwd / _bwd (needs torch/library.h where it is used).
#define FV_IMPL_OP_PAIR(key, prefix, family, fwd, bwd) \
  TORCH_LIBRARY_IMPL(fused_vae, key, m) {              \
    m.impl(prefix #family "_fwd", &fwd);               \
    m.impl(prefix #family "_bwd", &bwd);               \
  }

using ReparamKlOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;               // z, kl, logq
using ReparamKlGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;     // mu, logvar, prior's
using LogProbGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;                   // x, mu, logvar

// The sampling op's gradient checks.
inline void check_reparam_grads(const OptTensor& grad_z, const OptTensor& grad_kl, const OptTensor& grad_logq,
                                const at::Tensor& mu, int64_t num_samples, int64_t kl_mode, int64_t logq_mode) {
  check_grad("z", grad_z, num_samples == 0 ? "num_samples is 0" : nullptr, num_samples * mu.numel(),
             mu.scalar_type(), mu, "mu");
  check_grad("kl", grad_kl, kl_mode == kReduceSkip ? "kl_mode is 0" : nullptr, reduced_numel(mu, kl_mode),
             reduced_dtype(mu, kl_mode), mu, "mu");
  check_grad("logq", grad_logq, logq_mode == kLogqSkip ? "logq_mode is 0" : nullptr, num_samples * mu.size(0),
             acc_dtype(mu.scalar_type()), mu, "mu");
}

// Every check of the sampling op's backward (check_bwd_args of protocol.REPARAM).
inline void check_reparam_bwd(const OptTensor& grad_z, const OptTensor& grad_kl, const OptTensor& grad_logq,
                              const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& prior_mu,
                              const OptTensor& prior_logvar, const at::Tensor& seed, int64_t num_samples,
                              int64_t kl_mode, int64_t logq_mode) {
  check_reparam(mu, logvar, prior_mu, prior_logvar, seed, num_samples, kl_mode, logq_mode);
  check_reparam_grads(grad_z, grad_kl, grad_logq, mu, num_samples, kl_mode, logq_mode);
}

// Every check of the log-density op's backward (check_bwd_args of protocol.LOG_PROB).
inline void check_log_prob_bwd(const OptTensor& grad, const at::Tensor& x, const at::Tensor& mu,
                               const at::Tensor& logvar, int64_t reduction) {
  check_log_prob(x, mu, logvar, reduction);
  check_grad("log_prob", grad, nullptr, reduced_numel(x, reduction), reduced_dtype(x, reduction), x, "x");
}

inline at::Tensor empty_contiguous(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
}

// z: [num_samples, *mu.shape] (empty [0] when num_samples == 0).
inline at::Tensor alloc_z(const at::Tensor& mu, int64_t num_samples) {
  if (num_samples == 0) return at::empty({0}, mu.options());
  std::vector<int64_t> shape{num_samples};
  shape.insert(shape.end(), mu.sizes().begin(), mu.sizes().end());
  return empty_contiguous(shape, mu.options());
}

// An output of reduction `mode`: ref.shape ("none"), [B] ("per_sample"), [] ("sum" /
// "batchmean"), [0] (skipped).
inline at::Tensor alloc_reduced(const at::Tensor& ref, int64_t mode) {
  const auto acc = ref.options().dtype(acc_dtype(ref.scalar_type()));
  switch (mode) {
    case kReduceElementwise:
      return empty_contiguous(ref.sizes(), ref.options());
    case kReducePerSample:
      return at::empty({ref.size(0)}, acc);
    case kReduceSum:
    case kReduceBatchMean:
      return at::empty({}, acc);
    default:
      return at::empty({0}, ref.options());
  }
}

// logq: [num_samples, B] in the accumulation dtype ([0] when skipped).
inline at::Tensor alloc_logq(const at::Tensor& mu, int64_t num_samples, int64_t logq_mode) {
  if (logq_mode == kLogqSkip) return at::empty({0}, mu.options());
  return at::empty({num_samples, mu.size(0)}, mu.options().dtype(acc_dtype(mu.scalar_type())));
}

// A backward op's gradient of an input like `ref`: contiguous, or [0] when not `present`.
inline at::Tensor alloc_grad(const at::Tensor& ref, bool present = true) {
  return present ? empty_contiguous(ref.sizes(), ref.options()) : at::empty({0}, ref.options());
}

// The value of a reduced output without elements: 0, NaN (0 / 0) for batchmean of B = 0.
inline double empty_value(int64_t mode, int64_t batch) {
  return mode == kReduceBatchMean && batch == 0 ? std::numeric_limits<double>::quiet_NaN() : 0.0;
}

}  // namespace fused_vae
