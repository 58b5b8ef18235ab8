"""Where the trainer's step time goes, measured in one process (issue 15: "the note says exactly
where the remaining time goes").

For a configuration of benchmarks/bench_trainer.py (default: the default run and the IWAE
preset's net at batch 20, iwae K = 5), this builds the run ``fused-vae train`` would build
(``Trainer._setup``) and times blocks of its real steps (``Trainer._train_epoch`` itself: the
step, the LR schedule and the statistics read-out, which also ends each block), interleaved with
blocks of benchmarks/plain.py's loop on the same data, and with blocks where one part of the
trainer's step is switched off:

- ``binarization``: the seeded, device-side dynamic binarization (replaced by a fixed binarized
  batch);
- ``gradient norm``: the global gradient norm that the statistics, the NaN/Inf check and
  clipping read (replaced by a constant);
- ``NaN/Inf check``: the per-step read-back of the statistics row on a CPU;
- ``update``: the fused Adam update and the LR schedule.

The plain loop's own parts are switched off the same way (its ``torch.bernoulli``
binarization, gradient clipping, and ``optimizer.step()`` with the LR schedule). A part's cost
is the median over rounds of (step time with everything - step time with that part off) of
the same round: blocks of one round run within a second, so the machine's slow drift cancels.
What is left (the forward and backward, and the trainer's statistics) is the step with all its
parts off; ``--profile`` then splits each side's step by operator (torch.profiler's self CPU
time per step over one block of each, the profiler's own overhead included, so the split is a
proportion, not a timing). Steps switched off change what later steps compute (no update: the same weights),
not the work a step does. One torch thread, times from ``time.perf_counter``.

    python benchmarks/trainer_breakdown.py              # about 2 minutes on 2 quiet cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trainer import configurations, plain_model  # noqa: E402
from common import environment, load_average, save_result  # noqa: E402
from plain import PlainLoop, PlainMLPVAE  # noqa: E402

from fused_vae.cli import build_parser, config_from_args  # noqa: E402
from fused_vae.training import trainer as trainer_module  # noqa: E402
from fused_vae.training.progress import progress_bar  # noqa: E402
from fused_vae.training.distributed import setup  # noqa: E402

PARTS = ("binarization", "gradient norm", "NaN/Inf check", "update")
PLAIN_PARTS = ("binarization", "clipping", "update")


class TrainerSteps:
    """The steps of one run of ``fused-vae train ARGS`` (built, not started: no files are written)."""

    def __init__(self, args: list[str], out_dir: str):
        ns = build_parser().parse_args(["train", *args, "--out-dir", out_dir, "--threads", "1", "--no-progress",
                                        "--max-steps", "1000000"])
        self.trainer = trainer_module.Trainer(config_from_args(ns)[0], overwrite=True)
        self.run = self.trainer._setup(setup(self.trainer.cfg.device))
        self.run.pbar = progress_bar(total=None, disable=True)
        self.run.t0 = time.perf_counter()
        torch.set_num_threads(1)

    def __call__(self, n: int) -> None:
        """``n`` more steps, by ``Trainer._train_epoch`` itself (no evaluation or checkpoint between epochs)."""
        run = self.run
        run.total_steps = run.step + n  # _train_epoch stops there (and logs the window)
        while run.step < run.total_steps:
            self.trainer._train_epoch(run)


class PlainSteps:
    """benchmarks/plain.py's :class:`PlainLoop` of the configuration's net (bench_trainer.py's
    ``plain_model``) from the trainer's weights, reading its loss back every 50 steps as
    ``train_plain`` does; ``off`` switches :data:`PLAIN_PARTS` off."""

    def __init__(self, steps: TrainerSteps, config: dict):
        run = steps.run
        model = plain_model(config, run.data.train[0].numel())
        if isinstance(model, PlainMLPVAE):
            model.copy_from(run.model)
        else:  # the hierarchical nets: the trainer's own model class
            model.load_state_dict(run.model.state_dict())
        self.loop = PlainLoop(model, run.data.train, total_steps=1_000_000, **config["plain"])
        self.parts_on = {"binarization": self.loop.binarize, "clipping": self.loop.clip, "update": True}
        self.off: tuple[str, ...] = ()

    def __call__(self, n: int) -> None:
        loop = self.loop
        loop.binarize, loop.clip, loop.update = (self.parts_on[p] and p not in self.off for p in PLAIN_PARTS)
        for _ in range(n):
            loss = loop.step()
            if loop.steps_done % 50 == 0:
                float(loss.detach())


class PartsOff:
    """Context manager switching ``parts`` of a :class:`TrainerSteps` (module attributes patched,
    restored on exit) or of a :class:`PlainSteps` off."""

    def __init__(self, steps, parts: tuple[str, ...]):
        self.steps, self.parts, self.saved = steps, parts, []

    def _patch(self, obj, name: str, value) -> None:
        self.saved.append((obj, name, vars(obj).get(name), name in vars(obj)))
        setattr(obj, name, value)

    def __enter__(self):
        if isinstance(self.steps, PlainSteps):
            self.steps.off = self.parts
            return self
        run = self.steps.run
        if "binarization" in self.parts:
            fixed = {}

            def fixed_batch(thresholds, seed, backend=None):
                if thresholds.shape not in fixed:
                    fixed[thresholds.shape] = (thresholds > 0).float()
                return fixed[thresholds.shape]

            self._patch(trainer_module, "binarize_with_seed", fixed_batch)
        if "gradient norm" in self.parts:
            one = torch.ones((), device=run.ctx.device)
            self._patch(trainer_module, "grad_norm", lambda params: one)
        if "NaN/Inf check" in self.parts:
            self._patch(trainer_module.Trainer, "_check_due", lambda trainer, r: False)
        if "update" in self.parts:
            self._patch(run.update, "step", lambda grad_scale=None: None)
            self._patch(run.scheduler, "step", lambda epoch=None: None)
        return self

    def __exit__(self, *exc):
        if isinstance(self.steps, PlainSteps):
            self.steps.off = ()
        for obj, name, value, own in reversed(self.saved):
            if own:
                setattr(obj, name, value)
            else:
                delattr(obj, name)  # an instance's patch: back to its class's method
        self.saved.clear()


def op_profile(fn, steps: int, top: int = 25) -> dict:
    """``{operator: self CPU us per step}`` of ``fn(steps)`` under torch.profiler: the ``top``
    largest, the rest as ``"other"``, and ``"total"``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(steps)
    rows = sorted(((e.key, e.self_cpu_time_total / steps) for e in prof.key_averages()), key=lambda r: -r[1])
    out = {k: round(v, 1) for k, v in rows[:top]}
    out["other"] = round(sum(v for _, v in rows[top:]), 1)
    out["total"] = round(sum(v for _, v in rows), 1)
    return out


def breakdown(name: str, config: dict, *, rounds: int, block: int, profile_ops: bool = False) -> dict:
    """Step times of the trainer and the plain loop, whole and with each of their parts (and all
    of them) off, over ``rounds`` interleaved rounds of ``block`` steps; the parts' costs."""
    with tempfile.TemporaryDirectory(prefix="trainer-breakdown-") as tmp:
        steps = TrainerSteps(config["args"], tmp)
        plain = PlainSteps(steps, config)
        variants = {"plain loop": (plain, ()), "trainer": (steps, ())}
        variants.update({f"trainer without {p}": (steps, (p,)) for p in PARTS})
        variants["trainer without all"] = (steps, PARTS)
        variants.update({f"plain loop without {p}": (plain, (p,)) for p in PLAIN_PARTS})
        variants["plain loop without all"] = (plain, PLAIN_PARTS)
        for fn, off in variants.values():  # warm-up (allocator, first fused Adam step, caches)
            with PartsOff(fn, off):
                fn(2 * block)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(rounds):
            for v in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                fn, off = variants[v]
                with PartsOff(fn, off):
                    t0 = time.perf_counter()
                    fn(block)
                    times[v].append((time.perf_counter() - t0) / block * 1e3)
        profiles = {"trainer": op_profile(steps, block), "plain loop": op_profile(plain, block)} if profile_ops else None

    def paired(a: str, b: str) -> float:
        return statistics.median([x - y for x, y in zip(times[a], times[b])])

    sides = {}
    for side, parts in (("trainer", PARTS), ("plain loop", PLAIN_PARTS)):
        sides[side] = {"step_ms": statistics.median(times[side]),
                       "part_ms": {p: paired(side, f"{side} without {p}") for p in parts},
                       "rest_ms": statistics.median(times[f"{side} without all"])}
    ratio = statistics.median([t / p for t, p in zip(times["trainer"], times["plain loop"])])
    plain_kwargs = {k: getattr(v, "__name__", v) for k, v in config["plain"].items()}  # the loss by name
    out = {"config": name, "trainer_args": config["args"], "plain": plain_kwargs, "sides": sides,
           "trainer_over_plain_per_round_median": ratio, "values_ms_per_step": times}
    if profiles is not None:
        out["op_self_cpu_us_per_step"] = profiles
        for side, prof in profiles.items():
            print(f"{name} {side} by operator (self CPU us/step, profiled): " + ", ".join(
                f"{k} {v:.0f}" for k, v in list(prof.items())[:8]) + f"; total {prof['total']:.0f}", flush=True)
    for side, v in sides.items():
        print(f"{name} {side}: step {v['step_ms']:.3f} ms; " + ", ".join(f"{p} {c * 1e3:.0f} us" for p, c in
              v["part_ms"].items()) + f"; rest {v['rest_ms']:.3f} ms", flush=True)
    print(f"{name}: trainer / plain loop {ratio:.3f} (median of per-round ratios)", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="default,iwae-iwae-K5",
                        help=f"comma-separated configurations of bench_trainer.py ({', '.join(configurations())})")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds (default 60)")
    parser.add_argument("--block", type=int, default=25, help="steps per timed block (default 25)")
    parser.add_argument("--quick", action="store_true", help="4 rounds of 10 steps (a smoke test)")
    parser.add_argument("--profile", action="store_true", help="also split each side's step by operator")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path (default: results/...)")
    args = parser.parse_args(argv)
    all_configs = configurations()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in all_configs]
    if unknown:
        parser.error(f"unknown configuration: {', '.join(unknown)}")
    rounds, block = (4, 10) if args.quick else (args.rounds, args.block)
    torch.set_num_threads(1)
    env = environment()
    results = [breakdown(n, all_configs[n], rounds=rounds, block=block, profile_ops=args.profile) for n in names]
    payload = {"benchmark": "trainer_breakdown", "environment": {**env, "load_average_at_end": load_average()},
               "quick": args.quick, "profile": args.profile, "rounds": rounds, "block_steps": block, "parts": {"trainer": list(PARTS), "plain loop": list(PLAIN_PARTS)},
               "method": __doc__.split("\n\n")[1].replace("\n", " "), "results": results}
    return save_result(args, "cpu-trainer-breakdown", payload)


if __name__ == "__main__":
    raise SystemExit(main())
