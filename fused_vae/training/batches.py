"""Which examples each process trains on at each step, and the seeds of their noise.

The data order is a function of ``(seed, epoch)`` only (``DistributedSampler(seed=seed)``
with ``set_epoch``), so a resumed run sees the same batches as an uninterrupted one.

A global batch of ``B`` examples is cut into ``M = world_size * grad_accum`` micro-batches
of ``B / M`` examples. Micro-batch ``m = rank + world_size * a`` (process ``rank``,
accumulation index ``a``) holds the global batch's positions ``m, m + M, m + 2M, ...``:
exactly what ``DistributedSampler`` hands process ``rank`` when ``a`` runs over its local
batch with stride ``grad_accum``. Every random number of micro-batch ``m`` at step ``t`` (the
fused op's noise, dynamic binarization) comes from seeds derived from ``(seed, t, m)``; the
seeds are computed on the training device (:func:`step_seeds`), a whole epoch at a time for
the eager step and from a step counter inside a captured step.
So a run depends on the global batch size and on M, never on how the M micro-batches
are spread over processes: 2 processes x 1 micro-batch equals 1 process x 2 micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data.distributed import DistributedSampler

from ..models.seeds import counter_seeds, derive_seed

NOISE_TAG = 1
BINARIZE_TAG = 2
EVAL_TAG = 3
# The eager step's noise seeds are computed this many steps at a time (at least an epoch): a
# small epoch (14 steps of the default run) would otherwise pay the tensor calls of one
# Philox evaluation every few steps.
SEED_CHUNK_STEPS = 1024


@dataclass(frozen=True)
class MicroBatch:
    """Dataset indices (``[b]`` int64) of one micro-batch, its global micro-batch id and the
    seeds (0-d int64 on the training device, :func:`step_seeds`) of its noise and of its
    dynamic binarization."""

    indices: torch.Tensor
    micro_id: int
    seed: torch.Tensor | None = None
    binarize_seed: torch.Tensor | None = None


class TrainBatches:
    """Per-step micro-batches for one process.

    Args:
        num_examples: training-set size N.
        batch_size: global batch size B (all processes and micro-batches).
        world_size, rank: the process group (1, 0 for a single process).
        grad_accum: micro-batches per process per step.
        seed: data-order seed.

    Raises:
        ValueError: B not divisible by world_size * grad_accum, or fewer than B examples.
    """

    def __init__(self, num_examples: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 grad_accum: int = 1, seed: int = 0):
        micro = world_size * grad_accum
        if batch_size % micro:
            raise ValueError(f"batch_size {batch_size} must be divisible by world_size x grad_accum = "
                             f"{world_size} x {grad_accum} = {micro}")
        if num_examples < batch_size:
            raise ValueError(f"batch_size {batch_size} is larger than the training set ({num_examples} examples)")
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.local_batch = batch_size // world_size
        self.sampler = DistributedSampler(range(num_examples), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {batch_size} leaves no full batch per epoch for {num_examples} examples")
        self.micro_ids = [rank + world_size * a for a in range(grad_accum)]
        self._seeds = None  # ((seed, device), first step, steps, [0-d seed per (step, micro-batch)])

    def order(self, epoch: int) -> torch.Tensor:
        """This process's examples of ``epoch`` as ``[steps_per_epoch, grad_accum, B / M]`` int64
        indices: ``order[i, a]`` is micro-batch ``micro_ids[a]`` of step ``i``."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(self.sampler))[:self.steps_per_epoch * self.local_batch], dtype=torch.int64)
        return order.view(self.steps_per_epoch, -1, self.grad_accum).transpose(1, 2)

    def epoch(self, epoch: int, start: int = 0, *, seed: int | None = None, device=None):
        """Yields ``(i, [MicroBatch, ...])`` for steps ``i = start .. steps_per_epoch - 1`` of ``epoch``.

        With ``seed``, each micro-batch carries its seeds (:func:`step_seeds` of the global
        step ``epoch * steps_per_epoch + i``), computed on ``device`` for
        :data:`SEED_CHUNK_STEPS` steps (at least the epoch) at a time.
        """
        order = self.order(epoch)
        seeds, first = [(None, None)] * (self.steps_per_epoch * self.grad_accum), 0
        if seed is not None:
            seeds, first = self._step_seeds(seed, device, epoch * self.steps_per_epoch, self.steps_per_epoch)
        steps = order.unbind(0)  # views made once per epoch, not per step
        for i in range(start, self.steps_per_epoch):
            at = first + i * self.grad_accum
            yield i, [MicroBatch(ix, m, *seeds[at + a]) for a, (ix, m) in enumerate(zip(steps[i].unbind(0), self.micro_ids))]

    def _step_seeds(self, seed: int, device, first: int, n: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """``(seeds, offset)``: ``seeds[offset + i * grad_accum + a]`` is the (noise, binarization)
        pair of :func:`step_seeds` of micro-batch ``micro_ids[a]`` at step ``first + i``
        (``i < n``); computed ``max(n, SEED_CHUNK_STEPS)`` steps at a time and kept."""
        key = (seed, str(device))
        c = self._seeds
        if c is None or c[0] != key or not (c[1] <= first and first + n <= c[1] + c[2]):
            count = max(n, SEED_CHUNK_STEPS)
            steps = torch.arange(count, dtype=torch.int64, device=device) + first
            ids = torch.tensor(self.micro_ids, dtype=torch.int64, device=device)
            noise, binar = (t.view(-1).unbind() for t in step_seeds(seed, steps[:, None], ids[None, :]))
            c = self._seeds = (key, first, count, list(zip(noise, binar)))
        return c[3], (first - c[1]) * self.grad_accum


def step_seeds(seed: int, steps: torch.Tensor, micro_ids: torch.Tensor, *,
               binarize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The seeds of micro-batches ``micro_ids`` at (0-based) steps ``steps`` (int64 tensors that
    broadcast; steps below 2**32), on the tensors' device: ``(noise, binarization)``, int64
    tensors of the broadcast shape (binarization None unless ``binarize``). The fused op's noise
    seeds are :func:`~fused_vae.models.seeds.counter_seeds` keyed by ``derive_seed(seed,
    NOISE_TAG)``, the dynamic binarization's keyed by ``derive_seed(seed, BINARIZE_TAG)``."""
    noise = counter_seeds(derive_seed(seed, NOISE_TAG), steps, micro_ids)
    return noise, counter_seeds(derive_seed(seed, BINARIZE_TAG), steps, micro_ids) if binarize else None
