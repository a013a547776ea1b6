"""`m2snet data ...`: demo, import, validate, split, version, cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from m2snet.common import M2SNetError

data_app = typer.Typer(help="Datasets: create the demo set, import public layouts, validate, split, version.", no_args_is_help=True)


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


@data_app.command("demo")
def demo(
    dest: Path = typer.Argument(..., help="Directory to create (BUSI layout: benign/, malignant/, normal/)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives byte-identical files."),
    n_per_class: str = typer.Option("12,8,6", help="Cases per class: one number, or benign,malignant,normal."),
    size: int = typer.Option(128, help="Image width in pixels."),
    overwrite: bool = typer.Option(False, help="Replace DEST if it exists."),
    formatted: bool = typer.Option(
        False, "--formatted", help="Write the m2snet format directly (= demo + `data import --format busi`); this is data/demo.",
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


@data_app.command("import")
def import_(
    src: Path = typer.Argument(..., help="The dataset as distributed."),
    dest: Path = typer.Argument(..., help="Directory to create in the m2snet format."),
    format: str = typer.Option(..., "--format", "-f", help="Source layout: busi, kvasir, pranet, cvc-clinicdb, covid-ct, goals, folder."),
    allow_duplicates: Optional[bool] = typer.Option(
        None, "--allow-duplicates/--no-allow-duplicates",
        help="Accept exact-duplicate images (reported, kept in one fold). Default: yes for busi, no otherwise.",
    ),
    overwrite: bool = typer.Option(False, help="Replace DEST if it exists."),
    option: List[str] = typer.Option([], "--option", "-o", help="Importer option KEY=VALUE (e.g. threshold=127, mask_suffix=_mask)."),
    name: Optional[str] = typer.Option(None, help="Dataset name (default: DEST's name)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Convert a public dataset layout into the m2snet format (validated; nothing is left behind on error)."""
    from m2snet.data.importers import import_dataset
    from m2snet.data.validation import REPORT_JSON

    info = import_dataset(
        format, src, dest, allow_duplicates=allow_duplicates, overwrite=overwrite, name=name,
        options=_parse_options(option),
    )
    report = json.loads((info.root / REPORT_JSON).read_text())
    if as_json:
        typer.echo(json.dumps({
            "dest": str(info.root), "format": format, "n_cases": len(info.cases),
            "class_counts": report["class_counts"], "duplicates": report["duplicates"],
            "allow_duplicates": report["allow_duplicates"], "version": info.version,
        }, indent=2))
    else:
        typer.echo(f"imported {len(info.cases)} cases into {info.root}: {report['class_counts']}")
        if report["duplicates"]:
            typer.echo(f"exact-duplicate images (allowed, kept in one fold): {report['duplicates']}")


@data_app.command("formats")
def formats() -> None:
    """List the source layouts `m2snet data import` understands."""
    from m2snet.data.importers import get_importer, list_importers

    for name in list_importers():
        typer.echo(f"{name:14s} {get_importer(name).description}")


@data_app.command("validate")
def validate(
    dest: Path = typer.Argument(..., help="An m2snet dataset directory."),
    allow_duplicates: Optional[bool] = typer.Option(
        None, "--allow-duplicates/--no-allow-duplicates", help="Override the policy recorded in dataset.json."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check every case (great-expectations); write validation.html/.json into DEST; exit 1 when invalid."""
    from m2snet.data.validation import REPORT_HTML, validate_dataset

    report = validate_dataset(dest, allow_duplicates=allow_duplicates)
    typer.echo(json.dumps(report.to_dict(), indent=2, default=str) if as_json else report.summary())
    typer.echo(f"report: {Path(dest) / REPORT_HTML}", err=True)
    if not report.success:
        raise typer.Exit(1)


@data_app.command("split")
def split(
    dest: Path = typer.Argument(..., help="An m2snet dataset directory."),
    folds: int = typer.Option(4, help="Number of folds."),
    seed: int = typer.Option(42, help="Seed of the assignment."),
    out: Optional[Path] = typer.Option(None, help="Split file (default: DEST.split-<k>fold-seed<S>.json beside DEST)."),
    group_by: str = typer.Option("cluster", help="What stays in one fold: 'cluster' (exact + near duplicates, "
                                 "the manifest's group) or 'sha256' (byte-identical only: the old, leaky rule)."),
) -> None:
    """Write a K-fold split: stratified by label, duplicate clusters in one fold, deterministic for a seed."""
    from m2snet.data.split import make_split

    result = make_split(dest, n_folds=folds, seed=seed, out=out, group_by=group_by)  # type: ignore[arg-type]
    for k, counts in enumerate(result.counts):
        typer.echo(f"fold {k}: {sum(counts.values())} val cases {counts}")
    kept = result.groups_kept_together
    typer.echo(f"kept together ({result.group}): {kept.get('groups', 0)} groups of duplicates "
               f"({kept.get('cases', 0)} cases), each in one fold")
    typer.echo(f"wrote {result.path} (sha256 {result.sha256})")


@data_app.command("version")
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


@data_app.command("cache")
def cache(
    dest: Path = typer.Argument(..., help="An m2snet dataset directory."),
    size: int = typer.Option(352, help="Side of the cached square arrays."),
    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (default ~/.cache/m2snet or $M2SNET_CACHE_DIR)."),
) -> None:
    """Decode and resize every case once into a memory-mapped cache used by training."""
    from m2snet.data.cache import build_cache
    from m2snet.data.format import load_dataset

    typer.echo(build_cache(load_dataset(dest), size, cache_dir))


def register(app: typer.Typer) -> None:
    """Add this area's commands (or sub-app) to the root `m2snet` app."""
    app.add_typer(data_app, name="data")
