"""PNG outputs: image grids (Pillow) and loss curves (matplotlib, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: int, *, value_range=(0.0, 1.0), pad: int = 2, min_tile: int = 56):
    """Tiles ``[N, C, H, W]`` images into a uint8 ``[H', W']`` (C = 1) or ``[H', W', 3]`` array.

    Values are mapped from ``value_range`` to 0..255 (clipped); tiles smaller than
    ``min_tile`` pixels are enlarged by an integer factor (nearest neighbour).
    C other than 1 or 3 shows the first channel.
    """
    x = images.detach().float().cpu()
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got {list(x.shape)}")
    if x.shape[1] not in (1, 3):
        x = x[:, :1]
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    n, c, h, w = x.shape
    scale = max(1, -(-min_tile // max(h, 1))) if max(h, w) < min_tile else 1
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    ncol = max(1, min(nrow, n))
    rows = -(-n // ncol)
    grid = torch.ones(c, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = (grid * 255 + 0.5).to(torch.uint8).numpy()
    return arr[0] if c == 1 else np.transpose(arr, (1, 2, 0))


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, *, value_range=(0.0, 1.0)) -> Path:
    """Writes :func:`image_grid` of ``images`` (``[N, C, H, W]``) as a PNG; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, nrow, value_range=value_range)).save(path)
    return path


@torch.no_grad()
def save_reconstructions(model, x: torch.Tensor, path, *, value_range=(0.0, 1.0), per_row: int = 8) -> Path:
    """Rows of test images ``x`` (``[N, *input_shape]``) each followed by a row of their
    reconstructions (decoder mean at the posterior mode)."""
    recon = model.reconstruct(x).to(x.dtype)
    rows = []
    for i in range(0, x.shape[0], per_row):
        rows += [x[i:i + per_row], recon[i:i + per_row]]
    return save_image_grid(torch.cat(rows).cpu(), path, per_row, value_range=value_range)


@torch.no_grad()
def save_samples(model, path, *, n: int = 64, seed: int = 0, value_range=(0.0, 1.0)) -> Path:
    """A grid of decoder means for ``n`` prior draws ``z ~ N(0, I)``."""
    imgs = model.generate(n, seed=seed)
    return save_image_grid(imgs.cpu(), path, int(round(n ** 0.5)) or 1, value_range=value_range)


@torch.no_grad()
def save_interpolation(model, pairs: list[tuple[torch.Tensor, torch.Tensor]], path, *, steps: int = 10,
                       value_range=(0.0, 1.0)) -> Path:
    """One row per pair of test images: the first image, ``steps`` decodings along the line
    between their posterior means, the second image."""
    rows = []
    for a, b in pairs:
        mid = model.interpolate(a, b, steps=steps).to(a.dtype)
        rows.append(torch.cat([a[None], mid, b[None]]))
    return save_image_grid(torch.cat(rows).cpu(), path, steps + 2, value_range=value_range)


def save_loss_curves(records: list[dict], path) -> Path:
    """Plots training loss and -ELBO, test -ELBO (and IWAE NLL), reconstruction and KL
    against the optimizer step from the metric records."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(kind, key):
        pts = [(r["step"], r[key]) for r in records
               if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    s, v = series("train", "loss")
    ax1.plot(s, v, label="train loss (recon + beta KL)", lw=1)
    s, v = series("train", "elbo")
    ax1.plot(s, [-e for e in v], label="train -ELBO", lw=1, alpha=0.7)
    s, v = series("eval", "test_elbo")
    ax1.plot(s, [-e for e in v], "o-", ms=2, label="test -ELBO")
    s, v = series("eval", "test_iwae_nll")
    if s:
        ax1.plot(s, v, "*", ms=10, label="test NLL (IWAE)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats per example")
    ax1.set_title("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for key, label in (("recon", "train reconstruction"), ("kl", "train KL")):
        s, v = series("train", key)
        ax2.plot(s, v, label=label, lw=1)
    for key, label in (("test_recon", "test reconstruction"), ("test_kl", "test KL")):
        s, v = series("eval", key)
        ax2.plot(s, v, "o-", ms=2, label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("nats per example")
    ax2.set_title("reconstruction and KL")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
