"""Checkpoints: plain containers written atomically, read without unpickling objects."""

from __future__ import annotations

import errno
import os
import re
import uuid
from pathlib import Path

import torch

FORMAT = "fused_vae.checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "model", "model_spec", "config", "epoch", "step")


class CheckpointError(RuntimeError):
    """A missing, corrupt or incompatible checkpoint; the message names the path."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (a full disk, no permission, ...); any earlier file at that
    path is intact (see :func:`atomic_save`). The message names the file and how to go on."""


def write_error(path: str | Path, err: OSError, *, last_good: tuple[Path, int] | None,
                run_dir: str | Path) -> CheckpointWriteError:
    """The one-line error for a failed write of checkpoint ``path`` by a run in ``run_dir``:
    the file and the cause (``err``), the last good checkpoint ``(path, step)`` (None: none was
    written yet) and the command that resumes from it."""
    cause = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    if last_good is None:
        good = "no earlier checkpoint of this run was written, so nothing was lost; free space and start again"
    else:
        good = (f"the last good checkpoint {last_good[0]} (step {last_good[1]}) is intact; free space and resume "
                f"with: fused-vae train --resume {run_dir}")
    return CheckpointWriteError(f"cannot write checkpoint {path}: {cause}; {good}")


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # pragma: no cover - directories cannot be fsync'd on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` so that a crash leaves either the old or the new file:
    write a temp file in the same directory, flush + fsync, ``os.replace``, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def save_run_checkpoint(obj, path: str | Path, *, last_good: tuple[Path, int] | None, run_dir: str | Path) -> None:
    """:func:`atomic_save` for a training run in ``run_dir`` whose last good checkpoint is
    ``last_good`` (``(path, step)`` or None).

    Raises:
        CheckpointWriteError: the write failed (:func:`write_error`'s message); ``path`` is unchanged.
    """
    try:
        atomic_save(obj, path)
    except OSError as e:
        raise write_error(path, e, last_good=last_good, run_dir=run_dir) from None


def capture_rng_state() -> dict:
    """torch's CPU and CUDA generator states as uint8 tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restores what :func:`capture_rng_state` saved (CUDA states only where devices match)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def make_checkpoint(*, model, optimizer=None, scheduler=None, epoch: int, step: int, batch_in_epoch: int = 0,
                    config: dict, model_spec: dict, data_info: dict | None = None, metrics: dict | None = None) -> dict:
    """The checkpoint dict: only tensors, dicts, lists, numbers, strings and None.

    ``epoch``: completed epochs; ``step``: completed optimizer steps; ``batch_in_epoch``:
    steps done in the current (unfinished) epoch, 0 at an epoch boundary.
    """
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model.state_dict(),
        "model_spec": dict(model_spec),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "epoch": int(epoch),
        "step": int(step),
        "batch_in_epoch": int(batch_in_epoch),
        "config": dict(config),
        "data": dict(data_info or {}),
        "metrics": dict(metrics or {}),
        "torch_version": str(torch.__version__),
    }


def save_checkpoint(path: str | Path, **kwargs) -> None:
    """:func:`make_checkpoint` (keyword arguments) written with :func:`atomic_save`."""
    atomic_save(make_checkpoint(**kwargs), path)


# The first bytes of what torch.save writes: a zip archive, or (the legacy format) a pickle.
_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


def _why_unreadable(path: Path, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed with ``err``, for a user: never torch's
    advice to load with ``weights_only=False``, which runs whatever code the file holds."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty (corrupt or truncated); it is not a fused_vae checkpoint"
    if not head.startswith(_TORCH_SAVE_MAGIC):
        return (f"not a fused_vae checkpoint: not a file written by torch.save (it starts with {head!r}; "
                "corrupt, truncated or another kind of file)")
    text = str(err)
    if "weights_only" in text or "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({found[1]})" if found else ""
        return (f"not a fused_vae checkpoint: it holds Python objects{what}, where a checkpoint holds only tensors, "
                "numbers, strings, lists and dicts; it was not loaded, since unpickling such objects can run any code")
    first = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()
    return (f"the file is corrupt or truncated, or not a fused_vae checkpoint ({type(err).__name__}: "
            f"{first[0] if first else 'no detail'})")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Loads and checks a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing file, a file that is not a (complete) checkpoint, one that
            holds arbitrary objects, or an unknown format version. The message names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"cannot load checkpoint {path}: {_why_unreadable(path, e)}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fused_vae checkpoint (no format marker {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in ck]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if ck["version"] != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ck['version']}; this fused_vae reads {VERSION}")
    return ck
