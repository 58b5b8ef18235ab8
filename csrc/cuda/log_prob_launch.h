// Host-side interface of the CUDA kernels of fused_vae::gaussian_log_prob_fwd / _bwd:
// log N(x; mu, exp(logvar)) per element, reduced as `reduction` says (elementwise.h has
// the math). No torch dependency (see launch_common.h).
#pragma once

#include <cstdint>

#include "fused_vae/elementwise.h"
#include "launch_common.h"

namespace fused_vae {
namespace cuda {

template <typename T>
struct LogProbParams {
  using acc_t = acc_type_t<T>;
  const T* x = nullptr;
  const T* mu = nullptr;
  const T* lv = nullptr;
  T* out_elem = nullptr;       // [N] when reduction == kReduceElementwise
  acc_t* out = nullptr;        // [B] (per_sample) or [] (sum / batchmean)
  acc_t* workspace = nullptr;  // reduced_workspace_elems<T>(B, D, reduction) elements
  int64_t N = 0, B = 0, D = 0;
  int64_t reduction = kReduceElementwise;
  ClampSpec clamp;
};

template <typename T>
struct LogProbGradParams {
  ReducedGrad<T> grad;  // mode = reduction; given (the glue returns zeros without it)
  const T* x = nullptr;
  const T* mu = nullptr;
  const T* lv = nullptr;
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

// Launch on target.stream. Requires N > 0. Returns the first error of the occupancy
// queries and launches.
template <typename T>
cudaError_t launch_log_prob_fwd(const LogProbParams<T>& p, const LaunchTarget& target);
template <typename T>
cudaError_t launch_log_prob_bwd(const LogProbGradParams<T>& p, const LaunchTarget& target);

#define FV_CUDA_DECLARE(T)                                                                        \
  extern template cudaError_t launch_log_prob_fwd<T>(const LogProbParams<T>&, const LaunchTarget&); \
  extern template cudaError_t launch_log_prob_bwd<T>(const LogProbGradParams<T>&, const LaunchTarget&);
FV_CUDA_FOR_EACH_TYPE(FV_CUDA_DECLARE)
#undef FV_CUDA_DECLARE

}  // namespace cuda
}  // namespace fused_vae
