"""Training: the config, the loop, checkpoints, and the loss (target positions only).

    from peftkit.train import TrainConfig, train
    train(TrainConfig(model="smollm2-135m-instruct", data="train.jsonl", output="runs/lora", max_steps=100))
"""

from .config import TrainConfig, build_train_config
from .loop import TrainingDiverged, lr_factor, train
from .loss import loss_fn
from ..precision import bf16_support, resolve_precision

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "bf16_support",
    "build_train_config",
    "loss_fn",
    "lr_factor",
    "resolve_precision",
    "train",
]
