"""Adam / AdamW (fused where the device supports it) and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "linear", "iwae")
# The IWAE paper's schedule: stage i lasts 3^i epochs at lr * 10^(-i / IWAE_DECADE_STAGES).
IWAE_DECADE_STAGES = 7


def make_optimizer(params, *, lr: float, weight_decay: float, eps: float = 1e-8) -> tuple[torch.optim.AdamW, bool]:
    """AdamW over ``params`` (betas 0.9, 0.999; with ``weight_decay=0`` it is Adam), with
    ``fused=True`` when torch has a fused kernel for their device (CUDA, and CPU in recent
    torch), else the default implementation.

    Returns ``(optimizer, fused)``.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=True), True
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay), False


def optimizer_name(weight_decay: float, *, fused: bool) -> str:
    """What :func:`make_optimizer` builds, in words: ``"Adam"`` without weight decay (AdamW with
    ``weight_decay=0`` is Adam), else ``"AdamW (weight decay X)"``; ``", fused"`` when fused."""
    name = "Adam" if weight_decay == 0 else f"AdamW (weight decay {weight_decay:g})"
    return f"{name}, fused" if fused else name


def iwae_stage(epoch: int) -> int:
    """The stage ``i`` of the IWAE paper's schedule that (0-based) ``epoch`` falls in: stage
    ``i`` covers epochs ``(3^i - 1) / 2`` to ``(3^(i+1) - 1) / 2 - 1``."""
    i = 0
    while epoch >= iwae_schedule_epochs(i + 1):
        i += 1
    return i


def iwae_schedule_epochs(stages: int) -> int:
    """Epochs in the first ``stages`` stages of the IWAE schedule: ``(3^stages - 1) / 2``
    (3280 for the paper's 8 stages, 121 for stages 0..4)."""
    return (3**stages - 1) // 2


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float,
              steps_per_epoch: int = 1) -> float:
    """Multiplier of the peak learning rate at (0-based) ``step``: linear warm-up over
    ``warmup_steps``, then ``constant``, ``cosine`` or ``linear`` decay to ``min_ratio`` at
    ``total_steps``, or ``iwae``: ``10^(-i/7)`` in stage ``i`` of :func:`iwae_stage` (epoch
    ``step // steps_per_epoch``; ``total_steps`` and ``min_ratio`` do not apply).

    Raises:
        ValueError: unknown schedule.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "iwae":
        return 10.0 ** (-iwae_stage(step // steps_per_epoch) / IWAE_DECADE_STAGES)
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * t
    raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def make_scheduler(optimizer, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float,
                   steps_per_epoch: int = 1):
    """A ``LambdaLR`` applying :func:`lr_factor` (its state dict holds only numbers)."""
    kwargs = dict(total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, min_ratio=min_ratio,
                  steps_per_epoch=steps_per_epoch)
    lr_factor(0, **kwargs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **kwargs))
