// CUDA kernels of fused_vae::reparam_kl_fwd / reparam_kl_bwd (see reparam_kl_launch.h).
//
// Needs only the CUDA toolkit and the fused_vae headers (no torch), so every kernel
// compiles on any machine with nvcc. The per-element math (Philox, Box-Muller, exp,
// KL and gradient terms) is the one definition in csrc/include/fused_vae/, shared with
// the CPU backend (op_exp maps to CUDA's expf on the device, see fast_math.h). Math is
// float32 for float32 / float16 / bfloat16 and float64 for float64 (the noise stays
// float32); all element indices are 64-bit.
//
// Tiles and reductions: docs/design.md section 9 (the CUDA row of its table and "CUDA
// details"); RowTiles in reparam_kl_launch.h cuts the forward's [R, C] view ([B, D] when
// the KL is reduced, else one row [1, N]) into the tiles, and kFuseTiles is the one-block
// limit. What the contract leaves to this file: a thread's V elements start on a Philox
// group boundary, so one Philox call yields 4 of its normals (two calls for 16-bit
// types); loads and stores are 16-byte vectors for a thread's full chunks when every
// pointer is 16-byte aligned (and, with several samples, N is a multiple of V),
// otherwise the kernel instance with scalar accesses runs. Row sums of sum / batchmean go
// to B slots of the workspace after the partials. With many samples and few tiles the
// forward also splits the samples over blocks; the backward reduces nothing, uses flat
// tiles of 256 * V elements and sums over samples per element.
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

// The chunk's raw values: p[k] for lo <= k < hi, zero bits elsewhere (p points at the
// chunk's first element). Loads are kept apart from the conversion (unpack) so that a
// thread issues all its loads before the first use: a 16-bit value converted right after
// its load makes the next load wait for the first.
template <typename T, int V, bool kVec>
__device__ __forceinline__ Pack<T, V> load_raw(const T* __restrict__ p, int lo, int hi) {
  if (kVec && lo == 0 && hi == V) {
    FV_ASSERT_ALIGNED16(p);
    return *reinterpret_cast<const Pack<T, V>*>(p);
  }
  Pack<T, V> pk{};
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k >= lo && k < hi) pk.v[k] = p[k];
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
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int lo, int hi, const acc_type_t<T> (&in)[V]) {
  if (kVec && lo == 0 && hi == V) {
    Pack<T, V> pk;
#pragma unroll
    for (int k = 0; k < V; ++k) pk.v[k] = Conv<T>::from_acc(in[k]);
    FV_ASSERT_ALIGNED16(p);
    *reinterpret_cast<Pack<T, V>*>(p) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k >= lo && k < hi) p[k] = Conv<T>::from_acc(in[k]);
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

// Row pass: out[b] = the sum of row b's chunks partials[b * chunks + c], by a warp per
// row (lane l adds chunks l, l + 32, ... in order, then a butterfly); warps first,
// first + stride, ...
template <typename A>
__device__ void sum_row_chunks(A* __restrict__ out, const A* __restrict__ partials, int64_t B, int64_t chunks,
                               int64_t warp_first, int64_t warp_stride) {
  const int lane = threadIdx.x & 31;
  for (int64_t b = warp_first; b < B; b += warp_stride) {
    const A* row = partials + b * chunks;
    A s = A(0);
    for (int64_t c = lane; c < chunks; c += 32) s += row[c];
    s = warp_sum(s);
    if (lane == 0) out[b] = s;
  }
}

// Total by one block: the B row sums added in double in a fixed tree, / B for batchmean.
template <typename A>
__device__ void sum_rows_total(A* __restrict__ kl_out, const A* __restrict__ row_sums, int64_t B, bool mean,
                               double* red) {
  double s = 0.0;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) s += static_cast<double>(row_sums[b]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) {
    if (mean) s /= static_cast<double>(B);
    kl_out[0] = static_cast<A>(s);
  }
}

// What is left after the tiles, by one block: the row pass (chunks > 1), then the total
// (sum / batchmean). The caller's barrier makes the tiles' writes visible.
template <typename A>
__device__ void finish_in_block(A* kl_out, const A* partials, A* row_sums, int64_t B, int64_t chunks,
                                int64_t kl_mode, double* red) {
  if (chunks > 1) sum_row_chunks<A>(row_sums, partials, B, chunks, threadIdx.x >> 5, kWarps);
  if (kl_mode == kKlPerSample) return;
  __syncthreads();
  sum_rows_total<A>(kl_out, row_sums, B, kl_mode == kKlBatchMean, red);
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
    reparam_kl_fwd_kernel(const FwdParams<T> p, const RowTiles g, const int64_t sample_chunks,
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
  const int64_t C = g.cols;
  const int64_t tiles = g.tiles;
  const int64_t mode = p.kl_mode;
  const bool small_index = N <= 0xffffffffLL;
  // Partials [R, chunks], then the row sums (kl_out for per_sample).
  acc_t* const partials = p.workspace;
  acc_t* const row_sums =
      mode == kKlPerSample ? p.kl_out : p.workspace + (g.chunks > 1 ? g.rows * g.chunks : 0);
  // Whole-row tiles: rows are summed by groups of W lanes (W = min(32, pow2 >= C)); lane li
  // of group gr of its warp. Depends on C only, so it is computed once, not per tile.
  int W = 32;
  if (C < 32) {
    W = 1;
    while (W < C) W <<= 1;
  }
  const int per_warp = 32 / W;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int gr = lane / W;
  const int li = lane % W;

  // Work item w: tile t = w % tiles, samples [c * chunk_samples, ...) of sample chunk
  // c = w / tiles (several only when many samples meet few tiles). Chunk 0 also does the
  // KL. (c, t) advance by the grid size without a division per item.
  const int64_t work = tiles * sample_chunks;
  const int64_t step = gridDim.x;
  const int64_t step_c = step / tiles;
  const int64_t step_t = step - step_c * tiles;
  int64_t c = static_cast<int64_t>(blockIdx.x) / tiles;
  int64_t t = static_cast<int64_t>(blockIdx.x) - c * tiles;
  for (int64_t w = blockIdx.x; w < work; w += step, next_work_item(c, t, step_c, step_t, tiles)) {
    const int64_t s_begin = c * chunk_samples;
    const int64_t s_end = s_begin + chunk_samples < p.num_samples ? s_begin + chunk_samples : p.num_samples;
    // The tile: elements [a, e) of rows row0 .. row0 + nrows - 1.
    int64_t row0, nrows, a, e;
    if (g.chunks == 1) {
      row0 = t * g.rows_per_tile;
      nrows = g.rows - row0 < g.rows_per_tile ? g.rows - row0 : g.rows_per_tile;
      a = row0 * C;
      e = a + nrows * C;
    } else {
      row0 = index_div(t, g.chunks, small_index);
      nrows = 1;
      const int64_t col = (t - row0 * g.chunks) * g.chunk_len;
      a = row0 * C + col;
      e = row0 * C + (C - col < g.chunk_len ? C : col + g.chunk_len);
    }
    const int64_t base = a & ~static_cast<int64_t>(V - 1);
    const int64_t j = base + static_cast<int64_t>(tid) * V;
    const int lo = j < a ? static_cast<int>(a - j) : 0;
    const int64_t rem = e - j;
    const int hi = rem <= lo ? lo : (rem >= V ? V : static_cast<int>(rem));  // elements [lo, hi)

    acc_t m[V], l[V], sd[V];
    const Pack<T, V> mu_raw = load_raw<T, V, kVec>(p.mu + j, lo, hi);
    const Pack<T, V> lv_raw = load_raw<T, V, kVec>(p.lv + j, lo, hi);
    unpack<T, V>(mu_raw, m);
    unpack<T, V>(lv_raw, l);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      l[k] = p.clamp.apply(l[k]);
      sd[k] = op_exp(acc_t(0.5) * l[k]);
    }

    if (p.z != nullptr && hi > lo) {
      for (int64_t s = s_begin; s < s_end; ++s) {
        const int64_t zj = s * N + j;
        float eps[V];
        if (kVec) {
          noise_aligned<V>(seed, static_cast<uint64_t>(zj), eps);
        } else {
          noise_any<V>(seed, static_cast<uint64_t>(zj), eps);
        }
        acc_t zz[V];
#pragma unroll
        for (int k = 0; k < V; ++k) zz[k] = m[k] + sd[k] * static_cast<acc_t>(eps[k]);
        store_chunk<T, V, kVec>(p.z + zj, lo, hi, zz);
      }
    }
    if (mode == kKlSkip || c != 0) continue;  // uniform over the block

    acc_t kl[V];
#pragma unroll
    for (int k = 0; k < V; ++k) kl[k] = k >= lo && k < hi ? kl_term(m[k], l[k], sd[k]) : acc_t(0);

    if (mode == kKlElementwise) {
      if (hi > lo) store_chunk<T, V, kVec>(p.kl_elem + j, lo, hi, kl);
      continue;
    }

    if (g.chunks > 1) {  // one chunk of one row: its partial, partials[row0 * chunks + chunk] = [t]
      acc_t s = acc_t(0);
#pragma unroll
      for (int k = 0; k < V; ++k) s += kl[k];
      s = block_sum(s, red);
      if (tid == 0) partials[t] = s;
      continue;
    }

    // Whole rows: stage the tile, then sum each of its rows.
#pragma unroll
    for (int k = 0; k < V; ++k) stage[tid * V + k] = kl[k];
    __syncthreads();
    const int64_t first = a - base;  // row 0 of the tile starts at stage[first]
    for (int64_t gb = static_cast<int64_t>(warp) * per_warp; gb < nrows; gb += kWarps * per_warp) {
      const int64_t lr = gb + gr;
      acc_t s = acc_t(0);
      if (lr < nrows) {
        const int64_t row_begin = first + lr * C;
        for (int64_t i = row_begin + li; i < row_begin + C; i += W) s += stage[i];
      }
      for (int off = W >> 1; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lr < nrows && li == 0) row_sums[row0 + lr] = s;
    }
    __syncthreads();  // stage is rewritten by the next tile
  }

  if (fuse_final) {
    __syncthreads();  // makes this block's partials and row sums visible to all its threads
    finish_in_block<acc_t>(p.kl_out, partials, row_sums, g.rows, g.chunks, mode, red_d);
  }
}

// Row pass of per_sample (chunks > 1): a warp per row.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    row_pass_kernel(A* __restrict__ kl_out, const A* __restrict__ partials, int64_t B, int64_t chunks) {
  const int64_t warp_first = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  sum_row_chunks<A>(kl_out, partials, B, chunks, warp_first, warp_stride);
}

// sum / batchmean after the tiles: the row pass (chunks > 1) and the total, by one block.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    finish_total_kernel(A* __restrict__ kl_out, const A* partials, A* row_sums, int64_t B, int64_t chunks,
                        int64_t kl_mode) {
  FV_SHARED(double, red, kWarps);
  finish_in_block<A>(kl_out, partials, row_sums, B, chunks, kl_mode, red);
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
    const Pack<T, V> mu_raw = load_raw<T, V, kVec>(p.mu + j, 0, cnt);
    const Pack<T, V> lv_raw = load_raw<T, V, kVec>(p.lv + j, 0, cnt);
    Pack<T, V> gz_raw{};
    if (gz_stream) gz_raw = load_raw<T, V, kVec>(p.grad_z + j, 0, cnt);
    Pack<T, V> gkl_raw{};
    if (gkl_stream) gkl_raw = load_raw<T, V, kVec>(p.grad_kl_elem + j, 0, cnt);

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
        if (gz_stream && s + 1 < p.num_samples) gz_next = load_raw<T, V, kVec>(p.grad_z + base + N, 0, cnt);
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
    store_chunk<T, V, kVec>(p.grad_mu + j, 0, cnt, gmu);
    store_chunk<T, V, kVec>(p.grad_lv + j, 0, cnt, glv);
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
  const int num_sms = target.num_sms;
  const RowTiles g = fwd_tiles<T>(p.B, p.D, p.N, p.kl_mode);
  const int64_t tiles = g.tiles;
  const int64_t samples = p.num_samples > 1 ? p.num_samples : 1;
  const bool reduced = p.kl_mode >= kKlPerSample;
  constexpr auto kernel = reparam_kl_fwd_kernel<T, kVec>;
  int64_t grid = 1;
  int64_t sample_chunks = 1;
  int64_t chunk_samples = samples;
  if (tiles * samples > kFuseTiles) {
    int per_sm = 0;
    const cudaError_t occ = resident_blocks_per_sm<kernel>(target.device, &per_sm);
    if (occ != cudaSuccess) return occ;
    const int64_t full = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * per_sm;
    if (tiles < full && samples > 1) {  // few tiles, many samples: split the samples too
      sample_chunks = (full + tiles - 1) / tiles;
      sample_chunks = sample_chunks < samples ? sample_chunks : samples;
      chunk_samples = (samples + sample_chunks - 1) / sample_chunks;
      sample_chunks = (samples + chunk_samples - 1) / chunk_samples;
    }
    grid = grid_for(per_sm, tiles * sample_chunks, num_sms);
  }
  const bool fuse_final = reduced && grid == 1;
  FV_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, target.stream, p, g, sample_chunks, chunk_samples,
            fuse_final);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !reduced || fuse_final) return err;

  if (p.kl_mode == kKlPerSample) {
    if (g.chunks == 1) return cudaSuccess;  // the tiles wrote the row sums
    constexpr auto rk = row_pass_kernel<acc_t>;
    int per_sm = 0;
    const cudaError_t occ = resident_blocks_per_sm<rk>(target.device, &per_sm);
    if (occ != cudaSuccess) return occ;
    const int64_t blocks = grid_for(per_sm, (p.B + kWarps - 1) / kWarps, num_sms);
    FV_LAUNCH(rk, static_cast<unsigned>(blocks), kThreads, target.stream, p.kl_out, p.workspace, p.B, g.chunks);
  } else {
    acc_t* const row_sums = p.workspace + (g.chunks > 1 ? p.B * g.chunks : 0);
    FV_LAUNCH(finish_total_kernel<acc_t>, 1u, kThreads, target.stream, p.kl_out, p.workspace, row_sums, p.B,
              g.chunks, p.kl_mode);
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
