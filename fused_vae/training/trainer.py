"""The training loop: setup, epochs, evaluation and checkpoints, summary and outputs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import backend_for
from ..models import build_model, kl_warmup_beta
from .batches import TrainBatches
from .checkpoint import CheckpointError, load_checkpoint, make_checkpoint, restore_rng_state, save_run_checkpoint
from .config import CHECKPOINT_STEPS, ConfigError, TrainConfig
from .data import DataBundle, bernoulli_thresholds, binarize_with_seed, load_data
from .distributed import DistContext, setup
from .evaluation import evaluate
from .metrics import check_tensorboard
from .optim import DirectAdam, make_optimizer, make_scheduler, optimizer_name
from .progress import progress_bar
from .stats import StatsWindow
from .step import CapturedStep, clip_divisor, forward_backward, grad_norm

# Largest training set (bytes) copied to an accelerator up front; larger sets stay in host memory.
_DEVICE_DATA_LIMIT = 2 << 30
# Below this many parameters a CPU run uses one thread unless --threads says otherwise.
SMALL_MODEL_PARAMS = 1_000_000


def default_threads(model: torch.nn.Module, device, threads: int | None = None) -> int | None:
    """The CPU thread count for running ``model`` on ``device``: ``threads`` when given; else 1 on a
    CPU for a model under :data:`SMALL_MODEL_PARAMS` parameters (its layers are too small to gain
    from threads, and lose much when other jobs share the cores); else None (torch's choice)."""
    if threads:
        return int(threads)
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
    return 1 if torch.device(device).type == "cpu" and small else None


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Runs the block with ``torch.set_num_threads(threads)`` (None: as it is) and restores the count."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the message names the step and the last
    good checkpoint (which is left untouched)."""


class RunExistsError(FileExistsError):
    """The run directory already holds a checkpoint and neither resume nor overwrite was asked for."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the last checkpoint and the command that resumes."""


def plural(n, noun: str) -> str:
    """``n`` and ``noun``, with an ``s`` unless ``n`` is 1: ``"1 epoch"``, ``"2.5 epochs"``."""
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_resume(resume, run_dir: Path) -> Path:
    """The checkpoint a ``resume`` argument means: ``True``/``"last"``/``"best"`` pick
    ``run_dir/checkpoints/{last,best}.pt``; a run directory picks its ``last.pt``; else a path."""
    if resume is True or resume in ("last", "best"):
        return run_dir / "checkpoints" / f"{'best' if resume == 'best' else 'last'}.pt"
    p = Path(resume)
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


@dataclass
class _Run:
    """What one :meth:`Trainer.fit` works on: built by ``_setup``, advanced by ``_train_epoch``."""

    ctx: DistContext
    data: DataBundle
    spec: dict
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    fused_adamw: bool
    batches: TrainBatches
    train_x: torch.Tensor
    total_steps: int
    backend_name: str
    autocast: object
    data_info: dict
    step: int = 0
    epoch: int = 0
    start_batch: int = 0
    best: float = -math.inf
    elapsed0: float = 0.0
    t0: float = 0.0
    resumed: bool = False
    last_eval: dict = field(default_factory=dict)
    postfix: dict = field(default_factory=dict)
    logger: object = None
    pbar: object = None
    show_bar: bool = False
    window: StatsWindow | None = None
    params: list = field(default_factory=list)
    captured: CapturedStep | None = None
    update: DirectAdam | None = None
    checkpoint_every: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.epoch >= self.total_epochs

    @property
    def total_epochs(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch)

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0


class Trainer:
    """Trains a VAE as ``config`` says; :meth:`fit` runs it.

    Args:
        config: the run's :class:`~fused_vae.training.config.TrainConfig`.
        resume: continue from a checkpoint (see :func:`resolve_resume`); leave it out to start afresh.
        overwrite: start afresh even if ``run_dir`` holds a checkpoint.
        data: use this :class:`~fused_vae.training.data.DataBundle` instead of loading ``config``'s.

    Under torchrun (``WORLD_SIZE`` > 1) each process joins the group (gloo on CPU, nccl
    on CUDA), trains its share of every global batch with DDP, and rank 0 writes all files.
    """

    def __init__(self, config: TrainConfig, *, resume=None, overwrite: bool = False, data: DataBundle | None = None):
        config.validate()
        self.cfg = config
        self.resume = resume
        self.overwrite = overwrite
        self._data = data
        self.run_dir = config.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.last_good: tuple[Path, int] | None = None  # (path, step) of the last checkpoint written
        self.amp = config.amp

    # -- the run ----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Trains, evaluates and writes everything under ``run_dir``.

        Returns the summary dict (also ``run_dir/summary.json``): final test ELBO, IWAE NLL,
        steps, time, ... Resuming a run that is already complete trains nothing and returns
        its stored summary with ``already_complete=True``.

        Raises:
            RunExistsError, CheckpointError, ConfigError, DataError: before training starts
                (nothing is written then).
            NonFiniteLossError: a NaN/Inf loss or gradient.
            TrainingInterrupted: Ctrl-C; the message names the last checkpoint and how to resume.
        """
        check_tensorboard(self.cfg.tensorboard)
        ctx = setup(self.cfg.device)
        threads = torch.get_num_threads()
        try:
            run = self._setup(ctx)
            if run.done and run.resumed and (self.run_dir / "summary.json").is_file():
                summary = json.loads((self.run_dir / "summary.json").read_text())
                return {**summary, "already_complete": True}
            self._open_outputs(run)
            try:
                while not run.done:
                    self._train_epoch(run)
                    self._evaluate_and_checkpoint(run)
                return self._finish(run)
            except KeyboardInterrupt:
                raise TrainingInterrupted(self._interrupted_message(run)) from None
            finally:
                run.pbar.close()
                if run.logger:
                    run.logger.close()
        finally:
            torch.set_num_threads(threads)
            ctx.close()

    # -- setup ------------------------------------------------------------------------------
    def _load_resume(self):
        if not self.resume:
            last = self.ckpt_dir / "last.pt"
            if last.exists() and not self.overwrite:
                raise RunExistsError(
                    f"{self.run_dir} already holds a run ({last}); pass --resume to continue it, "
                    "--overwrite to start it again, or --name for a new run"
                )
            return None
        path = resolve_resume(self.resume, self.run_dir)
        ck = load_checkpoint(path, map_location="cpu")
        self.last_good = (path, int(ck["step"]))
        return ck

    def _amp_context(self, device: torch.device):
        amp = self.cfg.amp
        if amp == "auto":
            amp = "bf16" if (device.type == "cuda" and torch.cuda.is_bf16_supported()) else "off"
        self.amp = amp
        if amp == "bf16":
            return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext

    def _setup(self, ctx: DistContext) -> _Run:
        """Data, model, optimizer, schedule and the state restored from a checkpoint; writes nothing."""
        cfg = self.cfg
        device = ctx.device
        ck = self._load_resume()
        data = self._data if self._data is not None else load_data(cfg)
        spec = cfg.model_spec(data.input_shape)
        if ck is not None and ck["model_spec"] != spec:
            diff = {k: (ck["model_spec"].get(k), spec.get(k)) for k in set(spec) | set(ck["model_spec"])
                    if ck["model_spec"].get(k) != spec.get(k)}
            raise CheckpointError(f"cannot resume from {self.last_good[0]}: its model differs from this "
                                  f"config/data (checkpoint vs now: {diff})")

        torch.manual_seed(cfg.seed)
        model = build_model(spec, backend=cfg.backend).to(device)
        backend_name = backend_for(device, cfg.backend)
        threads = default_threads(model, device, cfg.threads)
        if threads:  # fit() restores the count
            torch.set_num_threads(threads)
        # Dynamic binarization needs only each pixel's Bernoulli threshold, not the pixel itself.
        train_x = bernoulli_thresholds(data.train) if cfg.binarize == "dynamic" else data.train
        if device.type != "cpu" and train_x.numel() * 4 <= _DEVICE_DATA_LIMIT:
            train_x = train_x.to(device)
        try:
            batches = TrainBatches(train_x.shape[0], cfg.batch_size, world_size=ctx.world_size, rank=ctx.rank,
                                   grad_accum=cfg.grad_accum, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        spe = batches.steps_per_epoch
        total_steps = spe * cfg.epochs if cfg.max_steps is None else min(spe * cfg.epochs, cfg.max_steps)
        if total_steps >= 2**32:
            raise ConfigError(f"{total_steps} steps: the noise seeds take steps below 2**32; lower --epochs or --max-steps")
        captured = cfg.compile or cfg.cuda_graphs
        if captured and ctx.distributed:
            raise ConfigError("--compile and --cuda-graphs train in one process; run without torchrun, or without them")
        optimizer, fused = make_optimizer(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps,
                                          weight_decay=cfg.weight_decay)
        scheduler = make_scheduler(optimizer, total_steps=total_steps, warmup_steps=cfg.lr_warmup_steps,
                                   schedule=cfg.lr_schedule, min_ratio=cfg.min_lr_ratio, steps_per_epoch=spe)
        ddp = model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        data_info = {"name": data.name, "input_shape": list(data.input_shape), "value_range": list(data.value_range),
                     "num_train": int(data.train.shape[0]), "num_test": int(data.test.shape[0])}
        params = [p for p in model.parameters() if p.requires_grad]
        run = _Run(ctx=ctx, data=data, spec=spec, model=model, ddp=ddp, optimizer=optimizer, scheduler=scheduler,
                   fused_adamw=fused, batches=batches, train_x=train_x, total_steps=total_steps,
                   backend_name=backend_name, autocast=self._amp_context(device), data_info=data_info,
                   params=params, update=DirectAdam(optimizer, params),
                   checkpoint_every=cfg.checkpoint_every or -(-CHECKPOINT_STEPS // spe))
        if ck is not None:
            model.load_state_dict(ck["model"])
            if ck.get("optimizer"):
                optimizer.load_state_dict(ck["optimizer"])
            if ck.get("scheduler"):
                scheduler.load_state_dict(ck["scheduler"])
            restore_rng_state(ck.get("rng", {}))
            run.step, run.epoch, run.start_batch = int(ck["step"]), int(ck["epoch"]), int(ck.get("batch_in_epoch", 0))
            run.best = float(ck["metrics"].get("best_test_elbo", -math.inf))
            run.elapsed0 = float(ck["metrics"].get("elapsed_s", 0.0))
            run.resumed = True
            if ctx.is_main:
                print(f"resuming from step {run.step} (epoch {run.step / spe:g}) of {self.last_good[0]}", flush=True)
        run.window = StatsWindow(device, cfg.log_every, divisor=cfg.grad_accum * ctx.world_size, step=run.step,
                                 batch_stats=model.stat_names)
        if captured:
            try:
                run.captured = CapturedStep(
                    model=model, params=run.params, optimizer=optimizer, train_x=train_x, window=run.window,
                    cfg=cfg, micro_ids=batches.micro_ids, micro_batch=batches.local_batch // cfg.grad_accum,
                    step=run.step, autocast=run.autocast, mode="cuda-graphs" if cfg.cuda_graphs else "compile")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return run

    def _open_outputs(self, run: _Run) -> None:
        """Creates the run directory, ``config.json`` (resolved values), the metrics logger and the progress bar."""
        cfg = self.cfg
        if run.ctx.is_main:
            from .metrics import MetricsLogger

            self.run_dir.mkdir(parents=True, exist_ok=True)
            run.logger = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard,
                                       resume_step=run.step if run.resumed else None)
            _write_json(self.run_dir / "config.json", self._resolved_config().to_dict())
        run.show_bar = cfg.progress and run.ctx.is_main and sys.stderr.isatty()
        run.pbar = progress_bar(total=run.total_steps, initial=run.step, desc=cfg.run_name, dynamic_ncols=True,
                           disable=not run.show_bar, unit="step")
        run.t0 = time.perf_counter()

    def _resolved_config(self) -> TrainConfig:
        return self.cfg.resolved(threads=torch.get_num_threads(), amp=self.amp)

    # -- one epoch ----------------------------------------------------------------------------
    def _train_epoch(self, run: _Run) -> None:
        """Steps from ``run.start_batch`` to the end of the epoch (or ``total_steps``), logging
        every ``log_every`` steps."""
        cfg = self.cfg
        i = run.start_batch - 1
        seed = None if run.captured else cfg.seed  # a captured step derives its seeds itself
        for i, micros in run.batches.epoch(run.epoch, run.start_batch, seed=seed, device=run.ctx.device):
            beta = kl_warmup_beta(run.step, cfg.beta, cfg.kl_warmup_steps)
            self._train_step(run, micros, beta)
            run.scheduler.step()
            run.step += 1
            if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                self._log_train(run, beta)
            run.pbar.update(1)
            if run.step >= run.total_steps:
                break
        run.start_batch = i + 1
        if run.start_batch >= run.steps_per_epoch:
            run.epoch += 1
            run.start_batch = 0

    def _train_step(self, run: _Run, micros, beta: float) -> None:
        """One optimizer step over this process's micro-batches; its (all-reduced) statistics go
        to the window's row of the step.

        The NaN/Inf check reads a value back from the device, so it runs every step on a CPU
        and at the logging interval elsewhere (see :meth:`_check_finite`)."""
        if run.captured is not None:
            run.captured([mb.indices for mb in micros], beta)
            run.window.advance(run.step + 1)
            if self._check_due(run):
                self._check_finite(run)
            return
        cfg = self.cfg
        ctx = run.ctx
        device = ctx.device
        t = run.step + 1
        for p in run.params:  # optimizer.zero_grad(set_to_none=True) without its wrappers
            p.grad = None
        n_micro = len(micros)
        row = run.window.batch_row(t)
        for a, mb in enumerate(micros):
            x = run.train_x.index_select(0, mb.indices.to(run.train_x.device))
            if x.device != device:
                x = x.to(device, non_blocking=True)
            if cfg.binarize == "dynamic":
                x = binarize_with_seed(x, mb.binarize_seed, cfg.backend)
            sync = run.ddp.no_sync() if (ctx.distributed and a < n_micro - 1) else contextlib.nullcontext()
            with sync:
                stats = forward_backward(run.ddp, x, cfg=cfg, beta=beta, seed=mb.seed, n_micro=n_micro,
                                         autocast=run.autocast)
            if a == 0:
                row.copy_(stats)
            else:
                row.add_(stats)
        ctx.all_reduce_sum(row)
        total = grad_norm(run.params)
        run.window.norm_row(t).copy_(total)
        run.window.advance(t)
        if self._check_due(run):
            self._check_finite(run)
        run.update.step(clip_divisor(total, cfg.grad_clip) if cfg.grad_clip > 0 else None)

    def _check_due(self, run: _Run) -> bool:
        """Whether this step checks for NaN/Inf before its update: every step on a CPU (no cost),
        else at the logging interval, so that a GPU step does not wait for the host."""
        return run.ctx.device.type == "cpu" or (run.step + 1) % self.cfg.log_every == 0

    def _check_finite(self, run: _Run) -> None:
        """Raises :class:`NonFiniteLossError` naming the first step (since the run started)
        whose loss or gradient norm was NaN/Inf. One host synchronisation."""
        bad = run.window.first_non_finite()
        if bad is None:
            return
        bad_step, stats = bad
        now = run.step + 1
        epoch, batch = divmod(bad_step - 1, run.steps_per_epoch)
        where = (f"{self.last_good[0]} (step {self.last_good[1]})" if self.last_good
                 else "none (no checkpoint was written before this step)")
        if bad_step == now:
            applied = "Training stopped before applying this step."
        elif run.captured is not None:
            applied = (f"Found at step {now} (on {run.ctx.device.type} the check runs every --log-every steps); "
                       f"the captured step applied no update from step {bad_step} on, training stopped and no "
                       "later state was saved.")
        else:
            applied = (f"Found at step {now} (on {run.ctx.device.type} the check runs every --log-every steps); "
                       "training stopped and no later state was saved.")
        msg = (f"non-finite loss at step {bad_step} (epoch {epoch + 1}, batch {batch + 1}): loss={stats['loss']}, "
               f"gradient norm={stats['grad_norm']}. {applied} Last good checkpoint: {where}. "
               "Try a lower --lr, --grad-clip, --logvar-clamp -30 20 or --amp off.")
        if run.logger:
            run.logger.log({"kind": "error", "step": bad_step, "message": msg})
        raise NonFiniteLossError(msg)

    def _log_train(self, run: _Run, beta: float) -> None:
        self._check_finite(run)
        w = run.window.means()
        cfg = self.cfg
        rec = {"kind": "train", "step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4),
               "objective": cfg.objective, "train_samples": cfg.train_samples, **w, "beta": beta,
               "lr": float(run.optimizer.param_groups[0]["lr"]), "time_s": round(run.elapsed(), 3)}
        if run.logger:
            run.logger.log(rec)
        run.postfix["loss"] = f"{w['loss']:.3f}"
        run.pbar.set_postfix(run.postfix)

    # -- evaluation and checkpoints -------------------------------------------------------------
    def _evaluate_and_checkpoint(self, run: _Run) -> None:
        """After an epoch (or the last step): the test ELBO every ``eval_every`` epochs and at the
        end; ``last.pt`` every ``checkpoint_every`` epochs and at the end, with ``best.pt`` when
        an evaluation at such an epoch improved on the best so far. The slow IWAE NLL comes
        after the final checkpoint, in :meth:`_finish`."""
        cfg = self.cfg
        self._check_finite(run)
        at_boundary = run.start_batch == 0
        due = at_boundary and run.epoch % run.checkpoint_every == 0
        if run.done or (cfg.eval_every and at_boundary and run.epoch % cfg.eval_every == 0):
            run.last_eval = self._evaluate(run, iwae_samples=0)
            if not run.done:  # the final record, with the NLL, is logged by _finish
                self._log_eval(run, run.last_eval)
            if run.done or due:  # best.pt: the best of the evaluations that wrote a checkpoint
                improved = run.last_eval["test_elbo"] > run.best
                run.best = max(run.best, run.last_eval["test_elbo"])
                metrics = {**run.last_eval, "best_test_elbo": run.best, "elapsed_s": run.elapsed()}
                self._checkpoint(run, "last.pt", metrics)
                if improved:
                    self._checkpoint(run, "best.pt", metrics)
        elif due:
            self._checkpoint(run, "last.pt", {"best_test_elbo": run.best, "elapsed_s": run.elapsed()})

    def _log_eval(self, run: _Run, metrics: dict) -> None:
        rec = {"kind": "eval", "step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4), **metrics}
        if run.logger:
            run.logger.log(rec)
        if run.ctx.is_main and not run.show_bar:
            print(_eval_line(rec), flush=True)
        run.postfix["test_elbo"] = f"{metrics['test_elbo']:.3f}"
        run.pbar.set_postfix(run.postfix)

    def _evaluate(self, run: _Run, *, iwae_samples: int) -> dict:
        cfg = self.cfg
        return evaluate(run.model, run.data.test, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                        iwae_samples=iwae_samples, iwae_chunk=cfg.iwae_chunk, ctx=run.ctx, progress=run.show_bar)

    def _checkpoint(self, run: _Run, name: str, metrics: dict) -> None:
        if not run.ctx.is_main:
            return
        path = self.ckpt_dir / name
        save_run_checkpoint(make_checkpoint(model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                    epoch=run.epoch, step=run.step, batch_in_epoch=run.start_batch,
                                    config=self._resolved_config().to_dict(), model_spec=run.spec,
                                    data_info=run.data_info, metrics=metrics), path,
                            last_good=self.last_good, run_dir=self.run_dir)
        if name == "last.pt":
            self.last_good = (path, run.step)

    def _interrupted_message(self, run: _Run) -> str:
        head = f"interrupted at step {run.step} of {run.total_steps}."
        last = self.ckpt_dir / "last.pt"
        if self.last_good is None and last.exists():  # written just as Ctrl-C came, or by an earlier run
            return (f"{head} {last} exists (written as the run stopped, or by an earlier run); resume from it with: "
                    f"fused-vae train --resume {self.run_dir}, or start over with --overwrite.")
        if self.last_good is None:  # nothing to resume, and nothing that stops a new start (RunExistsError)
            return (f"{head} No checkpoint of this run was written yet (the first comes after "
                    f"{plural(run.checkpoint_every, 'epoch')}, --checkpoint-every), so there is nothing to resume; "
                    "run the same command again to start over.")
        path, step = self.last_good
        return (f"{head} Last checkpoint: {path} (step {step}). Resume with: "
                f"fused-vae train --resume {self.run_dir}")

    # -- summary ------------------------------------------------------------------------------
    def _finish(self, run: _Run) -> dict:
        """The final test metrics with the IWAE NLL, the summary (also ``summary.json``) and the
        image outputs."""
        cfg = self.cfg
        if cfg.iwae_samples or not run.last_eval:  # (a finished run resumed without its summary has none)
            run.last_eval = self._evaluate(run, iwae_samples=cfg.iwae_samples)
        self._log_eval(run, run.last_eval)
        summary = {
            "run_dir": str(self.run_dir),
            "data": run.data.name,
            "model": run.spec["kind"],
            "objective": cfg.objective,
            "train_samples": cfg.train_samples,
            "steps": run.step,
            "epochs": round(run.step / run.steps_per_epoch, 4),
            "train_time_s": round(run.elapsed(), 2),
            **run.last_eval,
            "best_test_elbo": run.best if math.isfinite(run.best) else run.last_eval.get("test_elbo"),
            "device": str(run.ctx.device),
            "world_size": run.ctx.world_size,
            "fused_backend": run.backend_name,
            "amp": self.amp,
            "optimizer": optimizer_name(cfg.weight_decay, fused=run.fused_adamw),
            "torch": str(torch.__version__),
        }
        if run.ctx.is_main:
            self._write_outputs(run.model, run.data, run.logger.records if run.logger else [])
            _write_json(self.run_dir / "summary.json", summary)
        run.ctx.barrier()
        return summary

    def _write_outputs(self, model, data: DataBundle, records: list[dict]) -> None:
        from .plots import save_loss_curves, save_run_images

        save_run_images(model, data, self.run_dir, seed=self.cfg.seed)
        save_loss_curves(records, self.run_dir / "loss_curves.png")
        model.train()


def _eval_line(rec: dict) -> str:
    s = f"step {rec['step']} (epoch {rec['epoch']:g}): test ELBO {rec['test_elbo']:.4f} " \
        f"(recon {rec['test_recon']:.4f}, KL {rec['test_kl']:.4f})"
    if "test_iwae_nll" in rec:
        s += f", test NLL (IWAE, k={rec['iwae_samples']}) {rec['test_iwae_nll']:.4f}"
    return s


def train(config: TrainConfig, *, resume=None, overwrite: bool = False, data: DataBundle | None = None) -> dict:
    """Runs :class:`Trainer` (``config``, ``resume``, ``overwrite``, ``data``) and returns its summary."""
    return Trainer(config, resume=resume, overwrite=overwrite, data=data).fit()
