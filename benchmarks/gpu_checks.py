"""The helper of benchmarks/gpu_checks.sh: its summary JSON, its log archive, and two steps.

Subcommands (the script calls them; stdlib only, except ``env`` and ``build``):

- ``init``: writes the summary with every planned step ``pending`` and an empty archive.
- ``record``: stores one step's outcome (status, rc, seconds, time limit, timed_out, the
  tail of its log and its key numbers), then rewrites the summary and the archive.
  Both are written to a temporary name and renamed, so whenever the script is killed
  ``$OUT`` holds a valid summary and a valid archive of everything finished so far.
- ``note``: adds a line to the summary's notes.
- ``finish``: marks the run finished with its overall status.
- ``env``: the environment (benchmarks/common.py's record, the GPU and its driver from
  nvidia-smi, the tools' versions) as JSON; the summary takes it on the next ``record``.
- ``build``: loads (JIT-builds) the extension and checks that the backends run on the device.

Step statuses: ``ok``, ``failed``, ``timed_out`` (killed at its time limit: rc 124, or
137 when it ignored SIGTERM), ``interrupted`` (the script was stopped), ``skipped`` (on
purpose: a hardware tool in a dry run, or not selected by ``--only``), ``no_time`` (the
run's time budget was spent before the step) and ``pending`` (not reached yet).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

ENVIRONMENT_FILE = "environment.json"
LOG_DIR = "logs"
TAIL_LINES = 12
TAIL_LINE_CHARS = 300
MAX_ARCHIVE_MEMBER = 8 << 20  # bytes; larger files are left out of the archive (and named)
TIMEOUT_RCS = (124, 137)  # GNU timeout: SIGTERM sent at the limit, SIGKILL after the grace period


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, write) -> None:
    """Writes ``path`` through ``write(tmp_path)`` and a rename (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)


def git_commit() -> str | None:
    """``GIT_COMMIT`` from the environment (a copy without .git), else ``git rev-parse HEAD``."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# --------------------------------------------------------------------------- key numbers


def tail(log: Path) -> list[str]:
    """The last TAIL_LINES non-empty lines of ``log``, each cut to TAIL_LINE_CHARS."""
    try:
        lines = [ln.rstrip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []
    return [ln[:TAIL_LINE_CHARS] for ln in lines[-TAIL_LINES:]]


_PYTEST_LINE = re.compile(r"\b(?:passed|failed|skipped|errors?|collected|deselected)\b.* in [\d.]+s")
_PYTEST_COUNT = re.compile(r"(\d+)(?:/\d+)? (tests? collected|passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


_PYTEST_OUTCOME = re.compile(r" (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def pytest_keys(text: str, _work: Path) -> dict:
    """Counts from pytest's last summary line ('3 passed, 2 skipped in 1.2s', 'N tests collected'),
    or, for a run cut off before it, the outcomes of ``-v``'s one line per test."""
    lines = [ln for ln in text.splitlines() if _PYTEST_LINE.search(ln)]
    if not lines:
        outcomes = [m.group(1).lower() for ln in text.splitlines() if (m := _PYTEST_OUTCOME.search(ln))]
        return {"pytest_cut_off": {o: outcomes.count(o) for o in sorted(set(outcomes))}} if outcomes else {}
    counts = {word.split()[-1].rstrip("s") if "collected" not in word else "collected": int(n)
              for n, word in _PYTEST_COUNT.findall(lines[-1])}
    return {"pytest": counts, "pytest_line": lines[-1].strip("= ")}


def build_keys(text: str, _work: Path) -> dict:
    """ptxas's report of the kernels compiled in the build (nvcc -Xptxas -v)."""
    regs = [int(r) for r in re.findall(r"ptxas info\s*: Used (\d+) registers", text)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    keys = {"backends_ok": "backends ok" in text}
    if regs:
        keys["ptxas"] = {"kernels": len(regs), "max_registers": max(regs), "spill_bytes": sum(spills)}
    return keys


def bandwidth_keys(_text: str, work: Path) -> dict:
    """Copy bandwidth and each case's forward+backward fraction of it (bandwidth.py's JSON)."""
    data = read_json(work / "bandwidth.json")
    if not data:
        return {}
    return {
        "copy_GBps": round(data.get("copy_bytes_per_s", 0) / 1e9, 1),
        "fwd_bwd_fraction_of_copy": {
            f"{c['backend']} {c['dtype']} {c.get('reduction') or c['op']}": round(c["fwd_bwd_fraction_of_copy"], 3)
            for c in data["cases"]
        },
        "complete": bool(data.get("complete")),
    }


def bench_keys(_text: str, work: Path) -> dict:
    """bench_gpu.py's copy bandwidth, targets and error rows."""
    data = read_json(work / "bench_gpu.json")
    if not data:
        return {}
    return {
        "copy_GBps": round(data["copy_bandwidth"]["GBps"], 1),
        "rows": len(data["results"]),
        "errors": [f"{r['impl']} {r['dtype']} {r['shape']} {r['pass']}: {r['error'][:120]}" for r in data["results"] if "error" in r],
        "targets": data.get("targets", []),
        "complete": bool(data.get("complete")),
    }


def trainer_keys(_text: str, work: Path) -> dict:
    """bench_trainer.py's targets and each case's steady ms/step (trainer, plain loop)."""
    data = read_json(work / "bench_trainer.json")
    if not data:
        return {}
    return {
        "targets": data.get("targets", []),
        "steady_ms_per_step": {f"{r['config']} {r['variant']}": [round(r["steady_ms_per_step"][side]["median"], 3)
                                                                 for side in ("trainer", "plain")]
                               for r in data["results"]},
        "over_eager_steady": data.get("over_eager_steady", {}),
    }


def terms_keys(_text: str, work: Path) -> dict:
    """bench_terms.py's target checks and each case's speed-up of the fused op over the others."""
    data = read_json(work / "bench_terms.json")
    if not data:
        return {}
    return {
        "target_checks": data.get("target_checks", {}),
        "speedup_of_fused": {f"{threads} {case} {shape}": {k: round(v["median"], 3) for k, v in r["speedup_of_fused"].items()}
                             for threads, cases in data["results"].items() for case, shapes in cases.items()
                             for shape, r in shapes.items()},
    }


def sanitizer_keys(text: str, _work: Path) -> dict:
    """compute-sanitizer's error count and how far the driver got."""
    keys = {}
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    if errors:
        keys["sanitizer_errors"] = int(errors[-1])
    cases = re.findall(r"^case (\d+)/(\d+):", text, re.MULTILINE)
    if cases:
        keys["cases_started"] = f"{cases[-1][0]}/{cases[-1][1]}"
    done = [ln for ln in text.splitlines() if ln.startswith("driver ")]
    if done:
        keys["driver"] = done[-1]
    return keys


_NCU_KERNEL = re.compile(r"^\s{0,4}(\S.*?)\s+\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), Context")
_NCU_METRIC = re.compile(r"^\s+(Duration|DRAM Throughput|Registers Per Thread|Achieved Occupancy)\s+(\S+)\s+([\d.,]+)\s*$")


def ncu_keys(text: str, _work: Path) -> dict:
    """Per profiled kernel: duration, DRAM throughput, registers, achieved occupancy."""
    kernels, current = [], None
    for line in text.splitlines():
        m = _NCU_KERNEL.match(line)
        if m:
            current = {"kernel": m.group(1)[:120]}
            kernels.append(current)
            continue
        m = _NCU_METRIC.match(line)
        if m and current is not None:
            current[f"{m.group(1)} [{m.group(2)}]"] = m.group(3)
    return {"kernels": kernels} if kernels else {}


def key_function(name: str):
    """The key-number reader of a step, by name."""
    if name.startswith("sanitizer"):
        return sanitizer_keys
    return {"gpu_tests": pytest_keys, "contract": pytest_keys, "build": build_keys, "bandwidth": bandwidth_keys,
            "bench_gpu": bench_keys, "terms": terms_keys, "trainer": trainer_keys, "ncu": ncu_keys}.get(name)


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or not JSON (a step cut off mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- summary and archive


def save(summary: dict, summary_path: Path, archive_path: Path, work: Path) -> None:
    """Writes the archive of ``work`` (files over MAX_ARCHIVE_MEMBER left out and named), then the summary."""
    env = read_json(work / ENVIRONMENT_FILE)
    if env:
        summary["environment"].update(env)
    left_out = []

    def write_archive(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted(p for p in work.rglob("*") if p.is_file()):
                if f.stat().st_size > MAX_ARCHIVE_MEMBER:
                    left_out.append(f"{f.relative_to(work)} ({f.stat().st_size} bytes)")
                    continue
                tar.add(f, arcname=f"gpu_checks/{f.relative_to(work)}")

    write_atomic(archive_path, write_archive)
    summary["archive"] = {"file": archive_path.name, "left_out": left_out}
    summary["updated_utc"] = now()
    write_atomic(summary_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))


def cmd_init(a) -> int:
    """Writes the summary with every planned step pending, and an empty archive."""
    work = Path(a.work)
    (work / LOG_DIR).mkdir(parents=True, exist_ok=True)
    summary = {
        "script": "benchmarks/gpu_checks.sh",
        "mode": a.mode,
        "budget_s": a.budget,
        "started_utc": now(),
        "finished": False,
        "status": "running",
        "notes": a.note,
        "environment": {"date_utc": now(), "host": socket.gethostname(), "git_commit": git_commit()},
        "steps": [{"name": n, "status": "pending"} for n in a.steps.split(",") if n],
    }
    save(summary, Path(a.summary), Path(a.archive), work)
    return 0


def cmd_record(a) -> int:
    """Stores one step's outcome (status from ``--status``, else from its rc) and rewrites both files."""
    summary_path, work = Path(a.summary), Path(a.work)
    summary = json.loads(summary_path.read_text())
    log = work / LOG_DIR / f"{a.name}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    step = {"name": a.name, "status": a.status, "rc": a.rc, "seconds": a.seconds, "limit_s": a.limit,
            "timed_out": a.status == "timed_out"}
    if a.status is None:
        step["status"] = "ok" if a.rc == 0 else ("timed_out" if a.rc in TIMEOUT_RCS else "failed")
        step["timed_out"] = step["status"] == "timed_out"
    if a.reason:
        step["reason"] = a.reason
    if a.skipped_tools:
        step["skipped_tools"] = a.skipped_tools.split(",")
    if a.command:
        step["command"] = a.command
    if text:
        step["log"] = f"gpu_checks/{LOG_DIR}/{a.name}.log"
        step["tail"] = tail(log)
    reader = key_function(a.name)
    if reader is not None and step["status"] not in ("skipped", "no_time"):
        step["key"] = reader(text, work)
    steps = summary["steps"]
    at = next((i for i, s in enumerate(steps) if s["name"] == a.name), None)
    if at is None:
        steps.append(step)
    else:
        steps[at] = step
    save(summary, summary_path, Path(a.archive), work)
    return 0


def cmd_note(a) -> int:
    """Adds a line to the summary's notes (what changed for the steps after this point)."""
    summary_path = Path(a.summary)
    summary = json.loads(summary_path.read_text())
    summary["notes"].append(a.text)
    save(summary, summary_path, Path(a.archive), Path(a.work))
    return 0


def cmd_finish(a) -> int:
    """Marks the run finished, prints a table of the steps; 1 when a step is not ok or skipped."""
    summary_path = Path(a.summary)
    summary = json.loads(summary_path.read_text())
    bad = [s["name"] for s in summary["steps"] if s["status"] not in ("ok", "skipped")]
    summary["finished"] = True
    summary["finished_utc"] = now()
    summary["status"] = "ok" if not bad else "incomplete or failed: " + ", ".join(bad)
    save(summary, summary_path, Path(a.archive), Path(a.work))
    print(f"gpu_checks: {summary['status']}")
    for s in summary["steps"]:
        extra = s.get("reason", "") or " ".join(s.get("tail", [])[-1:])
        print(f"  {s['name']:<28} {s['status']:<10} rc={s.get('rc')} {s.get('seconds', 0) or 0:>5}s  {extra[:100]}")
    return 0 if not bad else 1


# --------------------------------------------------------------------------- env and build steps


def tool_output(argv: list[str]) -> str | None:
    """stdout of a short tool call, None when the tool is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cmd_env(a) -> int:
    """Writes the environment JSON (``--out``) and prints it, with nvidia-smi's report on a GPU."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import environment

    env = environment()
    env["git_commit"] = git_commit() or (env.get("git") or {}).get("commit")
    env["python_executable"] = sys.executable
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    tools = {"nvcc": ["nvcc", "--version"]}
    if a.hardware:
        tools.update({
            "nvidia-smi": ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            "compute-sanitizer": ["compute-sanitizer", "--version"],
            "ncu": ["ncu", "--version"],
        })
        full = tool_output(["nvidia-smi"])
        print(full or "nvidia-smi: not available")
    else:
        env["hardware_tools_skipped"] = ["nvidia-smi", "compute-sanitizer", "ncu"]
    for name, argv in tools.items():
        out = tool_output(argv)
        env[name] = out.splitlines()[-1] if out else None
    if env.get("nvidia-smi"):
        parts = [p.strip() for p in env["nvidia-smi"].split(",")]
        env["gpu_driver"] = parts[1] if len(parts) > 1 else None
    Path(a.out).write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2))
    print(f"environment: torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env.get('triton')}, "
          f"GPU {env.get('gpu')}, driver {env.get('gpu_driver')}, commit {env['git_commit']}")
    return 0


def cmd_build(a) -> int:
    """Loads (JIT-builds) the extension; 1 when a requested backend cannot run on ``--device``."""
    import fused_vae as fv
    from fused_vae.backends import extension

    info = fv.available_backends()
    print(info)
    print(f"extension loaded: {'yes' if extension.status().loaded else 'no'}")
    missing = [f"{b}: {info[b].reason or 'no ' + a.device + ' device'}" for b in a.backends.split(",")
               if not (info[b].available and a.device in info[b].devices)]
    if missing:
        print("backends missing on " + a.device + ": " + "; ".join(missing), file=sys.stderr)
        return 1
    print(f"backends ok on {a.device}: {a.backends}")
    return 0


def main(argv=None) -> int:
    """Command line entry: the subcommands of the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--summary", required=True, help="the summary JSON")
    files.add_argument("--archive", required=True, help="the tar.gz of the work folder")
    files.add_argument("--work", required=True, help="the work folder (logs/, raw results)")
    s = sub.add_parser("init", parents=[files])
    s.add_argument("--mode", required=True, choices=("gpu", "dry-run"))
    s.add_argument("--budget", type=float, required=True)
    s.add_argument("--steps", required=True, help="comma list of the planned steps")
    s.add_argument("--note", action="append", default=[], help="a note for the summary (repeatable)")
    s = sub.add_parser("record", parents=[files])
    s.add_argument("--name", required=True)
    s.add_argument("--rc", type=int, default=None)
    s.add_argument("--seconds", type=float, default=None)
    s.add_argument("--limit", type=float, default=None)
    s.add_argument("--status", choices=("skipped", "no_time", "interrupted"), default=None, help="default: from rc")
    s.add_argument("--reason", default=None)
    s.add_argument("--skipped-tools", default=None, help="comma list of hardware tools the step left out")
    s.add_argument("--command", default=None)
    s = sub.add_parser("note", parents=[files])
    s.add_argument("text")
    sub.add_parser("finish", parents=[files])
    s = sub.add_parser("env")
    s.add_argument("--out", required=True)
    s.add_argument("--no-hardware", dest="hardware", action="store_false", help="skip nvidia-smi, compute-sanitizer, ncu")
    s = sub.add_parser("build")
    s.add_argument("--device", required=True, choices=("cuda", "cpu"))
    s.add_argument("--backends", default="cuda,triton")
    a = p.parse_args(argv)
    commands = {"init": cmd_init, "record": cmd_record, "note": cmd_note, "finish": cmd_finish, "env": cmd_env, "build": cmd_build}
    return commands[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
