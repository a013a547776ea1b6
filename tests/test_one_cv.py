"""One cross-validation, whoever runs it: `m2snet cv` in one process and the pipeline on the kfp local runner
(SubprocessRunner, every task a process of its own) run the same (fold, seed) task list through the same step
functions, so for the same settings they record the same MLflow run tree under their parent run: the same run
names, kinds, folds, seeds and trial runs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from m2snet.mlops.tracking import iter_child_runs
from tests.conftest import make_tiny_dataset

# One given seed that is not the config's (42): the two doors once named its runs differently.
SETTINGS = ["--preset", "tiny", "--seeds", "43", "--set", "device=cpu"]


def _tree(client, run_id: str) -> list[tuple]:
    """The runs under ``run_id``, recursively: (name, status, kind/fold/seed tags, seed param, children)."""
    rows = []
    for child in iter_child_runs(client, run_id):
        tags = tuple(child.data.tags.get(k) for k in ("m2snet.kind", "m2snet.fold", "m2snet.seed"))
        rows.append((child.info.run_name, child.info.status, tags, child.data.params.get("seed"),
                     _tree(client, child.info.run_id)))
    return sorted(rows)


# About two minutes on 2 CPU cores: 2 folds x (tune + train + evaluate), twice.
@pytest.mark.long
def test_cli_cv_and_the_pipeline_record_the_same_run_tree(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from m2snet.cli import app
    from m2snet.data.split import make_split

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data, _ = make_tiny_dataset(tmp_path, n_per_class=(2, 2, 2))
    runner = CliRunner()
    pipeline = runner.invoke(app, ["pipeline", "run", "--local", "--data", str(data), "--work-dir",
                                   str(tmp_path / "work"), "--folds", "2", "--trials", "1", "--experiment",
                                   "tree-pipeline", *SETTINGS])
    assert pipeline.exit_code == 0, f"{pipeline.output}\n{pipeline.exception!r}"
    # The pipeline's split step: make_split of the dataset with its seed (42) and folds (the same cases per
    # fold; the file differs, as it names the pipeline's copy of the dataset).
    split = make_split(data, n_folds=2, seed=42, out=tmp_path / "split.json")
    cv = runner.invoke(app, ["cv", "--data", str(data), "--split", str(split.path), "--tune-trials", "1",
                             "--out", str(tmp_path / "cv"), "--experiment", "tree-cv", *SETTINGS])
    assert cv.exit_code == 0, f"{cv.output}\n{cv.exception!r}"

    client = MlflowClient(uri)
    trees = {}
    for door, kind in (("tree-pipeline", "pipeline"), ("tree-cv", "cv")):
        exp = client.get_experiment_by_name(door)
        (parent,) = client.search_runs([exp.experiment_id], f"tags.`m2snet.kind` = '{kind}'")
        assert parent.data.params["seeds"] == "43" and parent.data.params["folds"] == "0,1", door
        assert parent.data.params["n_folds"] == "2", door
        trees[kind] = _tree(client, parent.info.run_id)
    assert trees["cv"] == trees["pipeline"]
    # One seed, not the config's: it trains every task; it is no repeat, so it names no run.
    assert [name for name, *_ in trees["cv"]] == ["fold-0", "fold-1", "tune-fold-0", "tune-fold-1"]
    for name, status, (kind, fold, seed_tag), seed, children in trees["cv"]:
        assert name.endswith(f"fold-{fold}"), name
        assert status == "FINISHED" and seed_tag is None, name
        if kind == "fold":
            assert seed == "43" and children == [], name
        else:
            assert kind == "tuning" and [c[0] for c in children] == ["trial-0"], name
