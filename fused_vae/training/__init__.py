"""Training, evaluation and data loading for the VAE models (needs the ``train`` extra:
tqdm, matplotlib, Pillow, scikit-learn; each is imported only where used).

    from fused_vae.training import TrainConfig, train
    summary = train(TrainConfig(epochs=10))      # writes runs/digits-mlp/...
"""

from __future__ import annotations

from .allocator import keep_freed_memory
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_config_file
from .data import DataBundle, DataError, load_data, load_image_folder, load_mnist_images, load_tensor_file, read_idx
from .evaluation import evaluate
from .presets import PRESETS, load_preset
from .trainer import NonFiniteLossError, RunExistsError, Trainer, TrainingInterrupted, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataBundle",
    "DataError",
    "NonFiniteLossError",
    "PRESETS",
    "RunExistsError",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "atomic_save",
    "evaluate",
    "keep_freed_memory",
    "load_checkpoint",
    "load_config_file",
    "load_data",
    "load_preset",
    "load_image_folder",
    "load_mnist_images",
    "load_tensor_file",
    "read_idx",
    "save_checkpoint",
    "train",
]
