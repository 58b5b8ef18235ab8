// What the CPU kernels of every op family share: the row-aligned tiles and their
// deterministic reductions (docs/design.md section 9, the CPU row of its table), typed
// loads and stores, and the function-multiversioning macros.
//
// Tiles of at most kTile elements run in parallel with at::parallel_for; every sum is
// taken in an order fixed by the shape, so results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "fused_vae/fast_math.h"
#include "fused_vae/op_common.h"

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && __GNUC__ >= 11
#define FV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FV_CLONES
#endif

// Everything the per-dtype clones call must be inlined into them to get their ISA.
#define FV_INLINE inline __attribute__((always_inline))

// Before an element loop whose pointers never overlap: GCC honours __restrict on locals only
// in part and gives up vectorising a loop that would need too many run-time alias checks.
#if defined(__GNUC__) && !defined(__clang__)
#define FV_IVDEP _Pragma("GCC ivdep")
#else
#define FV_IVDEP
#endif

namespace fused_vae {
namespace cpu {

constexpr int64_t kTile = 2048;
constexpr int64_t kLanes = 16;  // independent partial sums per reduction

// A tile: flat elements [j0, j0 + len) of the [B, D] view, starting at row `row0`.
struct Tile {
  int64_t j0;
  int64_t len;
  int64_t row0;
  int64_t chunk;  // chunk index within the row when rows are split, else -1
};

struct TilePlan {
  RowShape s;
  int64_t rows_per_tile = 0;   // > 0: tiles hold whole rows
  int64_t chunks_per_row = 0;  // > 0: rows are split into chunks
  int64_t num_tiles = 0;

  explicit TilePlan(const RowShape& shape) : s(shape) {
    if (s.N == 0) return;
    if (s.D <= kTile) {
      rows_per_tile = kTile / s.D;
      num_tiles = (s.B + rows_per_tile - 1) / rows_per_tile;
    } else {
      chunks_per_row = (s.D + kTile - 1) / kTile;
      num_tiles = s.B * chunks_per_row;
    }
  }

  FV_INLINE Tile tile(int64_t t) const {
    if (rows_per_tile > 0) {
      const int64_t row0 = t * rows_per_tile;
      const int64_t rows = std::min(rows_per_tile, s.B - row0);
      return {row0 * s.D, rows * s.D, row0, -1};
    }
    const int64_t row = t / chunks_per_row;
    const int64_t chunk = t % chunks_per_row;
    const int64_t start = chunk * kTile;
    return {row * s.D + start, std::min(kTile, s.D - start), row, chunk};
  }
};

// Enough elements per task that the scheduling overhead stays small.
inline int64_t grain_tiles(const TilePlan& plan) {
  const int64_t avg = plan.num_tiles > 0 ? std::max<int64_t>(1, plan.s.N / plan.num_tiles) : 1;
  return std::max<int64_t>(1, (4 * kTile) / avg);
}

template <typename acc_t>
FV_INLINE acc_t lane_sum(const acc_t* v, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += v[k + l];
  }
  for (; k < n; ++k) lanes[k % kLanes] += v[k];
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Step 2 of the reductions: a tile's per-element values `buf` summed per row into rows[b]
// (tiles of whole rows) or into chunks[b * chunks_per_row + c] (a chunk of a row).
template <typename acc_t>
FV_INLINE void reduce_tile(const acc_t* buf, const TilePlan& plan, const Tile& t, acc_t* rows, acc_t* chunks) {
  if (t.chunk >= 0) {
    chunks[t.row0 * plan.chunks_per_row + t.chunk] = lane_sum(buf, t.len);
    return;
  }
  const int64_t D = plan.s.D;
  for (int64_t r = 0; r * D < t.len; ++r) rows[t.row0 + r] = lane_sum(buf + r * D, D);
}

// Step 3: rows[b] = the sum of chunks[b * chunks_per_row + 0, 1, ...] in turn, for nrows rows.
template <typename acc_t>
void sum_chunks(const acc_t* chunks, acc_t* rows, int64_t nrows, int64_t chunks_per_row) {
  at::parallel_for(0, nrows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* c = chunks + b * chunks_per_row;
      acc_t sum = 0;
      for (int64_t i = 0; i < chunks_per_row; ++i) sum += c[i];
      rows[b] = sum;
    }
  });
}

// Step 4: the B row sums added in double in turn (divided by B for batchmean).
template <typename acc_t>
acc_t total_of_rows(const acc_t* rows, int64_t B, int64_t mode) {
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) total += static_cast<double>(rows[b]);
  if (mode == kReduceBatchMean) total /= static_cast<double>(B);
  return static_cast<acc_t>(total);
}

// The values of a per-row tensor (row_values[b]) spread over a tile's elements.
template <typename acc_t>
FV_INLINE void fill_rows(const acc_t* row_values, const Tile& t, int64_t D, acc_t* out) {
  const int64_t n = t.len;
  const int64_t first_in_row = t.j0 - t.row0 * D;
  for (int64_t k = 0, row = t.row0, pos = first_in_row; k < n; ++row, pos = 0) {
    const int64_t m = std::min(n - k, D - pos);
    const acc_t g = row_values[row];
    for (int64_t i = 0; i < m; ++i) out[k + i] = g;
    k += m;
  }
}

// Loads/stores in the math type. bfloat16 goes through its bits so loops vectorise
// (c10::BFloat16's own conversions branch on NaN).
template <typename scalar_t>
struct Io {
  using acc_t = at::opmath_type<scalar_t>;
  static FV_INLINE acc_t load(const scalar_t* p, int64_t k) { return static_cast<acc_t>(p[k]); }
  static FV_INLINE void store(scalar_t* p, int64_t k, acc_t v) { p[k] = static_cast<scalar_t>(v); }
};

template <>
struct Io<at::BFloat16> {
  static FV_INLINE float load(const at::BFloat16* p, int64_t k) {
    return bits_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[k]) << 16);
  }
  static FV_INLINE void store(at::BFloat16* p, int64_t k, float v) {
    const uint32_t u = float_bits(v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    reinterpret_cast<uint16_t*>(p)[k] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
  }
};

// The incoming gradient of a reduced output, spread over a tile's elements: elementwise values
// (reduction "none"), a value per row (per_sample), or one value (sum; batchmean divided by B);
// zeros when the gradient is absent.
template <typename scalar_t>
struct ReducedGradIn {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* elem = nullptr;
  const acc_t* row = nullptr;
  acc_t scalar = 0;

  ReducedGradIn() = default;  // an absent gradient
  // From the gradient tensor (contiguous, or undefined when absent) of an output of `mode`.
  ReducedGradIn(const at::Tensor& grad, int64_t mode, int64_t batch) {
    if (!grad.defined()) return;
    if (mode == kReduceElementwise) {
      elem = grad.const_data_ptr<scalar_t>();
    } else if (mode == kReducePerSample) {
      row = grad.const_data_ptr<acc_t>();
    } else if (grad.numel() > 0) {
      scalar = grad.item<acc_t>();
      if (mode == kReduceBatchMean) scalar /= static_cast<acc_t>(batch);
    }
  }

  FV_INLINE void spread(const TilePlan& plan, const Tile& t, acc_t* out) const {
    const int64_t n = t.len;
    if (elem != nullptr) {
      const scalar_t* __restrict g = elem + t.j0;
      for (int64_t k = 0; k < n; ++k) out[k] = Io<scalar_t>::load(g, k);
    } else if (row != nullptr) {
      fill_rows(row, t, plan.s.D, out);
    } else {
      for (int64_t k = 0; k < n; ++k) out[k] = scalar;
    }
  }
};

// Where a reduced output's row sums go: straight into the output for per_sample, else into
// a [B] buffer that step 4 totals; chunk partials when rows are split.
template <typename acc_t>
struct RowSums {
  at::Tensor buffer;           // [B] (sum / batchmean), [B * chunks] partials
  at::Tensor chunk_buffer;
  acc_t* rows = nullptr;
  acc_t* chunks = nullptr;

  RowSums(const at::Tensor& out, int64_t mode, int64_t nrows, const TilePlan& plan, const at::TensorOptions& acc) {
    if (!is_reduced(mode)) return;
    if (mode == kReducePerSample) {
      rows = out.mutable_data_ptr<acc_t>();
    } else {
      buffer = at::empty({nrows}, acc);
      rows = buffer.mutable_data_ptr<acc_t>();
    }
    if (plan.s.N == 0) std::fill(rows, rows + nrows, acc_t(0));  // rows without elements
    if (plan.chunks_per_row > 0) {
      chunk_buffer = at::empty({nrows * plan.chunks_per_row}, acc);
      chunks = chunk_buffer.mutable_data_ptr<acc_t>();
    }
  }

  static bool is_reduced(int64_t mode) { return mode >= kReducePerSample; }

  // Steps 3 and 4 after the tiles, writing the output of `mode`.
  void finish(const at::Tensor& out, int64_t mode, int64_t nrows, const TilePlan& plan) const {
    if (!is_reduced(mode)) return;
    if (chunks != nullptr) sum_chunks(chunks, rows, nrows, plan.chunks_per_row);
    if (mode != kReducePerSample) *out.mutable_data_ptr<acc_t>() = total_of_rows(rows, nrows, mode);
  }
};

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

}  // namespace cpu
}  // namespace fused_vae
