"""Adam / AdamW (fused where the device supports it) and the learning-rate schedules."""

from __future__ import annotations

import math
from typing import NamedTuple

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


class FactorLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose plain :meth:`step` (no ``epoch``) sets each group's lr to
    ``base_lr * factor(last_epoch)`` directly: the same values and state dict as ``LambdaLR``,
    without its per-step checks and context managers (a trainer step on a small model is a
    few milliseconds, and those cost tens of microseconds)."""

    def step(self, epoch: int | None = None) -> None:
        """Advances one step (``epoch`` given: ``LambdaLR.step(epoch)``)."""
        if epoch is not None:
            super().step(epoch)
            return
        self._step_count += 1
        self.last_epoch += 1
        self._get_lr_called_within_step = False  # (LambdaLR.step leaves it so: the same state dict)
        last = []
        for group, factor, base in zip(self.optimizer.param_groups, self.lr_lambdas, self.base_lrs):
            lr = base * factor(self.last_epoch)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
                last.append(group["lr"].clone())
            else:
                group["lr"] = lr
                last.append(lr)
        self._last_lr = last


def make_scheduler(optimizer, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float,
                   steps_per_epoch: int = 1):
    """A :class:`FactorLR` (a ``LambdaLR``) applying :func:`lr_factor` (its state dict holds only numbers)."""
    kwargs = dict(total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, min_ratio=min_ratio,
                  steps_per_epoch=steps_per_epoch)
    lr_factor(0, **kwargs)
    return FactorLR(optimizer, lambda step: lr_factor(step, **kwargs))


class _FusedState(NamedTuple):
    """What :class:`DirectAdam` gathers once: the kernel, the param group, the state lists, the
    parameters' own step tensors and the shared step counter they follow."""

    kernel: object
    group: dict
    exp_avgs: list
    exp_avg_sqs: list
    param_steps: list
    counter: torch.Tensor


class DirectAdam:
    """Applies a fused Adam/AdamW ``optimizer``'s update by calling torch's fused kernel on
    state lists gathered once, bypassing ``optimizer.step()``'s per-step wrappers (hooks,
    profiler ranges, grouping by device): the same kernel with the same arguments, so the
    same bits and the same state (``optimizer.state_dict()`` is unchanged in form).

    The parameters share one step counter (their steps are equal when the lists are
    gathered), advanced once per update instead of once per parameter; the parameters' own
    ``step`` tensors are brought up to date before ``optimizer.state_dict()`` and before any
    ``optimizer.step()`` this class makes. While it drives an optimizer, step that optimizer
    only through it.

    It falls back to ``optimizer.step()`` whenever the fast path does not apply: an
    optimizer that is not fused, several param groups, amsgrad/maximize/capturable/
    differentiable, step hooks, a grad scaler or ``found_inf``, parameters on several
    devices or dtypes, a parameter without a gradient, parameters at different steps, or
    state not yet made (the first step, which ``optimizer.step()`` initialises; the lists are
    gathered after it, and again after ``optimizer.load_state_dict``).

    Args:
        optimizer: a ``torch.optim.Adam``/``AdamW``; params: its parameters, in order.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]):
        self.optimizer, self.params = optimizer, list(params)
        self._lists = None
        optimizer.register_state_dict_pre_hook(lambda opt: self._sync_steps())
        optimizer.register_load_state_dict_post_hook(lambda opt: self._forget())

    def _gather(self):
        opt = self.optimizer
        if len(opt.param_groups) != 1 or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
            return None
        g = opt.param_groups[0]
        if (not g.get("fused") or g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"]
                or getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None
                or any(isinstance(g[k], torch.Tensor) for k in ("lr", "weight_decay", "eps"))
                or any(isinstance(b, torch.Tensor) for b in g["betas"]) or len(g["params"]) != len(self.params)
                or any(a is not b for a, b in zip(g["params"], self.params))
                or len({(p.device, p.dtype) for p in self.params}) != 1):
            return None
        states = [opt.state.get(p, {}) for p in self.params]
        if not all("exp_avg" in s for s in states):
            return None
        steps = [s["step"] for s in states]
        if not all(torch.equal(s, steps[0]) for s in steps[1:]):
            return None
        decoupled = g.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))
        kernel = getattr(torch, "_fused_adamw_" if decoupled else "_fused_adam_", None)
        if kernel is None:  # a torch without these (private) kernels: optimizer.step() always
            return None
        return _FusedState(kernel, g, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps,
                           steps[0].clone())

    def _sync_steps(self) -> None:
        """Writes the shared step counter into every parameter's ``step`` tensor."""
        if self._lists is not None:
            with torch.no_grad():
                for s in self._lists.param_steps:
                    s.copy_(self._lists.counter)

    def _forget(self) -> None:
        self._lists = None

    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """One update with the parameters' current ``.grad``, divided by ``grad_scale`` (a 0-d
        float32 tensor on their device, e.g. a clipping divisor) when given: inside the fused
        kernel, else in place before ``optimizer.step()`` (the same division, the same bits)."""
        from torch.optim import optimizer as _optimizer

        grads = [p.grad for p in self.params]
        if (self._lists is None or any(g is None for g in grads) or _optimizer._global_optimizer_pre_hooks
                or _optimizer._global_optimizer_post_hooks):
            self._sync_steps()
            if grad_scale is not None:
                with torch.no_grad():
                    torch._foreach_div_([g for g in grads if g is not None], grad_scale)
            self.optimizer.step()
            self._lists = self._gather()
            return
        st, g = self._lists, self._lists.group
        beta1, beta2 = g["betas"]
        with torch.no_grad():
            st.counter.add_(1)
            st.kernel(self.params, grads, st.exp_avgs, st.exp_avg_sqs, [], [st.counter] * len(self.params),
                      amsgrad=False, lr=g["lr"], beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"],
                      eps=g["eps"], maximize=False, grad_scale=grad_scale, found_inf=None)
