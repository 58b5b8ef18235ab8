// CUDA kernels of fused_vae::reparam_kl_fwd / reparam_kl_bwd (see reparam_kl_launch.h).
//
// Needs only the CUDA toolkit and the fused_vae headers (no torch), so every kernel
// compiles on any machine with nvcc. The per-element math (Philox, Box-Muller, exp,
// KL and gradient terms) is the one definition in csrc/include/fused_vae/, shared with
// the CPU backend (op_exp maps to CUDA's expf on the device, see fast_math.h). Math is
// float32 for float32 / float16 / bfloat16 and float64 for float64 (the noise stays
// float32); all element indices are 64-bit.
//
// Work decomposition. The flat [N] problem is cut into tiles of TILE = 256 * V elements
// (V = 8 for 16-bit types, else 4). A block of 256 threads handles one tile per
// iteration of a grid-stride loop over tiles; thread k of the block owns the V
// consecutive elements [t0 + k*V, t0 + k*V + V), which start on a Philox group boundary,
// so one Philox call yields 4 of its normals (two calls for 16-bit types). Loads and
// stores are 16-byte vectors when every pointer is 16-byte aligned (and, with several
// samples, N is a multiple of V); otherwise the kernel instance with scalar accesses
// runs. The last, partial chunk is handled with scalar accesses in both instances.
//
// Reductions (no atomics; the tree depends on the shape only, never on the grid):
//   sum / batchmean: each tile's KL is summed (per thread in element order, then a
//     butterfly warp reduction, then the 8 warp sums) into workspace[t]; a final pass
//     sums the tile partials in a fixed order in double.
//   per_sample: the tile's KL values are staged in shared memory and each row that
//     meets the tile is summed by a group of W lanes (W = min(32, pow2 >= D)). A row
//     contained in the tile is written to kl[b] directly; a row cut by a tile boundary
//     leaves one partial per tile (workspace[2t] for the tile's first row, [2t+1] for its
//     last), which a final pass adds in tile order.
// Small problems (tiles x samples <= kFuseTiles) run in one block whose tail does the
// final pass, so they take one launch; others launch a small second kernel (none for
// per_sample when D divides TILE: no row is cut). With many samples and few tiles the
// forward also splits the samples over blocks (the backward sums over samples per
// element, so its parallelism is the number of tiles).
//
// Emulation (FUSED_VAE_CUDA_EMULATE, tests only): the same source compiles as host C++
// against csrc/emulate/cuda_emulation.h, which runs each block's threads concurrently.
// Three hooks below make that possible and are plain CUDA otherwise: FV_SHARED (shared
// arrays, per block in the emulator), FV_LAUNCH (the <<<>>> launch) and
// FV_ASSERT_ALIGNED16 (checks 16-byte vector accesses in the emulator).
#pragma once

#if defined(FUSED_VAE_CUDA_EMULATE)
#include "cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <cstdint>

#include "fused_vae/elementwise.h"
#include "fused_vae/fast_math.h"
#include "fused_vae/philox.h"
#include "reparam_kl_launch.h"

#ifndef FV_SHARED
#define FV_SHARED(type, name, count) __shared__ type name[count]
#endif
#ifndef FV_LAUNCH
#define FV_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif
#ifndef FV_ASSERT_ALIGNED16
#define FV_ASSERT_ALIGNED16(ptr) ((void)0)
#endif

namespace fused_vae {
namespace cuda {
namespace detail {

constexpr int kWarps = kThreads / 32;
constexpr int64_t kFuseTiles = 8;       // tiles x samples that one block finishes alone
constexpr int64_t kRowWarpSpan = 8;     // per-sample final pass: a warp per row when D > 8 tiles

// ---- scalar conversions ---------------------------------------------------------------

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
};
template <>
struct Conv<double> {
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double x) { return x; }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
};
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
};

// ---- memory access of one thread's chunk of V elements --------------------------------

template <typename T, int V>
struct alignas(16) Pack {
  T v[V];
};

// The chunk's raw values: p[k] for k < cnt, zero bits beyond (p points at the chunk's
// first element). Loads are kept apart from the conversion (unpack) so that a thread
// issues all its loads before the first use: a 16-bit value converted right after its
// load makes the next load wait for the first.
template <typename T, int V, bool kVec>
__device__ __forceinline__ Pack<T, V> load_raw(const T* __restrict__ p, int cnt) {
  if (kVec && cnt == V) {
    FV_ASSERT_ALIGNED16(p);
    return *reinterpret_cast<const Pack<T, V>*>(p);
  }
  Pack<T, V> pk{};
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k < cnt) pk.v[k] = p[k];
  }
  return pk;
}

template <typename T, int V>
__device__ __forceinline__ void unpack(const Pack<T, V>& pk, acc_type_t<T> (&out)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = Conv<T>::to_acc(pk.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void fill_chunk(const T* __restrict__ p, acc_type_t<T> (&out)[V]) {
  const acc_type_t<T> x = Conv<T>::to_acc(p[0]);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = x;
}

template <typename T, int V, bool kVec>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int cnt, const acc_type_t<T> (&in)[V]) {
  if (kVec && cnt == V) {
    Pack<T, V> pk;
#pragma unroll
    for (int k = 0; k < V; ++k) pk.v[k] = Conv<T>::from_acc(in[k]);
    FV_ASSERT_ALIGNED16(p);
    *reinterpret_cast<Pack<T, V>*>(p) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < cnt) p[k] = Conv<T>::from_acc(in[k]);
    }
  }
}

// ---- noise ----------------------------------------------------------------------------

__device__ __forceinline__ uint64_t load_seed(const int64_t* seed_ptr, uint64_t seed_value) {
  return seed_ptr != nullptr ? static_cast<uint64_t>(__ldg(reinterpret_cast<const long long*>(seed_ptr)))
                             : seed_value;
}

// eps[k] = normal of flat stream position flat0 + k; flat0 must be a multiple of 4.
template <int V>
__device__ __forceinline__ void noise_aligned(uint64_t seed, uint64_t flat0, float (&eps)[V]) {
  const uint64_t g0 = flat0 >> 2;
#pragma unroll
  for (int q = 0; q < V / 4; ++q) normal4(seed, g0 + q, &eps[4 * q]);
}

// Any flat0: one extra Philox group when flat0 is not on a group boundary (only with
// several samples and N % 4 != 0).
template <int V>
__device__ __forceinline__ void noise_any(uint64_t seed, uint64_t flat0, float (&eps)[V]) {
  const uint32_t lane0 = static_cast<uint32_t>(flat0 & 3u);
  if (lane0 == 0) {
    noise_aligned<V>(seed, flat0, eps);
    return;
  }
  float buf[V + 4];
  const uint64_t g0 = flat0 >> 2;
#pragma unroll
  for (int q = 0; q <= V / 4; ++q) normal4(seed, g0 + q, &buf[4 * q]);
#pragma unroll
  for (int k = 0; k < V; ++k) eps[k] = lane0 == 1 ? buf[k + 1] : (lane0 == 2 ? buf[k + 2] : buf[k + 3]);
}

// ---- deterministic reductions ---------------------------------------------------------

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block, valid in thread 0. Starts and ends with a barrier-safe state
// (red may be reused right after).
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* red) {
  const int tid = threadIdx.x;
  v = warp_sum(v);
  if ((tid & 31) == 0) red[tid >> 5] = v;
  __syncthreads();
  A total = A(0);
  if (tid < 32) {
    total = tid < kWarps ? red[tid] : A(0);
    total = warp_sum(total);
  }
  __syncthreads();
  return total;
}

// Which workspace slot of tile t holds the partial of the row starting at row_start
// whose first tile is t_a (see the header comment).
template <int64_t TILE>
__device__ __forceinline__ int64_t row_slot(int64_t t, int64_t t_a, int64_t row_start) {
  return 2 * t + ((t == t_a && row_start != t_a * TILE) ? 1 : 0);
}

// per_sample final pass, rows of at most kRowWarpSpan tiles: one worker per cut row,
// found at the first tile boundary inside it; workers first, first + stride, ...
template <typename A, int64_t TILE>
__device__ void finalize_rows_by_boundary(A* __restrict__ kl_out, const A* __restrict__ ws, int64_t tiles,
                                          int64_t D, int64_t first, int64_t stride) {
  for (int64_t t = 1 + first; t < tiles; t += stride) {
    const int64_t P = t * TILE;
    const int64_t b = P / D;
    const int64_t row_start = b * D;
    if (row_start == P) continue;  // the boundary is a row boundary
    const int64_t t_a = row_start / TILE;
    if (t != t_a + 1) continue;  // not the row's first boundary
    const int64_t t_b = (row_start + D - 1) / TILE;
    A s = A(0);
    for (int64_t u = t_a; u <= t_b; ++u) s += ws[row_slot<TILE>(u, t_a, row_start)];
    kl_out[b] = s;
  }
}

// per_sample final pass, long rows: one warp per row.
template <typename A, int64_t TILE>
__device__ void finalize_rows_by_warp(A* __restrict__ kl_out, const A* __restrict__ ws, int64_t B, int64_t D,
                                      int64_t warp_first, int64_t warp_stride) {
  const int lane = threadIdx.x & 31;
  for (int64_t b = warp_first; b < B; b += warp_stride) {
    const int64_t row_start = b * D;
    const int64_t t_a = row_start / TILE;
    const int64_t t_b = (row_start + D - 1) / TILE;
    if (t_a == t_b) continue;  // whole row in one tile: written by the forward kernel
    A s = A(0);
    for (int64_t u = t_a + lane; u <= t_b; u += 32) s += ws[row_slot<TILE>(u, t_a, row_start)];
    s = warp_sum(s);
    if (lane == 0) kl_out[b] = s;
  }
}

// sum / batchmean final pass by one block: fixed-order double sums of the tile partials.
template <typename A>
__device__ void finalize_total(A* __restrict__ kl_out, const A* __restrict__ ws, int64_t tiles, int64_t B,
                               bool mean, double* red) {
  double s = 0.0;
  for (int64_t u = threadIdx.x; u < tiles; u += kThreads) s += static_cast<double>(ws[u]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) {
    if (mean) s /= static_cast<double>(B);
    kl_out[0] = static_cast<A>(s);
  }
}

template <typename A, int64_t TILE>
__device__ __forceinline__ void finalize_block(A* kl_out, const A* ws, int64_t tiles, int64_t B, int64_t D,
                                               int64_t kl_mode, double* red) {
  if (kl_mode == kKlPerSample) {
    if (D > kRowWarpSpan * TILE) {
      finalize_rows_by_warp<A, TILE>(kl_out, ws, B, D, threadIdx.x >> 5, kWarps);
    } else {
      finalize_rows_by_boundary<A, TILE>(kl_out, ws, tiles, D, threadIdx.x, kThreads);
    }
  } else {
    finalize_total<A>(kl_out, ws, tiles, B, kl_mode == kKlBatchMean, red);
  }
}

// a / b for 0 <= a, 0 < b; a 32-bit division when the problem's indices fit (N < 2**32).
__device__ __forceinline__ int64_t index_div(int64_t a, int64_t b, bool small_index) {
  return small_index ? static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b)) : a / b;
}

// Next (chunk, tile) of a grid-stride loop over work items w = c * tiles + t.
__device__ __forceinline__ void next_work_item(int64_t& c, int64_t& t, int64_t step_c, int64_t step_t,
                                               int64_t tiles) {
  c += step_c;
  t += step_t;
  if (t >= tiles) {
    t -= tiles;
    ++c;
  }
}

// ---- kernels --------------------------------------------------------------------------

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    reparam_kl_fwd_kernel(const FwdParams<T> p, const int64_t tiles, const int64_t chunks,
                          const int64_t chunk_samples, const bool fuse_final) {
  using acc_t = acc_type_t<T>;
  constexpr int V = TileShape<T>::kVec;
  constexpr int64_t TILE = TileShape<T>::kElems;
  FV_SHARED(acc_t, stage, TILE);
  FV_SHARED(acc_t, red, kWarps);
  FV_SHARED(double, red_d, kWarps);

  const uint64_t seed = p.z != nullptr ? load_seed(p.seed_ptr, p.seed_value) : 0;
  const int tid = threadIdx.x;
  const int64_t N = p.N;
  const int64_t D = p.D;
  const int64_t mode = p.kl_mode;
  const bool small_index = N <= 0xffffffffLL;
  // per_sample: rows are summed by groups of W lanes (W = min(32, pow2 >= D)); lane li of
  // group g of its warp. Depends on D only, so it is computed once, not per tile.
  int W = 32;
  if (D < 32) {
    W = 1;
    while (W < D) W <<= 1;
  }
  const int per_warp = 32 / W;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane / W;
  const int li = lane % W;

  // Work item w: tile t = w % tiles, samples [c * chunk_samples, ...) of chunk c = w / tiles
  // (several chunks only when many samples meet few tiles). Chunk 0 also does the KL.
  // (c, t) advance by the grid size without a division per item.
  const int64_t work = tiles * chunks;
  const int64_t step = gridDim.x;
  const int64_t step_c = step / tiles;
  const int64_t step_t = step - step_c * tiles;
  int64_t c = static_cast<int64_t>(blockIdx.x) / tiles;
  int64_t t = static_cast<int64_t>(blockIdx.x) - c * tiles;
  for (int64_t w = blockIdx.x; w < work; w += step, next_work_item(c, t, step_c, step_t, tiles)) {
    const int64_t s_begin = c * chunk_samples;
    const int64_t s_end = s_begin + chunk_samples < p.num_samples ? s_begin + chunk_samples : p.num_samples;
    const int64_t t0 = t * TILE;
    const int64_t j = t0 + static_cast<int64_t>(tid) * V;
    const int64_t rem = N - j;
    const int cnt = rem <= 0 ? 0 : (rem >= V ? V : static_cast<int>(rem));

    acc_t m[V], l[V], sd[V];
    const Pack<T, V> mu_raw = load_raw<T, V, kVec>(p.mu + j, cnt);
    const Pack<T, V> lv_raw = load_raw<T, V, kVec>(p.lv + j, cnt);
    unpack<T, V>(mu_raw, m);
    unpack<T, V>(lv_raw, l);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      l[k] = p.clamp.apply(l[k]);
      sd[k] = op_exp(acc_t(0.5) * l[k]);
    }

    if (p.z != nullptr && cnt > 0) {
      for (int64_t s = s_begin; s < s_end; ++s) {
        const int64_t base = s * N + j;
        float eps[V];
        if (kVec) {
          noise_aligned<V>(seed, static_cast<uint64_t>(base), eps);
        } else {
          noise_any<V>(seed, static_cast<uint64_t>(base), eps);
        }
        acc_t zz[V];
#pragma unroll
        for (int k = 0; k < V; ++k) zz[k] = m[k] + sd[k] * static_cast<acc_t>(eps[k]);
        store_chunk<T, V, kVec>(p.z + base, cnt, zz);
      }
    }
    if (mode == kKlSkip || c != 0) continue;  // uniform over the block

    acc_t kl[V];
#pragma unroll
    for (int k = 0; k < V; ++k) kl[k] = k < cnt ? kl_term(m[k], l[k], sd[k]) : acc_t(0);

    if (mode == kKlElementwise) {
      if (cnt > 0) store_chunk<T, V, kVec>(p.kl_elem + j, cnt, kl);
      continue;
    }

    if (mode != kKlPerSample) {  // sum / batchmean: one partial per tile
      acc_t s = acc_t(0);
#pragma unroll
      for (int k = 0; k < V; ++k) s += kl[k];
      s = block_sum(s, red);
      if (tid == 0) p.workspace[t] = s;
      continue;
    }

    // per_sample: stage the tile, then sum each row that meets it.
#pragma unroll
    for (int k = 0; k < V; ++k) stage[tid * V + k] = kl[k];
    __syncthreads();
    const int64_t len = N - t0 < TILE ? N - t0 : TILE;
    const int64_t r_first = index_div(t0, D, small_index);
    const int64_t r_last = index_div(t0 + len - 1, D, small_index);
    const int64_t nr = r_last - r_first + 1;
    for (int64_t base = static_cast<int64_t>(warp) * per_warp; base < nr; base += kWarps * per_warp) {
      const int64_t lr = base + g;
      const int64_t r = r_first + lr;
      const int64_t row_start = r * D;
      acc_t s = acc_t(0);
      if (lr < nr) {
        const int64_t a = (row_start > t0 ? row_start : t0) - t0;
        const int64_t e = (row_start + D < t0 + len ? row_start + D : t0 + len) - t0;
        for (int64_t i = a + li; i < e; i += W) s += stage[i];
      }
      for (int off = W >> 1; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lr < nr && li == 0) {
        if (row_start >= t0 && row_start + D <= t0 + len) {
          p.kl_out[r] = s;  // the whole row lies in this tile
        } else {
          p.workspace[2 * t + (r == r_first ? 0 : 1)] = s;
        }
      }
    }
    __syncthreads();  // stage is rewritten by the next tile
  }

  if (fuse_final) {
    __syncthreads();  // makes this block's workspace writes visible to all its threads
    finalize_block<acc_t, TILE>(p.kl_out, p.workspace, tiles, p.B, p.D, mode, red_d);
  }
}

template <typename A, int64_t TILE>
__global__ void __launch_bounds__(kThreads)
    finalize_rows_boundary_kernel(A* __restrict__ kl_out, const A* __restrict__ ws, int64_t tiles, int64_t D) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  finalize_rows_by_boundary<A, TILE>(kl_out, ws, tiles, D, first, stride);
}

template <typename A, int64_t TILE>
__global__ void __launch_bounds__(kThreads)
    finalize_rows_warp_kernel(A* __restrict__ kl_out, const A* __restrict__ ws, int64_t B, int64_t D) {
  const int64_t warp_first = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  finalize_rows_by_warp<A, TILE>(kl_out, ws, B, D, warp_first, warp_stride);
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    finalize_total_kernel(A* __restrict__ kl_out, const A* __restrict__ ws, int64_t tiles, int64_t B, bool mean) {
  FV_SHARED(double, red, kWarps);
  finalize_total<A>(kl_out, ws, tiles, B, mean, red);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) reparam_kl_bwd_kernel(const BwdParams<T> p, const int64_t tiles) {
  using acc_t = acc_type_t<T>;
  constexpr int V = TileShape<T>::kVec;
  constexpr int64_t TILE = TileShape<T>::kElems;

  const bool has_gz = p.grad_z != nullptr;
  const uint64_t seed = has_gz ? load_seed(p.seed_ptr, p.seed_value) : 0;
  const int64_t N = p.N;
  const int64_t D = p.D;
  const int64_t mode = p.kl_mode;
  const bool small_index = N <= 0xffffffffLL;
  // grad_kl as one value: sum / batchmean, or a broadcast (expanded) tensor.
  acc_t gkl_scalar = acc_t(0);
  bool gkl_is_scalar = true;
  if (mode == kKlElementwise && p.grad_kl_elem != nullptr) {
    if (p.grad_kl_bcast) {
      gkl_scalar = Conv<T>::to_acc(p.grad_kl_elem[0]);
    } else {
      gkl_is_scalar = false;
    }
  } else if (mode == kKlPerSample && p.grad_kl_red != nullptr) {
    if (p.grad_kl_bcast) {
      gkl_scalar = p.grad_kl_red[0];
    } else {
      gkl_is_scalar = false;
    }
  } else if (mode >= kKlSum && p.grad_kl_red != nullptr) {
    gkl_scalar = p.grad_kl_red[0];
    if (mode == kKlBatchMean) gkl_scalar = gkl_scalar / static_cast<acc_t>(p.B);
  }

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t j = t * TILE + static_cast<int64_t>(threadIdx.x) * V;
    const int64_t rem = N - j;
    if (rem <= 0) continue;  // no barrier in this kernel
    const int cnt = rem >= V ? V : static_cast<int>(rem);

    // Every load of the tile is issued before the first conversion: mu, logvar, the
    // first sample's grad_z and an elementwise grad_kl (later samples' grad_z are loaded
    // one sample ahead, before the noise of the current one).
    const bool gz_stream = has_gz && !p.grad_z_bcast;
    const bool gkl_stream = !gkl_is_scalar && mode == kKlElementwise;
    const Pack<T, V> mu_raw = load_raw<T, V, kVec>(p.mu + j, cnt);
    const Pack<T, V> lv_raw = load_raw<T, V, kVec>(p.lv + j, cnt);
    Pack<T, V> gz_raw{};
    if (gz_stream) gz_raw = load_raw<T, V, kVec>(p.grad_z + j, cnt);
    Pack<T, V> gkl_raw{};
    if (gkl_stream) gkl_raw = load_raw<T, V, kVec>(p.grad_kl_elem + j, cnt);

    acc_t m[V], raw[V];
    unpack<T, V>(mu_raw, m);
    unpack<T, V>(lv_raw, raw);

    acc_t gz_sum[V], gz_eps[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      gz_sum[k] = acc_t(0);
      gz_eps[k] = acc_t(0);
    }
    if (has_gz) {
      for (int64_t s = 0; s < p.num_samples; ++s) {
        const int64_t base = s * N + j;
        Pack<T, V> gz_next{};
        if (gz_stream && s + 1 < p.num_samples) gz_next = load_raw<T, V, kVec>(p.grad_z + base + N, cnt);
        acc_t g[V];
        if (p.grad_z_bcast) {
          fill_chunk<T, V>(p.grad_z, g);
        } else {
          unpack<T, V>(gz_raw, g);
          gz_raw = gz_next;
        }
        float eps[V];
        if (kVec) {
          noise_aligned<V>(seed, static_cast<uint64_t>(base), eps);
        } else {
          noise_any<V>(seed, static_cast<uint64_t>(base), eps);
        }
#pragma unroll
        for (int k = 0; k < V; ++k) {
          gz_sum[k] += g[k];
          gz_eps[k] += g[k] * static_cast<acc_t>(eps[k]);
        }
      }
    }

    acc_t gkl[V];
    if (gkl_is_scalar) {
#pragma unroll
      for (int k = 0; k < V; ++k) gkl[k] = gkl_scalar;
    } else if (mode == kKlElementwise) {
      unpack<T, V>(gkl_raw, gkl);
    } else {  // per_sample: grad_kl[row of each element]
      int64_t r = index_div(j, D, small_index);
      int64_t next = (r + 1) * D;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < cnt) {
          while (j + k >= next) {
            ++r;
            next += D;
          }
          gkl[k] = p.grad_kl_red[r];
        } else {
          gkl[k] = acc_t(0);
        }
      }
    }

    acc_t gmu[V], glv[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t l = p.clamp.apply(raw[k]);
      const acc_t sd = op_exp(acc_t(0.5) * l);
      gmu[k] = gz_sum[k] + gkl[k] * m[k];
      const acc_t gl = grad_logvar_term(sd, gz_eps[k], gkl[k]);
      glv[k] = p.clamp.passes(raw[k]) ? gl : acc_t(0);
    }
    store_chunk<T, V, kVec>(p.grad_mu + j, cnt, gmu);
    store_chunk<T, V, kVec>(p.grad_lv + j, cnt, glv);
  }
}

// ---- launch helpers -------------------------------------------------------------------

inline bool aligned16(const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; }

constexpr int kMaxCachedDevices = 64;

// Resident blocks per SM of kKernel on `device`, queried once per (kernel, device) and
// cached; a failed query is returned to the caller (and not cached), never swallowed.
template <auto kKernel>
cudaError_t resident_blocks_per_sm(int device, int* per_sm) {
  static std::atomic<int> cache[kMaxCachedDevices];
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *per_sm = cached;
      return cudaSuccess;
    }
  }
  int n = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0);
  if (err != cudaSuccess) return err;
  if (n < 1) return cudaErrorLaunchOutOfResources;  // the block does not fit on an SM
  if (cacheable) cache[device].store(n, std::memory_order_relaxed);
  *per_sm = n;
  return cudaSuccess;
}

// Blocks for a grid-stride loop over `work` items: enough to fill the GPU once.
inline int64_t grid_for(int per_sm, int64_t work, int num_sms) {
  const int64_t full = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * per_sm;
  return work < full ? (work > 0 ? work : 1) : full;
}

template <typename T, bool kVec>
cudaError_t launch_fwd_impl(const FwdParams<T>& p, const LaunchTarget& target) {
  using acc_t = acc_type_t<T>;
  constexpr int64_t TILE = TileShape<T>::kElems;
  const int num_sms = target.num_sms;
  const int64_t tiles = num_tiles<T>(p.N);
  const int64_t samples = p.num_samples > 1 ? p.num_samples : 1;
  const bool reduced = p.kl_mode >= kKlPerSample;
  constexpr auto kernel = reparam_kl_fwd_kernel<T, kVec>;
  int64_t grid = 1;
  int64_t chunks = 1;
  int64_t chunk_samples = samples;
  if (tiles * samples > kFuseTiles) {
    int per_sm = 0;
    const cudaError_t occ = resident_blocks_per_sm<kernel>(target.device, &per_sm);
    if (occ != cudaSuccess) return occ;
    const int64_t full = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * per_sm;
    if (tiles < full && samples > 1) {  // few tiles, many samples: split the samples too
      chunks = (full + tiles - 1) / tiles;
      chunks = chunks < samples ? chunks : samples;
      chunk_samples = (samples + chunks - 1) / chunks;
      chunks = (samples + chunk_samples - 1) / chunk_samples;
    }
    grid = grid_for(per_sm, tiles * chunks, num_sms);
  }
  const bool fuse_final = reduced && grid == 1;
  FV_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, target.stream, p, tiles, chunks, chunk_samples,
            fuse_final);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !reduced || fuse_final) return err;

  if (p.kl_mode == kKlPerSample) {
    if (TILE % p.D == 0) return cudaSuccess;  // tile boundaries are row boundaries: no cut rows
    int per_sm = 0;
    if (p.D > kRowWarpSpan * TILE) {
      constexpr auto fk = finalize_rows_warp_kernel<acc_t, TILE>;
      const cudaError_t occ = resident_blocks_per_sm<fk>(target.device, &per_sm);
      if (occ != cudaSuccess) return occ;
      const int64_t blocks = grid_for(per_sm, (p.B + kWarps - 1) / kWarps, num_sms);
      FV_LAUNCH(fk, static_cast<unsigned>(blocks), kThreads, target.stream, p.kl_out, p.workspace, p.B, p.D);
    } else {
      constexpr auto fk = finalize_rows_boundary_kernel<acc_t, TILE>;
      const cudaError_t occ = resident_blocks_per_sm<fk>(target.device, &per_sm);
      if (occ != cudaSuccess) return occ;
      const int64_t blocks = grid_for(per_sm, (tiles - 1 + kThreads - 1) / kThreads, num_sms);
      FV_LAUNCH(fk, static_cast<unsigned>(blocks), kThreads, target.stream, p.kl_out, p.workspace, tiles, p.D);
    }
  } else {
    FV_LAUNCH(finalize_total_kernel<acc_t>, 1u, kThreads, target.stream, p.kl_out, p.workspace, tiles, p.B,
              p.kl_mode == kKlBatchMean);
  }
  return cudaGetLastError();
}

template <typename T, bool kVec>
cudaError_t launch_bwd_impl(const BwdParams<T>& p, const LaunchTarget& target) {
  const int64_t tiles = num_tiles<T>(p.N);
  constexpr auto kernel = reparam_kl_bwd_kernel<T, kVec>;
  int per_sm = 0;
  const cudaError_t occ = resident_blocks_per_sm<kernel>(target.device, &per_sm);
  if (occ != cudaSuccess) return occ;
  const int64_t grid = grid_for(per_sm, tiles, target.num_sms);
  FV_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, target.stream, p, tiles);
  return cudaGetLastError();
}

}  // namespace detail

template <typename T>
cudaError_t launch_reparam_kl_fwd(const FwdParams<T>& p, const LaunchTarget& target) {
  constexpr int V = TileShape<T>::kVec;
  const bool vec = detail::aligned16(p.mu) && detail::aligned16(p.lv) &&
                   (p.z == nullptr || detail::aligned16(p.z)) &&
                   (p.kl_elem == nullptr || detail::aligned16(p.kl_elem)) &&
                   (p.num_samples <= 1 || p.N % V == 0);
  return vec ? detail::launch_fwd_impl<T, true>(p, target)
             : detail::launch_fwd_impl<T, false>(p, target);
}

template <typename T>
cudaError_t launch_reparam_kl_bwd(const BwdParams<T>& p, const LaunchTarget& target) {
  constexpr int V = TileShape<T>::kVec;
  const bool vec = detail::aligned16(p.mu) && detail::aligned16(p.lv) && detail::aligned16(p.grad_mu) &&
                   detail::aligned16(p.grad_lv) &&
                   (p.grad_z == nullptr || p.grad_z_bcast || detail::aligned16(p.grad_z)) &&
                   (p.grad_kl_elem == nullptr || p.grad_kl_bcast || detail::aligned16(p.grad_kl_elem)) &&
                   (p.num_samples <= 1 || p.N % V == 0);
  return vec ? detail::launch_bwd_impl<T, true>(p, target)
             : detail::launch_bwd_impl<T, false>(p, target);
}

}  // namespace cuda
}  // namespace fused_vae
