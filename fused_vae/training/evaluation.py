"""Test-set ELBO and importance-sampled NLL, sharded over processes."""

from __future__ import annotations

import torch

from ..models.seeds import derive_seed
from .batches import EVAL_TAG
from .distributed import DistContext
from .progress import progress_bar

# The IWAE estimate decodes (examples x samples) rows per pass; this bounds that number. About
# 1000 rows of the paper's net were fastest on a CPU (benchmarks/bench_iwae_step.py); much
# larger passes spill the [rows, 784] activations out of cache.
IWAE_ROWS = 1024


@torch.inference_mode()
def evaluate(model, data: torch.Tensor, *, batch_size: int = 500, seed: int = 0, iwae_samples: int = 0,
             iwae_chunk: int = 50, ctx: DistContext | None = None, progress: bool = False) -> dict:
    """Mean per-example test metrics (nats) of ``model`` on ``data`` (``[N, *input_shape]``).

    Process ``rank`` evaluates examples ``rank, rank + W, ...``; sums are all-reduced, so
    every process gets the same result. Noise seeds are fixed functions of ``seed`` and
    the batch, so repeated evaluations of one model agree. The IWAE estimate decodes about
    ``IWAE_ROWS`` rows (examples x ``iwae_chunk`` samples) per pass, a size whose activations
    stay in cache; ``progress`` shows a tqdm bar over its examples.

    Returns:
        ``test_elbo`` (single-sample ELBO), ``test_recon``, ``test_kl`` and, when
        ``iwae_samples > 0``, ``test_iwae_nll`` (``-L_k``, the importance-sampled NLL
        estimate with k = iwae_samples) and ``iwae_samples``. Python floats.
    """
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    device = ctx.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    shard = torch.arange(ctx.rank, data.shape[0], ctx.world_size)
    bar = progress_bar(total=shard.numel(), desc=f"test NLL (k={iwae_samples})", unit="image",
                       dynamic_ncols=True, disable=not (progress and iwae_samples and ctx.is_main))
    for b, start in enumerate(range(0, shard.numel(), batch_size)):
        x = data[shard[start:start + batch_size]].to(device)
        out = model.elbo(x, seed=derive_seed(seed, EVAL_TAG, ctx.rank, b))
        sums[0] += out["elbo"].double().sum()
        sums[1] += out["recon"].double().sum()
        sums[2] += out["kl"].double().sum()
        sums[3] += x.shape[0]
        if iwae_samples:
            chunk = min(iwae_chunk, iwae_samples)
            sub = max(1, IWAE_ROWS // chunk)  # examples per IWAE pass: at most IWAE_ROWS decoded rows at once
            for j in range(0, x.shape[0], sub):
                ll = model.iwae_log_likelihood(x[j:j + sub], iwae_samples, chunk_size=chunk,
                                               seed=derive_seed(seed, EVAL_TAG, 1, ctx.rank, b, j))
                sums[4] += -ll.double().sum()
                bar.update(ll.shape[0])
    bar.close()
    ctx.all_reduce_sum(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    res = {"test_elbo": sums[0].item() / n, "test_recon": sums[1].item() / n, "test_kl": sums[2].item() / n}
    if iwae_samples:
        res["test_iwae_nll"] = sums[4].item() / n
        res["iwae_samples"] = int(iwae_samples)
    return res
