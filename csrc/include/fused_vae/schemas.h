// The op schemas of every fused_vae op family (docs/design.md section 8), from their
// argument list on: fused_vae/backends/protocol.py derives the same strings from its OPS
// table and tests/test_op_protocol.py compares them with the registered ops.
//
// FV_FOR_EACH_OP(X) calls X(name, forward schema, backward schema) once per family; each
// backend defines or implements <prefix><name>_fwd / _bwd with them (csrc/ops.cpp for the
// extension, csrc/emulate/emulated_ops.cpp for the emulated CUDA device).
#pragma once

#define FV_REPARAM_KL_FWD_SCHEMA                                                                  \
  "(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, Tensor seed, int num_samples, " \
  "int kl_mode, int logq_mode, float? clamp_lo, float? clamp_hi) -> (Tensor, Tensor, Tensor)"
#define FV_REPARAM_KL_BWD_SCHEMA                                                                    \
  "(Tensor? grad_z, Tensor? grad_kl, Tensor? grad_logq, Tensor mu, Tensor logvar, Tensor? prior_mu, "  \
  "Tensor? prior_logvar, Tensor seed, int num_samples, int kl_mode, int logq_mode, float? clamp_lo, " \
  "float? clamp_hi) -> (Tensor, Tensor, Tensor, Tensor)"
#define FV_LOG_PROB_FWD_SCHEMA \
  "(Tensor x, Tensor mu, Tensor logvar, int reduction, float? clamp_lo, float? clamp_hi) -> Tensor"
#define FV_LOG_PROB_BWD_SCHEMA                                                                    \
  "(Tensor? grad_log_prob, Tensor x, Tensor mu, Tensor logvar, int reduction, float? clamp_lo, " \
  "float? clamp_hi) -> (Tensor, Tensor, Tensor)"

#define FV_FOR_EACH_OP(X)                                                    \
  X(reparam_kl, FV_REPARAM_KL_FWD_SCHEMA, FV_REPARAM_KL_BWD_SCHEMA)          \
  X(gaussian_log_prob, FV_LOG_PROB_FWD_SCHEMA, FV_LOG_PROB_BWD_SCHEMA)
