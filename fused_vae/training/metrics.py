"""Metrics to ``metrics.jsonl`` (one JSON object a line), ``metrics.csv`` and, when it is
installed, TensorBoard."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from .config import ConfigError


def check_tensorboard(tensorboard: str) -> bool:
    """Whether TensorBoard logging will run for the ``tensorboard`` option (auto, on, off).

    Raises:
        ConfigError: ``"on"`` but the tensorboard package is not installed.
    """
    if tensorboard == "off":
        return False
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        if tensorboard == "on":
            raise ConfigError("tensorboard: 'on' needs the tensorboard package (pip install tensorboard); "
                              "or pass --tensorboard auto or off") from None
        return False
    return True


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    return v


class MetricsLogger:
    """Appends records (flat dicts with a ``kind`` and a ``step``) to ``run_dir/metrics.jsonl``.

    Args:
        run_dir: output directory.
        tensorboard: ``"auto"`` (use it if importable), ``"on"`` (required), ``"off"``.
        resume_step: keep only earlier records with ``step <= resume_step`` (a resumed run
            rewrites what came after its checkpoint); None starts a new file.

    Raises:
        ConfigError: ``tensorboard="on"`` but tensorboard is not installed.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: str = "auto", resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self.records: list[dict] = []
        if resume_step is not None and self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        with open(self.jsonl, "w") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")
        self.writer = None
        if tensorboard != "off" and check_tensorboard(tensorboard):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict) -> None:
        """Appends one record (``kind``, ``step`` and numbers/strings) and flushes it."""
        rec = {k: _clean(v) for k, v in record.items()}
        self.records.append(rec)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.writer is not None:
            kind = rec.get("kind", "metrics")
            for k, v in rec.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{kind}/{k}", v, rec.get("step", 0))

    def write_csv(self) -> None:
        """Rewrites ``metrics.csv`` from all records (columns: union of their keys)."""
        keys: list[str] = []
        for rec in self.records:
            keys += [k for k in rec if k not in keys]
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.records)

    def close(self) -> None:
        """Writes the CSV and closes TensorBoard. A CSV that cannot be written (a full disk, say)
        is reported on stderr, not raised: it repeats ``metrics.jsonl``, and an error that
        stopped the run, often the same full disk, must stay the one reported."""
        try:
            self.write_csv()
        except OSError as e:
            print(f"fused-vae: could not write {self.csv} ({e.strerror or e}); {self.jsonl} holds the same records",
                  file=sys.stderr, flush=True)
        if self.writer is not None:
            self.writer.close()
            self.writer = None
