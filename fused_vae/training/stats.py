"""Training statistics kept on the device: one preallocated row per step of a logging window,
written with O(1) ops per step and read back (means, the NaN/Inf check) only when asked."""

from __future__ import annotations

import math

import torch

from ..models.base import LOSS_STATS

# Per-step statistics, in row order: the batch means of ``VAE.forward(..., return_stats=True)``
# (:data:`~fused_vae.models.base.LOSS_STATS`) and the global gradient norm before clipping.
BATCH_STATS = LOSS_STATS
STAT_NAMES = (*BATCH_STATS, "grad_norm")


class StatsWindow:
    """Per-step statistics of the steps since the last :meth:`means`, in a ``[size, S + 1]``
    float64 buffer on ``device``; step ``t`` (1-based) owns row ``(t - 1) % size``.

    A step writes the sums of ``batch_stats`` over its micro-batches (and processes)
    into ``batch_row(t)`` and its gradient norm into ``norm_row(t)``; ``divisor`` (the number
    of micro-batches in a global batch) turns those sums into batch means when read. Only
    :meth:`means` and :meth:`first_non_finite` read values back (one host synchronisation each).

    Args:
        device: where the buffer lives.
        size: rows; a window may hold at most ``size`` steps and may not cross a multiple of
            ``size`` (the trainer reads it every ``log_every`` steps, and passes ``log_every``).
        divisor: micro-batches per global batch (>= 1).
        step: the (1-based) step before the window's first.
        batch_stats: the names of a step's batch statistics, in row order (the model's
            ``stat_names``; :data:`BATCH_STATS` for one-layer models).
    """

    def __init__(self, device: torch.device, size: int, divisor: int = 1, step: int = 0,
                 batch_stats: tuple[str, ...] = BATCH_STATS):
        self.names = (*batch_stats, "grad_norm")
        self.n_batch = len(batch_stats)
        self.rows = torch.zeros(size, len(self.names), dtype=torch.float64, device=device)
        self.size, self.divisor = size, divisor
        # Views made once, so that a step creates no tensor to reach its row.
        self._batch_rows = self.rows[:, :self.n_batch].unbind(0)
        self._norm_rows = self.rows[:, self.n_batch].unbind(0)
        self.start = self.end = self.checked = step
        self._bad: tuple[int, dict[str, float]] | None = None

    def _slot(self, step: int) -> int:
        if not self.start < step <= self.start + self.size or (step - 1) // self.size != self.start // self.size:
            raise RuntimeError(f"step {step} does not fit the statistics window after step {self.start} "
                               f"(size {self.size}); read it with means() first")
        return (step - 1) % self.size

    def batch_row(self, step: int) -> torch.Tensor:
        """The ``[S]`` view where (1-based) step ``step`` sums its batch statistics."""
        return self._batch_rows[self._slot(step)]

    def norm_row(self, step: int) -> torch.Tensor:
        """The 0-d view where step ``step`` writes its gradient norm."""
        return self._norm_rows[self._slot(step)]

    def advance(self, step: int) -> None:
        """Marks steps up to ``step`` as written."""
        self._slot(step)
        self.end = step

    @property
    def count(self) -> int:
        """Steps in the window."""
        return self.end - self.start

    def _block(self, first: int, last: int) -> torch.Tensor:
        """Rows of steps ``first + 1 .. last`` as batch means (a copy)."""
        lo = first % self.size
        block = self.rows[lo:lo + last - first].clone()
        block[:, :self.n_batch] /= self.divisor
        return block

    def first_non_finite(self) -> tuple[int, dict[str, float]] | None:
        """``(step, stats)`` of the first step with a NaN/Inf statistic since construction,
        or None (one host synchronisation, over the steps not checked before)."""
        if self._bad is None and self.end > self.checked:
            if math.isfinite(self.rows[self.checked % self.size:(self.end - 1) % self.size + 1].sum().item()):
                self.checked = self.end
                return None
            block = self._block(self.checked, self.end)
            i = int((~torch.isfinite(block).all(1)).nonzero()[0, 0])
            self._bad = (self.checked + i + 1, dict(zip(self.names, block[i].tolist())))
        return self._bad

    def means(self) -> dict[str, float]:
        """Means over the window's steps as Python floats (one host synchronisation); then
        starts the next window after the last step written."""
        block = self._block(self.start, self.end)
        out = dict(zip(self.names, (block.sum(0) / max(self.count, 1)).tolist()))
        self.start = self.checked = self.end
        return out
