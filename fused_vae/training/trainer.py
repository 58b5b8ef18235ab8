"""The training loop: data, model, AdamW, schedule, evaluation, checkpoints, outputs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .. import backends as _backends
from ..models import build_model, kl_warmup_beta
from .batches import TrainBatches, binarize_generator, noise_seed
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, make_checkpoint, restore_rng_state
from .config import ConfigError, TrainConfig
from .data import DataBundle, binarize, load_data
from .distributed import DistContext, setup
from .evaluation import evaluate
from .optim import make_optimizer, make_scheduler

# Largest training set (bytes) copied to an accelerator up front; larger sets stay in host memory.
_DEVICE_DATA_LIMIT = 2 << 30
# Below this many parameters a CPU run uses one thread unless --threads says otherwise.
SMALL_MODEL_PARAMS = 1_000_000


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the message names the step and the last
    good checkpoint (which is left untouched)."""


class RunExistsError(FileExistsError):
    """The run directory already holds a checkpoint and neither resume nor overwrite was asked for."""


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


class Trainer:
    """Trains a VAE as ``config`` says; :meth:`fit` runs it.

    Args:
        config: the run's :class:`~fused_vae.training.config.TrainConfig`.
        resume: continue from a checkpoint (see :func:`resolve_resume`), or None.
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

    # -- the run ----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Trains, evaluates and writes everything under ``run_dir``.

        Returns the summary dict (also ``run_dir/summary.json``): final test ELBO, IWAE NLL,
        steps, time, ...

        Raises:
            RunExistsError, CheckpointError, ConfigError, DataError: before training starts.
            NonFiniteLossError: a NaN/Inf loss or gradient (the step is not taken).
        """
        ctx = setup(self.cfg.device)
        threads = torch.get_num_threads()
        try:
            return self._fit(ctx)
        finally:
            torch.set_num_threads(threads)
            ctx.close()

    def _fit(self, ctx: DistContext) -> dict:
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
        backend_name = _backends.resolve(cfg.backend, device).name
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
            torch.set_num_threads(1)
        train_x = data.train
        if device.type != "cpu" and train_x.numel() * 4 <= _DEVICE_DATA_LIMIT:
            train_x = train_x.to(device)
        try:
            batches = TrainBatches(train_x.shape[0], cfg.batch_size, world_size=ctx.world_size, rank=ctx.rank,
                                   grad_accum=cfg.grad_accum, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        spe = batches.steps_per_epoch
        total_steps = spe * cfg.epochs if cfg.max_steps is None else min(spe * cfg.epochs, cfg.max_steps)
        optimizer, fused = make_optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = make_scheduler(optimizer, total_steps=total_steps, warmup_steps=cfg.lr_warmup_steps,
                                   schedule=cfg.lr_schedule, min_ratio=cfg.min_lr_ratio)
        step, epoch, start_batch, elapsed0 = 0, 0, 0, 0.0
        best = -math.inf
        if ck is not None:
            model.load_state_dict(ck["model"])
            if ck.get("optimizer"):
                optimizer.load_state_dict(ck["optimizer"])
            if ck.get("scheduler"):
                scheduler.load_state_dict(ck["scheduler"])
            restore_rng_state(ck.get("rng", {}))
            step, epoch, start_batch = int(ck["step"]), int(ck["epoch"]), int(ck.get("batch_in_epoch", 0))
            best = float(ck["metrics"].get("best_test_elbo", -math.inf))
            elapsed0 = float(ck["metrics"].get("elapsed_s", 0.0))
        ddp = model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        autocast = self._amp_context(device)

        logger = None
        if ctx.is_main:
            from .metrics import MetricsLogger

            self.run_dir.mkdir(parents=True, exist_ok=True)
            logger = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard, resume_step=step if ck else None)
            _write_json(self.run_dir / "config.json", cfg.to_dict())
        data_info = {"name": data.name, "input_shape": list(data.input_shape), "value_range": list(data.value_range),
                     "num_train": int(data.train.shape[0]), "num_test": int(data.test.shape[0])}

        def checkpoint(name: str, metrics: dict) -> None:
            if not ctx.is_main:
                return
            path = self.ckpt_dir / name
            atomic_save(make_checkpoint(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, step=step,
                                        batch_in_epoch=start_batch, config=cfg.to_dict(), model_spec=spec,
                                        data_info=data_info, metrics=metrics), path)
            if name == "last.pt":
                self.last_good = (path, step)

        tqdm = _tqdm()
        show_bar = cfg.progress and ctx.is_main and sys.stderr.isatty()
        pbar = tqdm(total=total_steps, initial=step, desc=cfg.run_name, dynamic_ncols=True, disable=not show_bar,
                    unit="step")
        t0 = time.perf_counter()
        window = torch.zeros(5, dtype=torch.float64, device=device)  # loss, recon, kl, elbo, grad_norm sums
        window_n = 0
        last_eval: dict = {}
        postfix: dict = {}
        done = step >= total_steps or epoch >= cfg.epochs
        try:
            while not done:
                i = start_batch - 1
                for i, micros in batches.epoch(epoch, start_batch):
                    beta = kl_warmup_beta(step, cfg.beta, cfg.kl_warmup_steps)
                    stats = self._train_step(ddp, model, optimizer, micros, train_x, step, beta, ctx, autocast,
                                             epoch, i, logger)
                    scheduler.step()
                    step += 1
                    window += stats
                    window_n += 1
                    if step % cfg.log_every == 0 or step == total_steps:
                        w = (window / window_n).tolist()
                        rec = {"kind": "train", "step": step, "epoch": round(step / spe, 4), "loss": w[0],
                               "recon": w[1], "kl": w[2], "elbo": w[3], "grad_norm": w[4], "beta": beta,
                               "lr": optimizer.param_groups[0]["lr"],
                               "time_s": round(elapsed0 + time.perf_counter() - t0, 3)}
                        if logger:
                            logger.log(rec)
                        postfix["loss"] = f"{w[0]:.3f}"
                        pbar.set_postfix(postfix)
                        window.zero_()
                        window_n = 0
                    pbar.update(1)
                    if step >= total_steps:
                        break
                start_batch = i + 1
                if start_batch >= spe:
                    epoch += 1
                    start_batch = 0
                done = step >= total_steps or epoch >= cfg.epochs
                at_boundary = start_batch == 0
                if done or (cfg.eval_every and at_boundary and epoch % cfg.eval_every == 0):
                    last_eval = evaluate(model, data.test, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                                         iwae_samples=cfg.iwae_samples if done else 0, iwae_chunk=cfg.iwae_chunk,
                                         ctx=ctx)
                    rec = {"kind": "eval", "step": step, "epoch": round(step / spe, 4), **last_eval}
                    if logger:
                        logger.log(rec)
                    if ctx.is_main and not show_bar:
                        print(_eval_line(rec), flush=True)
                    postfix["test_elbo"] = f"{last_eval['test_elbo']:.3f}"
                    pbar.set_postfix(postfix)
                    improved = last_eval["test_elbo"] > best
                    best = max(best, last_eval["test_elbo"])
                    metrics = {**last_eval, "best_test_elbo": best,
                               "elapsed_s": elapsed0 + time.perf_counter() - t0}
                    checkpoint("last.pt", metrics)
                    if improved:
                        checkpoint("best.pt", metrics)
                elif at_boundary and epoch % cfg.checkpoint_every == 0:
                    checkpoint("last.pt", {"best_test_elbo": best, "elapsed_s": elapsed0 + time.perf_counter() - t0})
        finally:
            pbar.close()
            if logger:
                logger.close()

        elapsed = elapsed0 + time.perf_counter() - t0
        if not last_eval:  # resumed a finished run: evaluate once more
            last_eval = evaluate(model, data.test, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                                 iwae_samples=cfg.iwae_samples, iwae_chunk=cfg.iwae_chunk, ctx=ctx)
        summary = {
            "run_dir": str(self.run_dir),
            "data": data.name,
            "model": spec["kind"],
            "steps": step,
            "epochs": round(step / spe, 4),
            "train_time_s": round(elapsed, 2),
            **last_eval,
            "best_test_elbo": best if math.isfinite(best) else last_eval.get("test_elbo"),
            "device": str(device),
            "world_size": ctx.world_size,
            "fused_backend": backend_name,
            "amp": self.amp,
            "fused_adamw": fused,
            "torch": str(torch.__version__),
        }
        if ctx.is_main:
            self._write_outputs(model, data, logger.records if logger else [])
            _write_json(self.run_dir / "summary.json", summary)
        ctx.barrier()
        return summary

    def _train_step(self, ddp, model, optimizer, micros, train_x, step, beta, ctx, autocast, epoch, batch, logger):
        """One optimizer step over this process's micro-batches; returns the (all-reduced)
        mean [loss, recon, kl, elbo, grad_norm] as float64."""
        cfg = self.cfg
        device = ctx.device
        optimizer.zero_grad(set_to_none=True)
        n_micro = len(micros)
        stats = torch.zeros(4, dtype=torch.float64, device=device)
        for a, mb in enumerate(micros):
            x = train_x[mb.indices.to(train_x.device)].to(device, non_blocking=True)
            if cfg.binarize == "dynamic":
                x = binarize(x, binarize_generator(cfg.seed, step, mb.micro_id, device))
            sync = ddp.no_sync() if (ctx.distributed and a < n_micro - 1) else contextlib.nullcontext()
            with sync:
                with autocast():
                    out = ddp(x, beta=beta, free_bits=cfg.free_bits, seed=noise_seed(cfg.seed, step, mb.micro_id))
                (out["loss"] / n_micro).backward()
            stats += torch.stack([out[k].detach().double() for k in ("loss", "recon", "kl", "elbo")]) / n_micro
        ctx.all_reduce_sum(stats)
        stats /= ctx.world_size
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        out_stats = torch.cat([stats, gnorm.detach().double().reshape(1)])
        if not bool(torch.isfinite(out_stats).all()):
            loss_v, gn = out_stats[0].item(), out_stats[4].item()
            where = (f"{self.last_good[0]} (step {self.last_good[1]})" if self.last_good
                     else "none (no checkpoint was written before this step)")
            msg = (f"non-finite loss at step {step + 1} (epoch {epoch + 1}, batch {batch + 1}): loss={loss_v}, "
                   f"gradient norm={gn}. Training stopped before applying this step. Last good checkpoint: {where}. "
                   "Try a lower --lr, --grad-clip, --logvar-clamp -30 20 or --amp off.")
            if logger:
                logger.log({"kind": "error", "step": step + 1, "message": msg})
            raise NonFiniteLossError(msg)
        optimizer.step()
        return out_stats

    def _write_outputs(self, model, data: DataBundle, records: list[dict]) -> None:
        from .plots import save_interpolation, save_loss_curves, save_reconstructions, save_samples

        model.eval()
        device = next(model.parameters()).device
        vr = data.value_range
        test = data.test[:16].to(device)
        save_reconstructions(model, test, self.run_dir / "reconstructions.png", value_range=vr)
        save_samples(model, self.run_dir / "samples.png", n=64, seed=self.cfg.seed, value_range=vr)
        n_pairs = min(4, data.test.shape[0] // 2)
        pairs = [(data.test[2 * j].to(device), data.test[2 * j + 1].to(device)) for j in range(n_pairs)]
        if pairs:
            save_interpolation(model, pairs, self.run_dir / "interpolation.png", value_range=vr)
        save_loss_curves(records, self.run_dir / "loss_curves.png")
        model.train()


def _eval_line(rec: dict) -> str:
    s = f"step {rec['step']} (epoch {rec['epoch']:g}): test ELBO {rec['test_elbo']:.4f} " \
        f"(recon {rec['test_recon']:.4f}, KL {rec['test_kl']:.4f})"
    if "test_iwae_nll" in rec:
        s += f", test NLL (IWAE, k={rec['iwae_samples']}) {rec['test_iwae_nll']:.4f}"
    return s


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:  # pragma: no cover - tqdm is in the train extra
        class tqdm:  # noqa: N801 - minimal stand-in
            def __init__(self, *a, **k):
                pass

            def update(self, n=1):
                pass

            def set_postfix(self, *a, **k):
                pass

            def close(self):
                pass
    return tqdm


def train(config: TrainConfig, *, resume=None, overwrite: bool = False, data: DataBundle | None = None) -> dict:
    """Runs :class:`Trainer` (``config``, ``resume``, ``overwrite``, ``data``) and returns its summary."""
    return Trainer(config, resume=resume, overwrite=overwrite, data=data).fit()
