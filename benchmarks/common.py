"""Helpers shared by the benchmark scripts: timing, environment record and result files.

Every script times with :func:`time_calls` (``torch.utils.benchmark.Timer``, the
implementations' timed blocks interleaved), records :func:`environment` next to the raw
numbers and writes its JSON with :func:`write_result` under :data:`RESULTS_DIR`.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.benchmark import Measurement, Timer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_RAW_TIMES = 100  # block times kept per measurement in a result file (evenly spaced)


def cpu_model() -> str:
    """The processor's model name (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict:
    """The commit of the checkout that ``fused_vae`` is imported from and its uncommitted
    changes to the measured code (``fused_vae/``, ``csrc/``), so a result names the code it timed."""
    import fused_vae

    root = Path(fused_vae.__file__).resolve().parent.parent
    changed = _git("status", "--porcelain", "--", "fused_vae", "csrc", cwd=root)
    return {
        "checkout": str(root),
        "commit": _git("rev-parse", "HEAD", cwd=root),
        "uncommitted_code_changes": changed.splitlines() if changed else [],
    }


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment() -> dict:
    """Machine, versions, threads, load, git commit and date to store next to raw numbers
    (call it when a run starts; add ``load_average()`` at the end)."""
    import fused_vae

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average_1_5_15min": load_average(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_vae": fused_vae.__version__,
        "platform": platform.platform(),
        "git": git_state(),
    }
    try:
        env["cxx"] = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_capability"] = list(torch.cuda.get_device_capability(0))
        env["gpu_sm_count"] = props.multi_processor_count
        env["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def summarize(measurement: Measurement, calls: int) -> dict:
    """JSON-able statistics of a (merged) Measurement over its timed blocks (seconds per
    call): median, IQR, 10th percentile and minimum, the number of calls and blocks
    timed, and up to MAX_RAW_TIMES block times."""
    times = measurement.times  # seconds per call, one entry per timed block
    stride = max(1, len(times) // MAX_RAW_TIMES)
    return {
        "median_s": measurement.median,
        "iqr_s": measurement.iqr,
        "p10_s": float(torch.tensor(times, dtype=torch.float64).quantile(0.1)),
        "min_s": min(times),
        "runs": calls,
        "blocks": len(times),
        "times_s_every_nth_block": stride,
        "times_s": times[::stride][:MAX_RAW_TIMES],
    }


def speedup(timings: dict[str, dict], base: str, new: str) -> dict:
    """How many times faster ``new`` ran than ``base`` in a :func:`time_calls` result, by
    the median and by the 10th percentile. Noise on a shared machine only adds time, so
    when calls are descheduled in many blocks (the median jumps between modes) the
    10th-percentile ratio is the steadier one."""
    return {stat: timings[base][f"{stat}_s"] / timings[new][f"{stat}_s"] for stat in ("median", "p10")}


def time_calls(fns: dict[str, Callable[[], object]], *, min_run_time: float = 1.0, warmup: int = 3,
               block_time: float = 1e-3) -> dict[str, dict]:
    """Times each zero-argument callable of ``fns`` side by side.

    Each callable is called ``warmup`` times (compilation, allocator), its time per call
    estimated with ``torch.utils.benchmark.Timer.blocked_autorange``, and its block size
    set to the calls that take about ``block_time`` seconds (at least one). The blocks are
    then timed with ``Timer.timeit`` in turn (A, B, C, A, B, C, ...) until each callable
    has run for ``min_run_time`` seconds, so bursts of load on a shared machine hit every
    implementation alike; short blocks let the median skip the blocks in which the
    process was descheduled. Runs on the current ``torch.get_num_threads()``; where an
    accelerator is present the Timer synchronises it around each block, so device time
    counts.

    Returns:
        ``{name: summarize(...)}``: ``median_s`` and ``iqr_s`` per call over the blocks,
        ``runs`` (calls timed), ``blocks`` and raw block times.
    """
    threads = torch.get_num_threads()
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}, label=name, num_threads=threads) for name, fn in fns.items()}
    number = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        per_call = timers[name].blocked_autorange(min_run_time=0.05).median
        number[name] = max(1, round(block_time / max(per_call, 1e-9)))
    parts: dict[str, list[Measurement]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)
    while any(t < min_run_time for t in spent.values()):
        for name, timer in timers.items():
            if spent[name] < min_run_time:
                m = timer.timeit(number[name])
                parts[name].append(m)
                spent[name] += m.raw_times[0]
    results = {}
    for name, ms in parts.items():
        calls = sum(len(m.raw_times) * m.number_per_run for m in ms)
        (merged,) = Measurement.merge(ms)
        results[name] = summarize(merged, calls)
    return results


def timing_method(min_run_time: float) -> str:
    """How :func:`time_calls` measured, for the ``method`` field of a result file."""
    return ("benchmarks/common.py time_calls: torch.utils.benchmark.Timer, 3 warm-up calls, blocks of about 1 ms "
            "(at least one call) sized with blocked_autorange, the implementations' blocks timed in turn until each "
            f"ran {min_run_time:g} s; median and IQR of the per-call time over blocks")


def result_path(kind: str, *, quick: bool = False) -> Path:
    """``RESULTS_DIR/<kind>-<UTC date>T<HHMM>Z[-quick].json``: what the file holds and when."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    return RESULTS_DIR / f"{kind}-{stamp}{'-quick' if quick else ''}.json"


def write_result(path: Path, payload: dict) -> Path:
    """Writes the JSON result file (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def save_result(args, kind: str, payload: dict) -> int:
    """Writes ``payload`` to ``args.out`` or :func:`result_path` (``kind``, ``args.quick``), prints
    the path and returns 0 (a benchmark's exit status)."""
    print(write_result(args.out or result_path(kind, quick=args.quick), payload))
    return 0


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def mmap_large_allocations(threshold: int = 64 * 1024) -> bool:
    """Makes glibc mmap (and on free, unmap) every allocation over ``threshold`` bytes, so
    that the resident set follows what is allocated (for :func:`peak_rss_delta_bytes`)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except OSError:
        return False


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_delta_bytes(fn) -> int:
    """Peak resident set during ``fn()`` above the resident set before it (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - before) * 1024


def saved_bytes(fn, exclude, extra=None) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``fn()`` runs
    (``saved_tensors_hooks``) and of the tensors ``extra()`` names after it (e.g. attributes
    kept alive), leaving out those of the tensors in ``exclude`` (the inputs, which the caller
    holds anyway) and of ``fn``'s returned tensors."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    skip = {t.untyped_storage().data_ptr() for t in (*exclude, *outs) if isinstance(t, torch.Tensor)}
    storages = {}
    for t in saved + (list(extra()) if extra is not None else []):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def us(seconds: float) -> str:
    """``seconds`` as microseconds for a table cell, e.g. ``'  42.1 us'``."""
    return f"{seconds * 1e6:8.1f} us"
