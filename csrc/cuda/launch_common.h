// What the host-side interfaces of every CUDA op family share (reparam_kl_launch.h,
// log_prob_launch.h): the block size, the tile shape per dtype, the accumulation type,
// the forward's row-aligned tiles and where the kernels run.
//
// No torch dependency: the kernels (*_kernels.cuh) are compiled once, in
// kernels_instantiate.cu, with only the CUDA toolkit and the fused_vae headers; the ATen
// glue (*_cuda.cu) includes the launch headers and calls the launchers.
//
// Data layout (the CPU backend's): every input contiguous, viewed as [B, D] rows with
// N = B * D elements. Tiles (RowTiles below) and reductions follow docs/design.md
// section 9.
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

// The launchers of an op family, launch_<name>_fwd / _bwd, declared for the params types
// Fwd<T> / Bwd<T>; `extern` (default) in the headers, empty in kernels_instantiate.cu, where
// they are instantiated for every storage type the kernels take. They launch on target.stream, require N > 0 and
// return the first error of the occupancy queries and launches (cudaSuccess when every
// kernel was launched).
#define FV_CUDA_LAUNCHER_TYPE(prefix, name, Fwd, Bwd, T)                                 \
  prefix template cudaError_t launch_##name##_fwd<T>(const Fwd<T>&, const LaunchTarget&); \
  prefix template cudaError_t launch_##name##_bwd<T>(const Bwd<T>&, const LaunchTarget&);
#define FV_CUDA_LAUNCHERS(prefix, name, Fwd, Bwd)         \
  FV_CUDA_LAUNCHER_TYPE(prefix, name, Fwd, Bwd, float)    \
  FV_CUDA_LAUNCHER_TYPE(prefix, name, Fwd, Bwd, double)   \
  FV_CUDA_LAUNCHER_TYPE(prefix, name, Fwd, Bwd, __half)   \
  FV_CUDA_LAUNCHER_TYPE(prefix, name, Fwd, Bwd, __nv_bfloat16)
#define FV_CUDA_DECLARE_LAUNCHERS(name, Fwd, Bwd)                                       \
  template <typename T>                                                                \
  cudaError_t launch_##name##_fwd(const Fwd<T>& p, const LaunchTarget& target);        \
  template <typename T>                                                                \
  cudaError_t launch_##name##_bwd(const Bwd<T>& p, const LaunchTarget& target);        \
  FV_CUDA_LAUNCHERS(extern, name, Fwd, Bwd)

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

// The gradient of a reduced output (ReduceMode `mode`, elementwise.h) as a backward
// kernel reads it: elementwise [N] in the input dtype, per_sample [B] or one value (sum /
// batchmean) in the accumulation dtype; `bcast` marks an elementwise / per_sample
// gradient that holds one value for every element (an expanded scalar, read in place).
template <typename T>
struct ReducedGrad {
  const T* elem = nullptr;                 // elementwise, or null
  const acc_type_t<T>* red = nullptr;      // per_sample / sum / batchmean, or null
  bool bcast = false;
  int64_t mode = kReduceSkip;
};

// Tiles of the flat [N] problem (the backward kernels, which reduce nothing).
template <typename T>
inline int64_t num_tiles(int64_t N) {
  return (N + TileShape<T>::kElems - 1) / TileShape<T>::kElems;
}

// The forward's row-aligned tiles of an [R, C] view of the problem: [B, D] when an output
// is reduced over rows, else one row [1, N]. A tile holds rows_per_tile whole rows
// (chunks == 1) or one chunk of chunk_len elements of one row (chunks > 1; tile t is
// chunk t % chunks of row t / chunks). Thread k of a tile owns the V elements from
// base + k * V, where base is the tile's first element rounded down to a multiple of V,
// so that vector accesses and Philox groups stay aligned; a tile therefore spans at most
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

// The tiles of a forward pass: row-aligned ([B, D]) when `by_rows`, else one row [1, N].
template <typename T>
inline RowTiles fwd_tiles(int64_t B, int64_t D, int64_t N, bool by_rows) {
  return by_rows ? row_tiles<T>(B, D) : row_tiles<T>(1, N);
}

// acc_t elements of scratch a reduced output of `mode` needs: the [B, chunks] partials
// when rows are cut into chunks, then (sum / batchmean) the B row sums; nothing otherwise.
template <typename T>
inline int64_t reduced_workspace_elems(int64_t B, int64_t D, int64_t mode) {
  if (mode < kReducePerSample) return 0;
  const RowTiles g = row_tiles<T>(B, D);
  return (g.chunks > 1 ? B * g.chunks : 0) + (mode >= kReduceSum ? B : 0);
}

// Where the kernels run: the device (its occupancy is queried once and cached), its
// number of SMs (sizes the grid) and the stream.
struct LaunchTarget {
  int device = 0;
  int num_sms = 1;
  cudaStream_t stream = nullptr;
};

}  // namespace cuda
}  // namespace fused_vae
