"""m2snet: train, tune, track, register and serve M2SNet medical image segmentation models."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml holds the one version; the installed package's metadata carries it.
    __version__ = version("m2snet")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
