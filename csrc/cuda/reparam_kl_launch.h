// Host-side interface of the CUDA kernels of fused_vae::reparam_kl_fwd / _bwd (the
// sample, its KL and its log density; elementwise.h has the math).
//
// No torch dependency (see launch_common.h). z is [S, N]; element i of z's flat index
// uses Philox group i / 4, lane i % 4. The log density is [S, B]: row (s, b) sums sample
// s over row b of the [B, D] view.
#pragma once

#include <cstdint>

#include "fused_vae/elementwise.h"
#include "launch_common.h"

namespace fused_vae {
namespace cuda {

template <typename T>
struct FwdParams {
  using acc_t = acc_type_t<T>;
  const T* mu = nullptr;
  const T* lv = nullptr;
  const T* pm = nullptr;       // prior mu / logvar [N], both null without a prior
  const T* pl = nullptr;
  T* z = nullptr;              // [S, N], null when num_samples == 0
  T* kl_elem = nullptr;        // [N] when kl_mode == kReduceElementwise
  acc_t* kl_out = nullptr;     // [B] (per_sample) or [] (sum / batchmean)
  acc_t* workspace = nullptr;  // the KL's reduced_workspace_elems<T>(B, D, kl_mode) elements
  acc_t* logq_out = nullptr;       // [S, B] when logq_mode != kLogqSkip
  acc_t* logq_partials = nullptr;  // [S * B, chunks] when logq_mode != 0 and rows are cut into chunks
  const int64_t* seed_ptr = nullptr;  // device pointer to the seed, or null:
  uint64_t seed_value = 0;            // then this value is used
  int64_t N = 0, B = 0, D = 0;
  int64_t num_samples = 0;
  int64_t kl_mode = kReduceSkip;
  int64_t logq_mode = kLogqSkip;
  ClampSpec clamp;
};

template <typename T>
struct BwdParams {
  using acc_t = acc_type_t<T>;
  const T* grad_z = nullptr;  // [S, N], or one element when grad_z_bcast
  bool grad_z_bcast = false;
  ReducedGrad<T> grad_kl;            // mode = kl_mode; elem / red null when absent
  const acc_t* grad_logq = nullptr;  // [S, B], or one element when grad_logq_bcast; null when absent
  bool grad_logq_bcast = false;
  const T* mu = nullptr;
  const T* lv = nullptr;
  const T* pm = nullptr;  // null without a prior
  const T* pl = nullptr;
  T* grad_mu = nullptr;  // [N]
  T* grad_lv = nullptr;  // [N]
  T* grad_pm = nullptr;  // [N] with a prior, else null
  T* grad_pl = nullptr;
  const int64_t* seed_ptr = nullptr;
  uint64_t seed_value = 0;
  int64_t N = 0, B = 0, D = 0;
  int64_t num_samples = 0;
  int64_t logq_mode = kLogqSkip;
  ClampSpec clamp;
};

// The forward's tiles: row-aligned when the KL is reduced or the log density is made.
template <typename T>
inline RowTiles reparam_tiles(int64_t B, int64_t D, int64_t N, int64_t kl_mode, int64_t logq_mode) {
  return fwd_tiles<T>(B, D, N, kl_mode >= kReducePerSample || logq_mode != kLogqSkip);
}

// acc_t elements of the forward's scratch: the KL's (FwdParams::workspace), then the log
// density's [S * B, chunks] partials when rows are cut into chunks (logq_partials).
struct ReparamWorkspace {
  int64_t kl_elems = 0;
  int64_t logq_elems = 0;
};

template <typename T>
inline ReparamWorkspace reparam_workspace(int64_t B, int64_t D, int64_t num_samples, int64_t kl_mode,
                                          int64_t logq_mode) {
  ReparamWorkspace w;
  w.kl_elems = reduced_workspace_elems<T>(B, D, kl_mode);
  if (logq_mode != kLogqSkip) {
    const RowTiles g = row_tiles<T>(B, D);
    w.logq_elems = g.chunks > 1 ? num_samples * B * g.chunks : 0;
  }
  return w;
}

FV_CUDA_DECLARE_LAUNCHERS(reparam_kl, FwdParams, BwdParams)

}  // namespace cuda
}  // namespace fused_vae
