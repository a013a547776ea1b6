"""Dataset validation with great-expectations 1.x.

We compute one row of facts per case (does the image decode, does the mask match its size, which
values does the mask hold, how large is the lesion and is that the manifest's lesion_area, do
image and mask still hash to the manifest's sha256 and mask_sha256, ...) into a pandas
DataFrame, and state the rules as GX expectations on that frame in an ephemeral context. GX then
tells us which rows break which rule; we map rows back to files.

Modules: :mod:`.facts` (the per-case facts), :mod:`.rules` (the expectations and their GX run),
:mod:`.report` (the report, JSON and HTML), :mod:`.validate` (:func:`validate_dataset`, by phases).

Duplicates are clustered here too (m2snet.data.duplicates, with the settings dataset.json records):
the manifest's ``group`` must be the cluster id found, and a cluster may hold two labels only when
the dataset allows label conflicts (BUSI). Foreground fractions per label are summarised and
outliers listed (a mask covering most of its image, an empty mask on a lesion label).

The report (``<dest>.validation.json`` + a self-made ``<dest>.validation.html``) is written beside
the dataset directory, never into it: the directory's hash is the dataset version, and validating
with other options must not change it. The report holds no timestamps or run ids.
"""

from m2snet.data.validation.report import REPORT_HTML, REPORT_JSON, ExpectationOutcome, ValidationReport, report_paths
from m2snet.data.validation.rules import MAX_SIZE, MIN_SIZE
from m2snet.data.validation.validate import validate_dataset

__all__ = [
    "MAX_SIZE",
    "MIN_SIZE",
    "REPORT_HTML",
    "REPORT_JSON",
    "ExpectationOutcome",
    "ValidationReport",
    "report_paths",
    "validate_dataset",
]
