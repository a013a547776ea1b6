"""The image every component runs in (docker/Dockerfile builds it with this tag)."""

from m2snet import __version__

COMPONENT_IMAGE = f"ghcr.io/m2snet/m2snet:{__version__}"
# Its user and group (docker/Dockerfile's `USER 1000:1000`): numeric, so Kubernetes' runAsNonRoot can verify it.
COMPONENT_UID = 1000
COMPONENT_GID = 1000
