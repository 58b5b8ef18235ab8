"""Training statistics kept on the device: summed per logging window, checked for NaN/Inf
without a host synchronisation each step."""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import torch


@dataclass
class StepStats:
    """One optimizer step's batch means (0-d float64 tensors on the training device).

    ``bound`` is the bound being trained (the ELBO, or L_K for the IWAE objective);
    ``elbo`` is always the (K-sample mean) ELBO, so the two can be compared.
    """

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    elbo: torch.Tensor
    bound: torch.Tensor
    grad_norm: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """The fields as one ``[6]`` float64 tensor, in declaration order."""
        return torch.stack([t.detach().to(torch.float64).reshape(()) for t in astuple(self)])


STAT_NAMES = tuple(f.name for f in fields(StepStats))


class StatsWindow:
    """Sums :class:`StepStats` over a logging window on ``device`` and remembers the first
    step whose statistics were not finite, all without synchronising with the host; only
    :meth:`means` and :meth:`first_non_finite` read values back.
    """

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=device)
        self.count = 0
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self._bad_stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=device)

    def add(self, stats: StepStats, step: int) -> None:
        """Adds the statistics of (1-based) optimizer step ``step``."""
        values = stats.stacked()
        self.sums += values
        self.count += 1
        first = (~torch.isfinite(values).all()) & (self._bad_step < 0)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_stats = torch.where(first, values, self._bad_stats)

    def first_non_finite(self) -> tuple[int, dict[str, float]] | None:
        """``(step, stats)`` of the first step with a NaN/Inf statistic since construction,
        or None (one host synchronisation)."""
        step = int(self._bad_step.item())
        if step < 0:
            return None
        return step, dict(zip(STAT_NAMES, self._bad_stats.tolist()))

    def means(self) -> dict[str, float]:
        """Means over the window as Python floats (one host synchronisation); then restarts the window."""
        out = dict(zip(STAT_NAMES, (self.sums / max(self.count, 1)).tolist()))
        self.sums.zero_()
        self.count = 0
        return out
