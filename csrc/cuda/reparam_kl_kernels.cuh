// CUDA kernels of fused_vae::reparam_kl_fwd / reparam_kl_bwd (see reparam_kl_launch.h):
// the sample, its KL to N(0, I) or to a learned prior, and its log density.
//
// The per-element math (Philox, Box-Muller, exp, the KL, log-density and gradient terms)
// is the one definition in csrc/include/fused_vae/, shared with the CPU backend (op_exp
// maps to CUDA's expf on the device, see fast_math.h); the noise stays float32. What the
// kernels share with the other op families (memory access, tiles, reductions, launch
// helpers) is in kernel_common.cuh.
//
// Tiles and reductions: docs/design.md section 9 (the CUDA row of its table and "CUDA
// details"); reparam_tiles cuts the forward's [R, C] view ([B, D] when the KL is reduced
// or the log density is made, else one row [1, N]) into the tiles, and kFuseTiles is the
// one-block limit. What the contract leaves to this file: a thread's V elements start on
// a Philox group boundary, so one Philox call yields 4 of its normals (two calls for
// 16-bit types); loads and stores are 16-byte vectors for a thread's full chunks when
// every pointer is 16-byte aligned (and, with several samples, N is a multiple of V),
// otherwise the kernel instance with scalar accesses runs. Row sums of sum / batchmean go
// to B slots of the workspace after the partials. The log density is a per_sample-style
// reduction over the S * B rows (sample s, row b): each sample of a tile is summed per
// row right after its z is made (the rows' sums into the output, a chunk's into the
// [S * B, chunks] partials, then the row pass). With many samples and few tiles the
// forward also splits the samples over blocks; the backward reduces nothing, uses flat
// tiles of 256 * V elements and sums over samples per element.
//
// Instances: per dtype and access width, with and without a prior (kPrior) and with and
// without the log density (kLogq: its output in the forward, its gradient in the
// backward); the instance without either is the original N(0, I) code, unchanged.
#pragma once

#include <cstdint>

#include "fused_vae/elementwise.h"
#include "fused_vae/fast_math.h"
#include "fused_vae/philox.h"
#include "kernel_common.cuh"
#include "reparam_kl_launch.h"

namespace fused_vae {
namespace cuda {
namespace detail {

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

template <int V, bool kVec>
__device__ __forceinline__ void noise(uint64_t seed, int64_t flat0, float (&eps)[V]) {
  if (kVec) {
    noise_aligned<V>(seed, static_cast<uint64_t>(flat0), eps);
  } else {
    noise_any<V>(seed, static_cast<uint64_t>(flat0), eps);
  }
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

// The prior of the thread's elements: pm, the clamped pl and ipv = exp(-pl) (kPrior), or
// N(0, I)'s 0, 0 and 1.
template <typename T, int V, bool kPrior>
struct PriorChunk {
  using acc_t = acc_type_t<T>;
  acc_t pm[V], pl[V], ipv[V];

  // pl_raw keeps the unclamped prior logvar (the clamp's gradient mask).
  __device__ __forceinline__ void set(const Pack<T, V>& pm_raw, const Pack<T, V>& pl_raw, const ClampSpec& clamp,
                                      acc_t (&pl_raw_out)[V]) {
    if constexpr (kPrior) {
      unpack<T, V>(pm_raw, pm);
      unpack<T, V>(pl_raw, pl_raw_out);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if constexpr (kPrior) {
        pl[k] = clamp.apply(pl_raw_out[k]);
        ipv[k] = op_exp(-pl[k]);
      } else {
        pm[k] = acc_t(0);
        pl[k] = acc_t(0);
        ipv[k] = acc_t(1);
        pl_raw_out[k] = acc_t(0);
      }
    }
  }
};

// ---- kernels --------------------------------------------------------------------------

template <typename T, bool kVec, bool kPrior, bool kLogq>
__global__ void __launch_bounds__(kThreads)
    reparam_kl_fwd_kernel(const FwdParams<T> p, const RowTiles g, const int64_t sample_chunks,
                          const int64_t chunk_samples, const bool fuse_final) {
  using acc_t = acc_type_t<T>;
  constexpr int V = TileShape<T>::kVec;
  constexpr int64_t TILE = TileShape<T>::kElems;
  FV_TILE_SUMS_SHARED(acc_t, TILE);

  const uint64_t seed = p.z != nullptr ? load_seed(p.seed_ptr, p.seed_value) : 0;
  const int64_t N = p.N;
  const int64_t C = g.cols;
  const int64_t tiles = g.tiles;
  const int64_t mode = p.kl_mode;
  const bool small_index = N <= 0xffffffffLL;
  const bool chunked = g.chunks > 1;
  const bool ratio = logq_is_ratio(p.logq_mode);
  const ReducedSlots<acc_t> kl_slots = reduced_slots(p.kl_out, p.workspace, mode, g);
  const RowGroups rg = row_groups(C);

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
    const TileSpan sp = tile_span<V>(g, t, small_index);
    const int64_t j = sp.j;
    const int lo = sp.lo;
    const int hi = sp.hi;

    acc_t m[V], l[V], sd[V], pl_raw[V];
    const Pack<T, V> mu_raw = load_raw<T, V, kVec>(p.mu + j, lo, hi);
    const Pack<T, V> lv_raw = load_raw<T, V, kVec>(p.lv + j, lo, hi);
    Pack<T, V> pm_raw{}, plv_raw{};
    if constexpr (kPrior) {
      pm_raw = load_raw<T, V, kVec>(p.pm + j, lo, hi);
      plv_raw = load_raw<T, V, kVec>(p.pl + j, lo, hi);
    }
    unpack<T, V>(mu_raw, m);
    unpack<T, V>(lv_raw, l);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      l[k] = p.clamp.apply(l[k]);
      sd[k] = op_exp(acc_t(0.5) * l[k]);
    }
    PriorChunk<T, V, kPrior> prior;
    prior.set(pm_raw, plv_raw, p.clamp, pl_raw);

    // With the log density every thread takes part in each sample's row sums (barriers).
    if (p.z != nullptr && (kLogq || hi > lo)) {
      for (int64_t s = s_begin; s < s_end; ++s) {
        const int64_t zj = s * N + j;
        float eps[V];
        noise<V, kVec>(seed, zj, eps);
        acc_t zz[V];
#pragma unroll
        for (int k = 0; k < V; ++k) zz[k] = m[k] + sd[k] * static_cast<acc_t>(eps[k]);
        store_chunk<T, V, kVec>(p.z + zj, lo, hi, zz);
        if constexpr (kLogq) {
          acc_t lq[V];
#pragma unroll
          for (int k = 0; k < V; ++k) {
            lq[k] = k >= lo && k < hi ? logq_term(static_cast<acc_t>(eps[k]), l[k], zz[k] - prior.pm[k], prior.pl[k],
                                                  prior.ipv[k], ratio)
                                      : acc_t(0);
          }
          const int64_t sb = s * p.B;  // row (s, b) of the [S * B] rows
          tile_row_sums<acc_t, V>(lq, sp, chunked, C, rg, chunked ? p.logq_partials + sb * g.chunks + t : nullptr,
                                  p.logq_out + sb + sp.row0, stage, red);
        }
      }
    }
    if (mode == kReduceSkip || c != 0) continue;  // uniform over the block

    acc_t kl[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if constexpr (kPrior) {
        kl[k] = k >= lo && k < hi ? kl_prior_term(m[k], l[k], sd[k], prior.pm[k], prior.pl[k], prior.ipv[k])
                                  : acc_t(0);
      } else {
        kl[k] = k >= lo && k < hi ? kl_term(m[k], l[k], sd[k]) : acc_t(0);
      }
    }

    if (mode == kReduceElementwise) {
      if (hi > lo) store_chunk<T, V, kVec>(p.kl_elem + j, lo, hi, kl);
      continue;
    }
    // One chunk of one row: its partial, partials[row0 * chunks + chunk] = [t]; else rows.
    tile_row_sums<acc_t, V>(kl, sp, chunked, C, rg, kl_slots.partials + t, kl_slots.rows + sp.row0, stage, red);
  }

  if (fuse_final) {
    __syncthreads();  // makes this block's partials and row sums visible to all its threads
    if (kLogq && chunked) {
      sum_row_chunks<acc_t>(p.logq_out, p.logq_partials, p.num_samples * p.B, g.chunks, threadIdx.x >> 5, kWarps);
    }
    if (!kLogq || mode >= kReducePerSample) {
      finish_in_block<acc_t>(p.kl_out, kl_slots.partials, kl_slots.rows, g.rows, g.chunks, mode, red_d);
    }
  }
}

template <typename T, bool kVec, bool kPrior, bool kLogq>
__global__ void __launch_bounds__(kThreads) reparam_kl_bwd_kernel(const BwdParams<T> p, const int64_t tiles) {
  using acc_t = acc_type_t<T>;
  constexpr bool kTerms = kPrior || kLogq;  // else the N(0, I) code without a log density
  constexpr int V = TileShape<T>::kVec;
  constexpr int64_t TILE = TileShape<T>::kElems;

  const bool has_gz = p.grad_z != nullptr;
  const uint64_t seed = has_gz || kLogq ? load_seed(p.seed_ptr, p.seed_value) : 0;
  const int64_t N = p.N;
  const int64_t D = p.D;
  const bool small_index = N <= 0xffffffffLL;
  // grad_kl as one value: sum / batchmean, or a broadcast (expanded) tensor.
  acc_t gkl_scalar;
  const bool gkl_is_scalar = reduced_grad_scalar(p.grad_kl, p.B, gkl_scalar);
  const acc_t gw_scalar = kLogq && p.grad_logq_bcast ? p.grad_logq[0] : acc_t(0);
  const bool ratio = logq_is_ratio(p.logq_mode);
  const bool path = logq_is_path(p.logq_mode);

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t j = t * TILE + static_cast<int64_t>(threadIdx.x) * V;
    const int64_t rem = N - j;
    if (rem <= 0) continue;  // no barrier in this kernel
    const int cnt = rem >= V ? V : static_cast<int>(rem);

    // Every load of the tile is issued before the first conversion: mu, logvar, the
    // prior, the first sample's grad_z and an elementwise grad_kl (later samples' grad_z
    // are loaded one sample ahead, before the noise of the current one).
    const bool gz_stream = has_gz && !p.grad_z_bcast;
    const bool gkl_stream = !gkl_is_scalar && p.grad_kl.mode == kReduceElementwise;
    const Pack<T, V> mu_raw = load_raw<T, V, kVec>(p.mu + j, 0, cnt);
    const Pack<T, V> lv_raw = load_raw<T, V, kVec>(p.lv + j, 0, cnt);
    Pack<T, V> pm_raw{}, plv_raw{};
    if constexpr (kPrior) {
      pm_raw = load_raw<T, V, kVec>(p.pm + j, 0, cnt);
      plv_raw = load_raw<T, V, kVec>(p.pl + j, 0, cnt);
    }
    Pack<T, V> gz_raw{};
    if (gz_stream) gz_raw = load_raw<T, V, kVec>(p.grad_z + j, 0, cnt);
    Pack<T, V> gkl_raw{};
    if (gkl_stream) gkl_raw = load_raw<T, V, kVec>(p.grad_kl.elem + j, 0, cnt);

    acc_t m[V], raw[V];
    unpack<T, V>(mu_raw, m);
    unpack<T, V>(lv_raw, raw);
    // The prior and sd are needed per sample by the log density's gradient.
    acc_t sd[V], pl_raw[V];
    PriorChunk<T, V, kPrior> prior;
    if constexpr (kTerms) {
#pragma unroll
      for (int k = 0; k < V; ++k) sd[k] = op_exp(acc_t(0.5) * p.clamp.apply(raw[k]));
      prior.set(pm_raw, plv_raw, p.clamp, pl_raw);
    }
    // Rows of the elements, for the log density's gradient [S, B].
    int64_t r0 = 0;
    int dr[V] = {};
    if (kLogq && !p.grad_logq_bcast) element_rows<V>(j, D, small_index, r0, dr);

    acc_t gz_sum[V], gz_eps[V];
    Grad4<acc_t> lq[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      gz_sum[k] = acc_t(0);
      gz_eps[k] = acc_t(0);
    }
    if (has_gz || kLogq) {
      for (int64_t s = 0; s < p.num_samples; ++s) {
        const int64_t base = s * N + j;
        Pack<T, V> gz_next{};
        if (gz_stream && s + 1 < p.num_samples) gz_next = load_raw<T, V, kVec>(p.grad_z + base + N, 0, cnt);
        acc_t g[V];
        if (kLogq && !has_gz) {  // only with the log density's gradient
#pragma unroll
          for (int k = 0; k < V; ++k) g[k] = acc_t(0);
        } else if (p.grad_z_bcast) {
          fill_chunk<T, V>(p.grad_z, g);
        } else {
          unpack<T, V>(gz_raw, g);
          gz_raw = gz_next;
        }
        float eps[V];
        noise<V, kVec>(seed, base, eps);
        if (!kLogq || has_gz) {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            gz_sum[k] += g[k];
            gz_eps[k] += g[k] * static_cast<acc_t>(eps[k]);
          }
        }
        if constexpr (kLogq) {
          const acc_t* gw_row = p.grad_logq_bcast ? nullptr : p.grad_logq + s * p.B + r0;  // [S, B]
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const acc_t gw = gw_row == nullptr ? gw_scalar : (k < cnt ? gw_row[dr[k]] : acc_t(0));
            const acc_t e = static_cast<acc_t>(eps[k]);
            const acc_t zz = m[k] + sd[k] * e;
            add_logq_grads(lq[k], gw, e, sd[k], zz - prior.pm[k], prior.ipv[k], ratio, path);
          }
        }
      }
    }

    acc_t gkl[V];
    reduced_grad_values<T, V>(p.grad_kl, gkl_is_scalar, gkl_scalar, gkl_raw, j, cnt, D, small_index, gkl);

    acc_t gmu[V], glv[V], gpm[V], gpl[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if constexpr (!kTerms) {
        const acc_t l = p.clamp.apply(raw[k]);
        const acc_t sdk = op_exp(acc_t(0.5) * l);
        gmu[k] = gz_sum[k] + gkl[k] * m[k];
        const acc_t gl = grad_logvar_term(sdk, gz_eps[k], gkl[k]);
        glv[k] = p.clamp.passes(raw[k]) ? gl : acc_t(0);
      } else {
        acc_t g_lv;
        if constexpr (kPrior) {  // the CPU backend's order of the terms (reparam_kl_cpu.cpp)
          const Grad4<acc_t> kg = kl_prior_grads(m[k], sd[k], prior.pm[k], prior.ipv[k], gkl[k]);
          gmu[k] = gz_sum[k] + kg.mu + lq[k].mu;
          g_lv = acc_t(0.5) * sd[k] * gz_eps[k] + kg.lv + lq[k].lv;
          gpm[k] = kg.pm + lq[k].pm;
          gpl[k] = p.clamp.passes(pl_raw[k]) ? kg.pl + lq[k].pl : acc_t(0);
        } else {
          gmu[k] = gz_sum[k] + gkl[k] * m[k] + lq[k].mu;
          g_lv = grad_logvar_term(sd[k], gz_eps[k], gkl[k]) + lq[k].lv;
        }
        glv[k] = p.clamp.passes(raw[k]) ? g_lv : acc_t(0);
      }
    }
    store_chunk<T, V, kVec>(p.grad_mu + j, 0, cnt, gmu);
    store_chunk<T, V, kVec>(p.grad_lv + j, 0, cnt, glv);
    if constexpr (kPrior) {
      store_chunk<T, V, kVec>(p.grad_pm + j, 0, cnt, gpm);
      store_chunk<T, V, kVec>(p.grad_pl + j, 0, cnt, gpl);
    }
  }
}

// ---- launchers ------------------------------------------------------------------------

template <typename T, bool kVec, bool kPrior, bool kLogq>
cudaError_t launch_fwd_impl(const FwdParams<T>& p, const LaunchTarget& target) {
  using acc_t = acc_type_t<T>;
  const int num_sms = target.num_sms;
  const RowTiles g = reparam_tiles<T>(p.B, p.D, p.N, p.kl_mode, p.logq_mode);
  const int64_t tiles = g.tiles;
  const int64_t samples = p.num_samples > 1 ? p.num_samples : 1;
  const bool reduced = p.kl_mode >= kReducePerSample;
  const bool logq_row_pass = kLogq && g.chunks > 1;
  constexpr auto kernel = reparam_kl_fwd_kernel<T, kVec, kPrior, kLogq>;
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
  const bool fuse_final = (reduced || logq_row_pass) && grid == 1;
  FV_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, target.stream, p, g, sample_chunks, chunk_samples,
            fuse_final);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || fuse_final) return err;
  if (logq_row_pass) {
    err = launch_row_pass<acc_t>(p.logq_out, p.logq_partials, p.num_samples * p.B, g.chunks, target);
    if (err != cudaSuccess) return err;
  }
  return reduced ? launch_finish<acc_t>(p.kl_out, p.workspace, p.B, g.chunks, p.kl_mode, target) : cudaSuccess;
}

template <typename T, bool kVec, bool kPrior, bool kLogq>
cudaError_t launch_bwd_impl(const BwdParams<T>& p, const LaunchTarget& target) {
  return launch_flat<T, reparam_kl_bwd_kernel<T, kVec, kPrior, kLogq>>(p, p.N, target);
}

}  // namespace detail

template <typename T>
cudaError_t launch_reparam_kl_fwd(const FwdParams<T>& p, const LaunchTarget& target) {
  constexpr int V = TileShape<T>::kVec;
  const bool vec = detail::aligned16(p.mu) && detail::aligned16(p.lv) &&
                   (p.pm == nullptr || (detail::aligned16(p.pm) && detail::aligned16(p.pl))) &&
                   (p.z == nullptr || detail::aligned16(p.z)) &&
                   (p.kl_elem == nullptr || detail::aligned16(p.kl_elem)) &&
                   (p.num_samples <= 1 || p.N % V == 0);
  return detail::with_flags(
      [&](auto v, auto prior, auto logq) {
        return detail::launch_fwd_impl<T, decltype(v)::value, decltype(prior)::value, decltype(logq)::value>(p, target);
      },
      vec, p.pm != nullptr, p.logq_mode != kLogqSkip);
}

template <typename T>
cudaError_t launch_reparam_kl_bwd(const BwdParams<T>& p, const LaunchTarget& target) {
  constexpr int V = TileShape<T>::kVec;
  const bool vec = detail::aligned16(p.mu) && detail::aligned16(p.lv) && detail::aligned16(p.grad_mu) &&
                   detail::aligned16(p.grad_lv) &&
                   (p.pm == nullptr || (detail::aligned16(p.pm) && detail::aligned16(p.pl) &&
                                        detail::aligned16(p.grad_pm) && detail::aligned16(p.grad_pl))) &&
                   (p.grad_z == nullptr || p.grad_z_bcast || detail::aligned16(p.grad_z)) &&
                   (p.grad_kl.elem == nullptr || p.grad_kl.bcast || detail::aligned16(p.grad_kl.elem)) &&
                   (p.num_samples <= 1 || p.N % V == 0);
  return detail::with_flags(
      [&](auto v, auto prior, auto logq) {
        return detail::launch_bwd_impl<T, decltype(v)::value, decltype(prior)::value, decltype(logq)::value>(p, target);
      },
      vec, p.pm != nullptr, p.grad_logq != nullptr);
}

}  // namespace cuda
}  // namespace fused_vae
