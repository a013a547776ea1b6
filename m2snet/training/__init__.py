"""Training: the typed config, the trainer loop, the LR schedule and the checkpoint format."""

from m2snet.training.config import TrainConfig

__all__ = ["TrainConfig"]
