"""Datasets as in-memory float32 tensors ``[N, C, H, W]``: scikit-learn digits (bundled),
MNIST / Fashion-MNIST IDX files, a folder of images, a ``.npy`` / ``.pt`` tensor file."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import backends
from ..backends.protocol import LOGQ_SKIP, REDUCE_SKIP


class DataError(ValueError):
    """Missing, corrupt or unsuitable data; the message names the path and the expected format."""


@dataclass
class DataBundle:
    """A train/test split.

    Attributes:
        train, test: float32 ``[N, C, H, W]`` tensors (flat data is ``[N, 1, 1, D]``).
        name: dataset name.
        value_range: ``(lo, hi)`` used to display images (``(0, 1)`` for [0, 1] data).
    """

    train: torch.Tensor
    test: torch.Tensor
    name: str
    value_range: tuple[float, float] = (0.0, 1.0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, ``(C, H, W)``."""
        return tuple(self.train.shape[1:])


IDX_FORMAT = ("IDX (the MNIST format): magic bytes 0x00 0x00 0x08 <ndim>, then ndim big-endian "
              "uint32 sizes, then the uint8 data; raw or .gz")
TENSOR_FORMAT = ("a .npy (numpy.save, no pickles) or .pt (torch.save of one tensor) file holding an "
                 "[N, D], [N, H, W], [N, C, H, W] or [N, H, W, C] (C = 1 or 3) float or uint8 array")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# -- file formats ----------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (raw or gzip-compressed, chosen by the ``.gz`` suffix).

    Returns the array with the header's dtype and shape.

    Raises:
        DataError: missing file, bad gzip data, bad magic number or a size mismatch.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found (expected {IDX_FORMAT})")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{p}: not a valid gzip file ({e}); expected {IDX_FORMAT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        magic = raw[:4].hex() if raw else "empty file"
        raise DataError(f"{p}: bad IDX magic number ({magic}); expected {IDX_FORMAT}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header; expected {IDX_FORMAT}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{p}: IDX header says shape {list(dims)} ({expected} data bytes) but the file has "
                        f"{len(raw) - header} data bytes (truncated or corrupt?)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(dirpath: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for cand in (dirpath / stem, dirpath / f"{stem}.gz"):
            if cand.is_file():
                return cand
    raise DataError(f"{dirpath}: no {stems[0]} or {stems[0]}.gz found (expected the MNIST / Fashion-MNIST "
                    f"files train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz], {IDX_FORMAT})")


def load_mnist_images(root: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST or Fashion-MNIST train and test images from the IDX files in ``root``.

    Returns float32 ``[60000, 1, 28, 28]`` and ``[10000, 1, 28, 28]`` tensors in [0, 1] (any
    N works). Only the image files are read.

    Raises:
        DataError: missing directory or files, or files that are not uint8 3-D IDX images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: directory not found (expected a directory with train-images-idx3-ubyte[.gz] "
                        f"and t10k-images-idx3-ubyte[.gz], {IDX_FORMAT})")
    out = []
    for split in ("train", "t10k"):
        p = _find(root, (f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"))
        arr = read_idx(p)
        if arr.dtype != np.uint8 or arr.ndim != 3:
            raise DataError(f"{p}: expected uint8 images of shape [N, H, W] (IDX magic 0x00000803), "
                            f"got {arr.dtype} with shape {list(arr.shape)}")
        out.append(torch.from_numpy(arr.astype(np.float32) / 255.0).unsqueeze(1))
    return out[0], out[1]


def _to_nchw(arr: torch.Tensor, path: Path) -> torch.Tensor:
    if arr.dim() == 2:
        return arr.reshape(arr.shape[0], 1, 1, arr.shape[1])
    if arr.dim() == 3:
        return arr.unsqueeze(1)
    if arr.dim() == 4:
        if arr.shape[1] in (1, 3):
            return arr
        if arr.shape[3] in (1, 3):
            return arr.permute(0, 3, 1, 2).contiguous()
    raise DataError(f"{path}: array of shape {list(arr.shape)} is not supported; expected {TENSOR_FORMAT}")


def load_tensor_file(path: str | Path) -> torch.Tensor:
    """A ``.npy`` or ``.pt`` array as float32 ``[N, C, H, W]``; uint8 data is scaled to [0, 1].

    ``.npy`` is read with ``allow_pickle=False`` and ``.pt`` with ``weights_only=True``: no
    arbitrary objects are unpickled.

    Raises:
        DataError: missing file, unknown suffix, unreadable or corrupt file, wrong dtype
            or shape, empty or non-finite data.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found (expected {TENSOR_FORMAT})")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
                raise DataError(f"{p}: holds dtype {getattr(arr, 'dtype', type(arr))}; expected {TENSOR_FORMAT}")
            t = torch.from_numpy(np.ascontiguousarray(arr))
        elif suffix == ".pt":
            t = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(t, torch.Tensor):
                raise DataError(f"{p}: holds a {type(t).__name__}, not a tensor; expected {TENSOR_FORMAT}")
        else:
            raise DataError(f"{p}: unknown suffix {p.suffix!r}; expected {TENSOR_FORMAT}")
    except DataError:
        raise
    except Exception as e:  # numpy / torch raise many types for corrupt files
        raise DataError(f"{p}: cannot read ({type(e).__name__}: {e}); expected {TENSOR_FORMAT}") from None
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.bool):
        t = t.float()
    else:
        raise DataError(f"{p}: dtype {t.dtype} is not supported; expected {TENSOR_FORMAT}")
    if t.dim() < 2 or t.shape[0] == 0 or t.numel() == 0:
        raise DataError(f"{p}: array of shape {list(t.shape)} has no examples; expected {TENSOR_FORMAT}")
    return _to_nchw(t, p)


def load_image_folder(root: str | Path, *, image_size: int | None = None, grayscale: bool = False) -> torch.Tensor:
    """All images under ``root`` (recursively, sorted by path) as float32 ``[N, C, H, W]`` in [0, 1].

    C is 1 with ``grayscale`` else 3. Without ``image_size`` every image must have the same size.

    Raises:
        DataError: missing or empty folder, an unreadable image, or differing sizes.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: directory not found (expected a folder of images: {', '.join(IMAGE_SUFFIXES)})")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"{root}: no image files found (expected {', '.join(IMAGE_SUFFIXES)})")
    mode = "L" if grayscale else "RGB"
    arrays = []
    first_size = None
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if image_size:
                    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{f}: cannot read image ({e}); expected an image file readable by Pillow") from None
        if first_size is None:
            first_size = arr.shape
        elif arr.shape != first_size:
            raise DataError(f"{f}: size {arr.shape[1]}x{arr.shape[0]} differs from {files[0]} "
                            f"({first_size[1]}x{first_size[0]}); pass --image-size to resize all images")
        arrays.append(arr)
    t = torch.from_numpy(np.stack(arrays)).float() / 255.0
    return t.unsqueeze(1) if grayscale else t.permute(0, 3, 1, 2).contiguous()


def load_digits_images() -> torch.Tensor:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, no download) as float32
    ``[1797, 1, 8, 8]`` in [0, 1] (grey levels 0..16 divided by 16)."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'fused_vae[train]'") from None
    images = load_digits().images.astype(np.float32) / 16.0
    return torch.from_numpy(images).unsqueeze(1)


# -- splits and checks ----------------------------------------------------------------------
def split(data: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random train/test split (a fixed function of ``seed``); at least one example each.

    Raises:
        DataError: fewer than 2 examples.
    """
    n = data.shape[0]
    if n < 2:
        raise DataError(f"need at least 2 examples to split into train and test, got {n}")
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data[perm[n_test:]].contiguous(), data[perm[:n_test]].contiguous()


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Binary pixels ``x_bin ~ Bernoulli(x)`` (x in [0, 1]) drawn with ``generator``; same shape, float."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return (u < x).to(x.dtype)


def bernoulli_thresholds(x: torch.Tensor) -> torch.Tensor:
    """``Phi^-1(x)`` for pixel values ``x`` in [0, 1] (``Phi``: the standard normal CDF), float32
    of x's shape, -inf at 0 and +inf at 1: a standard normal draw falls below it with
    probability ``x``, so :func:`binarize_with_seed` of these thresholds is ``Bernoulli(x)``."""
    return torch.special.ndtri(x.float())


_ZEROS: dict[torch.device, torch.Tensor] = {}  # a 0-d float32 zero per device, expanded to any shape


def binarize_with_seed(thresholds: torch.Tensor, seed: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Binary pixels ``x_bin ~ Bernoulli(x)`` from :func:`bernoulli_thresholds` of ``x`` (a float32
    tensor) and the fused ops' noise stream of ``seed`` (a 0-d int64 tensor on their device):
    1.0 where ``eps < threshold``, ``eps`` the stream's standard normals over the thresholds'
    shape (``fused_vae.standard_normal``). One fused-op call and no host work, so a captured
    step binarizes anew each step. float32 of the thresholds' shape; ``backend`` picks the
    op's backend (None: automatic).
    """
    zero = _ZEROS.get(thresholds.device)
    if zero is None:
        zero = _ZEROS[thresholds.device] = torch.zeros((), device=thresholds.device)
    zeros = zero.expand(thresholds.shape)
    # The op itself (the arguments are known good): z = 0 + exp(0) * eps is exactly eps.
    eps = backends.resolve(backend, thresholds.device).run(
        "reparam_kl", zeros, zeros, None, None, seed, 1, REDUCE_SKIP, LOGQ_SKIP, None, None
    )[0]
    return (eps[0] < thresholds).float()


def load_data(cfg) -> DataBundle:
    """The train/test data a :class:`~fused_vae.training.config.TrainConfig` asks for.

    Applies ``max_*_examples``, static binarization (``binarize`` static, and the test set
    for dynamic) and checks values (finite; in [0, 1] for the Bernoulli likelihood).

    Raises:
        DataError: missing/corrupt files or unsuitable values (names the path and format).
    """
    name = cfg.data
    path = cfg.data_path
    if name == "digits":
        train, test = split(load_digits_images(), cfg.test_fraction, cfg.split_seed)
        where = "digits"
    elif name in ("mnist", "fashion-mnist"):
        train, test = load_mnist_images(path)
        where = str(path)
    elif name == "tensor":
        train, test = split(load_tensor_file(path), cfg.test_fraction, cfg.split_seed)
        where = str(path)
    elif name == "folder":
        imgs = load_image_folder(path, image_size=cfg.image_size, grayscale=cfg.grayscale)
        train, test = split(imgs, cfg.test_fraction, cfg.split_seed)
        where = str(path)
    else:
        raise DataError(f"unknown dataset {name!r}")
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_test_examples:
        test = test[: cfg.max_test_examples]
    for part, t in (("train", train), ("test", test)):
        if not torch.isfinite(t).all():
            raise DataError(f"{where}: the {part} data contains NaN or Inf values")
    lo = float(min(train.min(), test.min()))
    hi = float(max(train.max(), test.max()))
    if cfg.likelihood == "bernoulli" and (lo < 0.0 or hi > 1.0):
        raise DataError(f"{where}: values span [{lo:.4g}, {hi:.4g}] but the bernoulli likelihood needs data in "
                        "[0, 1] (scale the data, store uint8 0..255, or use --likelihood gaussian)")
    if cfg.binarize != "none":
        g = torch.Generator().manual_seed(cfg.split_seed + 1)
        test = binarize(test, g)
        if cfg.binarize == "static":
            train = binarize(train, g)
    value_range = (0.0, 1.0) if (lo >= 0.0 and hi <= 1.0) else (lo, hi if hi > lo else lo + 1.0)
    return DataBundle(train=train, test=test, name=name, value_range=value_range)
