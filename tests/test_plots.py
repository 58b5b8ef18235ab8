"""PNG outputs: captioned image grids and a loss-curve legend that hides no line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fused_vae.training.plots import captioned, image_grid, loss_curve_figure, save_image_grid

ROOT = Path(__file__).resolve().parents[1]


def _records(beta: float, objective: str = "elbo"):
    recs = []
    for step in (10, 20, 30):
        elbo = -30.0 + step / 10
        kl = 2.0
        loss = -elbo - (1 - beta) * kl  # recon + beta KL
        recs.append({"kind": "train", "step": step, "objective": objective, "loss": loss, "elbo": elbo,
                     "recon": -elbo - kl, "kl": kl, "beta": beta})
    recs.append({"kind": "eval", "step": 30, "test_elbo": -28.0, "test_recon": 26.0, "test_kl": 2.0})
    return recs


def _loss_lines(records):
    ax = loss_curve_figure(records).axes[0]
    return {line.get_label(): line.get_linestyle() for line in ax.get_lines()}


def test_loss_and_elbo_that_coincide_share_one_legend_entry():
    lines = _loss_lines(_records(beta=1.0))
    assert [k for k in lines if k.startswith("train")] == ["train loss = -ELBO (beta = 1)"]


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_loss_and_elbo_that_differ_are_both_drawn_elbo_dashed(objective):
    lines = _loss_lines(_records(beta=0.5, objective=objective))
    loss = "train loss (-L_K, the IWAE bound)" if objective == "iwae" else "train loss (recon + beta KL)"
    assert lines[loss] == "-" and lines["train -ELBO"] == "--"


def test_captioned_grid_keeps_the_tiles_and_labels_each_row(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 8, 8, generator=g)
    grid = image_grid(images, 8)
    img = np.asarray(captioned(grid, rows=2, title="a title long enough to be wrapped " * 4,
                               row_labels=("input", "recon.")))
    h, w = grid.shape
    top, left = img.shape[0] - h, img.shape[1] - w
    assert top > 20 and left > 20  # wrapped title above, labels to the left
    np.testing.assert_array_equal(img[top:, left:], grid)
    assert (img[:top] < 128).any()  # title text
    row_h = (h - 2) // 2
    for r in range(2):  # label text level with each row of tiles
        assert (img[top + 2 + r * row_h: top + (r + 1) * row_h, :left] < 128).any()
    path = save_image_grid(images, tmp_path / "g.png", 8)  # no caption: the bare grid
    from PIL import Image

    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), grid)


def _load_regenerate_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("regenerate_images", ROOT / "docs" / "images" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _ConstantModel(torch.nn.Module):
    """Decodes everything to ``value``: what save_run_images draws outside the model's tiles does not depend on it."""

    def __init__(self, value: float, input_shape):
        super().__init__()
        self.value, self.input_shape = value, tuple(input_shape)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def reconstruct(self, x):
        return torch.full_like(x, self.value)

    def generate(self, n, *, seed=0, device=None):
        return torch.full((n, *self.input_shape), self.value)

    def interpolate(self, a, b, *, steps):
        return torch.full((steps, *a.shape), self.value)


def test_committed_readme_images_have_the_size_and_layout_a_default_run_writes(tmp_path):
    """docs/images/ holds copies of the default run's images (docs/images/regenerate.py): each has the
    size, titles, row labels and test images that the default run writes now, and decoded tiles."""
    from PIL import Image

    from fused_vae.training.config import TrainConfig
    from fused_vae.training.data import load_data
    from fused_vae.training.plots import save_run_images

    cfg = TrainConfig()
    data = load_data(cfg)
    renders = {}
    for value in (0.0, 1.0):  # black and white decodings: the pixels that differ are the model's
        save_run_images(_ConstantModel(value, data.input_shape), data, tmp_path / str(value), seed=cfg.seed)
        renders[value] = {f.name: np.asarray(Image.open(f)) for f in (tmp_path / str(value)).iterdir()}
    for name, source in _load_regenerate_script().IMAGES.items():
        with Image.open(ROOT / "docs" / "images" / name) as im:
            committed = np.asarray(im)
        black, white = renders[0.0][source], renders[1.0][source]
        assert committed.shape == black.shape, f"{name} is {committed.shape}, a run writes {black.shape}: " \
                                               "run python docs/images/regenerate.py"
        decoded = black != white
        np.testing.assert_array_equal(committed[~decoded], black[~decoded],
                                      err_msg=f"{name}: titles, labels or test images differ from what a run writes")
        assert committed[decoded].std() > 20, f"{name}: the model's tiles look blank"
