"""Importers: one converter per public layout, each writing the one m2snet format (see m2snet.data.format).

A converter only knows its layout (one module each, nnU-Net style: :mod:`.busi`, :mod:`.polyp` for
Kvasir-SEG and PraNet, :mod:`.clinicdb`, :mod:`.covid_ct`, :mod:`.goals`, :mod:`.folder`): ``scan(src)``
lists the cases (image, its mask files, label, subset) and ``mask_to_classes`` turns a decoded source
mask into class ids. Everything else -- decoding by content, content sanity checks (a mask is a
single-channel two-level map, images and masks not swapped), size checks, union of several masks,
writing PNGs (:mod:`.conversion`), exact and near-duplicate clusters, the manifest, validation and the
atomic move into place (:mod:`.importing`) -- is shared in :func:`import_dataset`, so every format gets
the same checks.

Registry (:mod:`.registry`): ``@register_importer("name")``; ``list_importers()``;
``get_importer(name, **options)``. A new layout is an :class:`Importer` subclass in its own module,
imported below so that it registers.
"""

from m2snet.data.importers import busi, clinicdb, covid_ct, folder, goals, polyp  # noqa: F401 (they register)
from m2snet.data.importers.base import Importer, SourceCase
from m2snet.data.importers.importing import import_dataset
from m2snet.data.importers.registry import get_importer, importer_group_by, list_importers, register_importer

__all__ = [
    "Importer",
    "SourceCase",
    "get_importer",
    "import_dataset",
    "importer_group_by",
    "list_importers",
    "register_importer",
]
