// Counter-based noise stream shared by the CPU and CUDA backends (see docs/design.md).
//
// Philox4x32-10 exactly as Triton's tl.randint4x, the int32 -> uniform mapping of
// tl.rand4x and the Box-Muller pairing of tl.randn4x. Element i of a flat output uses
// group g = offset + i / 4 and lane i % 4.
//
// Everything here is plain arithmetic on arrays-of-scalars so that the host compiler
// vectorises loops that call it, and nvcc compiles the same code for the device.
#pragma once

#include <cstdint>

#include "fused_vae/fast_math.h"

namespace fused_vae {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

FV_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds on counter (low32(group), high32(group), 0, 0).
FV_HD void philox4x32(uint64_t seed, uint64_t group, uint32_t& r0, uint32_t& r1,
                      uint32_t& r2, uint32_t& r3) {
  uint32_t c0 = static_cast<uint32_t>(group);
  uint32_t c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__) || defined(__clang__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t p0 = c0;
    const uint32_t p2 = c2;
    c0 = mulhi32(kPhiloxRoundB, p2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, p0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * p2;
    c3 = kPhiloxRoundA * p0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  r0 = c0;
  r1 = c1;
  r2 = c2;
  r3 = c3;
}

// Triton's uint_to_uniform_float: a value in [0, 1).
FV_HD float uint_to_uniform(uint32_t r) {
  int32_t x = static_cast<int32_t>(r);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kUniformScale;
}

// Box-Muller on one uniform pair: (rad * cos(th), rad * sin(th)).
FV_HD void box_muller(float ua, float ub, float& n_cos, float& n_sin) {
  ua = ua > kMinUniform ? ua : kMinUniform;
  const float rad = ::sqrtf(-2.0f * fast_logf(ua));
  const float th = kTwoPi * ub;
  float s, c;
  fast_sincosf_0_2pi(th, s, c);
  n_cos = rad * c;
  n_sin = rad * s;
}

// The four standard normals of one Philox group, lane k in n[k].
FV_HD void normal4(uint64_t seed, uint64_t group, float n[4]) {
  uint32_t r0, r1, r2, r3;
  philox4x32(seed, group, r0, r1, r2, r3);
  box_muller(uint_to_uniform(r0), uint_to_uniform(r1), n[0], n[1]);
  box_muller(uint_to_uniform(r2), uint_to_uniform(r3), n[2], n[3]);
}

}  // namespace fused_vae
