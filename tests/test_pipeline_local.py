"""The whole pipeline on the kfp local runner (TINY preset) against a real `mlflow server` + SeaweedFS.

One module-scoped run of every step (prepare -> split -> 4 x (tune -> train -> evaluate) -> aggregate ->
register -> promote -> exit handler); a second, smaller run through the CLI, on a raw Kvasir-layout set,
that cannot beat it must leave `production` alone and print a short console. A run on corrupt data
must fail cleanly. The MLflow UI is then loaded in headless Chromium on what the runs recorded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

EXPERIMENT = "pipeline-test"
USER_HEAD_LR = "0.031"  # the second run's `--set head_lr=...`, with tuning on
MODEL = "m2snet-tiny"
# Headless Debian chromium, offline and without first-run / sync / update traffic.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _kvasir_layout(root: Path) -> Path:
    """A raw Kvasir-SEG layout (images/*.jpg, masks/*.jpg) made of the demo set's lesion cases."""
    from PIL import Image

    from m2snet.data.demo import make_demo_dataset

    busi = make_demo_dataset(root / "busi", n_per_class={"benign": 4, "malignant": 4, "normal": 0}, size=64)
    for img in sorted(busi.rglob("*).png")):
        stem = img.stem.replace(" (", "").replace(")", "")
        for sub, src in (("images", img), ("masks", img.with_name(img.stem + "_mask.png"))):
            (root / "kvasir" / sub).mkdir(parents=True, exist_ok=True)
            Image.open(src).convert("RGB").save(root / "kvasir" / sub / f"{stem}.jpg", quality=95)
    return root / "kvasir"


def _cli(*args: str, cwd: Path, url: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    """`m2snet ARGS` as a user runs it: a subprocess whose stdout is not a terminal."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "m2snet.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(mlflow_server, tmp_path_factory):
    from mlflow import MlflowClient

    from m2snet.kubeflow.runner import LocalRunOptions, run_local

    work = tmp_path_factory.mktemp("pipeline")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mp.chdir(work)
    try:
        # Its task outputs are kept (the tests below read its checkpoints and images); the second run's are not.
        state_before = _process_state()
        first = run_local(LocalRunOptions("tiny", work_dir=work / "run1", experiment=EXPERIMENT, model_name=MODEL,
                                          keep_intermediates=True))
        state_after = _process_state()
        gate = SimpleNamespace(promoted=first.promoted, reason=first.promotion)
        if not first.promoted:
            # 1 epoch may learn nothing: the gate refused it (checked below); the tests after it need a
            # production version, so promote it by hand, as an operator would with --force.
            from m2snet.mlops.registry import promote

            promote(MODEL, first.version, force=True)
            first.promoted, first.production_version = True, first.version
        # Cannot beat production by a margin of 1.0 (Dice is at most 1): the gate must reject it.
        kvasir = _kvasir_layout(work / "raw")
        cli = _cli("pipeline", "run", "--local", "--preset", "tiny", "--data", str(kvasir), "--importer", "kvasir",
                   "--work-dir", str(work / "run2"), "--experiment", EXPERIMENT, "--model-name", MODEL,
                   "--folds", "2", "--trials", "1", "--margin", "1.0", "--set", f"head_lr={USER_HEAD_LR}",
                   "--seeds", "42,43", "--require-ci", cwd=work, url=mlflow_server.url)
        assert cli.returncode == 0, f"{cli.stdout}\n{cli.stderr}"
        client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
        latest = max(client.search_model_versions(f"name = '{MODEL}'"), key=lambda mv: int(mv.version))
        second = SimpleNamespace(version=str(latest.version), promoted="NOT promoted" not in cli.stdout)
        yield {"first": first, "second": second, "cli": cli, "kvasir": kvasir, "work": work,
               "url": mlflow_server.url, "gate": gate, "state": (state_before, state_after)}
    finally:
        mp.undo()


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


# m2snet.mlops.tracking turns MLflow's HTTP retries down for the whole process on its first use, whichever
# command tracks (os.environ.setdefault, the user's own values win): a library setting, not the local run's swap.
TRACKING_PROCESS_SETTINGS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                             "MLFLOW_HTTP_REQUEST_TIMEOUT")


def _process_state() -> dict:
    """What a local run borrows from its process (m2snet.kubeflow.process_state), as comparable values."""
    import logging

    environ = {k: v for k, v in os.environ.items() if k not in TRACKING_PROCESS_SETTINGS}
    return {"environ": environ, "stdout": sys.stdout, "stderr": sys.stderr,
            "root_handlers": list(logging.getLogger().handlers),
            "warnings_captured": getattr(logging, "_warnings_showwarning", None) is not None}


def test_a_local_run_gives_back_the_process_state(runs):
    """After run_local: the environment (MLFLOW_TRACKING_URI, the progress file, MLflow's progress bars),
    sys.stdout/stderr and the root logger's handlers are what they were before it."""
    before, after = runs["state"]
    changed = {k for k in before["environ"].keys() | after["environ"].keys()
               if before["environ"].get(k) != after["environ"].get(k)}
    assert changed == set() and after == before, changed


def test_a_failed_local_run_gives_back_the_process_state(tmp_path, monkeypatch):
    """A run that fails (an undecodable image) in this process, on the default SQLite store of its directory:
    MLFLOW_TRACKING_URI, which it set for its tasks, is unset again, and the rest is as it was."""
    from m2snet.data.demo import make_demo_dataset
    from m2snet.kubeflow.runner import LocalRunOptions, PipelineTaskFailed, run_local

    raw = make_demo_dataset(tmp_path / "raw", n_per_class=2, size=64)
    sorted(raw.rglob("*).png"))[0].write_bytes(b"\x89PNG but not really")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    before = _process_state()
    with pytest.raises(PipelineTaskFailed, match="prepare"):
        run_local(LocalRunOptions("tiny", data_path=str(raw), work_dir=tmp_path / "work",
                                  experiment="pipeline-state"))
    after = _process_state()
    changed = {k for k in before["environ"].keys() | after["environ"].keys()
               if before["environ"].get(k) != after["environ"].get(k)}
    assert changed == set() and after == before, changed
    assert "MLFLOW_TRACKING_URI" not in os.environ and (tmp_path / "mlflow.db").is_file()


def test_first_run_logs_parent_folds_and_trials(runs):
    client = _client(runs["url"])
    first = runs["first"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs_all = client.search_runs([exp.experiment_id], max_results=500)
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["preset"] == "tiny" and parent.data.params["data_version"]
    assert "cv_dice_mean" in parent.data.metrics and "cv_dice_std" in parent.data.metrics
    # the no-skill predictor (all background) on the same cases, and the lesion cases alone
    assert "cv_dice_noskill" in parent.data.metrics and "cv_lesion_dice_mean" in parent.data.metrics
    assert parent.data.params["metric_protocol"] == "project"
    assert "rule" in parent.data.tags["m2snet.promotion"]
    # The UI opens the experiment on its training runs, not on MLflow 3's GenAI overview.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # The parent's description is the CV table with the model and its promotion decision.
    note = parent.data.tags["mlflow.note.content"]
    assert "| CV: all cases" in note and "| no skill (all background): all cases" in note
    assert "project protocol" in note and f"{MODEL}/{first.version}" in note and "promoted" in note
    # Data lineage: the parent and every fold log the dataset as an MLflow dataset input.
    version = parent.data.params["data_version"]
    (given,) = parent.inputs.dataset_inputs
    assert given.dataset.digest == version and given.dataset.source_type == "local"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "cv")} >= {
        "cv/cv_table.md", "cv/cv_summary.json", "cv/cv_per_case.csv", "cv/cv_lineage.json"}

    children = [r for r in runs_all if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    folds = sorted((r for r in children if r.data.tags.get("m2snet.kind") == "fold"),
                   key=lambda r: int(r.data.tags["m2snet.fold"]))
    assert [r.data.tags["m2snet.fold"] for r in folds] == ["0", "1", "2", "3"]
    split_sha = parent.data.params["split_sha256"]
    for r in folds:
        assert r.info.status == "FINISHED"
        (given,) = r.inputs.dataset_inputs
        tags = {t.key: t.value for t in given.tags}
        assert given.dataset.digest == version and tags["split_sha256"] == split_sha == r.data.params["split_sha256"]
        assert tags["fold"] == r.data.tags["m2snet.fold"] and tags["mlflow.data.context"] == "training"
        assert {"dice", "iou", "precision", "recall", "specificity", "val_dice"} <= set(r.data.metrics)
        # the tuned learning rates reached training, recorded under their one name with their source
        assert r.data.params["head_lr.source"] == r.data.params["backbone_lr.source"] == "tuned"
        assert r.data.tags["m2snet.model_uri"].startswith("models:/")  # a model per fold, as `m2snet cv`
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
        for rate in ("head_lr", "backbone_lr"):
            assert float(fold_run.data.params[rate]) == pytest.approx(float(tune.data.params[rate]))
        assert fold_run.data.params["config.selection"] == "final" and fold_run.data.tags["m2snet.selection"] == "final"


def test_first_run_registers_one_version_and_the_gate_names_its_rule(runs):
    from m2snet.workflows.presets import get_preset

    client = _client(runs["url"])
    first, gate = runs["first"], runs["gate"]
    mv = client.get_model_version(MODEL, first.version)
    for tag in ("data_version", "split_sha256", "pipeline_run_id", "cv_dice", "cv_dice_mean", "n_folds",
                "noskill_dice", "cv_dice_noskill", "metric_protocol"):
        assert mv.tags.get(tag), tag
    assert mv.tags["n_folds"] == "4"
    assert mv.description.startswith("Ensemble of 4 fold models") and mv.tags["data_version"] in mv.description
    assert "**No skill (all background) on the same cases:** Dice" in mv.description
    # The tiny set's folds have too few held-out cases to set a guard's threshold on: none, and no false alarms.
    assert "**Input guard:**" not in mv.description
    # The gate: a 1-epoch model that learns nothing is refused by the no-skill rule; one it promotes
    # beats its no-skill row by the margin.
    cv, noskill = float(mv.tags["cv_dice"]), float(mv.tags["noskill_dice"])
    margin = get_preset("tiny").promotion.noskill_margin
    if gate.promoted:
        assert cv >= noskill + margin and "beats no skill" in gate.reason
    else:
        assert cv < noskill + margin and "no-skill rule" in gate.reason, gate.reason
    assert "**Promotion:**" in mv.description
    assert mv.tags["pipeline_run_id"] == first.pipeline_run_id
    assert 0.0 <= float(mv.tags["cv_dice"]) <= 1.0
    assert "Dice" in first.table and "±" in first.table
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
    from m2snet.workflows.context import RunContext
    from m2snet.workflows.steps import register_step

    versions_before = len(client.search_model_versions(f"name = '{MODEL}'"))
    mv = client.get_model_version(MODEL, second.version)
    again = register_step([], {}, "", model_name=MODEL, dataset_version="x",
                          ctx=RunContext.for_pipeline(mv.tags["pipeline_run_id"], EXPERIMENT))
    assert again == str(second.version)
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == versions_before


RATES = ("head_lr", "head_lr.source", "backbone_lr", "backbone_lr.source")


def test_a_user_rate_with_tuning_is_recorded_alike_by_cv_and_the_pipeline(runs, tmp_path):
    """preset < tuned < the user's override, the derived rate after it: `--set head_lr=X` with tuning on
    records the same rates through `m2snet cv` as through `m2snet pipeline run --local` (the second run):
    head_lr = X (user), backbone_lr = X x the fold's tuned backbone/head ratio (derived)."""
    from tests.conftest import make_tiny_dataset

    client = _client(runs["url"])
    pipeline_id = client.get_model_version(MODEL, runs["second"].version).tags["pipeline_run_id"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`m2snet.pipeline_run_id` = '{pipeline_id}'")
    data, split = make_tiny_dataset(tmp_path)
    tiny = ["multiscale=false", "pretrained=false", "lossnet_weight=0", "lossnet_pretrained=false"]
    sets = [arg for value in [f"head_lr={USER_HEAD_LR}", *tiny] for arg in ("--set", value)]
    cv = _cli("cv", "--data", str(data), "--split", str(split), "--folds", "0", "--epochs", "1", "--size", "64",
              "--batch-size", "4", "--tune-trials", "1", *sets, "--no-log-model", "--experiment", "precedence",
              "--out", str(tmp_path / "cv"), cwd=tmp_path, url=runs["url"])
    assert cv.returncode == 0, cv.stderr[-3000:]
    cv_exp = client.get_experiment_by_name("precedence")
    recorded = {}
    for door, exp_id, parent_id in (("pipeline", exp.experiment_id, parent.info.run_id),
                                    ("cv", cv_exp.experiment_id, None)):
        children = client.search_runs([exp_id], "tags.`m2snet.fold` = '0'")
        if parent_id:  # the pipeline's second run repeats seeds 42 and 43: its seed 42 is the CLI's seed
            children = [r for r in children if r.data.tags.get("mlflow.parentRunId") == parent_id
                        and r.data.tags["m2snet.seed"] == "42"]
        (fold,) = [r for r in children if r.data.tags["m2snet.kind"] == "fold"]
        (tune,) = [r for r in children if r.data.tags["m2snet.kind"] == "tuning"]
        ratio = float(tune.data.params["backbone_lr"]) / float(tune.data.params["head_lr"])
        rates = {k: fold.data.params[k] for k in RATES}
        assert rates["head_lr"] == USER_HEAD_LR and rates["head_lr.source"] == "user", door
        assert rates["backbone_lr.source"] == "derived", door
        assert float(rates["backbone_lr"]) == pytest.approx(float(USER_HEAD_LR) * ratio), door
        recorded[door] = rates
    # One study seed, one trial: both doors tuned the same ratio, so they record the very same rates.
    assert recorded["cv"] == recorded["pipeline"]


def test_compare_pairs_pipeline_versions_and_refuses_other_data(runs, tmp_path):
    """The aggregate step keeps the per-case scores: `m2snet compare` reads them by registered version and
    by run id, and refuses the second run (Kvasir-layout data, 2 folds) as another data version."""
    first, second = runs["first"], runs["second"]
    cli = _cli("compare", f"models:/{MODEL}@production", first.parent_run_id, "--json", "--no-track",
               "--resamples", "500", "--out", str(tmp_path / "same"), cwd=tmp_path, url=runs["url"])
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert out["n_folds"] == 4 and out["only_a"] == out["only_b"] == 0
    assert out["metrics"]["dice"]["diff"] == 0.0 and out["metrics"]["dice"]["ties"] == out["n_cases"]
    cli = _cli("compare", f"models:/{MODEL}/{first.version}", f"models:/{MODEL}/{second.version}", "--no-track",
               cwd=tmp_path, url=runs["url"])
    assert cli.returncode == 2
    (line,) = cli.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot pair models:/{MODEL}/{first.version} and ")
    assert "data version differs" in line


def test_production_model_predicts_masks(runs, tmp_path, monkeypatch):
    from PIL import Image

    from m2snet.mlops.serving import predict_files

    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs["url"])
    images = sorted(runs["first"].pipeline_root.rglob("images/*.png"))[:2]
    assert images, "the prepared dataset's images should be in the local runner's outputs"
    out = predict_files(f"models:/{MODEL}@production", images, tmp_path)
    for p in out:
        assert Image.open(p.mask).size == Image.open(p.image).size
        assert p.overlay.is_file()
        assert p.ood_score is None and p.ood_flag is None  # no guard on a set this small


def test_cli_console_is_short_and_says_where_to_look(runs):
    """The README's command on a non-terminal stdout: a line per task start/end and the summary, < 80 lines."""
    out = runs["cli"].stdout
    lines = out.splitlines()
    assert len(lines) < 80, out
    # The runner's executor JSON, library notices and progress bars are in the task logs, not here.
    for noise in ("KFP Executor", "executorInput", "parameterValues", "CloudPickle", "it/s]", "FutureWarning"):
        assert noise not in out + runs["cli"].stderr, noise
    assert "Cross-validation" in out and "| CV (2 seeds): all cases" in out and "| no skill (all background)" in out
    assert "NOT promoted" in out and re.search(r"why: .*margin", out)
    assert f"model {MODEL} version {runs['second'].version}" in out and "#/models/" in out
    assert f"m2snet serve --model models:/{MODEL}@production --port 5001" in out  # `m2snet serve`'s own options
    # Random init is true for the tiny preset's training: said once, and never by the tasks that load checkpoints.
    assert out.count("random weights") == 1
    log_dir = Path(re.search(r"^logs: (\S+)/", out, re.M)[1])
    done = re.findall(r"done in .*log: (\S+\.log)", out)
    assert {"prepare-dataset.log", "train-fold-1-seed43.log", "evaluate-fold-1-seed42.log", "register-model.log",
            "finalize-run.log"} <= set(done)
    for name in done:  # every task's full stream, the KFP executor's included
        assert "KFP Executor" in (log_dir / name).read_text(), name
    for name in ("evaluate-fold-0-seed42.log", "evaluate-fold-1-seed43.log", "register-model.log",
                 "promote-model.log"):
        assert "random weights" not in (log_dir / name).read_text(), name
    assert "random weights" in (log_dir / "train-fold-0-seed42.log").read_text()
    # A successful run removes its own task outputs (the fold checkpoints live on in MLflow), and only those.
    outputs = Path(re.search(r"^task outputs: (\S+)  \(removed: the run succeeded", out, re.M)[1])
    assert outputs.parent == runs["work"] / "run2" / "kfp" and not outputs.exists()
    assert runs["first"].pipeline_root.is_dir()


def test_seeds_repeat_the_cv_with_a_console_line_per_seed_and_fold(runs):
    """The second run's `--seeds 42,43 --require-ci`: every fold task once per seed on one split, each with its
    own console line and log file (named by fold and seed), the seeds on the parent run, and the promote step
    given the statistical gate, which falls back to the margin rule against production on other data."""
    from m2snet.kubeflow.runner import LocalRunOptions
    from m2snet.kubeflow.runview import planned_tasks

    options = LocalRunOptions("tiny", n_folds=2, seeds="42,43")
    keys = [key for key, _ in planned_tasks(options.pipeline().function, options.pipeline().loop_items)]
    assert [k for k in keys if k.startswith("train-fold")] == [
        "train-fold-0-seed42", "train-fold-1-seed42", "train-fold-0-seed43", "train-fold-1-seed43"]
    out = runs["cli"].stdout
    assert "2 folds x 2 seeds" in out and "| 2 folds x 2 seeds, project protocol |" in out
    done = set(re.findall(r"done in .*log: (\S+\.log)", out))
    for item in ("0-seed42", "1-seed42", "0-seed43", "1-seed43"):
        assert {f"tune-hyperparameters-{item}.log", f"train-fold-{item}.log", f"evaluate-fold-{item}.log"} <= done
    client = _client(runs["url"])
    mv = client.get_model_version(MODEL, runs["second"].version)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([exp.experiment_id],
                                   filter_string=f"tags.`m2snet.pipeline_run_id` = '{mv.tags['pipeline_run_id']}'")
    assert parent.data.params["seeds"] == "42,43" and parent.data.params["folds"] == "0,1"
    folds = [r for r in client.search_runs([exp.experiment_id], "tags.`m2snet.kind` = 'fold'")
             if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.data.tags["m2snet.fold"], r.data.params["seed"]) for r in folds) == [
        ("0", "42"), ("0", "43"), ("1", "42"), ("1", "43")]
    tunes = [r for r in client.search_runs([exp.experiment_id], "tags.`m2snet.kind` = 'tuning'")
             if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in tunes) == [  # each seed's study, told apart by name and tag
        "seed-42-tune-fold-0", "seed-42-tune-fold-1", "seed-43-tune-fold-0", "seed-43-tune-fold-1"]
    assert all(r.data.tags["m2snet.seed"] == r.info.run_name.split("-")[1] for r in tunes)
    # The gate the promote step applied is recorded on the version, and its reason says which rule decided.
    assert mv.tags["promotion_policy"] == "floor=0 margin=1 noskill_margin=0.05 require_ci=True"
    decision = mv.tags["promotion_decision"]
    assert decision.startswith("rejected: "), decision
    if "production rule" in decision:  # the CI rule cannot pair other data: the margin rule decided, and says so
        assert "margin rule: no paired comparison with production" in decision, decision


def test_any_importer_reaches_the_pipeline(runs):
    """`--data RAW --importer kvasir`: the prepare step imported the Kvasir layout; lineage says so."""
    client = _client(runs["url"])
    mv = client.get_model_version(MODEL, runs["second"].version)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([exp.experiment_id],
                                   filter_string=f"tags.`m2snet.pipeline_run_id` = '{mv.tags['pipeline_run_id']}'")
    assert parent.data.params["data_source"] == str(runs["kvasir"])
    (given,) = parent.inputs.dataset_inputs
    assert given.dataset.name == "kvasir" and '"importer": "kvasir"' in given.dataset.source
    assert given.dataset.digest == mv.tags["data_version"]


def test_corrupt_data_fails_cleanly(mlflow_server, tmp_path):
    """A step that fails (an undecodable image): exit 2 naming the task and its log; parent run FAILED."""
    from mlflow import MlflowClient

    from m2snet.data.demo import make_demo_dataset

    raw = make_demo_dataset(tmp_path / "raw", n_per_class=2, size=64)
    bad = sorted(raw.rglob("*).png"))[0]
    bad.write_bytes(b"\x89PNG but not really")
    res = _cli("pipeline", "run", "--local", "--preset", "tiny", "--data", str(raw), "--work-dir",
               str(tmp_path / "work"), "--experiment", "pipeline-failure", cwd=tmp_path, url=mlflow_server.url,
               timeout=900)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "error: pipeline task 'prepare + validate' failed" in res.stderr and bad.name in res.stderr
    log = Path(re.search(r"full log: (\S+\.log)", res.stderr)[1])
    assert log.name == "prepare-dataset.log" and "Traceback" in log.read_text()
    assert re.search(r"prepare \+ validate\s+FAILED after", res.stdout)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.get_experiment_by_name("pipeline-failure")
    (parent,) = client.search_runs([exp.experiment_id])
    assert parent.info.status == "FAILED"
    assert parent.data.tags["m2snet.failed_task"] == "prepare + validate"
    assert parent.data.tags["m2snet.failed_log"] == str(log)
    assert "cannot decode" in parent.data.tags["m2snet.error"] and bad.name in parent.data.tags["mlflow.note.content"]
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "logs")] == ["logs/prepare-dataset.log"]


def _tagged_processes(tag: str) -> list:
    """Live processes whose environment carries ``M2SNET_TEST_TAG=tag``: a command's whole process tree,
    however deep, and whatever was reparented when a parent died."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("M2SNET_TEST_TAG") == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:  # gone, or another user's
            continue
    return found


def _wait_for_event(log_root: Path, proc: subprocess.Popen, want, timeout: float = 600) -> dict:
    """The first progress event of a run under ``log_root`` for which ``want(event)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for events in log_root.glob("*/events.jsonl"):
            for line in events.read_text().splitlines():
                event = json.loads(line) if line.endswith("}") else {}
                if want(event):
                    return event
        assert proc.poll() is None, f"the run ended first: {proc.communicate()}"
        time.sleep(0.2)
    raise AssertionError(f"no such event under {log_root}")


def test_ctrl_c_stops_every_task_and_closes_the_runs_killed(tmp_path):
    """`kill -INT` of `pipeline run --local` once the fold loop started (two folds at once, more queued):
    every process it started is gone when it exits 130, the parent MLflow run and the runs its tasks opened
    are KILLED, and the parent says why. The default SQLite store, as `make run` uses."""
    from mlflow import MlflowClient

    from m2snet.data.demo import make_demo_dataset

    raw = make_demo_dataset(tmp_path / "raw", n_per_class=2, size=64)
    tag, uri = f"ctrl-c-{os.getpid()}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "M2SNET_TEST_TAG": tag}
    proc = subprocess.Popen([sys.executable, "-m", "m2snet.cli", "pipeline", "run", "--local", "--preset", "tiny",
                             "--data", str(raw), "--work-dir", str(tmp_path / "work"), "--experiment", "ctrl-c"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as a terminal's Ctrl-C would find it (a suite run with `&` ignores SIGINT)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # A fold's tuning has opened its MLflow run and started a trial; the runner's threads run two folds
        # at once, and more are queued.
        _wait_for_event(tmp_path / "work" / "logs", proc, lambda e: e.get("kind") == "trial")
        assert len(_tagged_processes(tag)) > 1
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)  # a hang guard: without the fix the folds run on for minutes
    finally:
        for leftover in [proc] * (proc.poll() is None) + _tagged_processes(tag):  # a failed test leaves none
            leftover.kill()
    assert proc.returncode == 130, out + err
    assert _tagged_processes(tag) == [], "task processes outlived the command"
    assert re.search(r"interrupted: interrupted by SIGINT \(Ctrl-C\) after \d+ s: \d+ processes stopped; "
                     r"MLflow run pipeline-\S+ marked KILLED", err), err
    assert "Traceback" not in err
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ctrl-c").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("m2snet.kind") == "pipeline"]
    assert parent.info.status == "KILLED" and parent.data.tags["m2snet.status"] == "canceled"
    assert "interrupted by SIGINT" in parent.data.tags["m2snet.error"]
    assert "interrupted by SIGINT" in parent.data.tags["mlflow.note.content"]
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert "RUNNING" not in statuses.values(), statuses
    assert {s for name, s in statuses.items() if name.startswith("tune-fold-")} == {"KILLED"}, statuses


def _events(log_root: Path) -> list[dict]:
    return [json.loads(line) for events in sorted(log_root.glob("*/events.jsonl"))
            for line in events.read_text().splitlines() if line.endswith("}")]


def test_two_runs_in_one_work_dir_keep_their_own_logs_console_and_store(tmp_path):
    """Two `pipeline run --local` started together in one directory (one work dir, one fresh SQLite store):
    each has its own log folder and events file, its console lists only its own tasks, and neither fails on
    the store's creation. Both are stopped with Ctrl-C once both have imported their data."""
    from m2snet.data.demo import make_demo_dataset

    raw = make_demo_dataset(tmp_path / "raw", n_per_class=2, size=64)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [sys.executable, "-m", "m2snet.cli", "pipeline", "run", "--local", "--preset", "tiny", "--data", str(raw)]
    procs = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) for _ in range(2)]
    logs = tmp_path / ".m2snet" / "pipeline" / "logs"
    try:
        deadline = time.monotonic() + 600
        while len({e.get("pid") for e in _events(logs) if e.get("kind") == "task_end"}) < 2:  # both imported
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the runs did not both finish their first task"
            time.sleep(0.2)
        for p in procs:
            p.send_signal(signal.SIGINT)
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [130, 130], outputs  # stopped, neither failed
    dirs = [Path(re.search(r"^logs: (\S+)/$", out, re.M)[1]) for out, _ in outputs]
    assert dirs[0] != dirs[1] and sorted(dirs) == sorted(logs.iterdir())
    for (out, _), log_dir in zip(outputs, dirs):
        events = [json.loads(line) for line in (log_dir / "events.jsonl").read_text().splitlines()]
        assert len({e["pipeline_run_id"] for e in events if e["kind"] == "task_start"}) == 1, events
        assert out.count("prepare + validate   running") == 1, out
        assert (log_dir / "pipeline.log").read_text().count("Executing task 'prepare-dataset'") == 1


def test_exit_handler_closes_the_runs_a_dead_task_left_open(mlflow_server, monkeypatch):
    """finalize_step on a failed pipeline: the parent and its RUNNING children end FAILED, with the error."""
    from m2snet.mlops.tracking import parent_run
    from m2snet.workflows.context import RunContext
    from m2snet.workflows.steps import finalize_step

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    parent = parent_run("dead-fold", "pipeline-exit")
    fold = parent.child("fold-1", tags={"m2snet.kind": "fold"})
    fold.log_metrics({"val_dice": 0.5}, step=0, flush=True)  # then its pod was killed: never ended
    assert finalize_step("FAILED", "Task train-fold failed.", ctx=RunContext.for_pipeline("dead-fold",
                         "pipeline-exit")) == ""
    client = parent.client
    assert client.get_run(fold.run_id).info.status == "FAILED"
    run = client.get_run(parent.run_id)
    assert run.info.status == "FAILED" and run.data.tags["m2snet.failed_runs"] == "fold-1"
    assert run.data.tags["m2snet.error"] == "Task train-fold failed."


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")


def _render(url: str, want: list[str], profile: Path, screenshot: Path | None = None) -> str:
    """The DOM of ``url`` once the MLflow UI (a JS app) has rendered every string in ``want``.

    Chromium's virtual time runs the page's scripts and XHRs to completion; a page still missing a
    string is loaded again with a larger budget (a slow, shared CI box).
    """
    chrome = _chromium()
    dom, missing = "", want
    for i, budget in enumerate((15_000, 40_000, 90_000)):
        argv = [chrome, *CHROMIUM_FLAGS, f"--user-data-dir={profile}-{i}", f"--virtual-time-budget={budget}"]
        dom = subprocess.run([*argv, "--dump-dom", url], capture_output=True, text=True, timeout=300).stdout
        missing = [w for w in want if w not in dom]
        if not missing:
            if screenshot is not None:
                subprocess.run([*argv, "--window-size=1600,900", f"--screenshot={screenshot}", url],
                               capture_output=True, timeout=300, check=True)
                assert screenshot.stat().st_size > 10_000, screenshot
            return dom
    raise AssertionError(f"{url}: {missing} not on the rendered page ({len(dom)} bytes of DOM)")


def test_mlflow_ui_shows_folds_lineage_and_production(runs, tmp_path):
    """The MLflow UI, rendered in headless chromium: the runs table with the four folds and the data
    digest, a fold run's dataset input, and the registered version with its `production` alias."""
    from m2snet.kubeflow.runner import LocalRunResult

    first: LocalRunResult = runs["first"]
    client = _client(runs["url"])
    links = first.ui_links(runs["url"])
    digest = client.get_run(first.parent_run_id).data.params["data_version"]
    shots = Path(os.environ.get("M2SNET_SCREENSHOT_DIR") or tmp_path)
    # Sorted by name, the table lists child runs flat (by start time it nests them under their parent).
    runs_table = links["runs"] + "&orderByKey=attributes.run_name&orderByAsc=true"
    dom = _render(runs_table, ["fold-0", "fold-1", "fold-2", "fold-3", f"pipeline-{first.pipeline_run_id}", digest],
                  tmp_path / "profile-runs", shots / "mlflow-runs-table.png")
    assert dom.count(digest) >= 5  # the Dataset column of the parent and of every fold
    fold = next(r for r in client.search_runs([first.experiment_id], filter_string="attributes.run_name = 'fold-1'")
                if r.data.tags.get("mlflow.parentRunId") == first.parent_run_id)
    fold_page = links["run"].replace(first.parent_run_id, fold.info.run_id)
    _render(fold_page, ["fold-1", digest, "training", f"pipeline-{first.pipeline_run_id}"], tmp_path / "profile-fold")
    _render(links["model"], ["production", "Ensemble of 4 fold models", digest, "Promotion"],
            tmp_path / "profile-model", shots / "mlflow-model-version.png")
