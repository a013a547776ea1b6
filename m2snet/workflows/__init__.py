"""Workflows: what a user runs, composed from the layers below -- the presets and shared defaults,
the one fold engine (tune, fit, score a fold; a whole CV), nested tuning, and the pipeline's step
functions. Nothing here imports kfp: the Kubeflow side (``m2snet.kubeflow``) sits above."""
