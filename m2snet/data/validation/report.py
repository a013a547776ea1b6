"""The validation report: each rule's outcome and offending cases, duplicate clusters, foreground
statistics and notes; its verdict in words (:meth:`ValidationReport.summary`), as JSON and as a small
self-contained HTML page, written beside the dataset (never into it: the directory's hash is the
dataset version). The report holds no timestamps or run ids."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2snet.data.duplicates import DuplicateReport
from m2snet.data.format import DatasetInfo
from m2snet.files import write_json, write_text

REPORT_JSON = "validation.json"
REPORT_HTML = "validation.html"


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
