// Host-side pieces shared by the CPU and CUDA implementations of the fused_vae ops:
// argument checks, output allocation and the shape bookkeeping.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>

#include "fused_vae/elementwise.h"

namespace fused_vae {

// mu / logvar viewed as [B, D] rows; N = B * D. The KL of row b is reduced over D.
struct RowShape {
  int64_t B = 0;
  int64_t D = 0;
  int64_t N = 0;
};

inline RowShape row_shape(const at::Tensor& mu) {
  RowShape s;
  s.N = mu.numel();
  s.B = mu.size(0);
  s.D = s.B > 0 ? s.N / s.B : 0;
  return s;
}

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

inline at::ScalarType reduced_kl_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

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

// SUPPORTED_DTYPES of fused_vae/backends/protocol.py; check_common's message is the text of
// protocol.unsupported_dtype (tests/test_op_protocol.py holds every backend to it).
inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The forward op's argument checks. Types and messages equal check_fwd_args in
// fused_vae/backends/protocol.py, so every backend reports a mistake the same way.
inline void check_common(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                         int64_t num_samples, int64_t kl_mode) {
  TORCH_CHECK_VALUE(mu.dim() >= 1, "fused_vae: mu must be at least 1-D, got ", mu.dim(), "-D");
  TORCH_CHECK_VALUE(mu.sizes() == logvar.sizes(), "fused_vae: logvar shape ", logvar.sizes(),
                    " must equal mu shape ", mu.sizes());
  TORCH_CHECK_TYPE(supported_dtype(mu.scalar_type()),
                   "fused_vae: mu must be float32, float64, float16 or bfloat16, got ",
                   dtype_name(mu.scalar_type()));
  TORCH_CHECK_TYPE(mu.scalar_type() == logvar.scalar_type(), "fused_vae: logvar dtype ",
                   dtype_name(logvar.scalar_type()), " must equal mu dtype ", dtype_name(mu.scalar_type()));
  TORCH_CHECK_VALUE(mu.device() == logvar.device(), "fused_vae: logvar is on ", logvar.device(),
                    " but mu is on ", mu.device());
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong && seed.numel() == 1,
                   "fused_vae: seed must be a one-element int64 tensor");
  TORCH_CHECK_VALUE(seed.device() == mu.device(), "fused_vae: seed is on ", seed.device(),
                    " but mu is on ", mu.device());
  TORCH_CHECK_VALUE(num_samples >= 0, "fused_vae: num_samples must be >= 0, got ", num_samples);
  TORCH_CHECK_VALUE(kl_mode >= kKlSkip && kl_mode <= kKlBatchMean,
                    "fused_vae: kl_mode must be in [0, 4], got ", kl_mode);
}

// z: [num_samples, *mu.shape] (empty [0] when num_samples == 0).
inline at::Tensor alloc_z(const at::Tensor& mu, int64_t num_samples) {
  if (num_samples == 0) return at::empty({0}, mu.options());
  std::vector<int64_t> shape{num_samples};
  shape.insert(shape.end(), mu.sizes().begin(), mu.sizes().end());
  return at::empty(shape, mu.options().memory_format(at::MemoryFormat::Contiguous));
}

// kl: mu.shape ("none"), [B] ("per_sample"), [] ("sum"/"batchmean"), [0] (skipped).
inline at::Tensor alloc_kl(const at::Tensor& mu, int64_t kl_mode) {
  const auto acc = mu.options().dtype(reduced_kl_dtype(mu.scalar_type()));
  switch (kl_mode) {
    case kKlElementwise:
      return at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
    case kKlPerSample:
      return at::empty({mu.size(0)}, acc);
    case kKlSum:
    case kKlBatchMean:
      return at::empty({}, acc);
    default:
      return at::empty({0}, mu.options());
  }
}

// The backward op's gradient checks (check_bwd_args in fused_vae/backends/protocol.py).
inline void check_grads(const c10::optional<at::Tensor>& grad_z,
                        const c10::optional<at::Tensor>& grad_kl, const at::Tensor& mu,
                        int64_t num_samples, int64_t kl_mode) {
  if (grad_z.has_value() && grad_z->defined()) {
    TORCH_CHECK_VALUE(num_samples > 0, "fused_vae: grad_z given but num_samples is 0");
    TORCH_CHECK_VALUE(grad_z->numel() == num_samples * mu.numel(),
                      "fused_vae: grad_z must have num_samples * mu.numel() = ", num_samples * mu.numel(),
                      " elements, got ", grad_z->numel());
    TORCH_CHECK_TYPE(grad_z->scalar_type() == mu.scalar_type(), "fused_vae: grad_z dtype ",
                     dtype_name(grad_z->scalar_type()), " must equal mu dtype ", dtype_name(mu.scalar_type()));
    TORCH_CHECK_VALUE(grad_z->device() == mu.device(), "fused_vae: grad_z is on ", grad_z->device(),
                      " but mu is on ", mu.device());
  }
  if (grad_kl.has_value() && grad_kl->defined()) {
    TORCH_CHECK_VALUE(kl_mode != kKlSkip, "fused_vae: grad_kl given but kl_mode is 0");
    const int64_t expected = kl_mode == kKlElementwise ? mu.numel()
                             : kl_mode == kKlPerSample ? mu.size(0)
                                                       : 1;
    TORCH_CHECK_VALUE(grad_kl->numel() == expected, "fused_vae: grad_kl must have ", expected,
                      " elements, got ", grad_kl->numel());
    const auto want = kl_mode == kKlElementwise ? mu.scalar_type()
                                                : reduced_kl_dtype(mu.scalar_type());
    TORCH_CHECK_TYPE(grad_kl->scalar_type() == want, "fused_vae: grad_kl dtype ",
                     dtype_name(grad_kl->scalar_type()), " must be ", dtype_name(want));
    TORCH_CHECK_VALUE(grad_kl->device() == mu.device(), "fused_vae: grad_kl is on ", grad_kl->device(),
                      " but mu is on ", mu.device());
  }
}

}  // namespace fused_vae
