"""benchmarks/gpu_checks.sh, so that the first GPU run cannot stop on a script error.

The dry run (the same steps and drivers on the emulated CUDA device and the Triton
interpreter, tiny sizes) runs once for the module; the GPU mode's own paths (parallel
compute-sanitizer jobs, time limits, ncu, a stopped run) run against stand-in tools that
answer instantly, since this machine has none of the hardware tools.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"


def _load(name: str):
    """A module of benchmarks/ (not a package) without putting benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu_checks = _load("gpu_checks")
sanitizer_driver = _load("sanitizer_driver")

SANITIZER_STEPS = [f"sanitizer_{tool}_{k}of2" for tool in ("memcheck", "racecheck", "synccheck", "initcheck") for k in (1, 2)]
STEPS = ["env", "build", "gpu_tests", "contract", "bandwidth", "bench_gpu", "terms", "trainer", "sanitizer_driver", *SANITIZER_STEPS,
         "sanitizer_memcheck_triton", "ncu"]
SUMMARY = "gpu_checks_summary.json"
ARCHIVE = "gpu_checks_logs.tar.gz"


def script_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FUSED_VAE_BACKEND", "FUSED_VAE_CUDA_EMULATE", "TRITON_INTERPRET")}
    env.update(OUT=str(tmp_path / "out"), GPU_CHECKS_WORK=str(tmp_path / "work"), PYTHON=sys.executable, **extra)
    return env


def run_script(tmp_path: Path, *args: str, timeout: float = 900, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=script_env(tmp_path, **extra), cwd=tmp_path)


def load(out: Path) -> tuple[dict, dict[str, bytes]]:
    """The summary and the archive's members of a run's $OUT, which must hold exactly those two files."""
    assert sorted(p.name for p in out.iterdir()) == [ARCHIVE, SUMMARY]
    summary = json.loads((out / SUMMARY).read_text())
    with tarfile.open(out / ARCHIVE, "r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return summary, members


def steps_by_name(summary: dict) -> dict[str, dict]:
    names = [s["name"] for s in summary["steps"]]
    assert names == STEPS
    return {s["name"]: s for s in summary["steps"]}


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    done = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# --------------------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dry")
    t0 = time.time()
    done = run_script(tmp, "--dry-run")
    print(f"dry run: {time.time() - t0:.0f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return load(tmp / "out")


def test_dry_run_runs_every_step_but_the_hardware_tools(dry_run):
    summary, _ = dry_run
    assert summary["mode"] == "dry-run" and summary["finished"] and summary["status"] == "ok"
    steps = steps_by_name(summary)
    for name in SANITIZER_STEPS:  # the cuda driver ran alone in sanitizer_driver
        assert steps[name]["status"] == "skipped" and steps[name]["skipped_tools"] == ["compute-sanitizer"]
        assert steps[name]["rc"] is None
    ran = [s for s in steps.values() if s["status"] != "skipped"]
    assert [s["name"] for s in ran] == ["env", "build", "gpu_tests", "contract", "bandwidth", "bench_gpu", "terms", "trainer",
                                        "sanitizer_driver", "sanitizer_memcheck_triton", "ncu"]
    for s in ran:
        assert (s["status"], s["rc"], s["timed_out"]) == ("ok", 0, False), s
        assert s["seconds"] <= s["limit_s"]
    # The hardware tools left out of the steps that ran; their drivers ran alone.
    assert {s["name"]: s["skipped_tools"] for s in ran if "skipped_tools" in s} == {
        "env": ["nvidia-smi"], "sanitizer_memcheck_triton": ["compute-sanitizer"], "ncu": ["ncu"]}


def test_dry_run_key_numbers_and_environment(dry_run):
    summary, _ = dry_run
    steps = steps_by_name(summary)
    assert steps["build"]["key"]["backends_ok"]
    for name in ("gpu_tests", "contract"):  # the selections are not empty
        assert steps[name]["key"]["pytest"]["collected"] > 0
    for name, backend in (("sanitizer_driver", "cuda"), ("sanitizer_memcheck_triton", "triton")):
        assert steps[name]["key"]["driver"].startswith(f"driver ok: {len(sanitizer_driver.cases('tiny', [backend]))}/")
    assert steps["bandwidth"]["key"]["complete"]
    assert set(steps["bandwidth"]["key"]["fwd_bwd_fraction_of_copy"]) == {
        f"cuda float32 {r}" for r in ("batchmean", "per_sample", "none", "prior_kl", "log_ratio", "log_prob")}
    terms = steps["terms"]["key"]  # the three cases of bench_terms.py, fused against eager
    assert {k.split()[2] for k in terms["speedup_of_fused"]} == {"prior_kl", "iwae_log_weight", "log_prob"}
    assert steps["bench_gpu"]["key"]["complete"] and steps["bench_gpu"]["key"]["errors"] == []
    trainer = steps["trainer"]["key"]  # one round of the default run, eager, trainer and plain loop
    assert list(trainer["steady_ms_per_step"]) == ["default eager"] and min(trainer["steady_ms_per_step"]["default eager"]) > 0
    assert trainer["targets"][0].split("]")[0] in ("[PASS", "[MISS")
    env = summary["environment"]
    for key in ("date_utc", "git_commit", "torch", "triton", "python"):
        assert env.get(key), key
    assert env["hardware_tools_skipped"] == ["nvidia-smi", "compute-sanitizer", "ncu"]


def test_dry_run_archive_holds_every_log_and_raw_result(dry_run):
    summary, members = dry_run
    for s in summary["steps"]:
        if s["status"] != "skipped":
            assert s["log"] in members and s["tail"], s["name"]
    for name in ("bandwidth.json", "bench_gpu.json", "bench_terms.json", "bench_trainer.json", "environment.json"):
        json.loads(members[f"gpu_checks/{name}"])
    assert json.loads(members["gpu_checks/bench_gpu.json"])["complete"]
    assert b"<testsuite" in members["gpu_checks/gpu_tests.xml"]


# --------------------------------------------------------------------------- GPU mode, stand-in tools

FAKE_SANITIZER = """#!/usr/bin/env bash
case $2 in
  memcheck) echo "========= ERROR SUMMARY: 0 errors" ;;
  racecheck) exec sleep 60 ;;
  synccheck) echo "========= ERROR SUMMARY: 2 errors"; exit 9 ;;
esac
"""
# ncu's details page, in the layout of Nsight Compute 2025 (kernel line, then sections).
FAKE_NCU = """#!/usr/bin/env bash
[[ " $* " == *" --import "* ]] || exit 0
cat <<'TXT'
[1234] python3@127.0.0.1
  void fused_vae::cuda::detail::reparam_kl_fwd_kernel<float, true>(fused_vae::cuda::FwdParams<T1>, long) (1056, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    DRAM Throughput                   %        91.02
    Duration                         us       180.35
  _bwd_kernel (2112, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Duration                         us       1,250.50
TXT
"""


@pytest.fixture
def fake_tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("compute-sanitizer", FAKE_SANITIZER), ("ncu", FAKE_NCU)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_gpu_mode_records_parallel_jobs_time_limits_and_ncu(tmp_path, fake_tools):
    only = "sanitizer_memcheck_1of2,sanitizer_racecheck_1of2,sanitizer_synccheck_1of2,ncu"
    done = run_script(tmp_path, "--only", only, LIMIT_sanitizer_racecheck_1of2="2", timeout=120, **fake_tools)
    assert done.returncode == 1, done.stdout + done.stderr
    summary, members = load(tmp_path / "out")
    assert summary["mode"] == "gpu" and summary["finished"]
    steps = steps_by_name(summary)
    assert steps["sanitizer_memcheck_1of2"]["status"] == "ok"
    assert steps["sanitizer_memcheck_1of2"]["key"]["sanitizer_errors"] == 0
    race = steps["sanitizer_racecheck_1of2"]
    assert (race["status"], race["rc"], race["timed_out"], race["limit_s"]) == ("timed_out", 124, True, 2)
    sync = steps["sanitizer_synccheck_1of2"]
    assert (sync["status"], sync["rc"], sync["key"]["sanitizer_errors"]) == ("failed", 9, 2)
    assert steps["ncu"]["status"] == "ok"
    assert steps["ncu"]["key"]["kernels"] == [
        {"kernel": "void fused_vae::cuda::detail::reparam_kl_fwd_kernel<float, true>(fused_vae::cuda::FwdParams<T1>, long)",
         "DRAM Throughput [%]": "91.02", "Duration [us]": "180.35"},
        {"kernel": "_bwd_kernel", "Duration [us]": "1,250.50"},
    ]
    for name in set(STEPS) - set(only.split(",")):
        assert steps[name]["status"] == "skipped" and "not selected" in steps[name]["reason"]
    assert "gpu_checks/logs/sanitizer_synccheck_1of2.log" in members


def test_spent_budget_leaves_valid_files_with_every_step_not_run(tmp_path):
    done = run_script(tmp_path, "--dry-run", BUDGET_S="0", timeout=120)
    assert done.returncode == 1
    summary, members = load(tmp_path / "out")
    assert summary["finished"]
    for s in steps_by_name(summary).values():
        assert s["status"] in ("no_time", "skipped"), s
    assert [s["name"] for s in summary["steps"] if s["status"] == "no_time"] == [
        "env", "build", "gpu_tests", "contract", "bandwidth", "bench_gpu", "terms", "trainer", "sanitizer_driver",
        "sanitizer_memcheck_triton", "ncu"]
    assert all(not name.endswith(".log") for name in members)


def test_stopped_run_records_the_running_step(tmp_path, fake_tools):
    p = subprocess.Popen(["bash", str(SCRIPT), "--only", "sanitizer_racecheck_1of2,ncu"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=script_env(tmp_path, **fake_tools), cwd=tmp_path)
    log = tmp_path / "work" / "logs" / "sanitizer_racecheck_1of2.log"
    deadline = time.time() + 60
    while not log.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 1, out
    summary, _ = load(tmp_path / "out")
    steps = steps_by_name(summary)
    assert steps["sanitizer_racecheck_1of2"]["status"] == "interrupted"
    assert steps["ncu"]["status"] == "pending"
    assert summary["finished"] and "sanitizer_racecheck_1of2" in summary["status"]


# --------------------------------------------------------------------------- log readers


def test_pytest_counts_from_summary_line_or_cut_off_log():
    done = "tests/test_a.py::t PASSED\n==== 3 failed, 700 passed, 12 skipped, 886 deselected in 81.20s (0:01:21) ====\n"
    assert gpu_checks.pytest_keys(done, Path())["pytest"] == {"failed": 3, "passed": 700, "skipped": 12, "deselected": 886}
    cut = "[gw0] [ 1%] PASSED tests/a.py::x\n[gw1] [ 2%] FAILED tests/a.py::y\n[gw0] [ 3%] PASSED tests/a.py::z\n"
    assert gpu_checks.pytest_keys(cut, Path()) == {"pytest_cut_off": {"failed": 1, "passed": 2}}


def test_ptxas_report_from_build_log():
    log = """ptxas info    : Compiling entry function '_ZN9fused_vae4cuda6detail21reparam_kl_bwd_kernel' for 'sm_90'
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 110 registers, used 0 barriers
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 8288 bytes smem
backends ok on cuda: cuda,triton
"""
    assert gpu_checks.build_keys(log, Path()) == {"backends_ok": True, "ptxas": {"kernels": 2, "max_registers": 110, "spill_bytes": 8}}


# --------------------------------------------------------------------------- the sanitizer driver's cases


def test_sanitizer_cases_cover_every_pair_and_shards_split_them():
    full = sanitizer_driver.cases("full", ["cuda"])
    dtypes, shapes = sanitizer_driver.TABLES[("full", "cuda")]
    assert {(c.dtype, c.shape, c.kl_mode) for c in full} == {(d, s, m) for d in dtypes for s in shapes for m in range(5)}
    assert len(full) == len(dtypes) * len(shapes) * 5
    for first, second in (("dtype", "shape"), ("dtype", "kl_mode"), ("shape", "kl_mode")):
        pairs = {}
        for c in full:
            pairs.setdefault((getattr(c, first), getattr(c, second)), set()).add((c.num_samples, c.shift))
        for key, seen in pairs.items():
            samples = {n for n, _ in seen}
            assert samples == ({1, 3} if second == "kl_mode" and key[1] == 0 else {0, 1, 3}), (first, second, key)
            assert {s for _, s in seen} == {0, 1}, (first, second, key)
    shards = [sanitizer_driver.shard(full, f"{k}/3") for k in (1, 2, 3)]
    assert sorted(map(str, sum(shards, []))) == sorted(map(str, full))
    with pytest.raises(SystemExit, match="1 <= K <= N"):
        sanitizer_driver.shard(full, "4/3")


def test_steps_after_a_failed_build_run_without_the_extension(tmp_path):
    # The extension cannot load here (disabled), as after a failed or timed-out build.
    done = run_script(tmp_path, "--dry-run", "--only", "build", FUSED_VAE_DISABLE_EXTENSION="1", timeout=300)
    summary, members = load(tmp_path / "out")
    assert b"extension loaded: no" in members["gpu_checks/logs/build.log"], done.stdout
    assert any("FUSED_VAE_DISABLE_EXTENSION=1" in note for note in summary["notes"])
