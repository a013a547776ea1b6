"""The image every component runs in (docker/Dockerfile builds it with this tag)."""

from m2snet import __version__

COMPONENT_IMAGE = f"ghcr.io/m2snet/m2snet:{__version__}"
