"""Kubeflow pipeline definitions; each is compiled to a YAML file committed beside it."""
