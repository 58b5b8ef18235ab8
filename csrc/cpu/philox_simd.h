// Philox4x32-10 over batches of consecutive groups with explicit AVX-512 / AVX2
// intrinsics. Compilers vectorise the 32x32->64-bit multiplies of philox.h poorly
// (AVX-512 gets the slow vpmullq); _mm*_mul_epu32 on even and odd lanes is what the
// algorithm wants. Results are identical to fused_vae::philox4x32 (tested).
// CPU-only, x86-64 with GCC/Clang; other targets use the portable loop.
#pragma once

#include <cstdint>

#include "fused_vae/philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FV_HAVE_X86_SIMD 1
#endif

namespace fused_vae {
namespace cpu {

// Counters (low32(g), high32(g)) for groups g0 .. g0 + n - 1.
inline void group_counters(uint64_t g0, int64_t n, uint32_t* c0, uint32_t* c1) {
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t g = g0 + static_cast<uint64_t>(k);
    c0[k] = static_cast<uint32_t>(g);
    c1[k] = static_cast<uint32_t>(g >> 32);
  }
}

inline void philox_portable(uint64_t seed, uint64_t g0, int64_t n, uint32_t* r0, uint32_t* r1,
                            uint32_t* r2, uint32_t* r3) {
  for (int64_t k = 0; k < n; ++k) philox4x32(seed, g0 + static_cast<uint64_t>(k), r0[k], r1[k], r2[k], r3[k]);
}

#ifdef FV_HAVE_X86_SIMD

__attribute__((target("avx512f"))) inline void mulhilo_avx512(__m512i a, __m512i m, __m512i& hi,
                                                               __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                       // lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, ...
  // One masked shuffle each moves the other half of the 64-bit products into place.
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
}

// kWays independent vectors per iteration hide the multiply latency of the round chain.
template <int kWays>
__attribute__((target("avx512f"))) inline void philox_avx512_block(uint64_t seed, const uint32_t* lo,
                                                                    const uint32_t* hi, uint32_t* r0,
                                                                    uint32_t* r1, uint32_t* r2,
                                                                    uint32_t* r3) {
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  __m512i c0[kWays], c1[kWays], c2[kWays], c3[kWays];
  for (int w = 0; w < kWays; ++w) {
    c0[w] = _mm512_loadu_si512(lo + 16 * w);
    c1[w] = _mm512_loadu_si512(hi + 16 * w);
    c2[w] = _mm512_setzero_si512();
    c3[w] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int w = 0; w < kWays; ++w) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mulhilo_avx512(c2[w], mb, hi_b, lo_b);
      mulhilo_avx512(c0[w], ma, hi_a, lo_a);
      c0[w] = _mm512_ternarylogic_epi32(hi_b, c1[w], key0, 0x96);  // a ^ b ^ c
      c2[w] = _mm512_ternarylogic_epi32(hi_a, c3[w], key1, 0x96);
      c1[w] = lo_b;
      c3[w] = lo_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int w = 0; w < kWays; ++w) {
    _mm512_storeu_si512(r0 + 16 * w, c0[w]);
    _mm512_storeu_si512(r1 + 16 * w, c1[w]);
    _mm512_storeu_si512(r2 + 16 * w, c2[w]);
    _mm512_storeu_si512(r3 + 16 * w, c3[w]);
  }
}

__attribute__((target("avx512f"))) inline void philox_avx512(uint64_t seed, uint64_t g0, int64_t n,
                                                              uint32_t* r0, uint32_t* r1,
                                                              uint32_t* r2, uint32_t* r3) {
  constexpr int kWays = 4;
  alignas(64) uint32_t lo[16 * kWays], hi[16 * kWays];
  int64_t k = 0;
  for (; k + 16 * kWays <= n; k += 16 * kWays) {
    group_counters(g0 + static_cast<uint64_t>(k), 16 * kWays, lo, hi);
    philox_avx512_block<kWays>(seed, lo, hi, r0 + k, r1 + k, r2 + k, r3 + k);
  }
  for (; k + 16 <= n; k += 16) {
    group_counters(g0 + static_cast<uint64_t>(k), 16, lo, hi);
    philox_avx512_block<1>(seed, lo, hi, r0 + k, r1 + k, r2 + k, r3 + k);
  }
  philox_portable(seed, g0 + static_cast<uint64_t>(k), n - k, r0 + k, r1 + k, r2 + k, r3 + k);
}

__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

template <int kWays>
__attribute__((target("avx2"))) inline void philox_avx2_block(uint64_t seed, const uint32_t* lo,
                                                               const uint32_t* hi, uint32_t* r0,
                                                               uint32_t* r1, uint32_t* r2, uint32_t* r3) {
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  __m256i c0[kWays], c1[kWays], c2[kWays], c3[kWays];
  for (int w = 0; w < kWays; ++w) {
    c0[w] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 8 * w));
    c1[w] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + 8 * w));
    c2[w] = _mm256_setzero_si256();
    c3[w] = _mm256_setzero_si256();
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int w = 0; w < kWays; ++w) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mulhilo_avx2(c2[w], mb, hi_b, lo_b);
      mulhilo_avx2(c0[w], ma, hi_a, lo_a);
      c0[w] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[w]), key0);
      c2[w] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[w]), key1);
      c1[w] = lo_b;
      c3[w] = lo_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int w = 0; w < kWays; ++w) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + 8 * w), c0[w]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r1 + 8 * w), c1[w]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r2 + 8 * w), c2[w]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r3 + 8 * w), c3[w]);
  }
}

__attribute__((target("avx2"))) inline void philox_avx2(uint64_t seed, uint64_t g0, int64_t n, uint32_t* r0,
                                                         uint32_t* r1, uint32_t* r2, uint32_t* r3) {
  constexpr int kWays = 4;
  alignas(32) uint32_t lo[8 * kWays], hi[8 * kWays];
  int64_t k = 0;
  for (; k + 8 * kWays <= n; k += 8 * kWays) {
    group_counters(g0 + static_cast<uint64_t>(k), 8 * kWays, lo, hi);
    philox_avx2_block<kWays>(seed, lo, hi, r0 + k, r1 + k, r2 + k, r3 + k);
  }
  for (; k + 8 <= n; k += 8) {
    group_counters(g0 + static_cast<uint64_t>(k), 8, lo, hi);
    philox_avx2_block<1>(seed, lo, hi, r0 + k, r1 + k, r2 + k, r3 + k);
  }
  philox_portable(seed, g0 + static_cast<uint64_t>(k), n - k, r0 + k, r1 + k, r2 + k, r3 + k);
}

#endif  // FV_HAVE_X86_SIMD

using PhiloxBatchFn = void (*)(uint64_t, uint64_t, int64_t, uint32_t*, uint32_t*, uint32_t*, uint32_t*);

// The widest implementation this processor runs, chosen once.
inline PhiloxBatchFn philox_batch() {
#ifdef FV_HAVE_X86_SIMD
  static const PhiloxBatchFn fn = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return static_cast<PhiloxBatchFn>(&philox_avx512);
    if (__builtin_cpu_supports("avx2")) return static_cast<PhiloxBatchFn>(&philox_avx2);
    return static_cast<PhiloxBatchFn>(&philox_portable);
  }();
  return fn;
#else
  return &philox_portable;
#endif
}

}  // namespace cpu
}  // namespace fused_vae
