"""The model registry: ``create_model(name, **config)`` and ``list_models()``.

Names: m2snet, msnet, m2snet_au, m2snet_aspp, m2snet_denseaspp, fpn, unet, unetplusplus.
Common config: ``n_classes=1``, ``pretrained=True`` (hub when reachable; a path = local file;
False = random), ``msu_impl="fast" | "dense"`` and ``msu_norm="per_site" | "shared"`` (m2snet only). Every model has
``pretrained_source``, ``backbone_parameters()`` and ``head_parameters()``.
"""

# Importing zoo registers every model (zoo takes register_architecture from models.registry, not from here).
from m2snet.models import zoo as _zoo  # noqa: F401
from m2snet.models.registry import create_model, list_models, register_architecture

__all__ = ["create_model", "list_models", "register_architecture"]
