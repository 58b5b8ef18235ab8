"""Data loading (IDX, tensor files, image folders, digits), checks and the batch schedule."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

import fused_vae as fv
from fused_vae.training.batches import TrainBatches, step_seeds
from fused_vae.training.config import TrainConfig
from fused_vae.training.data import (
    DataError,
    bernoulli_thresholds,
    binarize_with_seed,
    load_data,
    load_image_folder,
    load_mnist_images,
    load_tensor_file,
    read_idx,
    split,
)


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_mnist(root, n_train=12, n_test=5, gz=True, size=28):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split_name, n in (("train", n_train), ("t10k", n_test)):
        data = _idx_bytes(rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        name = f"{split_name}-images-idx3-ubyte"
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return root


# -- IDX / MNIST -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_round_trip(tmp_path, gz):
    root = _write_mnist(tmp_path / "mnist", gz=gz)
    train, test = load_mnist_images(root)
    assert train.shape == (12, 1, 28, 28) and test.shape == (5, 1, 28, 28)
    assert train.dtype == torch.float32 and 0 <= train.min() and train.max() <= 1
    suffix = ".gz" if gz else ""
    raw = read_idx(root / f"train-images-idx3-ubyte{suffix}")
    torch.testing.assert_close(train[:, 0], torch.from_numpy(raw.astype(np.float32) / 255))


def test_idx_errors_name_the_path_and_format(tmp_path):
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 20)
    with pytest.raises(DataError, match=r"bad-magic.*magic.*IDX"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(_idx_bytes(np.zeros((3, 4, 4)))[:-5])
    with pytest.raises(DataError, match=r"short.*\[3, 4, 4\].*truncated"):
        read_idx(truncated)
    not_gzip = tmp_path / "x-images-idx3-ubyte.gz"
    not_gzip.write_bytes(b"not gzip data")
    with pytest.raises(DataError, match=r"x-images-idx3-ubyte\.gz.*gzip"):
        read_idx(not_gzip)
    with pytest.raises(DataError, match=r"nowhere.*not found"):
        read_idx(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"missing-dir.*directory not found.*train-images-idx3-ubyte"):
        load_mnist_images(tmp_path / "missing-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*train-images-idx3-ubyte"):
        load_mnist_images(tmp_path / "empty")
    labels = tmp_path / "labels"
    labels.mkdir()
    for s in ("train", "t10k"):
        (labels / f"{s}-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros(7)))  # 1-D: labels, not images
    with pytest.raises(DataError, match=r"expected uint8 images"):
        load_mnist_images(labels)


# -- tensor files ----------------------------------------------------------------------------------
def test_tensor_files(tmp_path):
    u8 = np.arange(5 * 6 * 6, dtype=np.uint8).reshape(5, 6, 6)
    np.save(tmp_path / "a.npy", u8)
    t = load_tensor_file(tmp_path / "a.npy")
    assert t.shape == (5, 1, 6, 6)
    torch.testing.assert_close(t[:, 0], torch.from_numpy(u8).float() / 255)
    torch.save(torch.rand(4, 8, 8, 3), tmp_path / "b.pt")
    assert load_tensor_file(tmp_path / "b.pt").shape == (4, 3, 8, 8)
    np.save(tmp_path / "flat.npy", np.random.rand(7, 10).astype(np.float32))
    assert load_tensor_file(tmp_path / "flat.npy").shape == (7, 1, 1, 10)


def test_tensor_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.npy.*not found.*\.npy"):
        load_tensor_file(tmp_path / "missing.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy"):
        load_tensor_file(tmp_path / "obj.npy")
    torch.save({"x": torch.zeros(3)}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match=r"dict\.pt.*not a tensor"):
        load_tensor_file(tmp_path / "dict.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(DataError, match=r"evil\.pt.*cannot read"):
        load_tensor_file(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match=r"junk\.pt.*cannot read"):
        load_tensor_file(tmp_path / "junk.pt")
    np.save(tmp_path / "one_d.npy", np.zeros(5))
    with pytest.raises(DataError, match=r"one_d\.npy.*shape \[5\]"):
        load_tensor_file(tmp_path / "one_d.npy")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(DataError, match=r"data\.csv.*suffix"):
        load_tensor_file(tmp_path / "data.csv")


# -- image folders -----------------------------------------------------------------------------------
def test_image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(folder / "sub" / "grey.png")
    rgb = load_image_folder(folder)
    assert rgb.shape == (4, 3, 10, 12) and rgb.max() <= 1
    grey = load_image_folder(folder, grayscale=True, image_size=8)
    assert grey.shape == (4, 1, 8, 8)
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(folder / "small.png")
    with pytest.raises(DataError, match=r"small\.png.*size.*--image-size"):
        load_image_folder(folder)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png.*cannot read image"):
        load_image_folder(folder, image_size=8)
    with pytest.raises(DataError, match=r"nope.*directory not found"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"none.*no image files"):
        load_image_folder(tmp_path / "none")


# -- load_data -----------------------------------------------------------------------------------------
def test_digits_default_split():
    data = load_data(TrainConfig())
    assert data.train.shape == (1438, 1, 8, 8) and data.test.shape == (359, 1, 8, 8)
    assert 0 <= data.train.min() and data.train.max() <= 1
    again = load_data(TrainConfig(seed=5))  # the split depends on split_seed only
    assert torch.equal(again.test, data.test)


def test_load_data_checks_values(tmp_path):
    np.save(tmp_path / "wide.npy", np.linspace(-2, 2, 40, dtype=np.float32).reshape(10, 4))
    cfg = TrainConfig(data="tensor", data_path=str(tmp_path / "wide.npy"))
    with pytest.raises(DataError, match=r"wide\.npy.*\[0, 1\].*gaussian"):
        load_data(cfg)
    data = load_data(TrainConfig(data="tensor", data_path=str(tmp_path / "wide.npy"), likelihood="gaussian"))
    assert data.value_range == (-2.0, 2.0)
    nan = np.ones((10, 4), dtype=np.float32)
    nan[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DataError, match=r"nan\.npy.*NaN"):
        load_data(TrainConfig(data="tensor", data_path=str(tmp_path / "nan.npy")))
    root = _write_mnist(tmp_path / "m")
    data = load_data(TrainConfig(data="mnist", data_path=str(root), binarize="static"))
    assert set(data.train.unique().tolist()) <= {0.0, 1.0} and set(data.test.unique().tolist()) <= {0.0, 1.0}
    data = load_data(TrainConfig(data="mnist", data_path=str(root), binarize="dynamic", max_train_examples=4))
    assert data.train.shape[0] == 4 and not set(data.train.unique().tolist()) <= {0.0, 1.0}
    assert set(data.test.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_seeded_binarization_is_bernoulli_of_the_pixel_values(name):
    """x_bin = (eps < Phi^-1(x)) with eps the op's noise stream: P(x_bin = 1) = x, 0 and 1 stay
    exact, the seed fixes the draw, and every backend draws the same pixels."""
    torch.manual_seed(7)
    x = torch.rand(64, 1, 4, 8)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    thr = bernoulli_thresholds(x)
    draws = torch.stack([binarize_with_seed(thr, torch.tensor(s), name) for s in range(400)])
    assert draws.dtype == torch.float32 and set(draws.unique().tolist()) <= {0.0, 1.0}
    assert (draws[:, 0, 0, 0, 0] == 0).all() and (draws[:, 0, 0, 0, 1] == 1).all()
    z = (draws.double().mean(0) - x.double()) / (x.double() * (1 - x.double()) / 400).sqrt().clamp(min=1e-6)
    assert z.abs().max() < 5.5 and abs(float(z.mean())) < 0.1 and 0.9 < float(z[x > 0.05].std()) < 1.1
    eps = fv.standard_normal(x.shape, 3)
    three = torch.tensor(3)
    assert torch.equal(binarize_with_seed(thr, three, name), (torch.special.ndtr(eps.double()) < x.double()).float())
    assert torch.equal(binarize_with_seed(thr, three, name), binarize_with_seed(thr, three, "reference"))
    assert not torch.equal(binarize_with_seed(thr, three, name), binarize_with_seed(thr, torch.tensor(4), name))


def test_split_is_seeded():
    x = torch.arange(10.0).reshape(10, 1, 1, 1)
    a, b = split(x, 0.3, 1)
    assert a.shape[0] == 7 and b.shape[0] == 3
    assert sorted(torch.cat([a, b]).flatten().tolist()) == list(range(10))
    assert torch.equal(split(x, 0.3, 1)[1], b)
    with pytest.raises(DataError):
        split(x[:1], 0.5, 0)


# -- the batch schedule ----------------------------------------------------------------------------------
def test_micro_batches_do_not_depend_on_how_they_are_spread_over_processes():
    n, bsz = 103, 12
    single = TrainBatches(n, bsz, world_size=1, rank=0, grad_accum=4, seed=3)
    ranks = [TrainBatches(n, bsz, world_size=2, rank=r, grad_accum=2, seed=3) for r in range(2)]
    four = [TrainBatches(n, bsz, world_size=4, rank=r, grad_accum=1, seed=3) for r in range(4)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == four[0].steps_per_epoch == 103 // 12
    for epoch in (0, 1):
        ref = {i: {mb.micro_id: (mb.indices.tolist(), int(mb.seed), int(mb.binarize_seed)) for mb in micros}
               for i, micros in single.epoch(epoch, seed=5)}
        for group in (ranks, four):
            got: dict = {}
            for b in group:
                for i, micros in b.epoch(epoch, seed=5):
                    got.setdefault(i, {}).update({mb.micro_id: (mb.indices.tolist(), int(mb.seed), int(mb.binarize_seed))
                                                  for mb in micros})
            assert got == ref
    e0 = [m.indices.tolist() for _, ms in single.epoch(0) for m in ms]
    e1 = [m.indices.tolist() for _, ms in single.epoch(1) for m in ms]
    assert e0 != e1
    resumed = [m.indices.tolist() for _, ms in single.epoch(0, start=3) for m in ms]
    assert resumed == e0[3 * 4:]
    # The seeds are those of the global step: epoch * steps_per_epoch + i, whatever the start.
    step8 = [(int(m.seed), int(m.binarize_seed)) for m in next(iter(single.epoch(1, start=0, seed=5)))[1]]
    assert step8 == list(zip(*(t.tolist() for t in step_seeds(5, torch.tensor(8), torch.arange(4)))))
    seeds = torch.stack(step_seeds(0, torch.arange(50)[:, None], torch.arange(4)[None, :]))  # noise, binarization
    assert seeds.shape == (2, 50, 4) and seeds.unique().numel() == 400 and (seeds >= 0).all()
    assert not torch.equal(torch.stack(step_seeds(1, torch.arange(50)[:, None], torch.arange(4)[None, :])), seeds)


def test_batch_schedule_errors():
    with pytest.raises(ValueError, match="divisible"):
        TrainBatches(100, 10, world_size=3)
    with pytest.raises(ValueError, match="larger than the training set"):
        TrainBatches(5, 10)


def test_epoch_seeds_are_the_seeds_of_their_steps_across_seed_chunks(monkeypatch):
    from fused_vae.training import batches as batches_module

    monkeypatch.setattr(batches_module, "SEED_CHUNK_STEPS", 7)  # chunks end inside epochs
    b = TrainBatches(40, 8, grad_accum=2)  # 5 steps per epoch, micro-batches 0 and 1
    for epoch, start in [(0, 0), (1, 2), (2, 0), (1, 0), (6, 4)]:
        got = [[[int(m.seed), int(m.binarize_seed)] for m in ms] for _, ms in b.epoch(epoch, start, seed=11)]
        steps = torch.arange(epoch * 5 + start, epoch * 5 + 5)
        assert got == torch.stack(step_seeds(11, steps[:, None], torch.arange(2)[None, :]), -1).tolist()
