"""Cross-validation + MLflow tracking against real servers (SQLite / PostgreSQL back ends, S3 artifacts),
and the tracking layer's behaviour when the server is down."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from m2snet.mlops.mlflow_store import TrackingConfig, TrackingError
from m2snet.mlops.tracking import Tracker, flatten_params
from m2snet.processes import free_port
from m2snet.workflows.context import RunContext

REPO_ROOT = Path(__file__).resolve().parents[1]
BUSI_METRICS = ("iou", "precision", "recall", "specificity", "dice")


def test_flatten_params_drops_secrets_and_strips_url_passwords():
    flat = flatten_params({"config": {"lr": 0.1, "scales": [224, 256]}, "aws_secret_access_key": "s3cr3t",
                           "db": "postgresql://root:hunter2@127.0.0.1/test", "api_token": "t"})
    assert flat == {"config.lr": "0.1", "config.scales": "[224, 256]", "db": "postgresql://root:***@127.0.0.1/test"}


def test_summarize_cv_mean_std_percent():
    from m2snet.workflows.cv_summary import summarize_cv

    s = summarize_cv([{"dice": 0.7, "iou": 0.5, "med": 2.0, "med_c1": 1.0, "dice_c1": 0.6, "n_cases": 3},
                      {"dice": 0.8, "iou": 0.7, "med": 4.0, "med_c1": 3.0, "dice_c1": 0.8, "n_cases": 4}])
    assert s.mean["dice"] == pytest.approx(75.0) and s.std["dice"] == pytest.approx(np.std([70, 80], ddof=1))
    # pixel distances (the mean MED and each class's) stay in pixels; per-class Dice is a fraction
    assert s.mean["med"] == pytest.approx(3.0) and s.mean["med_c1"] == pytest.approx(2.0)
    assert s.mean["dice_c1"] == pytest.approx(70.0) and "n_cases" not in s.mean and s.counts["n_cases"] == 7
    assert "| model: all cases (7) | 60.00 ± 14.14 |" in s.table()


def test_cv_table_has_noskill_and_lesion_rows_and_counts_nans():
    from m2snet.workflows.cv_summary import summarize_cv

    fold = {"dice": 0.6, "iou": 0.5, "mae": 0.03, "s_measure": 0.8, "lesion_dice": 0.4, "lesion_iou": 0.3,
            "noskill_dice": 0.2, "noskill_iou": 0.2, "noskill_lesion_dice": 0.0, "noskill_lesion_iou": 0.0,
            "n_cases": 10, "n_lesion_cases": 8, "n_nan_s_measure": 1}
    s = summarize_cv([fold, {**fold, "dice": 0.8, "n_nan_s_measure": 0}], protocol="reference")
    assert s.mean["mae"] == pytest.approx(0.03)  # MAE: a fraction, as the paper reports it
    table = s.table(columns=(("Jaccard", "iou"), ("Dice", "dice")), title="m2snet")
    assert table.splitlines()[0] == "| 2 folds, reference protocol | Jaccard | Dice |"
    assert "| m2snet: all cases (20) | 50.00 ± 0.00 | 70.00 ± 14.14 |" in table
    assert "| m2snet: lesion cases (16) | 30.00 ± 0.00 | 40.00 ± 0.00 |" in table
    assert "| no skill (all background): all cases (20) | 20.00 ± 0.00 | 20.00 ± 0.00 |" in table
    assert "| no skill (all background): lesion cases (16) | 0.00 ± 0.00 | 0.00 ± 0.00 |" in table
    assert "m2snet: s_measure is NaN on 1 of 20 cases" in table
    flat = s.flat_metrics()
    assert flat["cv_dice_noskill"] == pytest.approx(20.0) and flat["cv_lesion_dice_noskill"] == 0.0
    assert flat["cv_dice_mean"] == pytest.approx(70.0) and flat["cv_lesion_dice_mean"] == pytest.approx(40.0)
    assert flat["cv_n_nan_s_measure"] == 1 and "cv_noskill_dice_mean" not in flat


def test_cv_reports_noskill_and_lesion_rows_on_the_parent_run(cv_data, tmp_path):
    """``m2snet cv``'s report: the no-skill row in the console table, cv_table.md and the parent's description;
    ``cv_<metric>_noskill`` metrics and the metric protocol on the parent run."""
    from mlflow.tracking import MlflowClient

    from m2snet.workflows.cv import run_cv
    from m2snet.workflows.folds import FoldOptions, ScoreOptions

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = FoldOptions(log_model=False, score=ScoreOptions(protocol="reference", with_sod=False))
    res = run_cv(_cv_config(cv_data), tmp_path / "cv", folds=[0], options=options,
                 ctx=RunContext(TrackingConfig(uri=uri, experiment="cv-noskill")))
    table = (tmp_path / "cv" / "cv_table.md").read_text()
    assert "reference protocol" in table and "no skill (all background): all cases" in table
    assert "m2snet: lesion cases" in table
    parent = MlflowClient(uri).get_run(res.parent_run_id)
    assert parent.data.params["metric_protocol"] == "reference"
    assert parent.data.metrics["cv_dice_noskill"] == pytest.approx(res.summary.mean["noskill_dice"])
    assert "cv_lesion_dice_mean" in parent.data.metrics
    assert "no skill (all background): all cases" in parent.data.tags["mlflow.note.content"]


def test_unreachable_server_fails_clearly_after_retries():
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.05)
    t0 = time.time()
    with pytest.raises(TrackingError,
                       match=r"tracking server http://127.0.0.1:\d+ unreachable: .* after 3 tries .*Connection"):
        Tracker.start(cfg, run_name="nowhere")
    assert time.time() - t0 < 60


# A first run on a store: imported, then waiting at a file barrier so that both open the fresh store at once.
FIRST_RUN = r"""
import sys, time
from pathlib import Path
from m2snet.mlops.mlflow_store import TrackingConfig
from m2snet.mlops.tracking import Tracker
barrier, me = Path(sys.argv[2]), sys.argv[3]
(barrier / me).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.01)
Tracker.start(TrackingConfig(uri=sys.argv[1], experiment="first"), run_name=me).end()
"""


def test_two_first_runs_on_a_fresh_sqlite_store_both_succeed(tmp_path):
    """MLflow creates and migrates a fresh SQLite store on the first connection, unlocked: two processes
    doing it at once failed on alembic's version row. m2snet serialises it."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    uri, barrier = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_RUN, uri, str(barrier), name], stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
             for name in ("a", "b")]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(errors)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("first").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["barrier", "mlflow.db"]  # no lock left behind


def test_server_killed_mid_run_loses_no_accepted_metric(tmp_path):
    from mlflow.tracking import MlflowClient

    from m2snet.mlops.services import start_mlflow_server
    from m2snet.mlops.tracking import replay_spool

    port = free_port()
    backend, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")
    server = start_mlflow_server(backend, artifacts, port=port, workdir=tmp_path)
    try:
        cfg = TrackingConfig(uri=server.url, retries=1, backoff_s=0.05, spool_dir=str(tmp_path / "spool"))
        tracker = Tracker.start(cfg, run_name="flaky")
        tracker.log_metrics({"loss": 1.0}, step=1, flush=True)
        server.stop()  # the server goes away mid-run
        tracker.log_metrics({"loss": 0.5, "dice": 0.4}, step=2)  # accepted into the buffer
        with pytest.raises(TrackingError, match=r"unreachable.*2 accepted metric values kept .*mlflow-pending-"):
            tracker.flush()
        assert tracker.pending == 2
        spool = next((tmp_path / "spool").glob("mlflow-pending-*.jsonl"))
        server = start_mlflow_server(backend, artifacts, port=port, workdir=tmp_path)
        tracker.flush()  # the same process sends what it kept
        assert tracker.pending == 0
        assert replay_spool(spool, cfg) == 2  # the spool (for another process) replays idempotently
        tracker.end()
        client = MlflowClient(server.url)
        assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == \
            [(1, 1.0), (2, 0.5)]
        assert client.get_run(tracker.run_id).data.metrics["dice"] == 0.4
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cv_data(tmp_path_factory):
    from m2snet.data.demo import make_demo_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.data.split import make_split

    base = tmp_path_factory.mktemp("cvdata")
    make_demo_dataset(base / "raw", n_per_class=(3, 3, 2), size=64, seed=3)
    import_dataset("busi", base / "raw", base / "ds", progress=False)
    make_split(base / "ds", n_folds=4, seed=0, out=base / "split.json")
    return base


def _cv_config(base: Path, **kw):
    from m2snet.training.config import TrainConfig

    options = dict(data=str(base / "ds"), split=str(base / "split.json"), epochs=1, batch_size=2, size=64,
                   pretrained=False, lossnet_weight=0.0, lossnet_pretrained=False, device="cpu",
                   progress=False, max_train_cases=2, cache_dir=str(base / "cache"))
    return TrainConfig(**{**options, **kw})


def _check_fold_run(client, run, url: str, n_val: int, load_model: bool = True):
    import mlflow

    from m2snet.mlops.pyfunc_io import decode_mask, encode_image

    for k in BUSI_METRICS:
        assert 0.0 <= run.data.metrics[k] <= 1.0
    assert run.data.params["pretrained"] == "none (random init)"
    assert run.data.params["config.size"] == "64" and len(run.data.params["split_sha256"]) == 64
    assert run.data.params["data_version"].endswith(".dir")
    assert run.data.metrics["final_n_cases"] == n_val
    # the CLI's fold runs record what the pipeline's do: lineage, the rates under one name and their source
    (given,) = run.inputs.dataset_inputs
    assert given.dataset.digest == run.data.params["data_version"]
    assert {t.key: t.value for t in given.tags}["split_sha256"] == run.data.params["split_sha256"]
    assert run.data.params["head_lr.source"] == run.data.params["backbone_lr.source"] == "preset"
    assert float(run.data.params["head_lr"]) > 0 and not any(k.startswith("config.") and k.endswith("_lr")
                                                             for k in run.data.params)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/overlays.png", "eval/per_case.csv", "eval/metrics.json"} <= arts
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [1]
    assert run.data.tags["m2snet.model_uri"].startswith("models:/")
    if not load_model:
        return
    mlflow.set_tracking_uri(url)
    # dst_path: without it MLflow downloads into a new temporary directory it never removes
    with tempfile.TemporaryDirectory(prefix="m2snet-test-model-") as dst:
        try:
            model = mlflow.pyfunc.load_model(run.data.tags["m2snet.model_uri"], dst_path=dst)
        finally:
            mlflow.set_tracking_uri(None)
    import pandas as pd

    image = (np.random.default_rng(0).random((45, 75)) * 255).astype(np.uint8)
    out = model.predict(pd.DataFrame({"image": [encode_image(image)]}))
    assert decode_mask(out["mask"][0]).shape == (45, 75)


@pytest.mark.long
def test_cv_smoke_four_folds_against_mlflow_server_sqlite_s3(cv_data, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from m2snet.data.split import load_split
    from m2snet.mlops.tracking import iter_child_runs
    from m2snet.workflows.cv import run_cv

    res = run_cv(_cv_config(cv_data), tmp_path / "cv", ctx=RunContext(TrackingConfig(uri=mlflow_server.url,
                                                                               experiment="cv-sqlite")))
    client = MlflowClient(mlflow_server.url)
    children = list(iter_child_runs(client, res.parent_run_id))
    assert sorted(r.info.run_name for r in children) == ["fold-0", "fold-1", "fold-2", "fold-3"]
    split = load_split(cv_data / "split.json")
    for run in children:
        assert run.info.status == "FINISHED"
        # every fold logged a model; loading one of them (120 MB from S3) is enough for the test
        _check_fold_run(client, run, mlflow_server.url, len(split.fold(int(run.data.tags["m2snet.fold"])).val),
                        load_model=run.info.run_name == "fold-2")
    parent = client.get_run(res.parent_run_id)
    for k in BUSI_METRICS:
        assert parent.data.metrics[f"cv_{k}_mean"] == pytest.approx(res.summary.mean[k])
    cv_artifacts = {a.path for a in client.list_artifacts(res.parent_run_id, "cv")}
    assert cv_artifacts >= {"cv/cv_summary.json", "cv/cv_learning_curves.png"}
    assert "aws_secret_access_key" not in " ".join(parent.data.params)


def test_cv_fold_against_mlflow_server_postgres_s3(cv_data, mlflow_server_pg, tmp_path):
    from mlflow.tracking import MlflowClient

    from m2snet.mlops.tracking import iter_child_runs
    from m2snet.workflows.cv import run_cv

    res = run_cv(_cv_config(cv_data, lossnet_weight=0.1), tmp_path / "cv", folds=[1],
                 ctx=RunContext(TrackingConfig(uri=mlflow_server_pg.url, experiment="cv-pg")))
    client = MlflowClient(mlflow_server_pg.url)
    (child,) = iter_child_runs(client, res.parent_run_id)
    assert child.data.tags["m2snet.fold"] == "1" and res.summary.folds == [1]
    from m2snet.data.split import load_split

    _check_fold_run(client, child, mlflow_server_pg.url, len(load_split(cv_data / "split.json").fold(1).val))
