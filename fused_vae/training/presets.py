"""Named option sets for ``fused-vae train --preset NAME`` (command-line options and
``--config`` files override them)."""

from __future__ import annotations

from .config import ConfigError
from .optim import iwae_schedule_epochs

PRESETS: dict[str, dict] = {
    # Burda, Grosse & Salakhutdinov (2015), "Importance Weighted Autoencoders", Table 1, one
    # stochastic layer on MNIST: 784-200-200-50 tanh, Bernoulli pixels binarized anew each
    # step, Adam (eps 1e-4) with batch size 20, 3^i epochs at 1e-3 * 10^(-i/7) for
    # i = 0..7, test NLL by the IWAE bound with k = 5000. --objective and --train-samples
    # pick the row; --epochs 121 runs stages 0..4 only.
    "iwae-mnist": {
        "data": "mnist",
        "binarize": "dynamic",
        "model": "mlp",
        "hidden": [200, 200],
        "latent_dim": 50,
        "activation": "tanh",
        "likelihood": "bernoulli",
        "objective": "iwae",
        "train_samples": 5,
        "beta": 1.0,
        "kl_warmup_steps": 0,
        "free_bits": 0.0,
        "batch_size": 20,
        "lr": 1e-3,
        "adam_eps": 1e-4,
        "weight_decay": 0.0,
        "lr_schedule": "iwae",
        "lr_warmup_steps": 0,
        "epochs": iwae_schedule_epochs(8),
        "grad_clip": 0.0,
        "amp": "off",
        "eval_every": 10,
        "checkpoint_every": 10,
        "iwae_samples": 5000,
        "log_every": 1000,
    },
}


# The same paper's two-stochastic-layer rows: x-200-200-h1(100)-100-100-h2(50) tanh, with
# Gaussian p(h1 | h2), the same data, optimiser, schedule and evaluation.
PRESETS["iwae-mnist-2layer"] = {
    **PRESETS["iwae-mnist"],
    "model": "mlp2",
    "latent_dims": [100, 50],
    "upper_hidden": [100, 100],
}


def load_preset(name: str) -> dict:
    """The options of preset ``name`` (a fresh dict).

    Raises:
        ConfigError: unknown name (the message lists the presets).
    """
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])
