"""Dataset validation with great-expectations 1.x.

We compute one row of facts per case (does the image decode, does the mask match its size, which
values does the mask hold, how large is the lesion and is that the manifest's lesion_area, do
image and mask still hash to the manifest's sha256 and mask_sha256, ...) into a pandas
DataFrame, and state the rules as GX expectations on that frame in an ephemeral context. GX then
tells us which rows break which rule; we map rows back to files.

Duplicates are clustered here too (m2snet.data.duplicates, with the settings dataset.json records):
the manifest's ``group`` must be the cluster id found, and a cluster may hold two labels only when
the dataset allows label conflicts (BUSI). Foreground fractions per label are summarised and
outliers listed (a mask covering most of its image, an empty mask on a lesion label).

The report (``<dest>.validation.json`` + a self-made ``<dest>.validation.html``) is written beside
the dataset directory, never into it: the directory's hash is the dataset version, and validating
with other options must not change it. The report holds no timestamps or run ids.
"""

from __future__ import annotations

import html
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m2snet.data.duplicates import (
    CROP_SCALES,
    LINKAGE,
    DuplicateReport,
    NearDuplicateConfig,
    find_duplicates,
    perceptual_hashes,
)
from m2snet.data.format import DatasetInfo, load_dataset
from m2snet.data.images import ImageError, decode_image
from m2snet.files import write_json, write_text
from m2snet.hashing import sha256_file

log = logging.getLogger(__name__)

REPORT_JSON = "validation.json"
REPORT_HTML = "validation.html"
MIN_SIZE, MAX_SIZE = 32, 8192
# A binary mask covering more than this fraction of its image is listed as an outlier.
MAX_FOREGROUND_FRACTION = 0.5


def report_paths(root: str | os.PathLike) -> tuple[Path, Path]:
    """Where the report of dataset ``root`` goes: ``<root>.validation.json`` and ``.html`` beside it."""
    root = Path(root).resolve()
    return root.parent / f"{root.name}.{REPORT_JSON}", root.parent / f"{root.name}.{REPORT_HTML}"


@dataclass
class ExpectationOutcome:
    expectation: str  # GX expectation type
    column: str | None
    rule: str  # what it means, in words
    success: bool
    offending: list[dict[str, str]] = field(default_factory=list)  # case_id + files per failing row


@dataclass
class ValidationReport:
    root: Path
    n_cases: int
    outcomes: list[ExpectationOutcome]
    class_counts: dict[str, int]
    duplicates: list[list[str]]  # groups of case ids with identical image bytes
    allow_duplicates: bool
    clusters: DuplicateReport | None = None
    allow_label_conflicts: bool = False
    foreground: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> min/median/mean/max
    outliers: list[dict[str, Any]] = field(default_factory=list)  # case_id, label, fraction, why
    notes: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def summary(self, shown_root: str | os.PathLike | None = None) -> str:
        """Readable verdict; ``shown_root`` names the dataset when it was validated under a temporary path."""
        lines = [f"{shown_root or self.root}: {self.n_cases} cases, classes {self.class_counts}"]
        if self.duplicates:
            policy = "allowed (kept in one fold by the split)" if self.allow_duplicates else "NOT allowed"
            lines.append(f"  exact-duplicate images ({policy}): {self.duplicates}")
        if self.clusters is not None:
            c = self.clusters.counts()
            near = self.clusters.config
            how = f"near duplicates within {near.max_distance} bits" if near.enabled else "near duplicates off"
            lines.append(
                f"  duplicate clusters ({how}): {c['duplicate_clusters']} clusters "
                f"holding {c['cases_in_clusters']} cases "
                f"({c['near_duplicate_clusters']} with near duplicates, at most {c['largest_cluster']} cases; "
                f"{c['near_pairs_across_clusters']} pairs within the threshold left in different clusters by the "
                "diameter bound); kept in one fold by the split"
            )
            for cl in self.clusters.conflicts:
                kind = "WARNING (allowed)" if self.allow_label_conflicts else "ERROR"
                lines.append(f"  label conflict {kind}: {cl.describe()}")
            lines.extend(f"  WARNING: {w}" for w in self.clusters.large_cluster_warnings())
        for o in self.outliers[:20]:
            lines.append(f"  outlier: {o['case_id']} ({o['label']}): {o['why']}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        for o in self.failures:
            lines.append(f"  FAILED {o.expectation}({o.column}): {o.rule}")
            for row in o.offending[:50]:
                lines.append(f"    {row['case_id']}: {row['files']}")
            if len(o.offending) > 50:
                lines.append(f"    ... and {len(o.offending) - 50} more (see {REPORT_HTML})")
        lines.append("  OK: every expectation met" if self.success else f"  {len(self.failures)} expectation(s) failed")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "n_cases": self.n_cases,
            "class_counts": self.class_counts,
            "duplicates": self.duplicates,
            "allow_duplicates": self.allow_duplicates,
            "duplicate_clusters": self.clusters.to_dict() if self.clusters is not None else None,
            "allow_label_conflicts": self.allow_label_conflicts,
            "label_conflicts": [c.to_dict() for c in self.clusters.conflicts] if self.clusters is not None else [],
            "foreground_fraction": self.foreground,
            "outliers": self.outliers,
            "notes": self.notes,
            "expectations": [o.__dict__ for o in self.outcomes],
        }

    def write(self, info: DatasetInfo) -> tuple[Path, Path]:
        """Write the JSON and HTML report beside ``info.root``; return their paths."""
        self.root = info.root
        json_path, html_path = report_paths(info.root)
        write_json(json_path, self.to_dict())
        write_text(html_path, render_html(self, info))
        return json_path, html_path


def _case_facts(info: DatasetInfo, near: NearDuplicateConfig) -> tuple["Any", np.ndarray]:
    """One row per case of facts read from the files (not trusted from the manifest), and the perceptual hashes."""
    import pandas as pd

    n_values = max(info.n_classes, 2)
    rows, hashes = [], np.zeros((len(info.cases), len(CROP_SCALES)), dtype=np.uint64)
    for i, case in enumerate(info.cases):
        row: dict[str, Any] = {
            "case_id": case.case_id, "label": case.label,
            "files": (
                f"{case.image_path.relative_to(info.root)}, {case.mask_path.relative_to(info.root)} "
                f"(source: {', '.join((case.source_image, *case.source_masks)) or '?'})"
            ),
            "image_decodes": False, "image_is_rgb": False, "mask_decodes": False, "mask_is_grey": False,
            "mask_size_matches": False, "manifest_size_matches": False, "mask_values_valid": False,
            "sha256_matches": False, "mask_sha256_matches": False, "lesion_area_matches": False,
            "height": -1, "width": -1, "lesion_area": -1, "sha256": case.sha256,
            "foreground_fraction": -1.0,
        }
        try:
            decoded = decode_image(case.image_path, "image")
            im = decoded.image
            row.update(image_decodes=True, image_is_rgb=decoded.source_mode == "RGB", width=im.width,
                       height=im.height)
            row["sha256_matches"] = sha256_file(case.image_path) == case.sha256
            if near.enabled:
                hashes[i] = perceptual_hashes(im)
        except (ImageError, OSError):
            pass
        try:
            decoded = decode_image(case.mask_path, "mask")
            m, grey = decoded.image, decoded.source_mode == "L"
            mask = np.asarray(m)
            row.update(mask_decodes=True, mask_is_grey=grey)
            row["mask_size_matches"] = (m.width, m.height) == (row["width"], row["height"])
            row["mask_values_valid"] = bool(grey and int(mask.max(initial=0)) < n_values)
            row["lesion_area"] = int((mask > 0).sum())
            row["lesion_area_matches"] = row["lesion_area"] == case.lesion_area
            row["mask_sha256_matches"] = sha256_file(case.mask_path) == case.mask_sha256
            row["foreground_fraction"] = row["lesion_area"] / max(mask.size, 1)
        except (ImageError, OSError):
            pass
        row["manifest_size_matches"] = (row["height"], row["width"]) == (case.height, case.width)
        rows.append(row)
    columns = list(rows[0]) if rows else ["case_id", "label", "files", "sha256", "height", "width", "lesion_area"]
    return pd.DataFrame(rows, columns=columns), hashes


def _expectations(
    info: DatasetInfo, allow_duplicates: bool, allow_label_conflicts: bool, check_groups: bool,
    min_size: int, max_size: int,
) -> list[tuple[Any, str]]:
    """The rules, as GX expectations with a sentence each."""
    import great_expectations.expectations as gxe

    true = [True]
    rules: list[tuple[Any, str]] = [
        (gxe.ExpectTableRowCountToBeBetween(min_value=1), "the dataset has at least one case"),
        (gxe.ExpectColumnValuesToBeInSet(column="image_decodes", value_set=true), "every image decodes"),
        (gxe.ExpectColumnValuesToBeInSet(column="image_is_rgb", value_set=true), "images are 8-bit RGB"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_decodes", value_set=true), "every mask decodes"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_is_grey", value_set=true), "masks are 8-bit grey (L)"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_size_matches", value_set=true),
         "each mask has its image's size"),
        (gxe.ExpectColumnValuesToBeInSet(column="manifest_size_matches", value_set=true),
         "sizes agree with manifest.csv"),
        (
            gxe.ExpectColumnValuesToBeInSet(column="mask_values_valid", value_set=true),
            "masks are binary (0/1)" if info.is_binary else f"mask values are class ids 0..{info.n_classes - 1}",
        ),
        (gxe.ExpectColumnValuesToBeInSet(column="sha256_matches", value_set=true),
         "image bytes match the manifest sha256"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_sha256_matches", value_set=true),
         "mask bytes match the manifest mask_sha256"),
        (gxe.ExpectColumnValuesToBeInSet(column="lesion_area_matches", value_set=true),
         "lesion area (mask pixels > 0) matches the manifest lesion_area"),
        (gxe.ExpectColumnValuesToBeBetween(column="height", min_value=min_size, max_value=max_size),
         f"height within {min_size}..{max_size} px"),
        (gxe.ExpectColumnValuesToBeBetween(column="width", min_value=min_size, max_value=max_size),
         f"width within {min_size}..{max_size} px"),
    ]
    if info.labels:
        rules.append((gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(info.labels)),
                      f"labels are among {info.labels}"))
    for label in info.meta.get("lesion_labels", []):
        rules.append((
            gxe.ExpectColumnValuesToBeBetween(
                column="lesion_area", min_value=1, row_condition=f'label=="{label}"', condition_parser="pandas",
            ),
            f"'{label}' cases have a lesion",
        ))
    for label in info.meta.get("empty_labels", []):
        rules.append((
            gxe.ExpectColumnValuesToBeBetween(
                column="lesion_area", min_value=0, max_value=0, row_condition=f'label=="{label}"',
                condition_parser="pandas",
            ),
            f"'{label}' cases have an empty mask",
        ))
    if not allow_duplicates:
        rules.append((gxe.ExpectColumnValuesToBeUnique(column="sha256"), "no two cases have the same image bytes"))
    if not allow_label_conflicts:
        rules.append((
            gxe.ExpectColumnValuesToBeInSet(column="label_conflict", value_set=[False]),
            "no duplicate cluster (exact or near) holds two labels (label conflicts)",
        ))
    if check_groups:
        rules.append((
            gxe.ExpectColumnValuesToBeInSet(column="group_matches", value_set=true),
            "manifest.csv's group is the duplicate cluster found (re-import after editing images)",
        ))
    return rules


def validate_dataset(
    root: str | os.PathLike,
    *,
    allow_duplicates: bool | None = None,
    allow_label_conflicts: bool | None = None,
    near_duplicates: NearDuplicateConfig | None = None,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    write_report: bool = True,
    notes: list[str] | None = None,
) -> ValidationReport:
    """Validate a dataset directory; write ``<root>.validation.json/.html`` beside it when ``write_report``.

    Defaults come from dataset.json. ``near_duplicates`` other than the recorded settings reports the
    clusters those settings find, without requiring the manifest's groups to match them (a re-import
    with those settings regroups). ``notes`` (from the import) are carried into the report.
    """
    # GX logs its own start-up at INFO (hundreds of lines); only its warnings matter to our users.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    info = load_dataset(root)
    allow = bool(info.meta.get("allow_duplicates", False)) if allow_duplicates is None else allow_duplicates
    allow_conflicts = (
        bool(info.meta.get("allow_label_conflicts", False)) if allow_label_conflicts is None else allow_label_conflicts
    )
    recorded = NearDuplicateConfig.from_meta(info.meta.get("near_duplicates"))
    notes = list(notes or [])
    recorded_meta = info.meta.get("near_duplicates") or {}
    if recorded_meta and recorded_meta.get("linkage") != LINKAGE:
        notes.append(
            f"{info.root / 'dataset.json'}: the duplicate clusters were made by an older m2snet, whose "
            "single-linkage clusters chain unrelated images; re-import to regroup (the group check compares "
            f"with {LINKAGE}-linkage clusters)"
        )
    near = recorded if near_duplicates is None else near_duplicates
    df, hashes = _case_facts(info, near)
    dups = find_duplicates(
        [c.case_id for c in info.cases], [c.label for c in info.cases], [c.sha256 for c in info.cases], hashes, near,
    )
    conflicted = {cid for cl in dups.conflicts for cid in cl.case_ids}
    df["label_conflict"] = [c.case_id in conflicted for c in info.cases]
    df["group_matches"] = [c.group == dups.group_of[c.case_id] for c in info.cases]

    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Ephemeral, in-memory stores and no Data Docs site: our report is written below.
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False)),
    )

    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # our own tqdm/log lines suffice
    batch = (
        context.data_sources.add_pandas("m2snet")
        .add_dataframe_asset("cases")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    rules = _expectations(info, allow, allow_conflicts, near == recorded, min_size, max_size)
    suite = context.suites.add(gx.ExpectationSuite(name="m2snet-dataset", expectations=[e for e, _ in rules]))
    # One validation of the whole suite; results are matched back to rules by expectation id.
    results = {
        r.expectation_config.id: r for r in batch.validate(suite, result_format={"result_format": "COMPLETE"}).results
    }
    outcomes = []
    for (_, rule), expectation in zip(rules, suite.expectations, strict=True):
        result = results[expectation.id]
        column = getattr(expectation, "column", None)
        offending = []
        if not result.success:
            for idx in sorted(set(result.result.get("unexpected_index_list") or [])):
                row = df.loc[idx]
                offending.append({"case_id": str(row["case_id"]), "files": str(row["files"])})
        outcomes.append(ExpectationOutcome(type(expectation).__name__, column, rule, bool(result.success), offending))

    by_hash: dict[str, list[str]] = defaultdict(list)
    for case in info.cases:
        by_hash[case.sha256].append(case.case_id)
    duplicates = sorted(sorted(ids) for ids in by_hash.values() if len(ids) > 1)
    foreground, outliers = _foreground_summary(info, df)
    report = ValidationReport(
        root=info.root, n_cases=len(info.cases), outcomes=outcomes,
        class_counts=dict(sorted(Counter(c.label for c in info.cases).items())),
        duplicates=duplicates, allow_duplicates=allow, clusters=dups, allow_label_conflicts=allow_conflicts,
        foreground=foreground, outliers=outliers, notes=notes,
    )
    if write_report:
        report.write(info)
    return report


def _foreground_summary(info: DatasetInfo, df: "Any") -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Foreground fraction per label (min/median/mean/max) and the cases that stand out."""
    stats, outliers = {}, []
    lesion_labels = set(info.meta.get("lesion_labels", []))
    for label, part in sorted(df.groupby("label"), key=lambda kv: str(kv[0])):
        fr = part["foreground_fraction"][part["foreground_fraction"] >= 0]
        if len(fr):
            stats[str(label)] = {
                "n": int(len(fr)), "min": round(float(fr.min()), 4), "median": round(float(fr.median()), 4),
                "mean": round(float(fr.mean()), 4), "max": round(float(fr.max()), 4),
            }
    for row in df.itertuples():
        frac = float(row.foreground_fraction)
        if frac < 0:
            continue
        if info.is_binary and frac > MAX_FOREGROUND_FRACTION:
            outliers.append({"case_id": row.case_id, "label": row.label, "fraction": round(frac, 4),
                             "why": f"mask covers {100 * frac:.0f}% of the image"})
        elif frac == 0 and row.label in lesion_labels:
            outliers.append({"case_id": row.case_id, "label": row.label, "fraction": 0.0,
                             "why": f"empty mask on the lesion label '{row.label}'"})
    return stats, outliers


def _similarity_text(link: dict[str, Any]) -> str:
    if link["kind"] == "exact":
        return "identical bytes"
    return f"similarity {link['similarity']:.2f} ({link['bits']} bits)"


def _header_row(*names: str) -> str:
    return "<tr>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"


def render_html(report: ValidationReport, info: DatasetInfo) -> str:
    """A small self-contained page: verdict, class counts, duplicates, each expectation and its offenders."""
    e = html.escape
    label_of = {c.case_id: c.label for c in info.cases}
    rows = []
    for o in report.outcomes:
        status = "pass" if o.success else "FAIL"
        offenders = "".join(f"<li><code>{e(r['case_id'])}</code> {e(r['files'])}</li>" for r in o.offending)
        rows.append(
            f"<tr class='{status.lower()}'><td>{status}</td><td>{e(o.rule)}</td>"
            f"<td><code>{e(o.expectation)}</code>{'(' + e(o.column) + ')' if o.column else ''}</td>"
            f"<td>{len(o.offending)}<ul>{offenders}</ul></td></tr>"
        )
    dups = "".join(
        "<li>" + ", ".join(f"<code>{e(i)}</code> ({e(label_of.get(i, '?'))})" for i in group) + "</li>"
        for group in report.duplicates
    ) or "<li>none</li>"
    counts = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in report.class_counts.items())
    clusters_html = "<p>not computed</p>"
    if report.clusters is not None:
        near = report.clusters.config
        items = []
        for cl in report.clusters.clusters:
            links = ", ".join(f"{e(link['a'])}~{e(link['b'])} {_similarity_text(link)}" for link in cl.links)
            allowed = " (allowed)" if report.allow_label_conflicts else ""
            flag = f" <b class='conflict'>label conflict{allowed}</b>" if cl.label_conflict else ""
            members = ", ".join(f"<code>{e(i)}</code> ({e(cl.labels[i])})" for i in cl.case_ids)
            items.append(f"<li>{members}{flag}<br><small>{links}</small></li>")
        c = report.clusters.counts()
        near_text = (f"pHash within {near.max_distance} of 64 bits (similarity = 1 - bits/64), complete linkage: "
                     "every two cases of a cluster within the threshold" if near.enabled else "off")
        clusters_html = (
            f"<p>Near duplicates: {near_text}. "
            f"{c['duplicate_clusters']} clusters, {c['cases_in_clusters']} cases, "
            f"{c['near_duplicate_clusters']} with near duplicates, {c['label_conflicts']} label conflicts, "
            f"largest {c['largest_cluster']} cases, {c['near_pairs_across_clusters']} pairs within the threshold "
            "in different clusters. "
            "The manifest's <code>group</code> is the cluster id; the split keeps a cluster in one fold.</p>"
            f"<ul>{''.join(items) or '<li>none</li>'}</ul>"
        )
    fg_rows = "".join(
        f"<tr><td>{e(k)}</td><td>{v['n']}</td><td>{v['min']:.4f}</td><td>{v['median']:.4f}</td>"
        f"<td>{v['mean']:.4f}</td><td>{v['max']:.4f}</td></tr>"
        for k, v in report.foreground.items()
    )
    outlier_items = "".join(
        f"<li><code>{e(o['case_id'])}</code> ({e(o['label'])}): {e(o['why'])}</li>" for o in report.outliers
    ) or "<li>none</li>"
    notes = "".join(f"<li>{e(n)}</li>" for n in report.notes) or "<li>none</li>"
    verdict = "VALID" if report.success else "INVALID"
    dup_policy = "allowed; the split keeps each group in one fold" if report.allow_duplicates else "not allowed"
    fg_head = _header_row("label", "n", "min", "median", "mean", "max")
    rules_head = _header_row("", "rule", "expectation", "offending cases")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(info.name)}: validation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}} .fail td:first-child{{color:#b00;font-weight:bold}}
.pass td:first-child{{color:#070}} .conflict{{color:#b00}}</style></head><body>
<h1>{e(info.name)}: {verdict}</h1>
<p>{report.n_cases} cases; format <code>{e(info.source_format)}</code>; n_classes {info.n_classes}
({e(", ".join(info.mask_classes))}). Checked with great-expectations on per-case facts read from the files.</p>
<h2>Class counts</h2><table><tr><th>label</th><th>cases</th></tr>{counts}</table>
<h2>Exact-duplicate images</h2><p>Policy: {dup_policy}.</p>
<ul>{dups}</ul>
<h2>Duplicate clusters (exact + near)</h2>{clusters_html}
<h2>Foreground fraction per label</h2><table>{fg_head}{fg_rows}</table>
<h3>Outliers</h3><ul>{outlier_items}</ul>
<h2>Import notes</h2><ul>{notes}</ul>
<h2>Expectations</h2><table>{rules_head}{"".join(rows)}</table>
</body></html>
"""
