"""What every backend provides to the dispatcher."""

from __future__ import annotations

from typing import Protocol

import torch


class Backend(Protocol):
    """A backend computes the fused op for tensors of some device types.

    ``reparam_kl`` has the contract of ``torch.ops.fused_vae.reparam_kl_fwd`` and is
    differentiable with respect to mu and logvar.
    """

    name: str

    def unavailable_reason(self, device_type: str) -> str | None:
        """None when the backend can run on tensors of ``device_type``, else why not."""
        ...

    def reparam_kl(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        seed: torch.Tensor,
        num_samples: int,
        kl_mode: int,
        clamp_lo: float | None,
        clamp_hi: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
