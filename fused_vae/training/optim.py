"""AdamW (fused where the device supports it) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch


def make_optimizer(params, *, lr: float, weight_decay: float) -> tuple[torch.optim.AdamW, bool]:
    """AdamW over ``params``, with ``fused=True`` when torch has a fused kernel for their
    device (CUDA, and CPU in recent torch), else the default implementation.

    Returns ``(optimizer, fused)``.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True), True
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), False


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at (0-based) ``step``: linear warm-up over
    ``warmup_steps``, then ``constant``, ``cosine`` or ``linear`` decay to ``min_ratio`` at
    ``total_steps``.

    Raises:
        ValueError: unknown schedule.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * t
    raise ValueError(f"lr_schedule must be constant, cosine or linear, got {schedule!r}")


def make_scheduler(optimizer, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float):
    """A ``LambdaLR`` applying :func:`lr_factor` (its state dict holds only numbers)."""
    lr_factor(0, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, min_ratio=min_ratio)

    def fn(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule,
                         min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
