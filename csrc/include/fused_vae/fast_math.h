// Branch-free float32 exp / log / sincos that the host compiler can vectorise and
// nvcc compiles unchanged, so the CPU and CUDA backends share one definition of the
// math. Polynomials are the classic Cephes single-precision ones (about 1 ulp).
//
// fast_expf follows IEEE semantics for NaN, +-Inf, overflow and underflow.
// fast_logf is only used by Box-Muller, on [1e-7, 1]; fast_sincosf_0_2pi on [0, 2*pi].
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FV_HD __host__ __device__ __forceinline__
#else
#define FV_HD inline __attribute__((always_inline))
#endif

namespace fused_vae {

// std::bit_cast for C++17: a fixed-size memcpy, which host compilers and nvcc turn into a
// register move.
template <typename To, typename From>
FV_HD To bit_cast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To out;
  memcpy(&out, &x, sizeof(To));
  return out;
}

FV_HD uint32_t float_bits(float x) { return bit_cast<uint32_t>(x); }
FV_HD float bits_float(uint32_t u) { return bit_cast<float>(u); }

// 2**n for n in [-126, 127].
FV_HD float exp2_int(int32_t n) {
  return bits_float(static_cast<uint32_t>(n + 127) << 23);
}

FV_HD float fast_expf(float x) {
  // The clamps keep NaN (comparisons with NaN are false) and bound the exponent n to
  // [-150, 128]; the arithmetic below then gives NaN for NaN, +inf past float32's range and
  // 0 below it without a separate test (a signalling NaN comes back quiet).
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  // floor(v) for v in [-150, 129] via truncation of a positive value (vectorises,
  // unlike floorf).
  const float v = 1.44269504088896341f * xc + 0.5f;
  const int32_t n = static_cast<int32_t>(v + 256.0f) - 256;
  const float k = static_cast<float>(n);
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  // Scale by 2**n in two steps so that subnormal results are reached.
  const int32_t n1 = n >> 1;
  return p * exp2_int(n1) * exp2_int(n - n1);
}

// Natural log for positive normal x (the Box-Muller uniforms, >= 1e-7).
FV_HD float fast_logf(float x) {
  // x = (1 + m) * 2**e with 1 + m in [sqrt(1/2), sqrt(2)), read off the bits (0x3f3504f3 is
  // float32's sqrt(1/2)); without a select, which compilers would otherwise turn into the
  // polynomial computed twice.
  const uint32_t bits = float_bits(x);
  const int32_t ei = static_cast<int32_t>(bits - 0x3f3504f3u) >> 23;
  const float m = bits_float(bits - (static_cast<uint32_t>(ei) << 23)) - 1.0f;
  const float e = static_cast<float>(ei);
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = m * z * p;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// sin and cos of x in [0, 2*pi] (Box-Muller angles).
FV_HD void fast_sincosf_0_2pi(float x, float& s, float& c) {
  // Quadrant k = round(x / (pi/2)), remainder by 3-part Cody-Waite reduction.
  const int32_t ki = static_cast<int32_t>(x * 0.636619772367581343f + 0.5f);  // x >= 0
  const float k = static_cast<float>(ki);
  float r = x - k * 1.5703125f;
  r = r - k * 4.837512969970703125e-4f;
  r = r - k * 7.549789954891882e-8f;
  const float z = r * r;
  float ps = -1.9515295891e-4f;
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z - 1.6666654611e-1f;
  const float sin_r = r + r * z * ps;
  float pc = 2.443315711809948e-5f;
  pc = pc * z - 1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  const float cos_r = 1.0f - 0.5f * z + z * z * pc;
  const int32_t q = ki & 3;
  // q: 0 -> (sin, cos), 1 -> (cos, -sin), 2 -> (-sin, -cos), 3 -> (-cos, sin)
  const float s_abs = (q & 1) ? cos_r : sin_r;
  const float c_abs = (q & 1) ? sin_r : cos_r;
  s = (q & 2) ? -s_abs : s_abs;
  c = ((q + 1) & 2) ? -c_abs : c_abs;
}

// exp in the op's accumulation type: float32 math for every dtype but float64.
// On the device it is CUDA's expf (IEEE specials, at most 2 ulp; built on MUFU.EX2, about
// 8 instructions against about 30 for the polynomial): the CUDA kernels are close to
// compute-bound for 16-bit inputs. Both are "float32 rounding" of exp in docs/design.md's sense.
FV_HD float op_exp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return fast_expf(x);
#endif
}
FV_HD double op_exp(double x) { return ::exp(x); }

}  // namespace fused_vae
