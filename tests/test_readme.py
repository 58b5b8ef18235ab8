"""README.md says only what is true: its Python snippets run (or are excerpts of a file that
a test runs), the commands it shows exist with the options it uses, the extras it names are
defined, and every repository path it mentions exists."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"(?:<!-- excerpt: (?P<source>\S+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
BLOCKS = [(m["lang"], m["source"], m["body"]) for m in FENCE.finditer(README)]
PATH_ROOTS = ("fused_vae/", "csrc/", "benchmarks/", "tests/", "examples/", "docs/", ".ci/")
TOP_FILES = ("setup.py", "pyproject.toml", "README.md")


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FUSED_VAE_BACKEND", None)
    return env


def _python_blocks(kind: str) -> list:
    blocks = [(src, body) for lang, src, body in BLOCKS if lang == "python"]
    chosen = [(src, body) for src, body in blocks if (src is not None) == (kind == "excerpt")]
    return [pytest.param(src, body, id=f"{kind}{i}") for i, (src, body) in enumerate(chosen)]


@pytest.mark.parametrize("source,body", _python_blocks("excerpt"))
def test_excerpts_are_lines_of_their_file(source, body):
    """A block marked ``<!-- excerpt: FILE -->`` is a run of FILE's lines (FILE is run below)."""
    lines = (ROOT / source).read_text().splitlines()
    want = [ln.strip() for ln in body.strip().splitlines()]
    have = [ln.strip() for ln in lines]
    starts = [i for i, ln in enumerate(have) if ln == want[0]]
    assert any(have[i : i + len(want)] == want for i in starts), f"README's excerpt is not in {source}"


@pytest.mark.parametrize("source,body", _python_blocks("snippet"))
def test_python_snippets_run(source, body, tmp_path):
    if "fused_vae.integrations.diffusers" in body:
        pytest.importorskip("diffusers")
    if "fused_vae.training" in body:
        pytest.importorskip("sklearn")
    r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_quickstart_example_runs_and_learns(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "60"], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    elbos = [float(m) for m in re.findall(r"-ELBO\s+([\d.]+)", r.stdout)]
    assert len(elbos) >= 2 and elbos[-1] < 0.9 * elbos[0], r.stdout


@cache
def _help(subcommand: str) -> str:
    r = subprocess.run([sys.executable, "-m", "fused_vae", subcommand, "--help"], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _commands() -> list[list[str]]:
    """The shell commands of README's bash blocks, comments and line continuations removed."""
    out = []
    for lang, _, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def test_fused_vae_commands_use_existing_options():
    seen = 0
    for argv in _commands():
        if "fused-vae" in argv:
            rest = argv[argv.index("fused-vae") + 1 :]
        elif "fused_vae" in argv and "-m" in argv:
            rest = argv[argv.index("fused_vae") + 1 :]
        else:
            continue
        if not rest:
            continue
        seen += 1
        text = _help(rest[0])
        for opt in (a.split("=", 1)[0] for a in rest[1:] if a.startswith("--")):
            assert re.search(rf"{re.escape(opt)}\b", text), f"`fused-vae {rest[0]}` has no option {opt}: {argv}"
    assert seen >= 5


def test_scripts_and_extras_in_commands_exist():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for argv in _commands():
        for arg in argv:
            if arg.endswith((".py", ".sh")) and "/" in arg:
                assert (ROOT / arg).is_file(), f"README runs {arg}, which does not exist"
            m = re.fullmatch(r"\.\[([\w,]+)\]", arg)
            if m:
                assert set(m[1].split(",")) <= extras, f"README installs unknown extras: {arg}"


def _layout_paths() -> list[str]:
    """The paths of the Layout section's tree (two spaces of indent per folder level)."""
    body = README[README.index("## Layout") :].split("```")[1]
    stack: list[tuple[int, str]] = []
    out = []
    for line in body.splitlines()[1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        if not re.fullmatch(r"[\w./-]+(/|\.\w+)", name):
            continue  # a description's continuation line
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(p for _, p in stack) + name
        out.append(path)
        if name.endswith("/"):
            stack.append((indent, name))
    return out


def test_every_path_readme_mentions_exists():
    mentioned = set(re.findall(r"`([^`\s]+)`", README)) | set(re.findall(r"\]\(([^)\s]+)\)", README))
    paths = {c.rstrip(",.:;").split("::")[0] for c in mentioned}
    paths = {p for p in paths if p.startswith(PATH_ROOTS) or p in TOP_FILES}
    layout = _layout_paths()
    assert len(paths) >= 20 and len(layout) >= 20
    for path in sorted(paths | set(layout)):
        assert (ROOT / path).exists(), f"README mentions {path}, which does not exist"


def test_ci_runs_exactly_readmes_test_command():
    """README shows one test command, and .ci/run runs it character for character."""
    shown = {line.split(" #", 1)[0].strip() for lang, _, body in BLOCKS if lang == "bash"
             for line in body.splitlines() if "pytest" in line and not line.lstrip().startswith("#")}
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(shown) == 1 and ci == sorted(shown), (shown, ci)
