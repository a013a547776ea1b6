"""Evaluation: per-image metrics, evaluation of checkpoints, figures."""
