// What the CUDA kernels of every op family share (reparam_kl_kernels.cuh,
// log_prob_kernels.cuh): typed 16-byte memory access of a thread's chunk, the forward's
// row-aligned tiles and their deterministic reductions (docs/design.md section 9), the
// reading of a reduced output's gradient in a backward kernel, and the launch helpers.
//
// Needs only the CUDA toolkit and the fused_vae headers (no torch), so every kernel
// compiles on any machine with nvcc. Math is float32 for float32 / float16 / bfloat16
// and float64 for float64; all element indices are 64-bit.
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
#include <type_traits>

#include "fused_vae/elementwise.h"
#include "fused_vae/fast_math.h"
#include "launch_common.h"

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
constexpr int64_t kFuseTiles = 8;  // tiles (x samples) that one block finishes alone

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
__device__ void sum_rows_total(A* __restrict__ out, const A* __restrict__ row_sums, int64_t B, bool mean,
                               double* red) {
  double s = 0.0;
  for (int64_t b = threadIdx.x; b < B; b += kThreads) s += static_cast<double>(row_sums[b]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) {
    if (mean) s /= static_cast<double>(B);
    out[0] = static_cast<A>(s);
  }
}

// What is left of a reduced output of `mode` after the tiles, by one block: the row pass
// (chunks > 1), then the total (sum / batchmean). The caller's barrier makes the tiles'
// writes visible.
template <typename A>
__device__ void finish_in_block(A* out, const A* partials, A* row_sums, int64_t B, int64_t chunks, int64_t mode,
                                double* red) {
  if (chunks > 1) sum_row_chunks<A>(row_sums, partials, B, chunks, threadIdx.x >> 5, kWarps);
  if (mode == kReducePerSample) return;
  __syncthreads();
  sum_rows_total<A>(out, row_sums, B, mode == kReduceBatchMean, red);
}

// a / b for 0 <= a, 0 < b; a 32-bit division when the problem's indices fit (N < 2**32).
__device__ __forceinline__ int64_t index_div(int64_t a, int64_t b, bool small_index) {
  return small_index ? static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b)) : a / b;
}

// ---- the forward's tiles ----------------------------------------------------------------

// Tile t of a RowTiles view and this thread's part of it.
struct TileSpan {
  int64_t row0, nrows;  // the tile's rows row0 .. row0 + nrows - 1
  int64_t a, e;         // its elements [a, e)
  int64_t base;         // a rounded down to a multiple of V
  int64_t j;            // this thread's first element, base + threadIdx.x * V
  int lo, hi;           // this thread's elements are j + [lo, hi)
};

template <int V>
__device__ __forceinline__ TileSpan tile_span(const RowTiles& g, int64_t t, bool small_index) {
  TileSpan sp;
  const int64_t C = g.cols;
  if (g.chunks == 1) {
    sp.row0 = t * g.rows_per_tile;
    sp.nrows = g.rows - sp.row0 < g.rows_per_tile ? g.rows - sp.row0 : g.rows_per_tile;
    sp.a = sp.row0 * C;
    sp.e = sp.a + sp.nrows * C;
  } else {
    sp.row0 = index_div(t, g.chunks, small_index);
    sp.nrows = 1;
    const int64_t col = (t - sp.row0 * g.chunks) * g.chunk_len;
    sp.a = sp.row0 * C + col;
    sp.e = sp.row0 * C + (C - col < g.chunk_len ? C : col + g.chunk_len);
  }
  sp.base = sp.a & ~static_cast<int64_t>(V - 1);
  sp.j = sp.base + static_cast<int64_t>(threadIdx.x) * V;
  sp.lo = sp.j < sp.a ? static_cast<int>(sp.a - sp.j) : 0;
  const int64_t rem = sp.e - sp.j;
  sp.hi = rem <= sp.lo ? sp.lo : (rem >= V ? V : static_cast<int>(rem));  // elements [lo, hi)
  return sp;
}

// Whole-row tiles: rows are summed by groups of W lanes (W = min(32, pow2 >= C)); lane li
// of group gr of its warp. Depends on C only, so it is computed once, not per tile.
struct RowGroups {
  int W, per_warp, gr, li;
};

__device__ __forceinline__ RowGroups row_groups(int64_t C) {
  RowGroups rg;
  rg.W = 32;
  if (C < 32) {
    rg.W = 1;
    while (rg.W < C) rg.W <<= 1;
  }
  rg.per_warp = 32 / rg.W;
  const int lane = threadIdx.x & 31;
  rg.gr = lane / rg.W;
  rg.li = lane % rg.W;
  return rg;
}

// The shared memory of a forward kernel's tile sums (tile_row_sums) and of its one-block
// finish (finish_in_block), declared in the kernel's body.
#define FV_TILE_SUMS_SHARED(acc_t, TILE) \
  FV_SHARED(acc_t, stage, TILE);         \
  FV_SHARED(acc_t, red, kWarps);         \
  FV_SHARED(double, red_d, kWarps)

// Where the tiles put a reduced output's sums (reduced_workspace_elems' layout): chunk
// partials [R, chunks] at the workspace's start; row sums into the output for per_sample,
// else into the R slots after the partials.
template <typename A>
struct ReducedSlots {
  A* partials;
  A* rows;
};

template <typename A>
__device__ __forceinline__ ReducedSlots<A> reduced_slots(A* out, A* workspace, int64_t mode, const RowTiles& g) {
  return {workspace, mode == kReducePerSample ? out : workspace + (g.chunks > 1 ? g.rows * g.chunks : 0)};
}

// The tile's sums of v (each thread's V values, zero outside its elements): for a chunk
// of a row (chunked) the block sum, written to *chunk_slot; for whole rows each row's
// sum, written to rows[r] for the tile's rows r = 0 .. nrows - 1 (the tile is staged in
// shared memory, then a group of W lanes sums each row). Every thread of the block calls
// it (barriers); stage and red may be reused right after.
template <typename A, int V>
__device__ __forceinline__ void tile_row_sums(const A (&v)[V], const TileSpan& sp, bool chunked, int64_t C,
                                              const RowGroups& rg, A* chunk_slot, A* rows, A* stage, A* red) {
  const int tid = threadIdx.x;
  if (chunked) {
    A s = A(0);
#pragma unroll
    for (int k = 0; k < V; ++k) s += v[k];
    s = block_sum(s, red);
    if (tid == 0) *chunk_slot = s;
    return;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) stage[tid * V + k] = v[k];
  __syncthreads();
  const int64_t first = sp.a - sp.base;  // row 0 of the tile starts at stage[first]
  const int warp = tid >> 5;
  for (int64_t gb = static_cast<int64_t>(warp) * rg.per_warp; gb < sp.nrows; gb += kWarps * rg.per_warp) {
    const int64_t lr = gb + rg.gr;
    A s = A(0);
    if (lr < sp.nrows) {
      const int64_t row_begin = first + lr * C;
      for (int64_t i = row_begin + rg.li; i < row_begin + C; i += rg.W) s += stage[i];
    }
    for (int off = rg.W >> 1; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lr < sp.nrows && rg.li == 0) rows[lr] = s;
  }
  __syncthreads();  // stage is rewritten by the next use
}

// ---- the backward's view of a reduced output's gradient ---------------------------------

// Rows of the elements j + k of the [B, D] view: r0 + dr[k].
template <int V>
__device__ __forceinline__ void element_rows(int64_t j, int64_t D, bool small_index, int64_t& r0, int (&dr)[V]) {
  r0 = index_div(j, D, small_index);
  int64_t next = (r0 + 1) * D;
  int d = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    while (j + k >= next) {
      ++d;
      next += D;
    }
    dr[k] = d;
  }
}

// Whether a given gradient is one value for every element (sum / batchmean, divided by B
// for batchmean; an expanded one); that value goes to `scalar`. An absent one is 0.
template <typename T>
__device__ __forceinline__ bool reduced_grad_scalar(const ReducedGrad<T>& g, int64_t B, acc_type_t<T>& scalar) {
  using acc_t = acc_type_t<T>;
  scalar = acc_t(0);
  if (g.mode == kReduceElementwise && g.elem != nullptr) {
    if (!g.bcast) return false;
    scalar = Conv<T>::to_acc(g.elem[0]);
  } else if (g.mode == kReducePerSample && g.red != nullptr) {
    if (!g.bcast) return false;
    scalar = g.red[0];
  } else if (g.mode >= kReduceSum && g.red != nullptr) {
    scalar = g.red[0];
    if (g.mode == kReduceBatchMean) scalar = scalar / static_cast<acc_t>(B);
  }
  return true;
}

// The gradient of each of the thread's elements j + k (k < cnt): the scalar, the
// elementwise values (`raw`, loaded by the caller) or per_sample's value of their row.
template <typename T, int V>
__device__ __forceinline__ void reduced_grad_values(const ReducedGrad<T>& g, bool is_scalar, acc_type_t<T> scalar,
                                                    const Pack<T, V>& raw, int64_t j, int cnt, int64_t D,
                                                    bool small_index, acc_type_t<T> (&out)[V]) {
  using acc_t = acc_type_t<T>;
  if (is_scalar) {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = scalar;
  } else if (g.mode == kReduceElementwise) {
    unpack<T, V>(raw, out);
  } else {
    int64_t r0;
    int dr[V];
    element_rows<V>(j, D, small_index, r0, dr);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = k < cnt ? g.red[r0 + dr[k]] : acc_t(0);
  }
}

// ---- kernels that finish a reduced output ---------------------------------------------

// Row pass (chunks > 1) of rows sums that are an output themselves: a warp per row.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    row_pass_kernel(A* __restrict__ out, const A* __restrict__ partials, int64_t B, int64_t chunks) {
  const int64_t warp_first = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  sum_row_chunks<A>(out, partials, B, chunks, warp_first, warp_stride);
}

// sum / batchmean after the tiles: the row pass (chunks > 1) and the total, by one block.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    finish_total_kernel(A* __restrict__ out, const A* partials, A* row_sums, int64_t B, int64_t chunks,
                        int64_t mode) {
  FV_SHARED(double, red, kWarps);
  finish_in_block<A>(out, partials, row_sums, B, chunks, mode, red);
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

// Blocks of kKernel for a grid-stride loop over `work` items.
template <auto kKernel>
cudaError_t grid_of(int64_t work, const LaunchTarget& target, int64_t* grid) {
  int per_sm = 0;
  const cudaError_t occ = resident_blocks_per_sm<kKernel>(target.device, &per_sm);
  if (occ != cudaSuccess) return occ;
  *grid = grid_for(per_sm, work, target.num_sms);
  return cudaSuccess;
}

// f(std::integral_constant<bool, flag>{}...) for the runtime flags: the kernel instance of
// a call (decltype(c)::value in f gives each flag as a constant).
template <typename F>
cudaError_t with_flags(F&& f) {
  return f();
}
template <typename F, typename... Rest>
cudaError_t with_flags(F&& f, bool flag, Rest... rest) {
  if (flag) return with_flags([&](auto... c) { return f(std::true_type{}, c...); }, rest...);
  return with_flags([&](auto... c) { return f(std::false_type{}, c...); }, rest...);
}

// A backward kernel's launch: kKernel(p, tiles), a grid-stride loop over the flat tiles
// of N elements.
template <typename T, auto kKernel, typename Params>
cudaError_t launch_flat(const Params& p, int64_t N, const LaunchTarget& target) {
  const int64_t tiles = num_tiles<T>(N);
  int64_t grid = 1;
  const cudaError_t occ = grid_of<kKernel>(tiles, target, &grid);
  if (occ != cudaSuccess) return occ;
  FV_LAUNCH(kKernel, static_cast<unsigned>(grid), kThreads, target.stream, p, tiles);
  return cudaGetLastError();
}

// The row pass of `rows` rows of `chunks` partials each into out[rows].
template <typename A>
cudaError_t launch_row_pass(A* out, const A* partials, int64_t rows, int64_t chunks, const LaunchTarget& target) {
  constexpr auto rk = row_pass_kernel<A>;
  int64_t blocks = 1;
  const cudaError_t occ = grid_of<rk>((rows + kWarps - 1) / kWarps, target, &blocks);
  if (occ != cudaSuccess) return occ;
  FV_LAUNCH(rk, static_cast<unsigned>(blocks), kThreads, target.stream, out, partials, rows, chunks);
  return cudaGetLastError();
}

// What a reduced output of `mode` needs after tiles that did not finish it: per_sample's
// row pass when rows are cut into chunks, or sum / batchmean's one-block row pass and
// total. workspace is laid out as reduced_workspace_elems says.
template <typename A>
cudaError_t launch_finish(A* out, A* workspace, int64_t B, int64_t chunks, int64_t mode,
                          const LaunchTarget& target) {
  if (mode == kReducePerSample) {
    return chunks == 1 ? cudaSuccess : launch_row_pass<A>(out, workspace, B, chunks, target);
  }
  A* const row_sums = workspace + (chunks > 1 ? B * chunks : 0);
  FV_LAUNCH(finish_total_kernel<A>, 1u, kThreads, target.stream, out, workspace, row_sums, B, chunks, mode);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace fused_vae
