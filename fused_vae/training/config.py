"""The training configuration: one dataclass, loadable from TOML/JSON, every field a CLI option."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import BACKENDS
from ..models import ACTIVATIONS, LIKELIHOODS, MODELS, OBJECTIVES, check_train_samples, kl_warmup_beta
from .optim import SCHEDULES


# The default checkpoint cadence: about this many optimizer steps, in whole epochs.
CHECKPOINT_STEPS = 1000


class ConfigError(ValueError):
    """A bad configuration value or config file; the message names the option or file."""


def _f(default, help: str, *, group: str, choices=None, type=None, nargs=None, metavar=None):  # noqa: A002
    meta = {"help": help, "group": group, "choices": choices, "type": type, "nargs": nargs, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


DATASETS = ("digits", "mnist", "fashion-mnist", "folder", "tensor")
HIERARCHICAL = ("mlp2", "topdown", "topdown-conv")
DEFAULT_LATENT_DIMS = {"mlp2": (100, 50), "topdown": (32, 16, 8), "topdown-conv": (16, 8)}
BACKEND_NAMES = tuple(sorted(BACKENDS, key=lambda name: name == "reference"))  # the fallback last


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``fused-vae train --help`` lists each field
    as ``--field-name``; config files use the field names (``-`` or ``_``)."""

    # data
    data: str = _f("digits", "dataset: digits (scikit-learn's bundled 8x8 digits, no download), mnist / "
                   "fashion-mnist (IDX files in --data-path), folder (images in --data-path), tensor "
                   "(a .npy or .pt [N, ...] array in --data-path)", group="data", choices=DATASETS)
    data_path: str | None = _f(None, "file or directory for mnist, fashion-mnist, folder and tensor data",
                               group="data", type=str, metavar="PATH")
    test_fraction: float = _f(0.2, "fraction held out as the test set for digits, folder and tensor data "
                              "(mnist files have their own test set)", group="data", type=float)
    split_seed: int = _f(0, "seed of the train/test split and of static binarization", group="data", type=int)
    binarize: str = _f("none", "none: use values as they are; dynamic: resample binary pixels ~ Bernoulli(x) "
                       "every step (test set binarized once); static: binarize train and test once",
                       group="data", choices=("none", "dynamic", "static"))
    image_size: int | None = _f(None, "folder data: resize images to SIZE x SIZE (default: keep, all must match)",
                                group="data", type=int, metavar="SIZE")
    grayscale: bool = _f(False, "folder data: convert images to one grey channel", group="data")
    max_train_examples: int | None = _f(None, "use at most N training examples (default: all)", group="data",
                                        type=int, metavar="N")
    max_test_examples: int | None = _f(None, "use at most N test examples (default: all)", group="data", type=int,
                                       metavar="N")

    # model
    model: str = _f("mlp", "architecture: mlp (fully connected), conv (convolutional), mlp2 (the IWAE paper's "
                    "two-stochastic-layer net), topdown (a top-down hierarchy of --latent-dims layers, fully "
                    "connected), topdown-conv (the same with convolutional feature-map latents)", group="model",
                    choices=tuple(MODELS))
    latent_dim: int = _f(50, "number of latent units (mlp, conv)", group="model", type=int)
    latent_dims: list | None = _f(None, "mlp2, topdown, topdown-conv: latent units (channels for topdown-conv) "
                                  "of each stochastic layer, bottom first (default: mlp2 100 50, topdown 32 16 8, "
                                  "topdown-conv 16 8)", group="model", type=int, nargs="+", metavar="D")
    upper_hidden: list = _f([100, 100], "mlp2: hidden widths between the two stochastic layers (IWAE paper: "
                            "100 100)", group="model", type=int, nargs="+")
    hidden: list = _f([200, 200], "mlp, mlp2: hidden layer widths (IWAE paper: 200 200); conv: first value is the "
                      "dense layer width; topdown: first value is the width of every state", group="model", type=int,
                      nargs="+")
    conv_channels: list = _f([32, 64], "conv: channels of the stride-2 conv layers; topdown-conv: channels of each "
                             "layer's blocks (one per layer)", group="model", type=int, nargs="+")
    activation: str | None = _f(None, "hidden activation (tanh, relu, silu, gelu, elu, softplus); default tanh "
                                "for mlp and mlp2, silu for the others", group="model", type=str)
    likelihood: str = _f("bernoulli", "p(x|z): bernoulli (BCE with logits, data in [0, 1]) or gaussian "
                         "(MSE with variance sigma^2)", group="model", choices=LIKELIHOODS)
    sigma: float = _f(0.1, "gaussian likelihood: standard deviation (initial value with --learn-sigma)",
                      group="model", type=float)
    learn_sigma: bool = _f(False, "gaussian likelihood: learn one shared sigma", group="model")
    logvar_clamp: list | None = _f(None, "clamp the posterior logvar to [LO, HI] (e.g. -30 20)", group="model",
                                   type=float, nargs=2, metavar=("LO", "HI"))
    backend: str | None = _f(None, "fused-op backend: cpu, cuda, triton, reference (default: the fastest "
                             "available for the device)", group="model", type=str)

    # objective
    objective: str = _f("elbo", "training objective: elbo (the mean of K single-sample ELBOs; the paper's "
                        "'VAE, k samples') or iwae (the importance-weighted bound L_K of Burda et al. 2015)",
                        group="objective", choices=OBJECTIVES)
    train_samples: int = _f(1, "samples K of z per example and step, drawn by one fused call", group="objective",
                            type=int, metavar="K")
    beta: float = _f(1.0, "KL weight (beta-VAE); 1 gives the ELBO", group="objective", type=float)
    kl_warmup_steps: int = _f(0, "ramp the KL weight linearly from 0 to beta over this many steps",
                              group="objective", type=int)
    free_bits: float = _f(0.0, "floor (nats) on the batch-mean KL in the loss: per latent unit for mlp and "
                          "conv, per stochastic layer for mlp2 and the topdown models", group="objective",
                          type=float)

    # optimisation
    epochs: int = _f(500, "number of passes over the training set", group="optimisation", type=int)
    max_steps: int | None = _f(None, "stop after this many optimizer steps (default: no limit; cosine and "
                               "linear schedules then end there)",
                               group="optimisation", type=int, metavar="N")
    batch_size: int = _f(100, "global batch size (all processes and micro-batches together)",
                         group="optimisation", type=int)
    grad_accum: int = _f(1, "micro-batches per process per step (gradient accumulation)", group="optimisation",
                         type=int)
    lr: float = _f(1e-3, "peak learning rate (Adam, or AdamW with --weight-decay)", group="optimisation", type=float)
    adam_eps: float = _f(1e-8, "Adam epsilon (the IWAE paper: 1e-4)", group="optimisation", type=float)
    weight_decay: float = _f(0.0, "decoupled weight decay: above 0 the optimizer is AdamW, at 0 Adam",
                             group="optimisation", type=float)
    lr_schedule: str = _f("cosine", "learning-rate schedule after warm-up; iwae: the IWAE paper's, 3^i epochs at "
                          "lr * 10^(-i/7) for i = 0, 1, ... (3280 epochs for i = 0..7)", group="optimisation",
                          choices=SCHEDULES)
    lr_warmup_steps: int = _f(0, "linear learning-rate warm-up steps", group="optimisation", type=int)
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr (cosine, linear)",
                             group="optimisation", type=float)
    grad_clip: float = _f(100.0, "clip the global gradient norm to this value (0: no clipping)",
                          group="optimisation", type=float)
    amp: str = _f("auto", "mixed precision: auto (bfloat16 autocast on CUDA GPUs that support it), bf16, off",
                  group="optimisation", choices=("auto", "bf16", "off"))
    device: str = _f("auto", "auto (cuda when available), cpu, cuda, cuda:N", group="optimisation", type=str)
    seed: int = _f(0, "seed of initialization, data order and the fused op's noise", group="optimisation", type=int)
    compile: bool = _f(False, "run each optimizer step (forward, backward, clipping, fused Adam/AdamW update, "
                       "statistics) as one torch.compile'd function; single process and a fused optimizer. "
                       "The first steps compile it (tens of seconds on a CPU)", group="optimisation")
    cuda_graphs: bool = _f(False, "capture each optimizer step once as a CUDA graph and replay it (CUDA devices "
                           "only; with --compile, the compiled step is captured); same limits as --compile",
                           group="optimisation")
    threads: int | None = _f(None, "CPU threads for torch (default: 1 for models under 1M parameters, whose layers "
                             "are too small to gain from threads and lose much on a busy machine; else torch's "
                             "choice)", group="optimisation", type=int, metavar="N")

    # evaluation and outputs
    eval_every: int = _f(10, "evaluate the test ELBO every N epochs (0: only at the end)", group="output", type=int,
                         metavar="N")
    eval_batch_size: int = _f(500, "batch size for evaluation", group="output", type=int)
    iwae_samples: int = _f(1000, "importance samples k for the final test NLL estimate (IWAE bound; 0: skip)",
                           group="output", type=int, metavar="K")
    iwae_chunk: int = _f(50, "importance samples per example decoded in one pass (memory vs speed)",
                         group="output", type=int)
    log_every: int = _f(50, "write training metrics every N steps", group="output", type=int, metavar="N")
    checkpoint_every: int | None = _f(None, "save checkpoints/last.pt every N epochs and at the end (default: "
                                      f"every ceil({CHECKPOINT_STEPS} / steps per epoch) epochs, i.e. about every "
                                      f"{CHECKPOINT_STEPS} steps, so short epochs do not write a file every few "
                                      "steps); an evaluation writes last.pt (and best.pt when it improves) only "
                                      "at a checkpoint epoch", group="output", type=int, metavar="N")
    out_dir: str = _f("runs", "parent directory of run directories", group="output", type=str, metavar="DIR")
    name: str | None = _f(None, "run name: outputs go to OUT_DIR/NAME (default: DATA-MODEL, plus -OBJECTIVEK "
                          "unless training the 1-sample ELBO, e.g. mnist-mlp-iwae5)", group="output", type=str)
    tensorboard: str = _f("auto", "TensorBoard logging: auto (when installed), on, off", group="output",
                          choices=("auto", "on", "off"))
    progress: bool = _f(True, "show tqdm progress bars", group="output")

    # -- helpers ---------------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        """``name``, or ``DATA-MODEL[-OBJECTIVEK]`` when unset (the suffix unless the objective
        is the 1-sample ELBO)."""
        if self.name:
            return self.name
        suffix = "" if (self.objective, self.train_samples) == ("elbo", 1) else f"-{self.objective}{self.train_samples}"
        return f"{self.data}-{self.model}{suffix}"

    @property
    def resolved_activation(self) -> str:
        """``activation``, or the model's default (tanh for mlp and mlp2, silu for the others)."""
        return self.activation or ("tanh" if self.model in ("mlp", "mlp2") else "silu")

    @property
    def resolved_latent_dims(self) -> list[int]:
        """``latent_dims``, or the hierarchical model's default."""
        return list(self.latent_dims) if self.latent_dims else list(DEFAULT_LATENT_DIMS.get(self.model, ()))

    def resolved(self, *, threads: int, amp: str) -> "TrainConfig":
        """A copy with the values a run settled on filled in: activation, name, threads, amp."""
        return dataclasses.replace(self, activation=self.resolved_activation, name=self.run_name,
                                   threads=int(threads), amp=amp)

    @property
    def run_dir(self) -> Path:
        """``OUT_DIR/NAME``."""
        return Path(self.out_dir) / self.run_name

    def model_spec(self, input_shape) -> dict:
        """The model spec (see :func:`fused_vae.models.build_model`) for data of ``input_shape``."""
        common = dict(
            input_shape=[int(s) for s in input_shape],
            latent_dim=self.latent_dim,
            likelihood=self.likelihood,
            sigma=self.sigma,
            learn_sigma=self.learn_sigma,
            logvar_clamp=list(self.logvar_clamp) if self.logvar_clamp is not None else None,
        )
        act = self.resolved_activation
        if self.model == "mlp":
            return dict(kind="mlp", hidden=list(self.hidden), activation=act, **common)
        if self.model == "conv":
            return dict(kind="conv", channels=list(self.conv_channels), hidden=int(self.hidden[0]), activation=act,
                        **common)
        common.pop("latent_dim")
        common["latent_dims"] = self.resolved_latent_dims
        if self.model == "mlp2":
            return dict(kind="mlp2", hidden=list(self.hidden), upper_hidden=list(self.upper_hidden), activation=act,
                        **common)
        if self.model == "topdown":
            return dict(kind="topdown", hidden=int(self.hidden[0]), activation=act, **common)
        return dict(kind="topdown-conv", channels=list(self.conv_channels), activation=act, **common)

    def to_dict(self) -> dict:
        """Plain dict (JSON- and checkpoint-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> "TrainConfig":
        """Builds and validates a config; keys may use ``-`` or ``_``.

        Raises:
            ConfigError: unknown keys or invalid values (the message names ``source``).
        """
        cfg = cls()
        return cfg.updated(d, source=source)

    def updated(self, d: dict, *, source: str = "config", validate: bool = True) -> "TrainConfig":
        """A copy with the keys of ``d`` replaced (types checked), validated unless ``validate``
        is False (for a layer that later layers complete, e.g. a preset without a data path).

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        names = {f.name: f for f in dataclasses.fields(self)}
        values = self.to_dict()
        for key, value in d.items():
            k = str(key).replace("-", "_")
            if k not in names:
                raise ConfigError(f"{source}: unknown option {key!r}; see `fused-vae train --help`")
            values[k] = _coerce(names[k], value, source)
        new = type(self)(**values)
        if validate:
            new.validate(source)
        return new

    def validate(self, source: str = "config") -> None:
        """Checks ranges and choices.

        Raises:
            ConfigError: naming the first bad option.
        """
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            v = getattr(self, f.name)
            if choices and v not in choices:
                raise ConfigError(f"{source}: {f.name} must be one of {', '.join(choices)}, got {v!r}")

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{source}: {msg}")

        need(0.0 < self.test_fraction < 1.0, f"test_fraction must be in (0, 1), got {self.test_fraction}")
        need(self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}")
        need(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), f"hidden must be widths >= 1, got {self.hidden}")
        need(len(self.conv_channels) >= 1 and all(c >= 1 for c in self.conv_channels),
             f"conv_channels must be >= 1, got {self.conv_channels}")
        need(len(self.upper_hidden) >= 1 and all(h >= 1 for h in self.upper_hidden),
             f"upper_hidden must be widths >= 1, got {self.upper_hidden}")
        if self.latent_dims is not None:
            need(self.model in HIERARCHICAL, f"latent_dims is for the hierarchical models ({', '.join(HIERARCHICAL)}); "
                 f"model {self.model!r} takes latent_dim")
        if self.model in HIERARCHICAL:
            dims = self.resolved_latent_dims
            need(len(dims) >= 2 and all(d >= 1 for d in dims), f"latent_dims must be at least 2 sizes >= 1, got {dims}")
            need(self.model != "mlp2" or len(dims) == 2, f"model mlp2 has two stochastic layers: latent_dims must "
                 f"be 2 sizes, got {dims}")
            need(self.model != "topdown-conv" or len(self.conv_channels) == len(dims),
                 f"model topdown-conv needs one conv_channels value per layer: {len(dims)} layers "
                 f"(latent_dims {dims}), got conv_channels {self.conv_channels}")
        need(math.isfinite(self.sigma) and self.sigma > 0, f"sigma must be > 0, got {self.sigma}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.free_bits >= 0, f"free_bits must be >= 0, got {self.free_bits}")
        need(self.kl_warmup_steps >= 0, f"kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}")
        need(self.train_samples >= 1, f"train_samples must be >= 1, got {self.train_samples}")
        try:  # the objective's own rules, with the KL weight of the first step
            check_train_samples(self.objective, self.train_samples,
                                kl_warmup_beta(0, self.beta, self.kl_warmup_steps), self.free_bits)
        except ValueError as e:
            warmup = f" (kl_warmup_steps={self.kl_warmup_steps})" if self.kl_warmup_steps > 0 else ""
            raise ConfigError(f"{source}: {e}{warmup}") from None
        need(self.backend is None or self.backend in BACKEND_NAMES,
             f"backend must be one of {', '.join(BACKEND_NAMES)} (leave it out for the automatic choice), "
             f"got {self.backend!r}")
        need(self.activation is None or self.activation in ACTIVATIONS,
             f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        need(self.iwae_samples >= 0, f"iwae_samples must be >= 0, got {self.iwae_samples}")
        need(self.iwae_chunk >= 1, f"iwae_chunk must be >= 1, got {self.iwae_chunk}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        need(self.image_size is None or self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        for k in ("max_train_examples", "max_test_examples"):
            v = getattr(self, k)
            need(v is None or v >= 1, f"{k} must be >= 1, got {v}")
        if self.logvar_clamp is not None:
            need(len(self.logvar_clamp) == 2 and self.logvar_clamp[0] <= self.logvar_clamp[1],
                 f"logvar_clamp must be [LO, HI] with LO <= HI, got {self.logvar_clamp}")
        need(self.data not in ("mnist", "fashion-mnist", "folder", "tensor") or bool(self.data_path),
             f"data {self.data!r} needs data_path (--data-path)")
        need(self.binarize == "none" or self.likelihood == "bernoulli",
             f"binarize={self.binarize!r} needs the bernoulli likelihood")
        need(self.name is None or (self.name and "/" not in self.name and self.name not in (".", "..")),
             f"name must be a plain directory name, got {self.name!r}")


# How a message names the value an option takes: (one value, several values).
TYPE_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
              bool: ("true or false", "booleans")}


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Checks a config-file value against the field's type (ints may be given for floats).

    Raises:
        ConfigError: a value of the wrong type, naming the option.
    """
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    typ = f.metadata.get("type") or (bool if isinstance(default, bool) else str)
    nargs = f.metadata.get("nargs")

    def ok(v) -> bool:
        if typ is bool:
            return isinstance(v, bool)
        if isinstance(v, bool):
            return False
        if typ is float:
            return isinstance(v, (int, float))
        return isinstance(v, typ)

    if value is None:
        if default is None:
            return None
        raise ConfigError(f"{source}: {f.name} must not be null")
    if nargs:
        good = isinstance(value, (list, tuple)) and all(ok(v) for v in value)
        good = good and (len(value) == nargs if isinstance(nargs, int) else len(value) >= 1)
        if not good:
            count = f"{nargs} " if isinstance(nargs, int) else ""
            raise ConfigError(f"{source}: {f.name} must be a list of {count}{TYPE_NAMES[typ][1]}, got {value!r}")
        return [typ(v) for v in value]
    if not ok(value):
        raise ConfigError(f"{source}: {f.name} must be {TYPE_NAMES[typ][0]}, got {value!r}")
    return typ(value)


def load_config_file(path: str | Path) -> dict:
    """Reads a ``.toml`` or ``.json`` config file into a dict of options (not yet validated;
    a ``[train]`` table in TOML or a ``"train"`` object in JSON is also accepted).

    Raises:
        ConfigError: missing file, unknown extension, or a parse error (names the path).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (expected a .toml or .json file of training options)")
    text = p.read_bytes()
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib  # Python 3.11+
            except ModuleNotFoundError:  # pragma: no cover - Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise ConfigError(f"{p}: reading TOML needs Python 3.11+ or `pip install tomli`; "
                                      "or use a .json config") from None
            data = tomllib.loads(text.decode("utf-8"))
        elif p.suffix.lower() == ".json":
            data = json.loads(text.decode("utf-8"))
        else:
            raise ConfigError(f"config file {p} must end in .toml or .json")
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{p}: cannot parse as {p.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a table/object of training options at the top level")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return data
