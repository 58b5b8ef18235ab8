// Host-side interface of the CUDA kernels of fused_vae::gaussian_log_prob_fwd / _bwd:
// log N(x; mu, exp(logvar)) per element, reduced as `reduction` says (elementwise.h has
// the math). No torch dependency (see launch_common.h).
#pragma once

#include <cstdint>

#include "fused_vae/elementwise.h"
#include "launch_common.h"

namespace fused_vae {
namespace cuda {

// The inputs, one pointer each, of both directions' params.
template <typename T>
struct LogProbInputs {
  const T* x = nullptr;
  const T* mu = nullptr;
  const T* lv = nullptr;
};

template <typename T>
struct LogProbParams : LogProbInputs<T> {
  T* out_elem = nullptr;                    // [N] when reduction == kReduceElementwise
  acc_type_t<T>* out = nullptr;             // [B] (per_sample) or [] (sum / batchmean)
  acc_type_t<T>* workspace = nullptr;       // reduced_workspace_elems<T>(B, D, reduction) elements
  int64_t N = 0, B = 0, D = 0;
  int64_t reduction = kReduceElementwise;
  ClampSpec clamp;
};

template <typename T>
struct LogProbGradParams : LogProbInputs<T> {
  ReducedGrad<T> grad;  // mode = reduction; given (the glue returns zeros without it)
  T* grad_x = nullptr;  // [N] each
  T* grad_mu = nullptr;
  T* grad_lv = nullptr;
  int64_t N = 0, B = 0, D = 0;
  ClampSpec clamp;
};

// The forward's tiles: row-aligned when the output is reduced.
template <typename T>
inline RowTiles log_prob_tiles(int64_t B, int64_t D, int64_t N, int64_t reduction) {
  return fwd_tiles<T>(B, D, N, reduction >= kReducePerSample);
}

FV_CUDA_DECLARE_LAUNCHERS(log_prob, LogProbParams, LogProbGradParams)

}  // namespace cuda
}  // namespace fused_vae
