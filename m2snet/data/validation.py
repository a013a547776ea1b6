"""Dataset validation with great-expectations 1.x.

We compute one row of facts per case (does the image decode, does the mask match its size, which
values does the mask hold, how large is the lesion, does the file still hash to the manifest's
sha256, ...) into a pandas DataFrame, and state the rules as GX expectations on that frame in an
ephemeral context. GX then tells us which rows break which rule; we map rows back to files.

The report (``validation.json`` + a self-made ``validation.html``) is written into the dataset
directory. It holds no timestamps or run ids: the same data gives the same bytes, so validating a
DVC-tracked dataset does not change its hash.
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

from m2snet.common import write_json
from m2snet.data.format import DatasetInfo, load_dataset

log = logging.getLogger(__name__)

REPORT_JSON = "validation.json"
REPORT_HTML = "validation.html"
MIN_SIZE, MAX_SIZE = 32, 8192


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
            "expectations": [o.__dict__ for o in self.outcomes],
        }


def _case_facts(info: DatasetInfo) -> "Any":
    """One row per case of facts read from the files (not trusted from the manifest)."""
    import pandas as pd
    from PIL import Image

    from m2snet.common import sha256_file

    n_values = max(info.n_classes, 2)
    rows = []
    for case in info.cases:
        row: dict[str, Any] = {
            "case_id": case.case_id, "label": case.label,
            "files": (
                f"{case.image_path.relative_to(info.root)}, {case.mask_path.relative_to(info.root)} "
                f"(source: {', '.join((case.source_image, *case.source_masks)) or '?'})"
            ),
            "image_decodes": False, "image_is_rgb": False, "mask_decodes": False, "mask_is_grey": False,
            "mask_size_matches": False, "manifest_size_matches": False, "mask_values_valid": False,
            "sha256_matches": False, "height": -1, "width": -1, "lesion_area": -1, "sha256": case.sha256,
        }
        try:
            with Image.open(case.image_path) as im:
                im.load()
                row.update(image_decodes=True, image_is_rgb=im.mode == "RGB", width=im.width, height=im.height)
                row["sha256_matches"] = sha256_file(case.image_path) == case.sha256
        except (OSError, SyntaxError, ValueError):
            pass
        try:
            with Image.open(case.mask_path) as m:
                m.load()
                mask = np.asarray(m)
                row.update(mask_decodes=True, mask_is_grey=m.mode == "L")
                row["mask_size_matches"] = (m.width, m.height) == (row["width"], row["height"])
                row["mask_values_valid"] = bool(m.mode == "L" and int(mask.max(initial=0)) < n_values)
                row["lesion_area"] = int((mask > 0).sum())
        except (OSError, SyntaxError, ValueError):
            pass
        row["manifest_size_matches"] = (row["height"], row["width"]) == (case.height, case.width)
        rows.append(row)
    columns = list(rows[0]) if rows else ["case_id", "label", "files", "sha256", "height", "width", "lesion_area"]
    return pd.DataFrame(rows, columns=columns)


def _expectations(info: DatasetInfo, allow_duplicates: bool, min_size: int, max_size: int) -> list[tuple[Any, str]]:
    """The rules, as GX expectations with a sentence each."""
    import great_expectations.expectations as gxe

    true = [True]
    rules: list[tuple[Any, str]] = [
        (gxe.ExpectTableRowCountToBeBetween(min_value=1), "the dataset has at least one case"),
        (gxe.ExpectColumnValuesToBeInSet(column="image_decodes", value_set=true), "every image decodes"),
        (gxe.ExpectColumnValuesToBeInSet(column="image_is_rgb", value_set=true), "images are 8-bit RGB"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_decodes", value_set=true), "every mask decodes"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_is_grey", value_set=true), "masks are 8-bit grey (L)"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_size_matches", value_set=true), "each mask has its image's size"),
        (gxe.ExpectColumnValuesToBeInSet(column="manifest_size_matches", value_set=true), "sizes agree with manifest.csv"),
        (
            gxe.ExpectColumnValuesToBeInSet(column="mask_values_valid", value_set=true),
            "masks are binary (0/1)" if info.is_binary else f"mask values are class ids 0..{info.n_classes - 1}",
        ),
        (gxe.ExpectColumnValuesToBeInSet(column="sha256_matches", value_set=true), "image bytes match the manifest sha256"),
        (gxe.ExpectColumnValuesToBeBetween(column="height", min_value=min_size, max_value=max_size), f"height within {min_size}..{max_size} px"),
        (gxe.ExpectColumnValuesToBeBetween(column="width", min_value=min_size, max_value=max_size), f"width within {min_size}..{max_size} px"),
    ]
    if info.labels:
        rules.append((gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(info.labels)), f"labels are among {info.labels}"))
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
                column="lesion_area", min_value=0, max_value=0, row_condition=f'label=="{label}"', condition_parser="pandas",
            ),
            f"'{label}' cases have an empty mask",
        ))
    if not allow_duplicates:
        rules.append((gxe.ExpectColumnValuesToBeUnique(column="sha256"), "no two cases have the same image bytes"))
    return rules


def validate_dataset(
    root: str | os.PathLike,
    *,
    allow_duplicates: bool | None = None,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    write_report: bool = True,
) -> ValidationReport:
    """Validate a dataset directory; write validation.json/.html into it when ``write_report``."""
    # GX logs its own start-up at INFO (hundreds of lines); only its warnings matter to our users.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    info = load_dataset(root)
    allow = bool(info.meta.get("allow_duplicates", False)) if allow_duplicates is None else allow_duplicates
    df = _case_facts(info)

    from great_expectations.data_context.types.base import (
        DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig,
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
    rules = _expectations(info, allow, min_size, max_size)
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
    report = ValidationReport(
        root=info.root, n_cases=len(info.cases), outcomes=outcomes,
        class_counts=dict(sorted(Counter(c.label for c in info.cases).items())),
        duplicates=duplicates, allow_duplicates=allow,
    )
    if write_report:
        write_json(info.root / REPORT_JSON, report.to_dict())
        (info.root / REPORT_HTML).write_text(render_html(report, info))
    return report


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
        "<li>" + ", ".join(f"<code>{e(i)}</code> ({e(label_of.get(i, '?'))})" for i in group) + "</li>" for group in report.duplicates
    ) or "<li>none</li>"
    counts = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in report.class_counts.items())
    verdict = "VALID" if report.success else "INVALID"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(info.name)}: validation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}} .fail td:first-child{{color:#b00;font-weight:bold}}
.pass td:first-child{{color:#070}}</style></head><body>
<h1>{e(info.name)}: {verdict}</h1>
<p>{report.n_cases} cases; format <code>{e(info.source_format)}</code>; n_classes {info.n_classes}
({e(", ".join(info.mask_classes))}). Checked with great-expectations on per-case facts read from the files.</p>
<h2>Class counts</h2><table><tr><th>label</th><th>cases</th></tr>{counts}</table>
<h2>Exact-duplicate images</h2><p>Policy: {"allowed; the split keeps each group in one fold" if report.allow_duplicates else "not allowed"}.</p>
<ul>{dups}</ul>
<h2>Expectations</h2><table><tr><th></th><th>rule</th><th>expectation</th><th>offending cases</th></tr>{"".join(rows)}</table>
</body></html>
"""
