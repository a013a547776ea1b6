"""`m2snet compare`: paired statistics on planted per-case results, refusal on another data version or
split, per-case results of a CV and its seeds, and the promotion gate's statistical rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m2snet.errors import M2SNetError
from m2snet.evaluation.compare import (
    average_seeds,
    compare_metric,
    compare_paired,
    lineage_difference,
    pair,
    stratified_bootstrap_means,
)
from m2snet.mlops.cv_results import write_cv_per_case
from m2snet.mlops.promotion_gate import PromotionPolicy, decide_with_ci
from tests.conftest import make_tiny_dataset

LINEAGE = {"data_version": "0123456789abcdef0123456789abcdef.dir", "split_sha256": "a" * 64}


def _planted(shift: float, n_per_fold: int = 40, n_folds: int = 4, seed: int = 0, noise: float = 0.03):
    """Per-case Dice/IoU of A and of B = A + shift + noise, fold by fold."""
    rng = np.random.default_rng(seed)
    fold = np.repeat(np.arange(n_folds), n_per_fold)
    a = rng.uniform(0.4, 0.8, len(fold))
    b = np.clip(a + shift + rng.normal(0.0, noise, len(fold)), 0, 1)
    return fold, a, b


def _rows(fold, values, seed=42, iou_scale=0.8):
    return [{"seed": str(seed), "fold": str(f), "case_id": f"case{i:03d}", "label": "benign", "dice": f"{v:.6f}",
             "iou": f"{v * iou_scale:.6f}"} for i, (f, v) in enumerate(zip(fold, values))]


def test_bootstrap_ci_covers_a_planted_difference_and_wilcoxon_sees_it():
    fold, a, b = _planted(0.05)
    m = compare_metric("dice", a, b, fold)
    assert m.ci_low < 0.05 < m.ci_high  # the CI covers the planted shift
    assert m.ci_low > 0.0  # and excludes zero
    assert m.diff == pytest.approx(np.mean(b - a))
    assert m.p_wilcoxon < 1e-6
    assert sorted(m.per_fold) == [0, 1, 2, 3]
    assert m.per_fold[2] == pytest.approx(np.mean((b - a)[fold == 2]))
    assert m.wins_b + m.wins_a + m.ties == len(fold) and m.wins_b > 0.9 * len(fold)


def test_null_difference_gives_a_ci_containing_zero():
    rng = np.random.default_rng(1)
    fold = np.repeat(np.arange(4), 30)
    a = rng.uniform(0.3, 0.9, len(fold))
    e = rng.normal(0.0, 0.05, len(fold) // 2)
    b = a + rng.permutation(np.concatenate([e, -e]))  # differences of mean exactly zero
    m = compare_metric("dice", a, b, fold)
    assert m.ci_low < 0.0 < m.ci_high
    assert m.diff == pytest.approx(0.0, abs=1e-12)
    assert m.p_wilcoxon > 0.05


def test_bootstrap_resamples_cases_within_folds():
    # Fold 0 differs by 0 on every case, fold 1 by 1: resampling within folds keeps each fold's share,
    # so every replicate is exactly 0.5; resampling across folds would spread it.
    diff = np.array([0.0] * 10 + [1.0] * 10)
    reps = stratified_bootstrap_means(diff, np.array([0] * 10 + [1] * 10), n_resamples=500)
    assert np.allclose(reps, 0.5)
    # fixed seed: the same replicates every time
    d = np.random.default_rng(3).normal(size=30)
    f = np.repeat([0, 1, 2], 10)
    assert np.array_equal(stratified_bootstrap_means(d, f, 200, seed=7), stratified_bootstrap_means(d, f, 200, seed=7))


def test_seeds_are_averaged_per_case_before_pairing():
    fold = np.array([0, 0, 1])
    rows = _rows(fold, [0.2, 0.4, 0.6], seed=1) + _rows(fold, [0.4, 0.6, 0.8], seed=2)
    scores = average_seeds(rows)
    assert scores.n_seeds == 2
    assert np.allclose(scores.values["dice"], [0.3, 0.5, 0.7])
    other = average_seeds(_rows(fold[:2], [0.5, 0.5], seed=9))
    p = pair(scores, other)
    assert len(p.fold) == 2 and p.only_a == 1 and p.only_b == 0
    c = compare_paired(p)
    assert c.metrics["dice"].diff == pytest.approx(((0.5 - 0.3) + (0.5 - 0.5)) / 2)


def test_lineage_difference_names_what_differs():
    assert lineage_difference(LINEAGE, dict(LINEAGE)) is None
    other = {**LINEAGE, "split_sha256": "b" * 64}
    assert lineage_difference(LINEAGE, other) == f"split sha256 differs: A {'a' * 64} vs B {'b' * 64}"
    assert "data version" in lineage_difference(LINEAGE, {**LINEAGE, "data_version": "x.dir"})
    assert lineage_difference(LINEAGE, {"split_sha256": "a" * 64}) == "the data version of B is unknown"


def _m2snet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m2snet.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_compare_cli_json_and_refusal_on_another_split(tmp_path):
    fold, a, b = _planted(0.05, n_per_fold=20)
    write_cv_per_case(_rows(fold, a), tmp_path / "A", LINEAGE)
    write_cv_per_case(_rows(fold, b), tmp_path / "B", LINEAGE)
    proc = _m2snet("compare", str(tmp_path / "A"), str(tmp_path / "B"), "--json", "--no-track", "--resamples", "2000",
                   "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    dice = out["metrics"]["dice"]
    assert dice["ci_low"] < 0.05 < dice["ci_high"] and dice["ci_low"] > 0
    assert out["n_cases"] == 80 and out["n_folds"] == 4 and out["n_resamples"] == 2000
    assert out["metrics"]["iou"]["diff"] == pytest.approx(0.8 * dice["diff"], abs=1e-5)
    assert (tmp_path / "cmp" / "compare_dice.png").stat().st_size > 0

    write_cv_per_case(_rows(fold, b), tmp_path / "C", {**LINEAGE, "split_sha256": "c" * 64})
    proc = _m2snet("compare", str(tmp_path / "A"), str(tmp_path / "C"), "--no-track", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot pair {tmp_path / 'A'} and {tmp_path / 'C'}: split sha256 differs: A {'a' * 64} vs B {'c' * 64}"]
    proc = _m2snet("compare", str(tmp_path / "A"), str(tmp_path / "nowhere"), "--no-track", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("bad, problem", [
    ("abc", "'abc' is not a number"), ("", "is empty"),
    ("nan", "'nan' is not a finite number (every paired case needs a score: re-evaluate the case or remove its row)")])
def test_compare_refuses_a_per_case_score_that_is_not_a_number_naming_file_row_column(tmp_path, bad, problem):
    """A metric cell that is text, NaN or empty is refused naming the file, its line and the column: a NaN
    would otherwise turn the interval into a silent NaN, and text into a traceback."""
    fold, a, b = _planted(0.05, n_per_fold=5, n_folds=2)
    write_cv_per_case(_rows(fold, a), tmp_path / "A", LINEAGE)
    rows = _rows(fold, b)
    rows[3]["iou"] = bad
    write_cv_per_case(rows, tmp_path / "B", LINEAGE)
    proc = _m2snet("compare", str(tmp_path / "A"), str(tmp_path / "B"), "--no-track", "--resamples", "200",
                   "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'B' / 'cv_per_case.csv'} line 5 (case case003), column 'iou': {problem}"]
    assert not (tmp_path / "cmp" / "compare.json").exists()


def test_gate_ci_rule_when_comparable_margin_rule_otherwise():
    policy = PromotionPolicy(floor=0.5, margin=0.02, require_ci=True)
    skill = dict(noskill=0.17, production_version="1")  # both well above no skill: only production decides
    # Comparable: the CI decides, whatever the margin says.
    ok, reason = decide_with_ci(0.71, 0.70, policy, (0.004, 0.016), **skill)
    assert ok and reason.startswith("statistical rule") and "lies above zero" in reason  # below the margin, but surely
    ok, reason = decide_with_ci(0.75, 0.70, policy, (-0.01, 0.11), **skill)
    assert not ok and "does not lie above zero" in reason  # beats the margin, but not surely
    # Not comparable: the margin rule, and the reason says so.
    ok, reason = decide_with_ci(0.75, 0.70, policy, None, "split sha256 differs", **skill)
    assert ok and "margin rule" in reason and "split sha256 differs" in reason
    ok, reason = decide_with_ci(0.71, 0.70, policy, None, "split sha256 differs", **skill)
    assert not ok and "margin" in reason
    # The floor and the no-skill rule still come first, whatever the CI says.
    assert not decide_with_ci(0.4, 0.3, policy, (0.05, 0.1), **skill)[0]
    ok, reason = decide_with_ci(0.71, 0.70, policy, (0.004, 0.016), noskill=0.69, production_version="1")
    assert not ok and reason.startswith("no-skill rule"), reason


def _register_cv(name: str, key: str, rows, lineage, cv_dice: float, tmp: Path) -> str:
    import mlflow

    from m2snet.mlops.registry import register_model_version

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [0.0] * len(model_input)

    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant())
        paths = write_cv_per_case(rows, tmp / key, lineage)
        for path in paths:
            mlflow.log_artifact(str(path), "cv")
    mv = register_model_version(info.model_uri, name, idempotency_key=key,
                                tags={"cv_dice": cv_dice, "noskill_dice": 0.17, **lineage})
    assert mv.run_id == run.info.run_id
    return str(mv.version)


def test_promote_with_the_statistical_gate_on_a_registry(tmp_path, monkeypatch):
    import mlflow

    from m2snet.mlops.registry import PRODUCTION, promote, version_by_alias

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    # The experiment through its public variable, undone with the test (not process-wide set_experiment).
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", mlflow.MlflowClient(uri).create_experiment("gate-test"))
    try:
        fold, a, b = _planted(0.01, n_per_fold=30, noise=0.005)
        name = "gate"
        v1 = _register_cv(name, "prod", _rows(fold, a), LINEAGE, 0.70, tmp_path)
        assert promote(name, v1, PromotionPolicy(floor=0.5)).promoted
        policy = PromotionPolicy(floor=0.5, margin=0.02, require_ci=True)
        # Surely better by 1 point (under the 2-point margin): the CI rule promotes it.
        v2 = _register_cv(name, "cand", _rows(fold, b), LINEAGE, 0.71, tmp_path)
        d = promote(name, v2, policy)
        assert d.promoted and "paired 95 % CI" in d.reason, d.reason
        assert str(version_by_alias(name, PRODUCTION).version) == v2
        # Another split: not comparable, the margin rule decides and says why.
        v3 = _register_cv(name, "other-split", _rows(fold, b + 0.05), {**LINEAGE, "split_sha256": "d" * 64},
                          0.72, tmp_path)
        d = promote(name, v3, policy)
        assert not d.promoted and "margin rule" in d.reason and "split sha256 differs" in d.reason, d.reason
    finally:
        mlflow.set_tracking_uri(None)


def test_pipeline_aggregate_joins_the_fold_reports(tmp_path):
    from m2snet.workflows.cv_summary import FOLD_INFO, collect_fold_reports

    reports = []
    for k in (0, 1):
        report = tmp_path / f"report{k}"
        report.mkdir()
        (report / "per_case.csv").write_text(f"case_id,label,dice,iou\nc{k}a,benign,0.5,0.4\nc{k}b,malignant,0.7,0.6\n")
        (report / FOLD_INFO).write_text(json.dumps({"fold": k, "seed": 7, **LINEAGE}))
        reports.append(str(report))
    per_case, lineage = collect_fold_reports(reports, tmp_path / "cv")
    lines = per_case.read_text().splitlines()
    assert lines[0] == "seed,fold,case_id,label,dice,iou" and lines[3] == "7,1,c1a,benign,0.5,0.4"
    assert json.loads(lineage.read_text())["split_sha256"] == LINEAGE["split_sha256"]


def test_cv_seeds_recorded_per_run_and_per_case(tmp_path, monkeypatch):
    """`run_cv(seeds=...)`: one fold run per seed with its seed as param and tag, the same validation cases
    for every seed (case_seed), and every seed's per-case scores in cv_per_case.csv."""
    from mlflow.tracking import MlflowClient

    from m2snet.data.demo import make_demo_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.data.split import make_split
    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.tracking import iter_child_runs
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.context import RunContext
    from m2snet.workflows.cv import run_cv
    from m2snet.workflows.folds import FoldOptions

    monkeypatch.chdir(tmp_path)
    make_demo_dataset(tmp_path / "raw", n_per_class=(3, 3, 2), size=64, seed=3)
    import_dataset("busi", tmp_path / "raw", tmp_path / "ds", progress=False)
    make_split(tmp_path / "ds", n_folds=2, seed=0, out=tmp_path / "split.json")
    cfg = TrainConfig(data=str(tmp_path / "ds"), split=str(tmp_path / "split.json"), epochs=1, batch_size=2, size=64,
                      pretrained=False, lossnet_weight=0.0, lossnet_pretrained=False, device="cpu", progress=False,
                      max_train_cases=2, max_val_cases=3, cache_dir=str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run_cv(cfg, tmp_path / "cv", folds=[0], seeds=[3, 4], options=FoldOptions(log_model=False),
                 ctx=RunContext(TrackingConfig(uri=uri, experiment="seeds")))
    client = MlflowClient(uri)
    children = {r.info.run_name: r for r in iter_child_runs(client, res.parent_run_id)}
    assert sorted(children) == ["seed-3-fold-0", "seed-4-fold-0"]
    for seed in (3, 4):
        run = children[f"seed-{seed}-fold-0"]
        assert run.data.params["seed"] == str(seed) and run.data.tags["m2snet.seed"] == str(seed)
        assert run.data.params["config.case_seed"] == str(cfg.seed)
    assert client.get_run(res.parent_run_id).data.params["seeds"] == "3,4"
    rows = (tmp_path / "cv" / "cv_per_case.csv").read_text().splitlines()
    assert rows[0].startswith("seed,fold,case_id,label,")
    by_seed = {s: sorted(r.split(",")[2] for r in rows[1:] if r.startswith(f"{s},")) for s in ("3", "4")}
    assert len(by_seed["3"]) == 3 and by_seed["3"] == by_seed["4"]  # the same cases for every seed
    arts = {a.path for a in client.list_artifacts(res.parent_run_id, "cv")}
    assert {"cv/cv_per_case.csv", "cv/cv_lineage.json"} <= arts
    assert res.summary.n_folds == 2  # seeds x folds rows in the table
    # One seed given: that seed trains, on the same cases.
    single = run_cv(cfg, tmp_path / "cv4", folds=[0], seeds=[4], options=FoldOptions(log_model=False),
                    ctx=RunContext(TrackingConfig(uri=uri, experiment="seeds")))
    (run,) = iter_child_runs(client, single.parent_run_id)
    assert run.data.params["seed"] == "4" and run.info.run_name == "fold-0"
    alone = (tmp_path / "cv4" / "cv_per_case.csv").read_text().splitlines()
    assert sorted(r.split(",")[2] for r in alone[1:] if r.startswith("4,")) == by_seed["4"]


def test_compare_logs_a_compare_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.workflows.comparison import compare_cv

    monkeypatch.chdir(tmp_path)
    fold, a, b = _planted(0.05, n_per_fold=10)
    write_cv_per_case(_rows(fold, a, seed=1) + _rows(fold, a + 0.01, seed=2), tmp_path / "A", LINEAGE)
    write_cv_per_case(_rows(fold, b), tmp_path / "B", LINEAGE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = compare_cv(str(tmp_path / "A"), str(tmp_path / "B"), tmp_path / "cmp", n_resamples=1000,
                     tracking=TrackingConfig(uri=uri, experiment=""))
    assert "A: each case averaged over 2 seeds (1, 2)" in res.report
    assert res.comparison.metrics["dice"].diff == pytest.approx(np.mean(b - a) - 0.005, abs=1e-5)
    run = MlflowClient(uri).get_run(res.run_id)
    assert run.data.tags["m2snet.kind"] == "compare" and run.data.params["split_sha256"] == LINEAGE["split_sha256"]
    assert run.data.metrics["dice_ci_low"] == pytest.approx(res.comparison.metrics["dice"].ci_low)
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "m2snet"
    arts = {f.path for f in MlflowClient(uri).list_artifacts(res.run_id, "compare")}
    assert arts == {"compare/compare_dice.png", "compare/compare.txt"}
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["run_id"] == res.run_id


def test_seeds_run_as_separate_jobs_join_with_plus(tmp_path):
    """`A42+A43` is one CV of two seeds: its cases are averaged over both before pairing; a seed in two
    parts or parts on two splits are refused."""
    from m2snet.errors import M2SNetError
    from m2snet.mlops.cv_results import load_cv_cases

    fold, a, b = _planted(0.05, n_per_fold=10)
    write_cv_per_case(_rows(fold, a, seed=42), tmp_path / "A42", LINEAGE)
    write_cv_per_case(_rows(fold, a + 0.02, seed=43), tmp_path / "A43", LINEAGE)
    joined = load_cv_cases(f"{tmp_path / 'A42'}+{tmp_path / 'A43'}")
    assert joined.seeds == ["42", "43"] and len(joined.rows) == 80
    scores = average_seeds(joined.rows)
    assert scores.n_seeds == 2
    np.testing.assert_allclose(scores.values["dice"], a + 0.01, atol=2e-6)

    with pytest.raises(M2SNetError, match="seed 42 is in both"):
        load_cv_cases(f"{tmp_path / 'A42'}+{tmp_path / 'A42'}")
    write_cv_per_case(_rows(fold, a, seed=44), tmp_path / "X", {**LINEAGE, "split_sha256": "c" * 64})
    with pytest.raises(M2SNetError, match="are not one CV"):
        load_cv_cases(f"{tmp_path / 'A42'}+{tmp_path / 'X'}")


def test_folds_run_in_separate_sittings_join_with_plus(tmp_path):
    """`F01+F23` is one CV whose folds ran as separate jobs (one seed): the joined CV holds every fold once and
    pairs like the CV run in one go; a fold in two parts is refused."""
    from m2snet.errors import M2SNetError
    from m2snet.mlops.cv_results import load_cv_cases

    fold, a, b = _planted(0.05, n_per_fold=10)
    rows = _rows(fold, a, seed=42)
    write_cv_per_case([r for r in rows if r["fold"] in "01"], tmp_path / "F01", LINEAGE)
    write_cv_per_case([r for r in rows if r["fold"] in "23"], tmp_path / "F23", LINEAGE)
    write_cv_per_case(rows, tmp_path / "ALL", LINEAGE)
    write_cv_per_case(_rows(fold, b, seed=42), tmp_path / "B", LINEAGE)
    joined = load_cv_cases(f"{tmp_path / 'F01'}+{tmp_path / 'F23'}")
    assert joined.seeds == ["42"] and sorted({r["fold"] for r in joined.rows}) == ["0", "1", "2", "3"]
    assert average_seeds(joined.rows).values["dice"].tolist() == average_seeds(
        load_cv_cases(str(tmp_path / "ALL")).rows).values["dice"].tolist()
    with pytest.raises(M2SNetError, match=r"seed 42 is in both .*F01 and .*ALL \(fold 0\)"):
        load_cv_cases(f"{tmp_path / 'F01'}+{tmp_path / 'ALL'}")


@pytest.mark.long
def test_pipeline_steps_repeat_the_cv_per_seed_on_one_split(tmp_path):
    """The pipeline's `seeds`: the split step fans out (seed, fold) tasks on ONE split; each seed's fold
    trains with its seed and the config's case seed; the aggregate step writes cv_per_case.csv with the
    seed column (what `m2snet compare` reads) and the table over seeds x folds."""
    from m2snet.mlops.cv_results import load_cv_cases
    from m2snet.workflows import steps

    data, _ = make_tiny_dataset(tmp_path, n_per_class=(2, 2, 2))
    split = tmp_path / "pipeline-split.json"
    tasks = steps.split_dataset(data, split, n_folds=2, seed=0, seeds="3,4")
    assert tasks == [{"fold": 0, "seed": 3}, {"fold": 1, "seed": 3}, {"fold": 0, "seed": 4}, {"fold": 1, "seed": 4}]
    assert steps.split_dataset(data, tmp_path / "one.json", n_folds=2, seed=0) == [
        {"fold": k, "seed": steps.NO_SEED} for k in (0, 1)]
    with pytest.raises(M2SNetError, match="distinct"):
        steps.split_dataset(data, tmp_path / "bad.json", n_folds=2, seed=0, seeds="3,3")
    overrides = json.dumps({"size": 64, "epochs": 1, "batch_size": 4, "max_train_cases": 4})
    metrics, reports = [], []
    for task in tasks[:1] + tasks[2:3]:  # fold 0 of each seed keeps the test short
        model = tmp_path / f"model-{task['seed']}"
        out = steps.train_fold_step(str(data), str(split), task["fold"], "", str(model), preset="tiny",
                                    train_overrides=overrides, seed=task["seed"])
        assert out["model_metadata"]["seed"] == task["seed"]
        config = json.loads((model / "train_config.json").read_text())
        assert config["seed"] == task["seed"] and config["case_seed"] == 42  # the cases stay the config's
        report = tmp_path / f"report-{task['seed']}"
        metrics.append(steps.evaluate_fold_step(str(data), str(split), task["fold"], str(model), str(report)))
        reports.append(str(report))
    cv = steps.aggregate_step(metrics, str(tmp_path / "cv"), report_dirs=reports)
    assert "cv_dice_mean" in cv
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert [(r["seed"], r["fold"]) for r in summary["per_fold"]] == [(3, 0), (4, 0)]
    # The table says what its rows are: one fold, twice (not "2 folds").
    assert (tmp_path / "cv" / "cv_table.md").read_text().startswith("| 1 fold x 2 seeds, project protocol |")
    cases = load_cv_cases(str(tmp_path / "cv"))
    assert sorted(map(str, cases.seeds)) == ["3", "4"] and {str(r["seed"]) for r in cases.rows} == {"3", "4"}
