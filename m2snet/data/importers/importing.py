"""The shared import: every converter's cases go through the same checks into one atomic, validated copy.

:func:`import_dataset` reads as its phases: scan the source, convert every case (all problems reported
together), cluster duplicates into groups, write the manifest, validate the copy; all inside
:func:`m2snet.directories.atomic_directory`, so only a complete and valid dataset ever appears at ``dest``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from m2snet.data.duplicates import NearDuplicateConfig, find_duplicates
from m2snet.data.format import DATASET_JSON, CaseRecord, DatasetInfo, load_dataset, write_dataset
from m2snet.data.importers.base import Importer, SourceCase
from m2snet.data.importers.conversion import convert_case, problems_message
from m2snet.data.importers.registry import get_importer
from m2snet.data.validation import ValidationReport, validate_dataset
from m2snet.directories import atomic_directory
from m2snet.errors import M2SNetError
from m2snet.progress import bar as progress_bar

log = logging.getLogger("m2snet.data.importers")


@dataclass(frozen=True)
class ImportPolicy:
    """What an import accepts: duplicates, label conflicts, and the near-duplicate clustering. Each is the
    converter's default unless the caller says otherwise."""

    allow_duplicates: bool
    allow_label_conflicts: bool
    near: NearDuplicateConfig

    @classmethod
    def resolve(cls, importer: Importer, allow_duplicates: bool | None, allow_label_conflicts: bool | None,
                near_duplicates: NearDuplicateConfig | None) -> ImportPolicy:
        return cls(
            allow_duplicates=importer.allow_duplicates_default if allow_duplicates is None else allow_duplicates,
            allow_label_conflicts=(importer.allow_label_conflicts_default if allow_label_conflicts is None
                                   else allow_label_conflicts),
            near=near_duplicates or NearDuplicateConfig(max_distance=importer.near_duplicate_threshold),
        )


def import_dataset(
    fmt: str,
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    allow_duplicates: bool | None = None,
    allow_label_conflicts: bool | None = None,
    near_duplicates: NearDuplicateConfig | None = None,
    overwrite: bool = False,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    validate: bool = True,
) -> DatasetInfo:
    """Convert ``src`` (layout ``fmt``) into an m2snet dataset at ``dest``, validated, atomically.

    ``validate=False`` skips the great-expectations pass (the per-file conversion checks and the
    duplicate clustering still run); it exists for machines without great-expectations, such as a
    bare GPU box running a benchmark on data already validated elsewhere, and is logged as a warning.

    Every problem found while converting (undecodable image, missing mask, mask of the wrong size,
    a mask that is a photo, images and masks swapped) is collected and reported together, naming
    each file; then duplicates are clustered (exact + near, ``near_duplicates``; the cluster id is
    the manifest's ``group``) and validation runs on the converted copy. Only a complete and valid
    dataset is moved to ``dest``; on any failure, Ctrl-C or SIGTERM nothing is left behind, and a
    partial directory left by a SIGKILLed import is removed by the next import to ``dest``. The
    validation report is written beside ``dest`` (``<dest>.validation.{json,html}``).
    """
    importer = get_importer(fmt, **(options or {}))
    policy = ImportPolicy.resolve(importer, allow_duplicates, allow_label_conflicts, near_duplicates)
    src, dest = Path(src), Path(dest)
    cases = _scan_source(importer, fmt, src)
    notes: list[str] = []
    # Only a previous import (it has dataset.json) is ever replaced, never the source or a folder around it.
    with atomic_directory(dest, overwrite=overwrite, marker=DATASET_JSON, protect=(src,)) as tmp:
        records, hashes = _convert_cases(importer, fmt, cases, src, tmp, policy.near, notes, progress)
        records = _group_duplicates(fmt, src, records, hashes, policy)
        _write_manifest(importer, fmt, tmp, records, policy)
        report = _validate_copy(tmp, src, dest, notes, validate)
    for note in notes:
        log.warning("note: %s", note)
    info = load_dataset(dest)
    if report is not None:
        report.write(info)
    log.info("imported %d cases (%s) into %s", len(records), fmt, dest)
    return info


# --- scan -----------------------------------------------------------------------------------------
def _scan_source(importer: Importer, fmt: str, src: Path) -> list[SourceCase]:
    """The source's cases, refused before any work when there are none, a name is not UTF-8, or two
    source images would become one case."""
    if not src.is_dir():
        raise M2SNetError(f"{src}: source directory not found")
    cases = importer.scan(src)
    if not cases:
        raise M2SNetError(f"{src}: no images found for format {fmt!r} ({importer.description})")
    _check_source_names(src, cases)
    ids = [c.case_id for c in cases]
    clashes = sorted({i for i in ids if ids.count(i) > 1})
    if clashes:
        raise M2SNetError(f"{src}: several source images map to the same case id: {clashes[:5]}")
    return cases


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a byte the file system's name could not decode (a surrogate escape)
        return False
    return True


def _check_source_names(src: Path, cases: list[SourceCase]) -> None:
    """Refuse source file (or folder) names that are not valid UTF-8, before any work, naming the first one.

    Why refuse rather than import under a substitute: the manifest (UTF-8 CSV, part of the data version)
    records each case's source files by name (``source_image``, ``source_masks``) and the folder names
    that became labels and subsets; a replaced name would record a file that does not exist under it, and
    two names could map to one. Renaming the files (e.g. ``convmv``) keeps the provenance exact.
    """
    bad = []
    for case in cases:
        names = [p.relative_to(src).as_posix() for p in (case.image, *case.masks)]
        wrong = [n for n in names if not _is_utf8(n)]
        if not wrong and not all(_is_utf8(v) for v in (case.label, case.subset, *case.extra.values())):
            wrong = names[:1]  # a label or subset taken from a folder's name
        bad += wrong
    if bad:
        shown = os.fsencode(bad[0]).decode("utf-8", "backslashreplace")
        raise M2SNetError(f"{src}: {len(bad)} source file name(s) are not valid UTF-8, e.g. {shown} (its bytes "
                          "escaped): the manifest records every source file by name; rename them to UTF-8 "
                          "(e.g. `convmv -f latin1 -t utf-8 -r --notest SRC`) and import again")


# --- convert --------------------------------------------------------------------------------------
def _convert_cases(
    importer: Importer, fmt: str, cases: list[SourceCase], src: Path, tmp: Path, near: NearDuplicateConfig,
    notes: list[str], progress: bool,
) -> tuple[list[CaseRecord], list[np.ndarray | None]]:
    """Every case converted into ``tmp``, with its perceptual hashes; the problems of all failed cases
    are raised together, so one run names every file to fix."""
    records, hashes, problems = [], [], []
    for case in progress_bar(cases, desc=f"import {fmt}", disable=not progress, leave=False):
        try:
            record, phash = convert_case(importer, case, src, tmp, notes, hashes=near.enabled)
        except M2SNetError as err:
            problems.append(err)
            continue
        records.append(record)
        hashes.append(phash)
    if problems:
        raise M2SNetError(problems_message(importer, src, len(cases), problems))
    return records, hashes


# --- group ----------------------------------------------------------------------------------------
def _group_duplicates(fmt: str, src: Path, records: list[CaseRecord], hashes: list[np.ndarray | None],
                      policy: ImportPolicy) -> list[CaseRecord]:
    """The records with their duplicate cluster (exact + near) as ``group``; label conflicts refused
    unless the policy allows them (then logged, as large clusters are)."""
    near = policy.near
    dups = find_duplicates(
        [r.case_id for r in records], [r.label for r in records], [r.sha256 for r in records],
        np.stack(hashes) if near.enabled else None, near,
    )
    if dups.conflicts and not policy.allow_label_conflicts:
        raise M2SNetError(
            f"{src}: {len(dups.conflicts)} duplicate cluster(s) hold cases with different labels "
            "(label conflicts):\n  "
            + "\n  ".join(c.describe() for c in dups.conflicts)
            + "\n  fix the labels, or accept them with --allow-label-conflicts (they stay in one fold)"
        )
    for conflict in dups.conflicts:
        log.warning("label conflict (allowed for %s): %s", fmt, conflict.describe())
    for warning in dups.large_cluster_warnings():
        log.warning("%s", warning)
    return [replace(r, group=dups.group_of[r.case_id]) for r in records]


# --- write ----------------------------------------------------------------------------------------
def _write_manifest(importer: Importer, fmt: str, tmp: Path, records: list[CaseRecord], policy: ImportPolicy) -> None:
    """dataset.json + manifest.csv, recording the policy and the converter's options and label rules."""
    # Recorded only where the column holds a value (a ClinicDB copy of unnumbered files has none), and
    # only for importers that have one: other datasets' dataset.json, and so their versions, are unchanged.
    grouping = ({"group_by": importer.group_by} if importer.group_by
                and any(dict(r.extra).get(importer.group_by) for r in records) else {})
    write_dataset(
        tmp, records, source_format=fmt, n_classes=importer.n_classes,
        mask_classes=importer.mask_classes, labels=sorted({r.label for r in records}),
        extra={
            **grouping,
            "allow_duplicates": policy.allow_duplicates,
            "allow_label_conflicts": policy.allow_label_conflicts,
            "near_duplicates": policy.near.to_meta(),
            "lesion_labels": importer.lesion_labels,
            "empty_labels": importer.empty_labels,
            "import_options": importer.options(),
        },
    )


# --- validate -------------------------------------------------------------------------------------
def _validate_copy(tmp: Path, src: Path, dest: Path, notes: list[str], validate: bool) -> ValidationReport | None:
    """The great-expectations pass on the converted copy (an invalid copy is never moved into place), or
    None when ``validate`` is off."""
    if not validate:
        log.warning("%s: great-expectations validation skipped (validate=False)", dest)
        return None
    report = validate_dataset(tmp, write_report=False, notes=notes)
    if not report.success:
        raise M2SNetError(f"{src}: the imported data is not valid:\n{report.summary(shown_root=dest)}")
    return report
