"""`m2snet pipeline ...`: the Kubeflow pipeline, run locally, compiled, submitted.

    m2snet pipeline run --local [--preset demo]     the whole CV pipeline on the kfp local runner
    m2snet pipeline compile [--check]               m2snet/kubeflow/pipelines/busi_cv.yaml from busi_cv.py
    m2snet pipeline submit --host URL [--param k=v] the compiled pipeline on a Kubeflow cluster
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, List, Optional

import typer

from m2snet.cli.options import METRIC_PROTOCOL, MODEL_NAME, PIPELINE_EXPERIMENT, PRESET, preset_overrides
from m2snet.errors import M2SNetError

app = typer.Typer(help="The cross-validation pipeline: run locally, compile, submit to Kubeflow.", no_args_is_help=True)



@app.command("run")
def run_cmd(
    local: bool = typer.Option(False, "--local", help="Run on the kfp local runner (required: clusters use `submit`)."),
    preset: str = PRESET,
    data: str = typer.Option("", help="Dataset directory (m2snet format, or a raw layout: see --importer); "
                                      "default: the demo set."),
    importer: str = typer.Option("busi", help="Layout of a raw --data / DVC dataset (`m2snet data formats`)."),
    dvc_repo: str = typer.Option("", help="Git/DVC repository to fetch the data from (dvc get)."),
    dvc_rev: str = typer.Option("", help="DVC revision (git tag/commit) of the data."),
    work_dir: Path = typer.Option(Path(".m2snet/pipeline"), help="Where the local runner keeps task outputs and logs."),
    experiment: str = PIPELINE_EXPERIMENT,
    model_name: str = MODEL_NAME,
    folds: Optional[int] = typer.Option(None, help="Number of CV folds (default: the preset's, 4)."),
    trials: int = typer.Option(-1, help="Optuna trials (default: the preset's)."),
    tuning_storage: str = typer.Option("", help="Optuna storage URL (sqlite:///..., journal:PATH, postgresql://...)."),
    seed: int = typer.Option(42, help="Split seed."),
    seeds: str = typer.Option("", help="Repeat the CV once per training seed on the same split (e.g. 42,43,44): "
                                       "the table is mean ± std over seeds x folds, as `m2snet cv --seeds`."),
    set_: List[str] = typer.Option([], "--set", help="Training option KEY=VALUE (TrainConfig field); repeatable."),
    floor: Optional[float] = typer.Option(None, help="Promotion floor on CV Dice (0..1); default: the preset's."),
    margin: Optional[float] = typer.Option(None, help="Margin over production's CV Dice; default: the preset's."),
    noskill_margin: Optional[float] = typer.Option(None, help="Margin over the no-skill (all-background) "
                                                   "predictor's CV Dice; default: the preset's."),
    require_ci: Optional[bool] = typer.Option(
        None, "--require-ci/--no-require-ci",
        help="Statistical gate: beat production by a paired 95 % CI above zero (default: the preset's)."),
    protocol: str = METRIC_PROTOCOL,
    threads: Optional[int] = typer.Option(None, help="Torch threads per task (two fold tasks run at once)."),
    verbose: bool = typer.Option(False, "--verbose", help="Stream every task's full output (the logs are kept too)."),
    runner: str = typer.Option("subprocess", help="subprocess (this Python) | container (every step in the "
                                                  "component image via docker/podman; needs an MLflow server)."),
    keep_intermediates: bool = typer.Option(
        False, "--keep-intermediates", help="Keep the runner's task outputs (<work-dir>/kfp/<run>/: data copies, "
        "fold checkpoints, reports) after a successful run; MLflow holds what the run produced either way."),
    fixed_protocol: Optional[str] = typer.Option(
        None, "--protocol", help="polyp | polyp-video | covid | oct: the fixed-split pipeline of that paper "
        "protocol (pipelines/protocol.py); --preset and --importer then default to the protocol's."),
) -> None:
    """Run the whole pipeline: data -> validate -> split -> per fold (--folds; the preset's 4 by default) tune, train,
    evaluate -> CV table -> register -> promote. With --protocol: one training on that protocol's fixed split,
    scored on its test sets, instead of folds."""
    from m2snet.kubeflow.runner import LocalRunOptions, run_local
    from m2snet.mlops.mlflow_store import PIPELINE_EXPERIMENT as CV_EXPERIMENT
    from m2snet.workflows.presets import DEFAULT_MODEL_NAME, DEFAULT_PRESET

    if not local:
        raise M2SNetError("pipeline run: add --local (the kfp local runner); submit to a cluster with "
                          "`m2snet pipeline submit --host URL`")
    common = dict(data_path=data, dvc_repo=dvc_repo, dvc_rev=dvc_rev, work_dir=work_dir, seed=seed, floor=floor,
                  margin=margin, noskill_margin=noskill_margin, metric_protocol=protocol, threads=threads,
                  display="stream" if verbose else "auto", runner=runner, keep_intermediates=keep_intermediates)
    if fixed_protocol:
        cv_only = {"--folds": folds is not None, "--trials": trials != -1, "--tuning-storage": bool(tuning_storage),
                   "--seeds": bool(seeds), "--require-ci": require_ci is not None}
        if any(cv_only.values()):
            raise M2SNetError(f"{', '.join(k for k, given in cv_only.items() if given)}: CV options; the fixed-split "
                              f"protocol {fixed_protocol} trains once on its training set")
        # The CV pipeline's defaults (its preset, importer, experiment, model name) give way to the protocol's.
        chosen = {k: v for k, v, cv_default in (("preset", preset, DEFAULT_PRESET), ("importer", importer, "busi"),
                                               ("experiment", experiment, CV_EXPERIMENT),
                                               ("model_name", model_name, DEFAULT_MODEL_NAME)) if v != cv_default}
        options = LocalRunOptions.for_protocol(fixed_protocol, **common, **chosen)
        options.train_overrides = preset_overrides(options.preset, set_)
    else:
        options = LocalRunOptions(preset, importer=importer, experiment=experiment, model_name=model_name,
                                  n_folds=folds, n_trials=trials, tuning_storage=tuning_storage, seeds=seeds,
                                  require_ci=require_ci, train_overrides=preset_overrides(preset, set_), **common)
    try:
        result = run_local(options)
    except KeyboardInterrupt as err:
        # Typer turns Ctrl-C into a silent exit 130: say what was stopped and which MLflow run was closed.
        typer.secho(f"interrupted: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(128 + 2) from None
    _print_summary(result)


def _print_summary(result: Any) -> None:
    """What a finished run produced and where to look: the CV table, the decision, MLflow, the logs."""
    uri = result.tracking_uri
    local_store = uri.startswith(("sqlite:", "postgresql", "mysql", "file:")) or "://" not in uri
    ui = "http://127.0.0.1:5000" if local_store else uri.rstrip("/")
    echo = typer.echo
    echo("")
    typer.secho(f"pipeline finished in {result.seconds / 60:.1f} min", bold=True)
    echo(f"\n{result.table_title}:\n{result.table or '(no table)'}\n")
    if result.comparison:
        echo(f"{result.comparison}\n")
    verdict, _, reason = result.promotion.partition(": ")
    if result.promoted:
        state = "promoted to `production`"
    elif result.production_version is None:
        state = "NOT promoted (no version is `production`)"
    else:
        state = f"NOT promoted (`production` stays at version {result.production_version})"
    echo(f"model {result.model_name} version {result.version}: {state}")
    if reason:
        echo(f"  why: {reason}")
    links = result.ui_links(ui)
    echo(f"MLflow ({uri}): experiment {result.experiment_id}, parent run {result.parent_run_id}")
    echo(f"  this run: {links['run']}")
    echo(f"  all runs: {links['runs']}")
    echo(f"  model:    {links['model']}")
    echo(f"logs: {result.log_dir}/  (<task>.log per task, pipeline.log for the runner)")
    echo(f"task outputs: {result.pipeline_root}" + ("  (removed: the run succeeded; --keep-intermediates keeps "
                                                    "them)" if result.intermediates_removed else ""))
    echo("\nwhere to look next:")
    if local_store:
        echo(f"  mlflow ui --backend-store-uri {uri}    # then open the links above")
    echo(f"  m2snet predict --model models:/{result.model_name}@production IMAGE.png --out predictions/")
    # `m2snet serve` finds this environment's uvicorn itself (it puts its bin first on PATH).
    echo(f"  m2snet serve --model models:/{result.model_name}@production --port 5001")


@app.command("compile")
def compile_cmd(
    out: Optional[Path] = typer.Option(
        None, help="Output YAML (default: the packaged m2snet/kubeflow/pipelines/busi_cv.yaml).",
    ),
    check: bool = typer.Option(False, "--check", help="Only check that the committed YAML is up to date."),
) -> None:
    """Compile the cluster pipeline (GPU requests, retries, Secrets) to YAML."""
    from m2snet.kubeflow.cluster import compile_pipeline, compiled_pipeline_path
    from m2snet.kubeflow.pipelines import protocol as protocol_pipeline

    if check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = compile_pipeline(Path(tmp) / "busi_cv.yaml").read_text()
        committed = compiled_pipeline_path()
        if not committed.is_file() or committed.read_text() != fresh:
            raise M2SNetError(f"{committed}: stale; run `m2snet pipeline compile` and commit the result")
        typer.echo(f"{committed}: up to date")
        typer.echo(protocol_pipeline.check_compiled())
        return
    typer.echo(f"wrote {compile_pipeline(out)}")
    if out is None:  # the packaged YAMLs: the fixed-split protocols' pipeline too
        typer.echo(f"wrote {protocol_pipeline.compile_pipeline()}")


@app.command("submit")
def submit_cmd(
    host: str = typer.Option(..., help="Kubeflow Pipelines API URL, e.g. http://localhost:8080."),
    experiment: str = PIPELINE_EXPERIMENT,
    run_name: Optional[str] = typer.Option(None, help="Run name (default: KFP's)."),
    param: List[str] = typer.Option([], "--param", help="Pipeline parameter NAME=VALUE; repeatable."),
    namespace: Optional[str] = typer.Option(None, help="Kubeflow profile namespace (multi-user KFP)."),
    package: Optional[Path] = typer.Option(
        None, help="Compiled pipeline YAML (default: the packaged m2snet/kubeflow/pipelines/busi_cv.yaml).",
    ),
) -> None:
    """Submit the compiled pipeline to a Kubeflow Pipelines endpoint; print the run URL."""
    from m2snet.kubeflow.cluster import parse_params, submit

    params = parse_params(param, package)
    run_id, url = submit(host, params=params, experiment=experiment, run_name=run_name, namespace=namespace,
                         package=package)
    typer.echo(f"submitted run {run_id}\n{url}")
