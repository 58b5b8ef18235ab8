// CUDA kernels of fused_vae::gaussian_log_prob_fwd / _bwd (see log_prob_launch.h):
// log N(x; mu, exp(logvar)) per element (log_prob_term, elementwise.h), reduced as the
// KL of the sampling op is (docs/design.md section 9; kernel_common.cuh has the tiles and
// the reductions). The forward reads x, mu and logvar once and writes the output (or, for
// a reduced one, per-tile row sums and chunk partials, then the row pass / total); one
// block finishes alone when there are at most kFuseTiles tiles. The backward reads the
// inputs and the output gradient once (an expanded or reduced one in place) and writes
// the three gradients, over flat tiles of 256 * V elements.
#pragma once

#include <cstdint>

#include "fused_vae/elementwise.h"
#include "fused_vae/fast_math.h"
#include "kernel_common.cuh"
#include "log_prob_launch.h"

namespace fused_vae {
namespace cuda {
namespace detail {

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    gaussian_log_prob_fwd_kernel(const LogProbParams<T> p, const RowTiles g, const bool fuse_final) {
  using acc_t = acc_type_t<T>;
  constexpr int V = TileShape<T>::kVec;
  constexpr int64_t TILE = TileShape<T>::kElems;
  FV_TILE_SUMS_SHARED(acc_t, TILE);

  const int64_t mode = p.reduction;
  const bool small_index = p.N <= 0xffffffffLL;
  const bool chunked = g.chunks > 1;
  const ReducedSlots<acc_t> slots = reduced_slots(p.out, p.workspace, mode, g);
  const RowGroups rg = row_groups(g.cols);

  for (int64_t t = blockIdx.x; t < g.tiles; t += gridDim.x) {
    const TileSpan sp = tile_span<V>(g, t, small_index);
    const int64_t j = sp.j;
    const int lo = sp.lo;
    const int hi = sp.hi;
    const Pack<T, V> x_raw = load_raw<T, V, kVec>(p.x + j, lo, hi);
    const Pack<T, V> mu_raw = load_raw<T, V, kVec>(p.mu + j, lo, hi);
    const Pack<T, V> lv_raw = load_raw<T, V, kVec>(p.lv + j, lo, hi);
    acc_t x[V], m[V], l[V], lp[V];
    unpack<T, V>(x_raw, x);
    unpack<T, V>(mu_raw, m);
    unpack<T, V>(lv_raw, l);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t lc = p.clamp.apply(l[k]);
      lp[k] = k >= lo && k < hi ? log_prob_term(x[k], m[k], lc, op_exp(-lc)) : acc_t(0);
    }
    if (mode == kReduceElementwise) {
      if (hi > lo) store_chunk<T, V, kVec>(p.out_elem + j, lo, hi, lp);
      continue;  // uniform over the block
    }
    tile_row_sums<acc_t, V>(lp, sp, chunked, g.cols, rg, slots.partials + t, slots.rows + sp.row0, stage, red);
  }

  if (fuse_final) {
    __syncthreads();  // makes this block's partials and row sums visible to all its threads
    finish_in_block<acc_t>(p.out, slots.partials, slots.rows, g.rows, g.chunks, mode, red_d);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    gaussian_log_prob_bwd_kernel(const LogProbGradParams<T> p, const int64_t tiles) {
  using acc_t = acc_type_t<T>;
  constexpr int V = TileShape<T>::kVec;
  constexpr int64_t TILE = TileShape<T>::kElems;
  const bool small_index = p.N <= 0xffffffffLL;
  acc_t g_scalar;
  const bool g_is_scalar = reduced_grad_scalar(p.grad, p.B, g_scalar);
  const bool g_stream = !g_is_scalar && p.grad.mode == kReduceElementwise;

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t j = t * TILE + static_cast<int64_t>(threadIdx.x) * V;
    const int64_t rem = p.N - j;
    if (rem <= 0) continue;  // no barrier in this kernel
    const int cnt = rem >= V ? V : static_cast<int>(rem);
    const Pack<T, V> x_raw = load_raw<T, V, kVec>(p.x + j, 0, cnt);
    const Pack<T, V> mu_raw = load_raw<T, V, kVec>(p.mu + j, 0, cnt);
    const Pack<T, V> lv_raw = load_raw<T, V, kVec>(p.lv + j, 0, cnt);
    Pack<T, V> g_raw{};
    if (g_stream) g_raw = load_raw<T, V, kVec>(p.grad.elem + j, 0, cnt);
    acc_t x[V], m[V], raw[V], g[V];
    unpack<T, V>(x_raw, x);
    unpack<T, V>(mu_raw, m);
    unpack<T, V>(lv_raw, raw);
    reduced_grad_values<T, V>(p.grad, g_is_scalar, g_scalar, g_raw, j, cnt, p.D, small_index, g);
    acc_t gx[V], gmu[V], glv[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const Grad3<acc_t> d = log_prob_grads(x[k], m[k], op_exp(-p.clamp.apply(raw[k])), g[k]);
      gx[k] = d.x;
      gmu[k] = d.mu;
      glv[k] = p.clamp.passes(raw[k]) ? d.lv : acc_t(0);
    }
    store_chunk<T, V, kVec>(p.grad_x + j, 0, cnt, gx);
    store_chunk<T, V, kVec>(p.grad_mu + j, 0, cnt, gmu);
    store_chunk<T, V, kVec>(p.grad_lv + j, 0, cnt, glv);
  }
}

template <typename T, bool kVec>
cudaError_t launch_log_prob_fwd_impl(const LogProbParams<T>& p, const LaunchTarget& target) {
  using acc_t = acc_type_t<T>;
  const RowTiles g = log_prob_tiles<T>(p.B, p.D, p.N, p.reduction);
  const bool reduced = p.reduction >= kReducePerSample;
  constexpr auto kernel = gaussian_log_prob_fwd_kernel<T, kVec>;
  int64_t grid = 1;
  if (g.tiles > kFuseTiles) {
    const cudaError_t occ = grid_of<kernel>(g.tiles, target, &grid);
    if (occ != cudaSuccess) return occ;
  }
  const bool fuse_final = reduced && grid == 1;
  FV_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, target.stream, p, g, fuse_final);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !reduced || fuse_final) return err;
  return launch_finish<acc_t>(p.out, p.workspace, p.B, g.chunks, p.reduction, target);
}

template <typename T, bool kVec>
cudaError_t launch_log_prob_bwd_impl(const LogProbGradParams<T>& p, const LaunchTarget& target) {
  return launch_flat<T, gaussian_log_prob_bwd_kernel<T, kVec>>(p, p.N, target);
}

}  // namespace detail

template <typename T>
cudaError_t launch_log_prob_fwd(const LogProbParams<T>& p, const LaunchTarget& target) {
  const bool vec = detail::aligned16(p.x) && detail::aligned16(p.mu) && detail::aligned16(p.lv) &&
                   (p.out_elem == nullptr || detail::aligned16(p.out_elem));
  return detail::with_flags([&](auto v) { return detail::launch_log_prob_fwd_impl<T, decltype(v)::value>(p, target); },
                            vec);
}

template <typename T>
cudaError_t launch_log_prob_bwd(const LogProbGradParams<T>& p, const LaunchTarget& target) {
  const bool vec = detail::aligned16(p.x) && detail::aligned16(p.mu) && detail::aligned16(p.lv) &&
                   detail::aligned16(p.grad_x) && detail::aligned16(p.grad_mu) && detail::aligned16(p.grad_lv) &&
                   (p.grad.elem == nullptr || p.grad.bcast || detail::aligned16(p.grad.elem));
  return detail::with_flags([&](auto v) { return detail::launch_log_prob_bwd_impl<T, decltype(v)::value>(p, target); },
                            vec);
}

}  // namespace cuda
}  // namespace fused_vae
