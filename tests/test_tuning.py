"""Optuna tuning on a tiny demo set: shared study, per-epoch reports, nested MLflow runs, plots."""

from __future__ import annotations

import dataclasses
import json

import pytest

from m2snet.errors import M2SNetError


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from m2snet.data.demo import make_demo_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.data.split import make_split

    root = tmp_path_factory.mktemp("tune-data")
    make_demo_dataset(root / "raw", n_per_class=4, size=64)
    import_dataset("busi", root / "raw", root / "ds", progress=False)
    make_split(root / "ds", n_folds=2, seed=0, out=root / "split.json")
    return root


def _base(root):
    from m2snet.workflows.presets import train_config

    return train_config("tiny", data=str(root / "ds"), split=str(root / "split.json"), fold=0,
                        out_dir=str(root / "unused"))


def test_inner_split_never_touches_the_fold_validation_cases(tiny_data, tmp_path):
    from m2snet.data.format import load_dataset
    from m2snet.data.split import load_split, write_inner_split

    outer = load_split(tiny_data / "split.json").fold(0)
    inner = load_split(write_inner_split(load_dataset(tiny_data / "ds"), load_split(tiny_data / "split.json"), 0,
                                         tmp_path / "i.json")).fold(0)
    assert set(inner.train) | set(inner.val) == set(outer.train)
    assert not set(inner.val) & set(inner.train)
    assert not (set(inner.train) | set(inner.val)) & set(outer.val)


def test_shared_study_reports_epochs_and_logs_nested_runs(tiny_data, tmp_path, monkeypatch):
    import mlflow
    import optuna

    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.tracking import Tracker
    from m2snet.workflows.tuning import TuningConfig, make_storage, tune

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    storage = f"journal:{tmp_path / 'study.log'}"
    cfg = TuningConfig(n_trials=2, epochs=2, storage=storage, study_name="s1")
    parent = Tracker.start(TrackingConfig(experiment="tune-test"), run_name="parent")
    result = tune(_base(tiny_data), cfg, tmp_path / "w1", parent=parent)
    parent.end()

    assert result.n_complete + result.n_pruned == 2
    assert set(result.best_params) == {"head_lr", "backbone_lr"}
    assert cfg.head_lr[0] <= result.best_params["head_lr"] <= cfg.head_lr[1]
    assert result.best_params["backbone_lr"] < result.best_params["head_lr"] * cfg.backbone_ratio[1] + 1e-12
    assert json.loads((tmp_path / "w1" / "best_params.json").read_text())["best_params"] == result.best_params
    assert any(p.endswith("optimization_history.png") for p in result.plots)

    study = optuna.load_study(study_name="s1", storage=make_storage(storage))
    # The trainer's on-epoch callback reported every epoch's validation Dice to Optuna.
    assert all(sorted(t.intermediate_values) == [1, 2] for t in study.trials)

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id])
    tune_run = next(r for r in runs if r.info.run_name == "tune-fold-0")  # the study of fold 0
    assert tune_run.data.tags["mlflow.parentRunId"] == parent.run_id
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_run.info.run_id]
    assert sorted(r.info.run_name for r in trials) == ["trial-0", "trial-1"]
    assert all("val_dice" in r.data.metrics for r in trials)
    artifacts = {a.path for a in client.list_artifacts(tune_run.info.run_id, "optuna_plots")}
    assert "optuna_plots/optimization_history.png" in artifacts
    # One spelling per rate: the study's choice is head_lr / backbone_lr (source tuned); ranges are "_range".
    assert float(tune_run.data.params["head_lr"]) == pytest.approx(result.best_params["head_lr"])
    assert tune_run.data.params["head_lr.source"] == "tuned" and "tuning.head_lr_range" in tune_run.data.params
    assert not {"best.head_lr", "tuning.head_lr"} & set(tune_run.data.params)

    # A second worker on the same storage finds the study full (load_if_exists + MaxTrialsCallback) ...
    again = tune(_base(tiny_data), cfg, tmp_path / "w2", tracking=False)
    assert again.n_complete + again.n_pruned == 2 and again.best_params == result.best_params
    # ... and asking for one more trial runs exactly one.
    more = tune(_base(tiny_data), TuningConfig(n_trials=3, epochs=1, storage=storage, study_name="s1"),
                tmp_path / "w3", tracking=False)
    assert more.n_complete + more.n_pruned == 3


def test_bad_tuning_settings_are_user_errors(tiny_data, tmp_path):
    from m2snet.workflows.tuning import TuningConfig, make_storage, tune

    with pytest.raises(M2SNetError, match="n_trials"):
        tune(_base(tiny_data), TuningConfig(n_trials=0), tmp_path, tracking=False)
    with pytest.raises(M2SNetError, match="storage"):
        make_storage("not-a-url")
    with pytest.raises(M2SNetError, match="split"):
        tune(dataclasses.replace(_base(tiny_data), split=None), TuningConfig(n_trials=1), tmp_path, tracking=False)


def test_a_storage_whose_driver_is_missing_or_server_is_down_is_one_line(monkeypatch):
    """`tune --storage postgresql://...` without its driver names the package to install; a database that
    does not answer is named too (both were tracebacks). A bare postgresql:// is psycopg 3 to SQLAlchemy 2.1,
    not the psycopg2 this package installs: the error says how to name the installed one."""
    import sys

    from m2snet.processes import free_port
    from m2snet.workflows.tuning import make_storage

    url = f"postgresql+psycopg2://alice:pw@127.0.0.1:{free_port()}/test"
    shown = url.replace(":pw@", ":***@")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "psycopg2", None)  # what an environment without the driver sees on import
        with pytest.raises(M2SNetError) as err:
            make_storage(url)
    assert str(err.value) == (f"tuning storage {shown!r}: its database driver psycopg2 is not installed "
                              "(pip install psycopg2-binary)")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "psycopg", None)
        with pytest.raises(M2SNetError) as err:
            make_storage(url.replace("+psycopg2", ""))
    assert str(err.value) == (f"tuning storage {shown.replace('+psycopg2', '')!r}: its database driver psycopg is not "
                              "installed (pip install 'psycopg[binary]'; or name the installed psycopg2: "
                              "postgresql+psycopg2://...)")
    with pytest.raises(M2SNetError, match="cannot open the database") as err:
        make_storage(url)
    assert str(err.value).startswith(f"tuning storage {shown!r}: cannot open the database (")
    assert "pw" not in str(err.value) and "\n" not in str(err.value)


_FIRST_TRIAL = """
import json, sys
from m2snet.workflows.tuning import TuningConfig, make_storage, open_study, suggest
cfg = TuningConfig(n_trials=4, storage=sys.argv[1], study_name="workers", seed=7)
trial = open_study(cfg, make_storage(cfg.storage)).ask()
print(json.dumps({"number": trial.number, **suggest(trial, cfg)}))
"""


def _first_trial(storage: str) -> dict:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FIRST_TRIAL, storage], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_on_one_study_propose_different_trials_reproducibly(tmp_path, kind):
    """Two worker processes joining one study each ask for a trial before any has finished: with one sampler
    seed they proposed the same learning rates. Each trial's sampler is seeded from (seed, trial number),
    which the storage hands out once, so workers differ, and a fresh study repeats the same proposals."""
    def storage(name):
        return f"sqlite:///{tmp_path / name}.db" if kind == "sqlite" else f"journal:{tmp_path / name}.log"

    a, b = _first_trial(storage("study")), _first_trial(storage("study"))
    assert (a["number"], b["number"]) == (0, 1)
    assert a["head_lr"] != b["head_lr"] and a["backbone_lr"] != b["backbone_lr"]
    again = _first_trial(storage("again")), _first_trial(storage("again"))
    assert again == (a, b)


def test_study_is_shared_through_postgresql(pg_database):
    """Two workers opening the study on the cluster's kind of storage see one study (load_if_exists)."""
    from m2snet.workflows.tuning import TuningConfig, make_storage, open_study, suggest

    cfg = TuningConfig(n_trials=2, storage=pg_database, study_name="shared")
    worker_a = open_study(cfg, make_storage(pg_database))
    worker_b = open_study(cfg, make_storage(pg_database))
    assert worker_a._study_id == worker_b._study_id
    trial = worker_a.ask()
    params = suggest(trial, cfg)
    worker_a.tell(trial, 0.5)
    assert [t.value for t in worker_b.trials] == [0.5]
    assert params["backbone_lr"] == params["head_lr"] * worker_b.trials[0].params["backbone_ratio"]


def test_a_trial_folder_m2snet_did_not_write_is_never_removed(tiny_data, tmp_path):
    """``trial-0000`` in the output folder is removed (a crashed earlier attempt) only if tuning made it."""
    from m2snet.workflows.tuning import TRIAL_MARKER, TuningConfig, tune

    cfg = TuningConfig(n_trials=1, epochs=1, storage=f"journal:{tmp_path / 'study.log'}", study_name="s-user")
    user_dir = tmp_path / "w" / "trial-0000"
    user_dir.mkdir(parents=True)
    (user_dir / "notes.txt").write_text("keep me\n")
    with pytest.raises(M2SNetError, match="no trial completed"):
        tune(_base(tiny_data), dataclasses.replace(cfg, n_trials=1), tmp_path / "w", tracking=False)
    assert sorted(p.name for p in user_dir.iterdir()) == ["notes.txt"]

    crashed = tmp_path / "w2" / "trial-0000"  # what an attempt killed mid-trial leaves
    crashed.mkdir(parents=True)
    (crashed / TRIAL_MARKER).touch()
    (crashed / "last.pt").write_bytes(b"half")
    result = tune(_base(tiny_data), dataclasses.replace(cfg, study_name="s-crashed", storage=""),
                  tmp_path / "w2", tracking=False)
    assert result.n_complete == 1 and not crashed.exists()


@pytest.mark.parametrize("explicit, head, backbone, sources", [
    ((), 0.04, 0.002, ("tuned", "tuned")),  # nothing set by the user: the study's values
    (("head_lr",), 0.1, 0.1 * 0.002 / 0.04, ("user", "derived")),  # the tuned RATIO, applied to the user's head
    (("head_lr", "backbone_lr"), 0.1, 0.03, ("user", "user")),
    (("backbone_lr",), 0.04, 0.03, ("tuned", "user")),
])
def test_precedence_preset_then_tuned_then_user_and_derived_after(explicit, head, backbone, sources):
    """presets.settle_config: preset < tuned < user; the backbone rate derived from the settled head rate."""
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.presets import rate_params, settle_config

    user = {"head_lr": 0.1, "backbone_lr": 0.03}
    cfg = TrainConfig(head_lr=0.05, backbone_lr=0.005).override(**{k: user[k] for k in explicit})
    settled, src = settle_config(cfg, {"head_lr": 0.04, "backbone_lr": 0.002}, frozenset(explicit))
    assert (settled.head_lr, settled.backbone_lr) == (pytest.approx(head), pytest.approx(backbone))
    assert (src["head_lr"], src["backbone_lr"]) == sources
    assert rate_params(settled, src) == {"head_lr": settled.head_lr, "head_lr.source": sources[0],
                                         "backbone_lr": settled.backbone_lr, "backbone_lr.source": sources[1]}
    untuned, plain = settle_config(cfg, None, frozenset(explicit))
    assert untuned == cfg and plain == {k: "user" if k in explicit else "preset" for k in ("head_lr", "backbone_lr")}
