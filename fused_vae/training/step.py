"""The pieces of one optimizer step shared by the eager and the captured trainer step, and the
captured step itself: forward, backward, clipping, fused AdamW and the statistics as one
function with static shapes, no host synchronisation and all state in tensors, run as it is,
under ``torch.compile``, or replayed as a CUDA graph."""

from __future__ import annotations

import torch

from .batches import step_seeds
from .data import binarize_with_seed
from .stats import StatsWindow


def forward_backward(module, x: torch.Tensor, *, cfg, beta, seed: torch.Tensor, n_micro: int,
                     autocast) -> torch.Tensor:
    """Runs ``module`` (the VAE, or its DDP wrapper) on micro-batch ``x`` with ``cfg``'s objective
    and backpropagates its loss divided by ``n_micro``.

    Returns the micro-batch's statistics (the model's ``stat_names``) as a detached float32 tensor.
    """
    with autocast():
        loss, stats = module(x, beta=beta, free_bits=cfg.free_bits, objective=cfg.objective,
                             num_samples=cfg.train_samples, seed=seed, return_stats=True)
    (loss if n_micro == 1 else loss / n_micro).backward()
    return stats


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global (2-)norm of the gradients of ``params`` (0-d tensor), with no host
    synchronisation: the same ops as ``torch.nn.utils.get_total_norm(grads, foreach=True)``
    (same bits), called directly when all gradients share a device and dtype (the usual
    case), which skips that function's grouping and wrappers."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or len({(g.device, g.dtype) for g in grads}) != 1:
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def clip_divisor(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What the gradients are divided by to clip their global norm ``total_norm`` to
    ``max_norm`` (> 0): ``max(1, (total_norm + 1e-6) / max_norm)``, 0-d float32, the reciprocal
    of ``torch.nn.utils.clip_grad_norm_``'s factor. The fused Adam kernel applies it as its
    ``grad_scale`` while it reads the gradients, so clipping adds no pass over them."""
    return torch.clamp((total_norm.float() + 1e-6) / float(max_norm), min=1.0)


class CapturedStep:
    """One optimizer step of a single process as a capturable function.

    Everything a step reads or writes lives in tensors made once: the step counter
    ``step_t`` (0-based, advanced by the step itself), the micro-batches' dataset indices
    ``idx`` (``[grad_accum, B / grad_accum]``, filled by :meth:`__call__`), the KL weight
    ``beta_t``, the learning rate (a tensor in the optimizer's param group, written by the
    LR scheduler), the statistics rows of ``window``, ``found_inf`` and, with clipping, the
    fused kernel's ``grad_scale`` (:func:`clip_divisor`). The seeds of the noise and of
    dynamic binarization are derived on the device from ``(seed, step_t, micro-batch)`` by
    :func:`~fused_vae.training.batches.step_seeds`, the same seeds as the eager step's, so
    both stay fresh when a CUDA graph is replayed. ``found_inf`` is sticky: once a step's
    loss, statistics or gradient norm is NaN/Inf, fused AdamW applies no update from that
    step on, so the state stays the one before the bad step until the host reads the window.

    Args:
        model: the VAE (on ``device``); params: its trainable parameters.
        optimizer: fused AdamW over ``params``; its ``lr`` becomes a tensor here.
        train_x: the training set on the model's device.
        window: the :class:`~fused_vae.training.stats.StatsWindow` rows the step writes.
        cfg: the :class:`~fused_vae.training.config.TrainConfig`.
        micro_ids: global micro-batch ids of this process (``grad_accum`` of them).
        micro_batch: examples per micro-batch.
        step: the 0-based step the next call trains.
        autocast: a callable returning the autocast context.
        mode: ``"eager"`` (the function as it is), ``"compile"`` (``torch.compile``) or
            ``"cuda-graphs"`` (captured once, then replayed; CUDA only).

    Raises:
        ValueError: ``cuda-graphs`` on a device that is not CUDA, an optimizer that is not
            fused, or data that is not on the model's device.
    """

    def __init__(self, *, model, params, optimizer, train_x, window: StatsWindow, cfg, micro_ids, micro_batch: int,
                 step: int, autocast, mode: str = "eager"):
        device = next(model.parameters()).device
        if mode == "cuda-graphs" and device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device, got device {device}")
        if not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("--compile and --cuda-graphs need the fused Adam/AdamW kernel, which this torch "
                             f"lacks on {device.type}; train without them")
        if train_x.device != device:
            raise ValueError(f"--compile and --cuda-graphs need the training set in {device} memory (it is on "
                             f"{train_x.device}: larger than the trainer copies to a device)")
        self.model, self.params, self.optimizer, self.train_x = model, params, optimizer, train_x
        self.window, self.cfg, self.autocast, self.mode = window, cfg, autocast, mode
        self.step_t = torch.tensor(step, dtype=torch.int64, device=device)
        self.micro_ids = torch.tensor(micro_ids, dtype=torch.int64, device=device)
        self.idx = torch.zeros(len(micro_ids), micro_batch, dtype=torch.int64, device=device)
        self.beta_t = torch.zeros((), dtype=torch.float32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        # On CUDA the fused kernel reads a float32 lr tensor on the device; on a CPU float64
        # keeps the lr the eager step passes as a Python float, so both give the same bits.
        lr_dtype = torch.float64 if device.type == "cpu" else torch.float32
        for g in optimizer.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), dtype=lr_dtype, device=device)
            g["capturable"] = mode == "cuda-graphs"
        optimizer.found_inf = self.found_inf
        if cfg.grad_clip > 0:  # clipping as the fused kernel's grad_scale (clip_divisor)
            self.grad_scale = torch.ones((), dtype=torch.float32, device=device)
            optimizer.grad_scale = self.grad_scale
        self._fn = torch.compile(self._step) if mode == "compile" else self._step
        self._graph = None

    def _step(self) -> None:
        cfg = self.cfg
        if self._graph is None:  # a CUDA graph's backward writes the same gradient buffers each replay
            self.optimizer.zero_grad(set_to_none=True)
        n_micro = self.idx.shape[0]
        noise_seeds, binarize_seeds = step_seeds(cfg.seed, self.step_t, self.micro_ids,
                                                 binarize=cfg.binarize == "dynamic")
        beta = self.beta_t if cfg.kl_warmup_steps > 0 else float(cfg.beta)
        sums = None
        for a in range(n_micro):
            x = self.train_x[self.idx[a]]
            if cfg.binarize == "dynamic":
                x = binarize_with_seed(x, binarize_seeds[a], cfg.backend)
            s = forward_backward(self.model, x, cfg=cfg, beta=beta, seed=noise_seeds[a],
                                 n_micro=n_micro, autocast=self.autocast).double()
            sums = s if sums is None else sums + s
        total = grad_norm(self.params)
        values = torch.cat([sums, total.double().reshape(1)])
        with torch.no_grad():
            if cfg.grad_clip > 0:
                self.grad_scale.copy_(clip_divisor(total, cfg.grad_clip))
            self.found_inf.copy_(torch.maximum(self.found_inf, (~torch.isfinite(values).all()).float()))
            self.window.rows.index_copy_(0, (self.step_t % self.window.size).reshape(1), values.reshape(1, -1))
        self.optimizer.step()
        self.step_t += 1

    def _capture(self) -> None:
        """Warms up (three steps on a side stream with the update switched off, so no state
        changes) and captures one step into a CUDA graph."""
        step0 = self.step_t.clone()
        self.found_inf.fill_(1.0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.step_t.copy_(step0)
        self.found_inf.fill_(0.0)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        self._graph = graph
        with torch.cuda.graph(graph):
            self._step()

    def __call__(self, indices: list[torch.Tensor], beta: float) -> None:
        """Trains one step on the micro-batches with dataset ``indices`` (``[B / grad_accum]``
        each) at KL weight ``beta``; the statistics land in the window's row of the step."""
        for a, ix in enumerate(indices):
            self.idx[a].copy_(ix, non_blocking=True)
        if self.cfg.kl_warmup_steps > 0:
            self.beta_t.fill_(beta)
        if self.mode != "cuda-graphs":
            self._fn()
            return
        if self._graph is None:
            self._capture()
        self._graph.replay()
