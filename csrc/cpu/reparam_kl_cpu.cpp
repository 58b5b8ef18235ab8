// CPU implementation of fused_vae::reparam_kl_fwd / reparam_kl_bwd.
//
// Tiles and reductions: docs/design.md section 9 (the CPU row of its table; tiles of at
// most kTile elements run in parallel with at::parallel_for, so results do not depend on
// the number of threads). Within a tile the noise is made into a small buffer (explicit
// AVX-512/AVX2 Philox, philox_simd.h) and the element loop reads mu/logvar once and
// writes z/KL once. Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at load time (target_clones).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fused_vae/elementwise.h"
#include "fused_vae/op_common.h"
#include "fused_vae/philox.h"
#include "philox_simd.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && __GNUC__ >= 11
#define FV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FV_CLONES
#endif

namespace fused_vae {
namespace {

// Everything the per-dtype clones call must be inlined into them to get their ISA.
#define FV_INLINE inline __attribute__((always_inline))

constexpr int64_t kTile = 2048;
constexpr int64_t kLanes = 16;   // independent partial sums per reduction
constexpr int64_t kBatch = 64;   // Philox groups generated per inner batch

// Writes the normals of groups [g0, g0 + ngroups) to out, 4 per group, lane-minor.
// Philox runs in explicit SIMD (philox_simd.h); Box-Muller is vectorised by the compiler.
FV_CLONES void normals_for_groups(uint64_t seed, uint64_t g0, int64_t ngroups, float* out) {
  alignas(64) uint32_t r0[kBatch], r1[kBatch], r2[kBatch], r3[kBatch];
  alignas(64) float n0[kBatch], n1[kBatch], n2[kBatch], n3[kBatch];
  const cpu::PhiloxBatchFn philox = cpu::philox_batch();
  for (int64_t base = 0; base < ngroups; base += kBatch) {
    const int64_t cnt = std::min(kBatch, ngroups - base);
    philox(seed, g0 + static_cast<uint64_t>(base), cnt, r0, r1, r2, r3);
    for (int64_t k = 0; k < cnt; ++k) {
      box_muller(uint_to_uniform(r0[k]), uint_to_uniform(r1[k]), n0[k], n1[k]);
      box_muller(uint_to_uniform(r2[k]), uint_to_uniform(r3[k]), n2[k], n3[k]);
    }
    float* dst = out + 4 * base;
    for (int64_t k = 0; k < cnt; ++k) {
      dst[4 * k + 0] = n0[k];
      dst[4 * k + 1] = n1[k];
      dst[4 * k + 2] = n2[k];
      dst[4 * k + 3] = n3[k];
    }
  }
}

// Normals for flat stream positions [first, first + n): returns a pointer into buf,
// which must hold n + 8 floats.
FV_INLINE const float* stream_normals(uint64_t seed, uint64_t first, int64_t n, float* buf) {
  const uint64_t g0 = first / 4;
  const int64_t lane0 = static_cast<int64_t>(first % 4);
  const int64_t ngroups = (lane0 + n + 3) / 4;
  normals_for_groups(seed, g0, ngroups, buf);
  return buf + lane0;
}

// A tile: flat elements [j0, j0 + len) of mu, starting at row `row0`.
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

template <typename scalar_t>
struct FwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* mu;
  const scalar_t* lv;
  scalar_t* z;            // null when no sample is drawn
  scalar_t* kl_elem;      // null unless kl_mode == elementwise
  acc_t* row_kl;          // [B] per-row sums (reduced modes), null otherwise
  acc_t* chunk_kl;        // [B * chunks_per_row] when rows are split
  ClampSpec clamp;
  uint64_t seed;
  int64_t num_samples;
};

// Forward of one tile for sample s; the KL is produced with sample 0.
template <typename scalar_t>
FV_INLINE void forward_tile(const FwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t,
                         int64_t s) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  alignas(64) float eps_buf[kTile + 8];
  alignas(64) acc_t kl_buf[kTile];
  const scalar_t* __restrict mu = a.mu + t.j0;
  const scalar_t* __restrict lv = a.lv + t.j0;
  const ClampSpec clamp = a.clamp;
  const bool want_kl = s == 0 && (a.kl_elem != nullptr || a.row_kl != nullptr);
  const int64_t n = t.len;

  if (a.z != nullptr) {
    const int64_t flat0 = s * plan.s.N + t.j0;
    const float* __restrict eps = stream_normals(a.seed, static_cast<uint64_t>(flat0), n, eps_buf);
    scalar_t* __restrict z = a.z + flat0;
    if (want_kl) {
      for (int64_t k = 0; k < n; ++k) {
        const acc_t m = io::load(mu, k);
        const acc_t l = clamp.apply(io::load(lv, k));
        const acc_t sd = op_exp(acc_t(0.5) * l);
        io::store(z, k, m + sd * static_cast<acc_t>(eps[k]));
        kl_buf[k] = kl_term(m, l, sd);
      }
    } else {
      for (int64_t k = 0; k < n; ++k) {
        const acc_t m = io::load(mu, k);
        const acc_t l = clamp.apply(io::load(lv, k));
        const acc_t sd = op_exp(acc_t(0.5) * l);
        io::store(z, k, m + sd * static_cast<acc_t>(eps[k]));
      }
    }
  } else if (want_kl) {
    for (int64_t k = 0; k < n; ++k) {
      const acc_t m = io::load(mu, k);
      const acc_t l = clamp.apply(io::load(lv, k));
      kl_buf[k] = kl_term(m, l, op_exp(acc_t(0.5) * l));
    }
  }
  if (!want_kl) return;

  if (a.kl_elem != nullptr) {
    scalar_t* __restrict out = a.kl_elem + t.j0;
    for (int64_t k = 0; k < n; ++k) io::store(out, k, kl_buf[k]);
    return;
  }
  if (t.chunk >= 0) {
    a.chunk_kl[t.row0 * plan.chunks_per_row + t.chunk] = lane_sum(kl_buf, n);
    return;
  }
  const int64_t D = plan.s.D;
  for (int64_t r = 0; r * D < n; ++r) a.row_kl[t.row0 + r] = lane_sum(kl_buf + r * D, D);
}

#define FV_FWD_TILE(scalar_t, suffix)                                                    \
  FV_CLONES void forward_tile_##suffix(const FwdArgs<scalar_t>& a, const TilePlan& plan, \
                                       const Tile& t, int64_t s) {                       \
    forward_tile<scalar_t>(a, plan, t, s);                                               \
  }                                                                                      \
  inline void forward_tile_dispatch(const FwdArgs<scalar_t>& a, const TilePlan& plan,    \
                                    const Tile& t, int64_t s) {                          \
    forward_tile_##suffix(a, plan, t, s);                                                \
  }
FV_FWD_TILE(float, f32)
FV_FWD_TILE(double, f64)
FV_FWD_TILE(at::Half, f16)
FV_FWD_TILE(at::BFloat16, bf16)

// Enough elements per task that the scheduling overhead stays small.
inline int64_t grain_tiles(const TilePlan& plan) {
  const int64_t avg = plan.num_tiles > 0 ? std::max<int64_t>(1, plan.s.N / plan.num_tiles) : 1;
  return std::max<int64_t>(1, (4 * kTile) / avg);
}

uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.device().is_cpu(), "fused_vae: seed must be a CPU tensor for CPU inputs");
  return static_cast<uint64_t>(seed.item<int64_t>());
}

std::tuple<at::Tensor, at::Tensor> reparam_kl_fwd_cpu(const at::Tensor& mu_in,
                                                      const at::Tensor& logvar_in,
                                                      const at::Tensor& seed, int64_t num_samples,
                                                      int64_t kl_mode,
                                                      c10::optional<double> clamp_lo,
                                                      c10::optional<double> clamp_hi) {
  check_common(mu_in, logvar_in, seed, num_samples, kl_mode);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const RowShape shape = row_shape(mu);
  const TilePlan plan(shape);
  at::Tensor z = alloc_z(mu, num_samples);
  at::Tensor kl = alloc_kl(mu, kl_mode);
  const bool reduced = kl_mode >= kKlPerSample;
  const at::ScalarType acc_type = reduced_kl_dtype(mu.scalar_type());
  at::Tensor chunk_kl;
  if (reduced && plan.chunks_per_row > 0) {
    chunk_kl = at::empty({shape.B * plan.chunks_per_row}, mu.options().dtype(acc_type));
  }
  const uint64_t seed_value = read_seed(seed);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Per-row sums go straight into kl for per_sample, else into a [B] buffer.
    std::vector<acc_t> row_buf(reduced && kl_mode != kKlPerSample ? shape.B : 0);
    acc_t* rows = !reduced ? nullptr : kl_mode == kKlPerSample ? kl.mutable_data_ptr<acc_t>() : row_buf.data();
    if (reduced && shape.N == 0) std::fill(rows, rows + shape.B, acc_t(0));  // rows without elements
    FwdArgs<scalar_t> a;
    a.mu = mu.const_data_ptr<scalar_t>();
    a.lv = logvar.const_data_ptr<scalar_t>();
    a.z = num_samples > 0 ? z.mutable_data_ptr<scalar_t>() : nullptr;
    a.kl_elem = kl_mode == kKlElementwise ? kl.mutable_data_ptr<scalar_t>() : nullptr;
    a.row_kl = rows;
    a.chunk_kl = chunk_kl.defined() ? chunk_kl.mutable_data_ptr<acc_t>() : nullptr;
    a.clamp = make_clamp(clamp_lo, clamp_hi);
    a.seed = seed_value;
    a.num_samples = num_samples;
    const int64_t passes = std::max<int64_t>(num_samples, 1);
    at::parallel_for(0, passes * plan.num_tiles, grain_tiles(plan), [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        forward_tile_dispatch(a, plan, plan.tile(w % plan.num_tiles), w / plan.num_tiles);
      }
    });
    if (!reduced) return;
    if (a.chunk_kl != nullptr) {
      at::parallel_for(0, shape.B, 64, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const acc_t* c = a.chunk_kl + b * plan.chunks_per_row;
          acc_t sum = 0;
          for (int64_t i = 0; i < plan.chunks_per_row; ++i) sum += c[i];
          rows[b] = sum;
        }
      });
    }
    if (kl_mode == kKlPerSample) return;
    double total = 0.0;  // fixed-order double accumulation of B partial sums
    for (int64_t b = 0; b < shape.B; ++b) total += static_cast<double>(rows[b]);
    if (kl_mode == kKlBatchMean) total /= static_cast<double>(shape.B);
    *kl.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total);
  });
  return {z, kl};
}

template <typename scalar_t>
struct BwdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad_z;     // [S, N] or null
  const scalar_t* grad_kl_elem;  // [N] or null
  const acc_t* grad_kl_row;   // [B] or null
  acc_t grad_kl_scalar;       // used when kl_mode is sum / batchmean
  bool has_grad_kl;
  const scalar_t* mu;
  const scalar_t* lv;
  scalar_t* grad_mu;
  scalar_t* grad_lv;
  ClampSpec clamp;
  uint64_t seed;
  int64_t num_samples;
};

template <typename scalar_t>
FV_INLINE void backward_tile(const BwdArgs<scalar_t>& a, const TilePlan& plan, const Tile& t) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = Io<scalar_t>;
  alignas(64) float eps_buf[kTile + 8];
  alignas(64) acc_t gz_sum[kTile];
  alignas(64) acc_t gz_eps_sum[kTile];
  alignas(64) acc_t gkl[kTile];
  const ClampSpec clamp = a.clamp;
  const int64_t n = t.len;
  const int64_t N = plan.s.N;
  const int64_t D = plan.s.D;

  if (!a.has_grad_kl) {
    for (int64_t k = 0; k < n; ++k) gkl[k] = 0;
  } else if (a.grad_kl_elem != nullptr) {
    const scalar_t* __restrict g = a.grad_kl_elem + t.j0;
    for (int64_t k = 0; k < n; ++k) gkl[k] = io::load(g, k);
  } else if (a.grad_kl_row != nullptr) {
    // Rows covered by this tile: whole rows, or one chunk of one row.
    const int64_t first_in_row = t.j0 - t.row0 * D;
    for (int64_t k = 0, row = t.row0, pos = first_in_row; k < n; ++row, pos = 0) {
      const int64_t m = std::min(n - k, D - pos);
      const acc_t g = a.grad_kl_row[row];
      for (int64_t i = 0; i < m; ++i) gkl[k + i] = g;
      k += m;
    }
  } else {
    for (int64_t k = 0; k < n; ++k) gkl[k] = a.grad_kl_scalar;
  }

  const scalar_t* __restrict mu = a.mu + t.j0;
  const scalar_t* __restrict lv = a.lv + t.j0;
  scalar_t* __restrict gmu = a.grad_mu + t.j0;
  scalar_t* __restrict glv = a.grad_lv + t.j0;
  if (a.grad_z != nullptr && a.num_samples == 1) {
    // One sample: a single pass, no accumulators.
    const float* __restrict eps = stream_normals(a.seed, static_cast<uint64_t>(t.j0), n, eps_buf);
    const scalar_t* __restrict gz = a.grad_z + t.j0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t m = io::load(mu, k);
      const acc_t raw = io::load(lv, k);
      const acc_t l = clamp.apply(raw);
      const acc_t sd = op_exp(acc_t(0.5) * l);
      const acc_t g = io::load(gz, k);
      io::store(gmu, k, g + gkl[k] * m);
      const acc_t gl = grad_logvar_term(sd, g * static_cast<acc_t>(eps[k]), gkl[k]);
      io::store(glv, k, clamp.passes(raw) ? gl : acc_t(0));
    }
    return;
  }
  for (int64_t k = 0; k < n; ++k) {
    gz_sum[k] = 0;
    gz_eps_sum[k] = 0;
  }
  if (a.grad_z != nullptr) {
    for (int64_t s = 0; s < a.num_samples; ++s) {
      const int64_t flat0 = s * N + t.j0;
      const float* __restrict eps = stream_normals(a.seed, static_cast<uint64_t>(flat0), n, eps_buf);
      const scalar_t* __restrict gz = a.grad_z + flat0;
      for (int64_t k = 0; k < n; ++k) {
        const acc_t g = io::load(gz, k);
        gz_sum[k] += g;
        gz_eps_sum[k] += g * static_cast<acc_t>(eps[k]);
      }
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    const acc_t m = io::load(mu, k);
    const acc_t raw = io::load(lv, k);
    const acc_t l = clamp.apply(raw);
    const acc_t sd = op_exp(acc_t(0.5) * l);
    io::store(gmu, k, gz_sum[k] + gkl[k] * m);
    const acc_t gl = grad_logvar_term(sd, gz_eps_sum[k], gkl[k]);
    io::store(glv, k, clamp.passes(raw) ? gl : acc_t(0));
  }
}

#define FV_BWD_TILE(scalar_t, suffix)                                                     \
  FV_CLONES void backward_tile_##suffix(const BwdArgs<scalar_t>& a, const TilePlan& plan, \
                                        const Tile& t) {                                  \
    backward_tile<scalar_t>(a, plan, t);                                                  \
  }                                                                                       \
  inline void backward_tile_dispatch(const BwdArgs<scalar_t>& a, const TilePlan& plan,    \
                                     const Tile& t) {                                     \
    backward_tile_##suffix(a, plan, t);                                                   \
  }
FV_BWD_TILE(float, f32)
FV_BWD_TILE(double, f64)
FV_BWD_TILE(at::Half, f16)
FV_BWD_TILE(at::BFloat16, bf16)

std::tuple<at::Tensor, at::Tensor> reparam_kl_bwd_cpu(
    const c10::optional<at::Tensor>& grad_z_in, const c10::optional<at::Tensor>& grad_kl_in,
    const at::Tensor& mu_in, const at::Tensor& logvar_in, const at::Tensor& seed,
    int64_t num_samples, int64_t kl_mode, c10::optional<double> clamp_lo,
    c10::optional<double> clamp_hi) {
  check_common(mu_in, logvar_in, seed, num_samples, kl_mode);
  check_grads(grad_z_in, grad_kl_in, mu_in, num_samples, kl_mode);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.contiguous();
  const bool has_gz = grad_z_in.has_value() && grad_z_in->defined();
  const bool has_gkl = grad_kl_in.has_value() && grad_kl_in->defined();
  const at::Tensor grad_z = has_gz ? grad_z_in->contiguous() : at::Tensor();
  const at::Tensor grad_kl = has_gkl ? grad_kl_in->contiguous() : at::Tensor();
  const RowShape shape = row_shape(mu);
  const TilePlan plan(shape);
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_lv = at::empty_like(grad_mu);
  const uint64_t seed_value = read_seed(seed);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BwdArgs<scalar_t> a;
    a.grad_z = has_gz ? grad_z.const_data_ptr<scalar_t>() : nullptr;
    a.has_grad_kl = has_gkl;
    a.grad_kl_elem = has_gkl && kl_mode == kKlElementwise ? grad_kl.const_data_ptr<scalar_t>() : nullptr;
    a.grad_kl_row = has_gkl && kl_mode == kKlPerSample ? grad_kl.const_data_ptr<acc_t>() : nullptr;
    a.grad_kl_scalar = 0;
    if (has_gkl && kl_mode >= kKlSum) {
      a.grad_kl_scalar = grad_kl.item<acc_t>();
      if (kl_mode == kKlBatchMean) a.grad_kl_scalar /= static_cast<acc_t>(shape.B);
    }
    a.mu = mu.const_data_ptr<scalar_t>();
    a.lv = logvar.const_data_ptr<scalar_t>();
    a.grad_mu = grad_mu.mutable_data_ptr<scalar_t>();
    a.grad_lv = grad_lv.mutable_data_ptr<scalar_t>();
    a.clamp = make_clamp(clamp_lo, clamp_hi);
    a.seed = seed_value;
    a.num_samples = num_samples;
    at::parallel_for(0, plan.num_tiles, grain_tiles(plan), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) backward_tile_dispatch(a, plan, plan.tile(t));
    });
  });
  return {grad_mu, grad_lv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_vae, CPU, m) {
  m.impl("reparam_kl_fwd", &reparam_kl_fwd_cpu);
  m.impl("reparam_kl_bwd", &reparam_kl_bwd_cpu);
}

}  // namespace fused_vae
