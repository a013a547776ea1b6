"""m2snet: train, tune, track, register and serve M2SNet medical image segmentation models."""

__version__ = "0.1.0"
