"""Command line: ``fused-vae train | eval | sample`` (also ``python -m fused_vae``).

Option precedence for ``train``: built-in defaults < ``--preset NAME`` < ``--config FILE`` <
the checkpoint's config (with ``--resume``) < options given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: the argument, what was expected, and where
    the options are listed (argparse's own prints the whole usage first)."""

    def error(self, message: str):
        """Prints ``PROG: error: MESSAGE`` and a pointer to ``--help`` on one line; exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def arg_type(kind: type, *, minimum=None, words: tuple[str, ...] = ()):
    """An argparse ``type`` that parses ``kind`` (int, float or str), at least ``minimum`` when
    given, or one of ``words`` as it is; anything else is refused with what was expected
    (``argument --lr: expected a number, got 'abc'``)."""
    from .training.config import TYPE_NAMES

    what = TYPE_NAMES[kind][0] + ("" if minimum is None else f" >= {minimum}")
    what = " or ".join([what, *map(repr, words)])

    def parse(text: str):
        if text in words:
            return text
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


GROUP_TITLES = {
    "data": "data",
    "model": "model",
    "objective": "objective (elbo: loss = reconstruction + beta * KL; iwae: loss = -L_K)",
    "optimisation": "optimisation",
    "output": "evaluation and outputs",
}


def _train_fields():
    from .training.config import TrainConfig

    return dataclasses.fields(TrainConfig)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .training.presets import PRESETS

    p.add_argument("--preset", choices=tuple(PRESETS), metavar="NAME",
                   help="start from a named option set; iwae-mnist: the IWAE paper's MNIST setup (784-200-200-50 "
                        "tanh, dynamic binarization, Adam eps 1e-4, batch 20, its 3280-epoch schedule, test NLL "
                        "with k = 5000); iwae-mnist-2layer: the same with its two-stochastic-layer net (model mlp2: "
                        f"784-200-200-100-100-100-50, Gaussian p(h1|h2)). Choices: {', '.join(PRESETS)}")
    p.add_argument("--config", metavar="FILE",
                   help="TOML or JSON file of options (field names as below, with _ or -); command-line "
                        "options override it")
    p.add_argument("--resume", nargs="?", const="last", metavar="CKPT",
                   help="continue a run: without a value from OUT_DIR/NAME/checkpoints/last.pt; or give a "
                        "checkpoint file or run directory. The checkpoint's config is used; options given "
                        "here override it (e.g. a larger --epochs)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in OUT_DIR/NAME even if it holds a previous run")
    groups = {k: p.add_argument_group(v) for k, v in GROUP_TITLES.items()}
    for f in _train_fields():
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help_text = m["help"] if default is None else f"{m['help']} (default: {shown})"
        flag = "--" + f.name.replace("_", "-")
        g = groups[m["group"]]
        if isinstance(default, bool):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
            continue
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if m.get("choices"):
            kwargs["choices"] = m["choices"]
        else:
            kwargs["type"] = arg_type(m.get("type") or str)
        if m.get("nargs"):
            kwargs["nargs"] = m["nargs"]
        if m.get("metavar"):
            kwargs["metavar"] = m["metavar"]
        g.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``fused-vae`` argument parser (subcommands train, eval, sample)."""
    import torch

    from . import __version__

    parser = _Parser(
        prog="fused-vae",
        description="Train, evaluate and sample VAEs built on fused_vae's fused reparameterization + KL op.",
        epilog="`fused-vae train` with no options trains the IWAE paper's MLP on scikit-learn's bundled digits "
               "and writes runs/digits-mlp/. Multi-process: torchrun --nproc_per_node N -m fused_vae train ...",
    )
    parser.add_argument("--version", action="version",
                        version=f"fused-vae {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,sample}")

    t = sub.add_parser("train", help="train a VAE", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a VAE. Writes OUT_DIR/NAME/: config.json, metrics.jsonl, metrics.csv, "
                                   "summary.json,\ncheckpoints/last.pt and best.pt, reconstructions.png, samples.png, "
                                   "interpolation.png, loss_curves.png.")
    _add_train_options(t)

    e = sub.add_parser("eval", help="test ELBO and importance-sampled NLL of a trained model",
                       description="Evaluate a checkpoint on its test set: ELBO and the IWAE estimate of the NLL. "
                                   "Prints JSON.")
    _add_common(e)
    e.add_argument("--iwae-samples", type=arg_type(int, minimum=0), default=None, metavar="K",
                   help="importance samples k (default: the run's --iwae-samples; 0 skips the NLL)")
    e.add_argument("--iwae-chunk", type=arg_type(int, minimum=1), default=None, metavar="N",
                   help="importance samples decoded at once (default: the run's)")
    e.add_argument("--batch-size", type=arg_type(int, minimum=1), default=None,
                   help="evaluation batch size (default: the run's)")
    e.add_argument("--max-test-examples", type=arg_type(int, minimum=1, words=("all",)), default=None, metavar="N",
                   help="evaluate the first N test examples, or all (default: as many as the run used, its "
                        "--max-test-examples)")
    e.add_argument("--data-path", default=None, metavar="PATH",
                   help="read the data from here instead of the path stored in the run's config")
    e.add_argument("--seed", type=arg_type(int), default=None, help="seed of the evaluation noise (default: the run's)")
    e.add_argument("--out", default=None, metavar="FILE", help="also write the JSON result to FILE")

    s = sub.add_parser("sample", help="draw images from the prior of a trained model",
                       description="Decode z ~ N(0, I) and write a PNG grid (and optionally the tensor).")
    _add_common(s)
    s.add_argument("-n", "--num", type=arg_type(int, minimum=1), default=64, help="number of samples (default: 64)")
    s.add_argument("--seed", type=arg_type(int), default=0, help="seed of the prior draws (default: 0)")
    s.add_argument("--mode", choices=("mean", "sample"), default="mean",
                   help="write the decoder mean of p(x|z), or a draw x ~ p(x|z) (default: mean)")
    s.add_argument("--nrow", type=arg_type(int, minimum=1), default=None,
                   help="images per row (default: about sqrt(n))")
    s.add_argument("--out", default=None, metavar="PNG",
                   help="output image (default: RUN_DIR/samples-seed<SEED>.png)")
    s.add_argument("--npy", default=None, metavar="FILE", help="also save the [n, C, H, W] float32 array (.npy)")
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory (uses its checkpoints/) or a checkpoint .pt file")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="which checkpoint of a run directory (default: last)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--threads", type=arg_type(int, minimum=1), default=None, metavar="N",
                   help="CPU threads for torch (default, as for train: 1 for models under 1M parameters, whose "
                        "layers are too small to gain from threads and lose much on a busy machine; else torch's "
                        "choice)")


# -- train ----------------------------------------------------------------------------------
def _run_dir_of(ckpt: Path) -> Path | None:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def config_from_args(ns: argparse.Namespace):
    """The :class:`TrainConfig` for parsed ``train`` arguments (preset < file < checkpoint < flags).

    Raises:
        ConfigError: bad options or config file. CheckpointError: unreadable --resume checkpoint.
    """
    from .training.checkpoint import load_checkpoint
    from .training.config import TrainConfig, load_config_file
    from .training.presets import load_preset
    from .training.trainer import resolve_resume

    names = {f.name for f in _train_fields()}
    flags = {k: v for k, v in vars(ns).items() if k in names}
    cfg = TrainConfig()
    if ns.preset:
        cfg = cfg.updated(load_preset(ns.preset), source=f"preset {ns.preset}", validate=False)
    if ns.config:
        cfg = cfg.updated(load_config_file(ns.config), source=str(ns.config), validate=False)
    resume = None
    if ns.resume:
        pre = cfg.updated(flags, source="command line", validate=False)
        resume = resolve_resume(ns.resume, pre.run_dir)
        ck = load_checkpoint(resume)
        stored = dict(ck["config"])
        run_dir = _run_dir_of(resume)
        if run_dir is not None:  # the run directory wherever it is now
            stored["out_dir"], stored["name"] = str(run_dir.parent), run_dir.name
        cfg = TrainConfig.from_dict(stored, source=f"{resume} (stored config)")
    cfg = cfg.updated(flags, source="command line")
    return cfg, resume


def _cmd_train(ns) -> int:
    from .training.trainer import train

    cfg, resume = config_from_args(ns)
    summary = train(cfg, resume=resume, overwrite=ns.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(_summary_text(summary), flush=True)
    return 0


def _summary_text(s: dict) -> str:
    from .training.trainer import plural

    steps, epochs = plural(s["steps"], "step"), plural(s["epochs"], "epoch")
    if s.get("already_complete"):
        head = (f"{s['run_dir']} is already complete ({steps}, {epochs}); nothing was "
                f"trained. To train it further, resume with a larger --epochs; to evaluate it again: "
                f"fused-vae eval {s['run_dir']} --iwae-samples K")
    else:
        head = (f"done: {steps} ({epochs}) in {s['train_time_s']:.1f} s on {s['device']}"
                f" x{s['world_size']} (fused backend {s['fused_backend']}, amp {s['amp']})")
    objective = s.get("objective", "elbo")
    optimizer = f", optimizer {s['optimizer']}" if "optimizer" in s else ""
    lines = [head, f"trained objective: {objective} with K = {s.get('train_samples', 1)} samples{optimizer}",
             f"test ELBO {s['test_elbo']:.4f} nats (recon {s['test_recon']:.4f}, KL {s['test_kl']:.4f})"]
    if "test_iwae_nll" in s:
        lines.append(f"test NLL (IWAE, k={s['iwae_samples']}) {s['test_iwae_nll']:.4f} nats")
    lines.append(f"outputs in {s['run_dir']}/")
    return "\n".join(lines)


# -- eval / sample ----------------------------------------------------------------------------
def _load_run(run: str, which: str, device: str):
    from .models import build_model
    from .training.checkpoint import load_checkpoint
    from .training.distributed import resolve_device

    p = Path(run)
    ckpt = p / "checkpoints" / f"{which}.pt" if p.is_dir() else p
    ck = load_checkpoint(ckpt, map_location="cpu")
    dev = resolve_device(device)
    model = build_model(ck["model_spec"], backend=ck["config"].get("backend")).to(dev)
    model.load_state_dict(ck["model"])
    model.eval()
    run_dir = p if p.is_dir() else (_run_dir_of(ckpt) or ckpt.parent)
    return ck, model, dev, run_dir


def _cmd_eval(ns) -> int:
    import torch

    from .training.config import TrainConfig
    from .training.data import load_data
    from .training.distributed import DistContext
    from .training.evaluation import evaluate
    from .training.trainer import default_threads, torch_threads

    ck, model, dev, _ = _load_run(ns.run, ns.checkpoint, ns.device)
    over = {"device": ns.device}
    if ns.data_path is not None:
        over["data_path"] = ns.data_path
    if ns.max_test_examples is not None:
        over["max_test_examples"] = None if ns.max_test_examples == "all" else ns.max_test_examples
    cfg = TrainConfig.from_dict({**ck["config"], **over}, source=f"{ns.run} (stored config)")
    data = load_data(cfg)
    k = cfg.iwae_samples if ns.iwae_samples is None else ns.iwae_samples
    with torch_threads(default_threads(model, dev, ns.threads)):
        res = evaluate(model, data.test, batch_size=ns.batch_size or cfg.eval_batch_size,
                       seed=cfg.seed if ns.seed is None else ns.seed, iwae_samples=k,
                       iwae_chunk=ns.iwae_chunk or cfg.iwae_chunk, ctx=DistContext(device=dev),
                       progress=sys.stderr.isatty())
        threads = torch.get_num_threads()
    res = {"checkpoint_step": ck["step"], "num_test": int(data.test.shape[0]), **res, "threads": threads}
    text = json.dumps(res, indent=2)
    print(text)
    if ns.out:
        Path(ns.out).write_text(text + "\n")
    return 0


def _cmd_sample(ns) -> int:
    import numpy as np
    import torch

    from .training.plots import save_image_grid
    from .training.trainer import default_threads, torch_threads

    ck, model, dev, run_dir = _load_run(ns.run, ns.checkpoint, ns.device)
    vr = tuple(ck.get("data", {}).get("value_range", (0.0, 1.0)))
    with torch.no_grad(), torch_threads(default_threads(model, dev, ns.threads)):
        if ns.mode == "mean":
            imgs = model.generate(ns.num, seed=ns.seed, device=dev)
        else:
            from . import api

            z = api.standard_normal((ns.num, model.latent_dim), ns.seed, device=dev)
            g = torch.Generator(device=dev).manual_seed(ns.seed)
            imgs = model.likelihood.sample(model.decode(z), generator=g)
    out = Path(ns.out) if ns.out else Path(run_dir) / f"samples-seed{ns.seed}.png"
    nrow = ns.nrow or max(1, round(ns.num ** 0.5))
    save_image_grid(imgs.cpu(), out, nrow, value_range=vr,
                    title=f"{ns.num} samples from the prior, z ~ N(0, I) (seed {ns.seed}): "
                          f"{'decoder means' if ns.mode == 'mean' else 'draws x ~ p(x|z)'}")
    print(f"wrote {out}")
    if ns.npy:
        np.save(ns.npy, imgs.float().cpu().numpy())
        print(f"wrote {ns.npy}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fused-vae``; returns the exit status (0 ok, 1 failure, 2 bad usage, 130 Ctrl-C).

    Every error and a Ctrl-C at any point (while torch is imported too) end with one line on stderr.
    """
    command = None
    try:
        parser = build_parser()
        ns = parser.parse_args(argv)
        command = ns.command
        return _run_command(ns)
    except KeyboardInterrupt as e:
        detail = str(e) or "interrupted"  # TrainingInterrupted says where the run stopped and how to go on
        print(f"fused-vae{f' {command}' if command else ''}: {detail}", file=sys.stderr)
        return 130


def _run_command(ns) -> int:
    from .training.allocator import keep_freed_memory
    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError
    from .training.data import DataError
    from .training.trainer import NonFiniteLossError, RunExistsError

    if ns.command in ("train", "eval"):  # this process is the command's own: its steps reuse freed memory
        keep_freed_memory()
    try:
        return {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample}[ns.command](ns)
    except (ConfigError, RunExistsError) as e:
        print(f"fused-vae {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, NonFiniteLossError, ValueError) as e:
        print(f"fused-vae {ns.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
