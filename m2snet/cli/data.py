"""`m2snet data ...`: demo, import, validate, split, version, cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from m2snet.data.duplicates import NearDuplicateConfig
from m2snet.data.format import load_dataset
from m2snet.data.grouping import group_by_option, grouping_note
from m2snet.data.split import make_split
from m2snet.errors import M2SNetError

app = typer.Typer(help="Datasets: create the demo set, import public layouts, validate, split, version.",
                  no_args_is_help=True)


def _parse_options(values: list[str]) -> dict[str, object]:
    """``key=value`` pairs; values parsed as JSON when they are (numbers, null, true), else strings."""
    out: dict[str, object] = {}
    for item in values:
        if "=" not in item:
            raise M2SNetError(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


@app.command("demo")
def demo(
    dest: Path = typer.Argument(..., help="Directory to create (BUSI layout: benign/, malignant/, normal/)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives byte-identical files."),
    n_per_class: str = typer.Option("12,8,6", help="Cases per class: one number, or benign,malignant,normal."),
    size: int = typer.Option(128, help="Image width in pixels."),
    overwrite: bool = typer.Option(False, help="Replace DEST only if it is a previous demo or empty."),
    formatted: bool = typer.Option(
        False, "--formatted",
        help="Write the m2snet format directly (= demo + `data import --format busi`); this is data/demo.",
    ),
) -> None:
    """Write a small synthetic ultrasound-like dataset in the BUSI layout (byte-identical for a seed)."""
    from m2snet.data.demo import build_demo_dataset, make_demo_dataset

    try:
        counts = [int(v) for v in n_per_class.split(",")]
    except ValueError:
        raise M2SNetError(f"--n-per-class {n_per_class!r}: expected integers like 12,8,6") from None
    counts_arg = counts[0] if len(counts) == 1 else counts
    if formatted:
        info = build_demo_dataset(dest, n_per_class=counts_arg, size=size, seed=seed, overwrite=overwrite)
        typer.echo(f"wrote demo dataset ({len(info.cases)} cases, m2snet format) to {dest}; version {info.version}")
        return
    make_demo_dataset(dest, n_per_class=counts_arg, size=size, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote demo dataset (BUSI layout) to {dest}; next: m2snet data import --format busi {dest} DEST")


def _near_duplicate_config(near_duplicates: Optional[str], threshold: Optional[int]):
    """--near-duplicates on|off and --near-duplicate-threshold as one config; None when neither is given
    (import: the default detector; validate: the settings recorded at import)."""
    if near_duplicates not in (None, "on", "off"):
        raise M2SNetError(f"--near-duplicates {near_duplicates!r}: expected on or off")
    if near_duplicates == "off":
        if threshold is not None:
            raise M2SNetError("--near-duplicate-threshold has no effect with --near-duplicates off")
        return NearDuplicateConfig(enabled=False)
    if near_duplicates is None and threshold is None:
        return None
    return NearDuplicateConfig() if threshold is None else NearDuplicateConfig(max_distance=threshold)


_NEAR_HELP = "Cluster near-duplicate images (resized, slightly cropped, re-encoded copies) with exact ones: on or off."
_THRESHOLD_HELP = (
    "Near-duplicate threshold: most differing bits of the 64-bit perceptual hash (default 8, chosen on BUSI; "
    "4 for the endoscopy formats kvasir, pranet, cvc-clinicdb: docs/data-format.md)."
)


def _report_payload(report: dict) -> dict:
    """The duplicate counts and label conflicts of a report, as printed by --json."""
    clusters = report.get("duplicate_clusters") or {}
    keys = ("exact_duplicate_groups", "duplicate_clusters", "near_duplicate_clusters", "cases_in_clusters",
            "label_conflicts", "largest_cluster", "near_pairs_across_clusters")
    return {
        "duplicate_counts": {k: clusters.get(k, 0) for k in keys},
        "near_duplicates": clusters.get("near_duplicates"),
        "label_conflicts": [c["case_ids"] for c in report.get("label_conflicts", [])],
    }


@app.command("import")
def import_(
    src: Path = typer.Argument(..., help="The dataset as distributed."),
    dest: Path = typer.Argument(..., help="Directory to create in the m2snet format."),
    format: str = typer.Option(
        ..., "--format", "-f", help="Source layout: busi, kvasir, pranet, cvc-clinicdb, covid-ct, goals, folder.",
    ),
    allow_duplicates: Optional[bool] = typer.Option(
        None, "--allow-duplicates/--no-allow-duplicates",
        help="Accept exact-duplicate images (reported, kept in one fold). Default: yes for busi, no otherwise.",
    ),
    allow_label_conflicts: Optional[bool] = typer.Option(
        None, "--allow-label-conflicts/--no-allow-label-conflicts",
        help="Accept duplicate clusters holding two labels (a warning; kept in one fold). "
             "Default: yes for busi (known there), no otherwise.",
    ),
    near_duplicates: Optional[str] = typer.Option(None, "--near-duplicates", help=_NEAR_HELP + " Default: on."),
    near_duplicate_threshold: Optional[int] = typer.Option(None, "--near-duplicate-threshold", help=_THRESHOLD_HELP),
    overwrite: bool = typer.Option(False, help="Replace DEST only if it is a previous import or empty."),
    option: List[str] = typer.Option(
        [], "--option", "-o", help="Importer option KEY=VALUE (e.g. threshold=127, mask_suffix=_mask).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Convert a public dataset layout into the m2snet format (validated; nothing is left behind on error or kill)."""
    from m2snet.data.importers import import_dataset
    from m2snet.data.validation import report_paths

    near = _near_duplicate_config(near_duplicates, near_duplicate_threshold)
    if near_duplicates == "on" and near_duplicate_threshold is None:
        near = None  # on, at the format's own threshold
    info = import_dataset(
        format, src, dest, allow_duplicates=allow_duplicates, allow_label_conflicts=allow_label_conflicts,
        near_duplicates=near,
        overwrite=overwrite, options=_parse_options(option),
    )
    report_json, report_html = report_paths(info.root)
    report = json.loads(report_json.read_text())
    extra = _report_payload(report)
    if as_json:
        typer.echo(json.dumps({
            "dest": str(info.root), "format": format, "n_cases": len(info.cases),
            "class_counts": report["class_counts"], "duplicates": report["duplicates"],
            "allow_duplicates": report["allow_duplicates"], "allow_label_conflicts": report["allow_label_conflicts"],
            **extra, "notes": report["notes"], "report": str(report_json), "version": info.version,
        }, indent=2))
        return
    typer.echo(f"imported {len(info.cases)} cases into {info.root}: {report['class_counts']}")
    counts = extra["duplicate_counts"]
    if report["duplicates"]:
        typer.echo(f"exact-duplicate images (allowed, kept in one fold): {report['duplicates']}")
    typer.echo(
        f"duplicate clusters: {counts['duplicate_clusters']} ({counts['cases_in_clusters']} cases; "
        f"{counts['near_duplicate_clusters']} with near duplicates; largest {counts['largest_cluster']} cases), "
        f"label conflicts: {counts['label_conflicts']}"
    )
    for ids in extra["label_conflicts"]:
        typer.echo(f"label conflict (allowed): {', '.join(ids)}")
    for group in (report.get("duplicate_clusters") or {}).get("large_clusters", []):
        typer.echo(f"WARNING: duplicate cluster {group} holds more than "
                   f"{report['duplicate_clusters']['warn_cluster_size']} cases (see {report_html})")
    for note in report["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"report: {report_html}")


@app.command("formats")
def formats() -> None:
    """List the source layouts `m2snet data import` understands."""
    from m2snet.data.importers import get_importer, list_importers

    for name in list_importers():
        typer.echo(f"{name:14s} {get_importer(name).description}")


@app.command("validate")
def validate(
    dest: Path = typer.Argument(..., help="An m2snet dataset directory."),
    allow_duplicates: Optional[bool] = typer.Option(
        None, "--allow-duplicates/--no-allow-duplicates", help="Override the policy recorded in dataset.json."
    ),
    allow_label_conflicts: Optional[bool] = typer.Option(
        None, "--allow-label-conflicts/--no-allow-label-conflicts", help="Override the policy recorded in dataset.json."
    ),
    near_duplicates: Optional[str] = typer.Option(
        None, "--near-duplicates", help=_NEAR_HELP + " Default: the settings recorded at import (dataset.json)."
    ),
    near_duplicate_threshold: Optional[int] = typer.Option(None, "--near-duplicate-threshold", help=_THRESHOLD_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check every case (great-expectations) and its duplicate clusters; exit 1 when invalid.

    Writes the report to DEST.validation.html and DEST.validation.json beside DEST.
    """
    from m2snet.data.validation import report_paths, validate_dataset

    report = validate_dataset(
        dest, allow_duplicates=allow_duplicates, allow_label_conflicts=allow_label_conflicts,
        near_duplicates=_near_duplicate_config(near_duplicates, near_duplicate_threshold),
    )
    payload = report.to_dict()
    if as_json:
        typer.echo(json.dumps({**payload, **_report_payload(payload)}, indent=2, default=str))
    else:
        typer.echo(report.summary())
    typer.echo(f"report: {report_paths(dest)[1]}", err=True)
    if not report.success:
        raise typer.Exit(1)


@app.command("split")
def split(
    dest: Path = typer.Argument(..., help="An m2snet dataset directory."),
    folds: int = typer.Option(4, help="Number of folds."),
    seed: int = typer.Option(42, help="Seed of the assignment."),
    out: Optional[Path] = typer.Option(None, help="Split file (default: DEST.split-<k>fold-seed<S>.json beside DEST)."),
    group_by: Optional[str] = typer.Option(
        None, "--group-by", metavar="COLUMN",
        help="A manifest column whose every value stays in one fold, on top of the duplicate clusters "
             "(e.g. a 'patient' column you add to manifest.csv). Default: the grouping dataset.json names "
             "(its importer's: 'sequence' for CVC-ClinicDB's videos); 'none': duplicate clusters only.",
    ),
    duplicates: str = typer.Option("cluster", help="Which duplicates stay in one fold: 'cluster' (exact + near "
                                   "duplicates, the manifest's group) or 'sha256' (byte-identical only: the old, "
                                   "leaky rule, kept to measure it)."),
    protocol: str = typer.Option("kfold", help="'kfold' (cross-validation) or 'fixed' (one training set, an "
                                 "optional validation set and named test sets; see --train/--val/--test/--fractions)."),
    train: Optional[str] = typer.Option(None, "--train", metavar="SELECTOR",
                                        help="fixed: the training set: subset:NAME[,NAME], ids:FILE or rest "
                                             "(default: rest; with no selector at all: subset:train)."),
    val: Optional[str] = typer.Option(None, "--val", metavar="SELECTOR", help="fixed: the validation set, if any."),
    test: List[str] = typer.Option([], "--test", metavar="NAME=SELECTOR",
                                   help="fixed: a named test set (repeatable), e.g. CVC-300=subset:CVC-300. "
                                        "Default: one per subset other than 'train'."),
    fractions: Optional[str] = typer.Option(None, "--fractions", metavar="TRAIN/VAL/TEST",
                                            help="fixed: deal whole groups (clusters, --group-by values) by shares "
                                                 "of the cases, e.g. 60/20/20 or 900/0/100."),
    test_name: str = typer.Option("test", "--test-name", help="fixed + --fractions: the test set's name."),
    on_leak: str = typer.Option("report", "--on-leak", help="fixed by selectors: a duplicate cluster or --group-by "
                                "value on two sides is 'report'ed (recorded in the file) or 'refuse'd."),
) -> None:
    """Write a K-fold split (stratified by label, duplicate clusters and --group-by values in one fold) or,
    with --protocol fixed, a fixed split with named test sets; deterministic for a seed."""
    info = load_dataset(dest)
    group_by = group_by_option(group_by)
    if protocol == "fixed":
        result = _fixed_split(info, seed, out, group_by, train, val, test, fractions, test_name, on_leak)
        typer.echo(grouping_note(info, result.group_by))
        typer.echo(f"wrote {result.path} (sha256 {result.sha256})")
        return
    if protocol != "kfold":
        raise M2SNetError(f"--protocol {protocol!r}: expected kfold or fixed")
    if train or val or test or fractions:
        raise M2SNetError("--train/--val/--test/--fractions need --protocol fixed")
    result = make_split(info, n_folds=folds, seed=seed, out=out, group_by=group_by,
                        duplicates=duplicates)  # type: ignore[arg-type]
    typer.echo(grouping_note(info, result.group_by))
    for k, counts in enumerate(result.counts):
        typer.echo(f"fold {k}: {sum(counts.values())} val cases {counts}")
    kept = result.groups_kept_together
    what = f"duplicates ({result.group})" + (f" and {result.group_by!r} values" if result.group_by else "")
    typer.echo(f"kept together: {kept.get('groups', 0)} groups of {what} ({kept.get('cases', 0)} cases), "
               "each in one fold")
    typer.echo(f"wrote {result.path} (sha256 {result.sha256})")


def _fixed_split(info, seed: int, out: Optional[Path], group_by: Optional[str], train: Optional[str],
                 val: Optional[str], test: list[str], fractions: Optional[str], test_name: str, on_leak: str):
    from m2snet.data.fixed_split import make_fixed_split, parse_test_sets

    if on_leak not in ("report", "refuse"):
        raise M2SNetError(f"--on-leak {on_leak!r}: expected report or refuse")
    tests = parse_test_sets(test)
    result = make_fixed_split(info, train=train, val=val, tests=tests or None, fractions=fractions,
                              test_name=test_name, group_by=group_by, seed=seed, out=out,
                              on_leak=on_leak)  # type: ignore[arg-type]
    fold = result.fold(0)
    typer.echo(f"train: {len(fold.train)} cases, val: {len(fold.val)} cases")
    for name, ids in result.test_sets.items():
        typer.echo(f"test {name}: {len(ids)} cases")
    for c in result.crossings[:5]:
        typer.echo(f"WARNING: group on two sides ({' and '.join(c['sets'])}): {', '.join(c['cases'][:6])}")
    if result.crossings:
        typer.echo(f"WARNING: {len(result.crossings)} group(s) on two sides, recorded in the file's 'crossings' "
                   "(--on-leak refuse to refuse them)")
    return result


@app.command("version")
def version(
    dest: Path = typer.Argument(..., help="An m2snet dataset directory."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print the dataset's DVC hash (as `dvc add` would record it) and whether its .dvc file agrees."""
    from m2snet.data.versioning import dataset_version, find_dvc_file, tracked_version

    current = dataset_version(dest)
    dvc_file, tracked = find_dvc_file(dest), tracked_version(dest)
    if as_json:
        typer.echo(json.dumps({"version": current, "dvc_file": str(dvc_file) if dvc_file else None,
                               "tracked": tracked, "matches": tracked == current}))
        return
    typer.echo(current)
    if dvc_file is not None:
        state = "matches" if tracked == current else f"DIFFERS (records {tracked}; run `dvc add` or `dvc checkout`)"
        typer.echo(f"{dvc_file}: {state}", err=True)


@app.command("cache")
def cache(
    dest: Path = typer.Argument(..., help="An m2snet dataset directory."),
    size: int = typer.Option(352, help="Side of the cached square arrays."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (default ~/.cache/m2snet or $M2SNET_CACHE_DIR)."),
) -> None:
    """Decode and resize every case once into a memory-mapped cache used by training."""
    from m2snet.data.cache import build_cache

    typer.echo(build_cache(load_dataset(dest), size, cache_dir))
