"""The whole pipeline on the kfp local runner (TINY preset) against a real `mlflow server` + SeaweedFS.

One module-scoped run of every step (prepare -> split -> 4 x (tune -> train -> evaluate) -> aggregate ->
register -> promote); a second, smaller run that cannot beat it must leave `production` alone.
"""

from __future__ import annotations

import pytest

EXPERIMENT = "pipeline-test"
MODEL = "m2snet-tiny"


@pytest.fixture(scope="module")
def runs(mlflow_server, tmp_path_factory):
    from m2snet.pipeline import run_local

    work = tmp_path_factory.mktemp("pipeline")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mp.chdir(work)
    try:
        first = run_local("tiny", work_dir=work / "run1", experiment=EXPERIMENT, model_name=MODEL)
        # Cannot beat production by a margin of 1.0 (Dice is at most 1): the gate must reject it.
        second = run_local("tiny", work_dir=work / "run2", experiment=EXPERIMENT, model_name=MODEL,
                           n_folds=2, n_trials=1, margin=1.0)
        yield {"first": first, "second": second, "work": work, "url": mlflow_server.url}
    finally:
        mp.undo()


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def test_first_run_logs_parent_folds_and_trials(runs):
    client = _client(runs["url"])
    first = runs["first"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs_all = client.search_runs([exp.experiment_id], max_results=500)
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["preset"] == "tiny" and parent.data.params["data_version"]
    assert "cv_dice_mean" in parent.data.metrics and "cv_dice_std" in parent.data.metrics
    assert "promoted" in parent.data.tags["m2snet.promotion"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "cv")} >= {"cv/cv_table.md", "cv/cv_summary.json"}

    children = [r for r in runs_all if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    folds = sorted((r for r in children if r.data.tags.get("m2snet.kind") == "fold"),
                   key=lambda r: int(r.data.tags["m2snet.fold"]))
    assert [r.data.tags["m2snet.fold"] for r in folds] == ["0", "1", "2", "3"]
    for r in folds:
        assert r.info.status == "FINISHED"
        assert {"dice", "iou", "precision", "recall", "specificity", "val_dice"} <= set(r.data.metrics)
        assert r.data.params["tuned.head_lr"]  # the tuned learning rates reached training
    # Nested tuning: one study per fold, each on that fold's inner split; its best LR trains that fold.
    tunes = {r.data.tags["m2snet.fold"]: r for r in children if r.data.tags.get("m2snet.kind") == "tuning"}
    assert sorted(tunes) == ["0", "1", "2", "3"]
    for fold_run in folds:
        tune = tunes[fold_run.data.tags["m2snet.fold"]]
        assert tune.info.run_name == f"tune-fold-{fold_run.data.tags['m2snet.fold']}"
        trials = [r for r in runs_all if r.data.tags.get("mlflow.parentRunId") == tune.info.run_id]
        assert len(trials) == 2 and all(r.info.run_name.startswith("trial-") for r in trials)
        plots = {a.path for a in client.list_artifacts(tune.info.run_id, "optuna_plots")}
        assert "optuna_plots/optimization_history.png" in plots
        assert float(fold_run.data.params["config.head_lr"]) == pytest.approx(float(tune.data.params["best.head_lr"]))
        assert fold_run.data.params["config.selection"] == "final" and fold_run.data.tags["m2snet.selection"] == "final"


def test_first_run_registers_one_version_and_promotes_it(runs):
    client = _client(runs["url"])
    first = runs["first"]
    assert first.promoted and first.production_version == first.version
    mv = client.get_model_version(MODEL, first.version)
    for tag in ("data_version", "split_sha256", "pipeline_run_id", "cv_dice", "cv_dice_mean", "n_folds"):
        assert mv.tags.get(tag), tag
    assert mv.tags["n_folds"] == "4"
    assert mv.tags["pipeline_run_id"] == first.pipeline_run_id
    assert 0.0 <= float(mv.tags["cv_dice"]) <= 1.0
    assert "Dice" in first.cv_table and "±" in first.cv_table
    # The local runner's task outputs exist (checkpoints were shipped as Model artifacts, without last.pt).
    checkpoints = list(first.pipeline_root.rglob("model.pt"))
    assert len(checkpoints) == 4 and not list(first.pipeline_root.rglob("last.pt"))


def test_second_run_that_does_not_beat_production_leaves_it(runs):
    client = _client(runs["url"])
    first, second = runs["first"], runs["second"]
    assert second.version != first.version
    assert not second.promoted
    assert str(client.get_model_version_by_alias(MODEL, "production").version) == str(first.version)
    assert "margin" in client.get_model_version(MODEL, second.version).tags["promotion_decision"]
    # The register step is idempotent per pipeline run: re-running it registers nothing new.
    from m2snet.pipeline import register_step

    versions_before = len(client.search_model_versions(f"name = '{MODEL}'"))
    mv = client.get_model_version(MODEL, second.version)
    again = register_step([], {}, "", model_name=MODEL, dataset_version="x",
                          pipeline_run_id=mv.tags["pipeline_run_id"], experiment=EXPERIMENT)
    assert again == str(second.version)
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == versions_before


def test_production_model_predicts_masks(runs, tmp_path, monkeypatch):
    from PIL import Image

    from m2snet.serving import predict_files

    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs["url"])
    images = sorted(runs["first"].pipeline_root.rglob("images/*.png"))[:2]
    assert images, "the prepared dataset's images should be in the local runner's outputs"
    out = predict_files(f"models:/{MODEL}@production", images, tmp_path)
    for p in out:
        assert Image.open(p.mask).size == Image.open(p.image).size
        assert p.overlay.is_file()
