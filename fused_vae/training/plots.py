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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` cut at spaces into lines no wider than ``width`` pixels (a longer word keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def captioned(grid: np.ndarray, *, rows: int, title: str | None = None, row_labels=None, pad: int = 2):
    """A PIL image of the :func:`image_grid` array ``grid`` (``rows`` rows of tiles) with ``title``
    above it (wrapped to the grid's width) and ``row_labels[r % len(row_labels)]`` left of row ``r``."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(grid)
    if not title and not row_labels:
        return img
    font = _font(13)
    probe = ImageDraw.Draw(img)
    margin = 6 + max((int(probe.textlength(str(t), font=font)) for t in row_labels), default=0) if row_labels else 0
    width = margin + img.width
    lines = _wrap(probe, title, font, width - 8) if title else []
    line_h = font.getbbox("Ag")[3] + 3
    top = len(lines) * line_h + (6 if lines else 0)
    white = 255 if img.mode == "L" else (255, 255, 255)
    black = 0 if img.mode == "L" else (0, 0, 0)
    out = Image.new(img.mode, (width, top + img.height), white)
    out.paste(img, (margin, top))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * line_h), line, fill=black, font=font)
    row_h = (img.height - pad) / rows
    for r in range(rows if row_labels else 0):
        label = str(row_labels[r % len(row_labels)])
        draw.text((2, top + pad + r * row_h + (row_h - pad) / 2), label, fill=black, font=font, anchor="lm")
    return out


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, *, value_range=(0.0, 1.0),
                    title: str | None = None, row_labels=None) -> Path:
    """Writes :func:`image_grid` of ``images`` (``[N, C, H, W]``) as a PNG, with the caption
    ``title`` and ``row_labels`` of :func:`captioned` when given; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    rows = -(-n // max(1, min(nrow, n)))
    captioned(image_grid(images, nrow, value_range=value_range), rows=rows, title=title,
              row_labels=row_labels).save(path)
    return path


@torch.no_grad()
def save_reconstructions(model, x: torch.Tensor, path, *, value_range=(0.0, 1.0), per_row: int = 8) -> Path:
    """Rows of test images ``x`` (``[N, *input_shape]``) each followed by a row of their
    reconstructions (decoder mean at the posterior mode), labelled "input" and "recon."."""
    recon = model.reconstruct(x).to(x.dtype)
    rows = []
    for i in range(0, x.shape[0], per_row):
        rows += [x[i:i + per_row], recon[i:i + per_row]]
    return save_image_grid(torch.cat(rows).cpu(), path, per_row, value_range=value_range,
                           title="Reconstructions: each row of test images (input) is followed by their "
                                 "reconstructions (recon.: decoder mean at the posterior mean)",
                           row_labels=("input", "recon."))


@torch.no_grad()
def save_samples(model, path, *, n: int = 64, seed: int = 0, value_range=(0.0, 1.0)) -> Path:
    """A grid of decoder means for ``n`` prior draws ``z ~ N(0, I)``, titled so."""
    imgs = model.generate(n, seed=seed)
    return save_image_grid(imgs.cpu(), path, int(round(n ** 0.5)) or 1, value_range=value_range,
                           title=f"Samples: decoder means for {n} draws z ~ N(0, I) (seed {seed})")


@torch.no_grad()
def save_interpolation(model, pairs: list[tuple[torch.Tensor, torch.Tensor]], path, *, steps: int = 10,
                       value_range=(0.0, 1.0)) -> Path:
    """One row per pair of test images: the first image, ``steps`` decodings along the line
    between their posterior means, the second image; titled so."""
    rows = []
    for a, b in pairs:
        mid = model.interpolate(a, b, steps=steps).to(a.dtype)
        rows.append(torch.cat([a[None], mid, b[None]]))
    return save_image_grid(torch.cat(rows).cpu(), path, steps + 2, value_range=value_range,
                           title=f"Interpolation: each row starts at a test image A (left column) and ends at a test image B "
                                 f"(right column); between them, {steps} decoder means along the line between their "
                                 "posterior means")


@torch.no_grad()
def save_run_images(model, data, run_dir, *, seed: int = 0) -> dict[str, Path]:
    """The image outputs of a training run in ``run_dir``, as :class:`~fused_vae.training.trainer.Trainer`
    writes them: ``reconstructions.png`` (the first 16 test images of ``data``, a DataBundle),
    ``samples.png`` (64 prior draws with ``seed``) and ``interpolation.png`` (test images 0 to 1,
    2 to 3, 4 to 5, 6 to 7). Returns ``{file name: path}``; leaves ``model`` in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    run_dir = Path(run_dir)
    vr = data.value_range
    out = {"reconstructions.png": save_reconstructions(model, data.test[:16].to(device),
                                                       run_dir / "reconstructions.png", value_range=vr),
           "samples.png": save_samples(model, run_dir / "samples.png", n=64, seed=seed, value_range=vr)}
    n_pairs = min(4, data.test.shape[0] // 2)
    pairs = [(data.test[2 * j].to(device), data.test[2 * j + 1].to(device)) for j in range(n_pairs)]
    if pairs:
        out["interpolation.png"] = save_interpolation(model, pairs, run_dir / "interpolation.png", value_range=vr)
    return out


def _train_loss_lines(ax, records: list[dict], series) -> None:
    """Training loss and -ELBO on ``ax``: one line labelled "loss = -ELBO" where they coincide
    (the ELBO objective at beta = 1, no free bits), else both, -ELBO dashed so neither hides the other."""
    s, loss = series("train", "loss")
    se, elbo = series("train", "elbo")
    neg = [-e for e in elbo]
    train = [r for r in records if r.get("kind") == "train"]
    iwae = bool(train) and train[-1].get("objective") == "iwae"
    if loss and s == se and np.allclose(loss, neg, rtol=1e-6, atol=1e-9):
        betas = {r.get("beta") for r in train}
        why = " (beta = 1)" if not iwae and betas == {1.0} else " (K = 1)" if iwae else ""
        ax.plot(s, loss, lw=1, label=f"train loss = -ELBO{why}")
        return
    ax.plot(s, loss, lw=1, label="train loss (-L_K, the IWAE bound)" if iwae else "train loss (recon + beta KL)")
    ax.plot(se, neg, "--", lw=1, label="train -ELBO")


def layer_kl_keys(records: list[dict]) -> list[str]:
    """The per-layer KL statistics (``kl_<layer>``) the training records of a hierarchical model hold."""
    train = [r for r in records if r.get("kind") == "train"]
    return [k for k in (train[-1] if train else {}) if k.startswith("kl_") and k != "kl_penalty"]


def loss_curve_figure(records: list[dict]):
    """A matplotlib Figure (no pyplot state) of training loss and -ELBO, test -ELBO (and IWAE
    NLL), reconstruction and KL against the optimizer step from the metric records; for a
    hierarchical model a third panel with each stochastic layer's KL (a layer whose KL stays
    near 0 has collapsed onto its prior)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(kind, key):
        pts = [(r["step"], r[key]) for r in records
               if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    layers = layer_kl_keys(records)
    fig = Figure(figsize=(16.5 if layers else 11, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if layers else 2)
    ax1, ax2 = axes[0], axes[1]
    _train_loss_lines(ax1, records, series)
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
    if layers:
        ax3 = axes[2]
        for key in layers:
            s, v = series("train", key)
            ax3.plot(s, v, lw=1, label=f"layer {key[3:]}")
        ax3.set_xlabel("step")
        ax3.set_ylabel("nats per example")
        ax3.set_title("train KL of each stochastic layer")
        ax3.legend()
        ax3.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_loss_curves(records: list[dict], path) -> Path:
    """Writes :func:`loss_curve_figure` of the metric records as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    loss_curve_figure(records).savefig(path)
    return path
