"""Which examples each process trains on at each step, and the seeds of their noise.

The data order is a function of ``(seed, epoch)`` only (``DistributedSampler(seed=seed)``
with ``set_epoch``), so a resumed run sees the same batches as an uninterrupted one.

A global batch of ``B`` examples is cut into ``M = world_size * grad_accum`` micro-batches
of ``B / M`` examples. Micro-batch ``m = rank + world_size * a`` (process ``rank``,
accumulation index ``a``) holds the global batch's positions ``m, m + M, m + 2M, ...``:
exactly what ``DistributedSampler`` hands process ``rank`` when ``a`` runs over its local
batch with stride ``grad_accum``. Every random number of micro-batch ``m`` at step ``t`` (the
fused op's noise, dynamic binarization) comes from seeds derived from ``(seed, t, m)``.
So a run depends on the global batch size and on M, never on how the M micro-batches
are spread over processes: 2 processes x 1 micro-batch equals 1 process x 2 micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data.distributed import DistributedSampler

from ..models.seeds import derive_seed

NOISE_TAG = 1
BINARIZE_TAG = 2
EVAL_TAG = 3


@dataclass(frozen=True)
class MicroBatch:
    """Dataset indices (``[b]`` int64) of one micro-batch and its global micro-batch id."""

    indices: torch.Tensor
    micro_id: int


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

    def epoch(self, epoch: int, start: int = 0):
        """Yields ``(i, [MicroBatch, ...])`` for steps ``i = start .. steps_per_epoch - 1`` of ``epoch``."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        for i in range(start, self.steps_per_epoch):
            local = order[i * self.local_batch:(i + 1) * self.local_batch]
            yield i, [MicroBatch(local[a::self.grad_accum], self.rank + self.world_size * a)
                      for a in range(self.grad_accum)]


def noise_seed(seed: int, step: int, micro_id: int) -> int:
    """Seed of the fused op's noise for micro-batch ``micro_id`` at (0-based) step ``step``."""
    return derive_seed(seed, NOISE_TAG, step, micro_id)


def binarize_generator(seed: int, step: int, micro_id: int, device) -> torch.Generator:
    """Generator for the dynamic binarization of micro-batch ``micro_id`` at step ``step``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, BINARIZE_TAG, step, micro_id))
