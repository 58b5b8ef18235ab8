// Host-side interface of the CUDA kernels of fused_vae::reparam_kl_fwd / _bwd.
//
// This header has no torch dependency: the kernels (reparam_kl_kernels.cuh) are compiled
// once, in kernels_instantiate.cu, with only the CUDA toolkit and the fused_vae headers;
// the ATen glue (reparam_kl_cuda.cu) includes this header and calls the launchers.
//
// Data layout (the CPU backend's): mu / logvar contiguous, viewed as [B, D] rows with
// N = B * D elements; z is [S, N]; element i of z's flat index uses Philox group i / 4,
// lane i % 4. Tiles (RowTiles below) and reductions follow docs/design.md section 9.
#pragma once

#if defined(FUSED_VAE_CUDA_EMULATE)
#include "cuda_emulation.h"  // tests only: the kernels as host C++ (csrc/emulate/)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

#include "fused_vae/elementwise.h"

namespace fused_vae {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every kernel here

// Elements per thread per tile: 16 bytes of 16-bit types (two Philox groups), else one
// Philox group (16 bytes of float, 32 bytes of double). Constants (not functions) so
// host and device code can use them without --expt-relaxed-constexpr.
template <typename T>
struct TileShape {
  static constexpr int kVec = sizeof(T) == 2 ? 8 : 4;
  static constexpr int64_t kElems = static_cast<int64_t>(kThreads) * kVec;
};

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type_t = typename AccType<T>::type;

template <typename T>
struct FwdParams {
  using acc_t = acc_type_t<T>;
  const T* mu = nullptr;
  const T* lv = nullptr;
  T* z = nullptr;              // [S, N], null when num_samples == 0
  T* kl_elem = nullptr;        // [N] when kl_mode == kKlElementwise
  acc_t* kl_out = nullptr;     // [B] (per_sample) or [] (sum / batchmean)
  acc_t* workspace = nullptr;  // fwd_workspace_elems<T>(B, D, kl_mode) elements
  const int64_t* seed_ptr = nullptr;  // device pointer to the seed, or null:
  uint64_t seed_value = 0;            // then this value is used
  int64_t N = 0, B = 0, D = 0;
  int64_t num_samples = 0;
  int64_t kl_mode = kKlSkip;
  ClampSpec clamp;
};

template <typename T>
struct BwdParams {
  using acc_t = acc_type_t<T>;
  const T* grad_z = nullptr;       // [S, N], or one element when grad_z_bcast
  bool grad_z_bcast = false;
  const T* grad_kl_elem = nullptr;     // kl_mode none: [N], or one element when bcast
  const acc_t* grad_kl_red = nullptr;  // per_sample: [B]; sum / batchmean: one element
  bool grad_kl_bcast = false;          // grad_kl_elem / per-sample grad_kl is one value
  const T* mu = nullptr;
  const T* lv = nullptr;
  T* grad_mu = nullptr;  // [N]
  T* grad_lv = nullptr;  // [N]
  const int64_t* seed_ptr = nullptr;
  uint64_t seed_value = 0;
  int64_t N = 0, B = 0, D = 0;
  int64_t num_samples = 0;
  int64_t kl_mode = kKlSkip;
  ClampSpec clamp;
};

// Tiles of the flat [N] problem (the backward, which reduces nothing).
template <typename T>
inline int64_t num_tiles(int64_t N) {
  return (N + TileShape<T>::kElems - 1) / TileShape<T>::kElems;
}

// The forward's row-aligned tiles of an [R, C] view of the problem: [B, D] when the KL
// is reduced, else one row [1, N]. A tile holds rows_per_tile whole rows (chunks == 1)
// or one chunk of chunk_len elements of one row (chunks > 1; tile t is chunk t % chunks
// of row t / chunks). Thread k of a tile owns the V elements from base + k * V, where
// base is the tile's first element rounded down to a multiple of V, so that vector
// accesses and Philox groups stay aligned; a tile therefore spans at most
// TILE - (V - 1) elements when rows may start off a multiple of V.
struct RowTiles {
  int64_t rows = 0;           // R
  int64_t cols = 0;           // C
  int64_t rows_per_tile = 0;  // chunks == 1: whole rows per tile
  int64_t chunks = 1;         // chunks per row
  int64_t chunk_len = 0;      // chunks > 1: elements per chunk (a multiple of V)
  int64_t tiles = 0;
};

template <typename T>
inline RowTiles row_tiles(int64_t R, int64_t C) {
  constexpr int64_t V = TileShape<T>::kVec;
  constexpr int64_t TILE = TileShape<T>::kElems;
  RowTiles g;
  g.rows = R;
  g.cols = C;
  const bool rows_aligned = R <= 1 || C % V == 0;
  const int64_t span = rows_aligned ? TILE : TILE - (V - 1);
  if (C <= span) {
    g.rows_per_tile = span / C;
    g.tiles = (R + g.rows_per_tile - 1) / g.rows_per_tile;
  } else {
    g.chunk_len = rows_aligned ? TILE : TILE - V;
    g.chunks = (C + g.chunk_len - 1) / g.chunk_len;
    g.tiles = R * g.chunks;
  }
  return g;
}

template <typename T>
inline RowTiles fwd_tiles(int64_t B, int64_t D, int64_t N, int64_t kl_mode) {
  return kl_mode >= kKlPerSample ? row_tiles<T>(B, D) : row_tiles<T>(1, N);
}

// acc_t elements of scratch the forward needs: the [B, chunks] partials when rows are
// cut into chunks, then (sum / batchmean) the B row sums; nothing otherwise.
template <typename T>
inline int64_t fwd_workspace_elems(int64_t B, int64_t D, int64_t kl_mode) {
  if (kl_mode < kKlPerSample) return 0;
  const RowTiles g = row_tiles<T>(B, D);
  return (g.chunks > 1 ? B * g.chunks : 0) + (kl_mode >= kKlSum ? B : 0);
}

// Where the kernels run: the device (its occupancy is queried once and cached), its
// number of SMs (sizes the grid) and the stream.
struct LaunchTarget {
  int device = 0;
  int num_sms = 1;
  cudaStream_t stream = nullptr;
};

// Launch on target.stream. Requires N > 0. Returns the first error of the occupancy
// queries and launches (cudaSuccess when all kernels were launched).
template <typename T>
cudaError_t launch_reparam_kl_fwd(const FwdParams<T>& p, const LaunchTarget& target);
template <typename T>
cudaError_t launch_reparam_kl_bwd(const BwdParams<T>& p, const LaunchTarget& target);

#define FV_CUDA_DECLARE(T)                                                                    \
  extern template cudaError_t launch_reparam_kl_fwd<T>(const FwdParams<T>&, const LaunchTarget&); \
  extern template cudaError_t launch_reparam_kl_bwd<T>(const BwdParams<T>&, const LaunchTarget&);
FV_CUDA_DECLARE(float)
FV_CUDA_DECLARE(double)
FV_CUDA_DECLARE(__half)
FV_CUDA_DECLARE(__nv_bfloat16)
#undef FV_CUDA_DECLARE

}  // namespace cuda
}  // namespace fused_vae
