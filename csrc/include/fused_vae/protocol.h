// The fused ops' protocol constants, shared by host and device code (torch-free).
// fused_vae/backends/protocol.py holds the same numbers; docs/design.md describes them.
#pragma once

#include <cstdint>

namespace fused_vae {

// How the KL output is produced; the integer values are part of the op schema.
enum KlMode : int64_t {
  kKlSkip = 0,        // no KL output (reparameterize)
  kKlElementwise = 1, // mu's shape and dtype
  kKlPerSample = 2,   // [B], accumulation dtype
  kKlSum = 3,         // scalar, accumulation dtype
  kKlBatchMean = 4,   // scalar sum / B, accumulation dtype
};

}  // namespace fused_vae
