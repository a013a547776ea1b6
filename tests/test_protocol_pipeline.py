"""The fixed-split pipeline (issue 20): compiled YAML, thin components, a local run on a PraNet-shaped
layout with two test sets (one row each + the no-skill rows in MLflow), and paper-compare on a CV."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from m2snet.kubeflow.image import COMPONENT_IMAGE
from tests.test_protocols import _pair, _save

PRANET_TWO_TESTS = (("TrainDataset", 6), ("TestDataset/CVC-300", 2), ("TestDataset/Kvasir", 3))


@pytest.fixture(scope="module")
def fresh_yaml(tmp_path_factory):
    from m2snet.kubeflow.pipelines.protocol import compile_pipeline

    return compile_pipeline(tmp_path_factory.mktemp("compile") / "protocol.yaml")


def test_committed_protocol_yaml_is_not_stale(fresh_yaml):
    from m2snet.kubeflow.pipelines.protocol import COMPILED

    assert COMPILED.is_file() and COMPILED.read_text() == fresh_yaml.read_text(), (
        f"{COMPILED} is stale: run `m2snet pipeline compile` and commit it")


def test_protocol_yaml_is_a_pipeline_with_gpu_training_and_per_protocol_defaults(fresh_yaml):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from m2snet.workflows.presets import PRESETS

    docs = list(yaml.safe_load_all(fresh_yaml.read_text()))
    spec, platform = docs[0], docs[1]
    assert json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec()).pipeline_info.name == "m2snet-protocol"
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {COMPONENT_IMAGE}
    assert [n for n, e in executors.items() if "accelerator" in e["container"].get("resources", {})] == [
        "exec-train-protocol"]
    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(body) == {"prepare-dataset", "split-protocol", "train-protocol", "evaluate-test-sets",
                         "register-protocol", "promote-model"}
    # promote takes the registered name (m2snet-<protocol> unless given) and version from register.
    promote = body["promote-model"]["inputs"]["parameters"]
    assert promote["model_name"]["taskOutputParameter"] == {"outputParameterKey": "model_name",
                                                             "producerTask": "register-protocol"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["protocol"]["defaultValue"] == "polyp" and params["importer"]["defaultValue"] == "pranet"
    assert params["promote_floor"]["defaultValue"] == PRESETS["polyp"].promotion.floor
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train-protocol"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert all(k8s[n]["securityContext"]["runAsNonRoot"] for n in executors)
    for name in ("polyp", "polyp-video", "covid", "oct"):
        assert PRESETS[name].train["size"] == 352


def test_protocol_components_are_thin_and_run_alone():
    from m2snet.kubeflow.components import protocol as components

    for name in components.__all__:
        comp = getattr(components, name)
        source = textwrap.dedent(inspect.getsource(comp.python_func))
        tree = ast.parse(source)
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        # The step itself, the task's announcement to the local console (its progress events), and the
        # masking of credentials in what it logs.
        assert [(i.module, [a.name for a in i.names]) for i in imports] == [
            ("m2snet.progress", ["task_started"]), ("m2snet.redaction", ["install_redaction"]),
            ("m2snet.workflows", ["protocols"])]
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and isinstance(n.func.value, ast.Name) and n.func.value.id == "protocols"]
        announced = [n for n in ast.walk(tree)
                     if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "task_started"]
        assert len(calls) == 1 and len(announced) == 1 and len(tree.body[0].body) <= 9, name
        namespace: dict = {}
        exec("import kfp\nfrom kfp import dsl\nfrom kfp.dsl import *\nfrom typing import *\n"
             + "\n".join(line for line in source.splitlines() if not line.startswith("@")), namespace)
        assert callable(namespace[name]), name


@pytest.fixture
def pranet_two_tests(tmp_path) -> Path:
    """A raw PraNet layout: 6 training images and two test subsets (CVC-300: 2, Kvasir: 3)."""
    seed = 0
    for folder, n in PRANET_TWO_TESTS:
        for i in range(n):
            image, mask = _pair(200 + seed)
            seed += 1
            _save(tmp_path / "src" / folder / "images" / f"{i + 1}.png", image)
            _save(tmp_path / "src" / folder / "masks" / f"{i + 1}.png", mask)
    return tmp_path / "src"


@pytest.mark.long
def test_local_protocol_pipeline_logs_one_row_per_test_set_and_no_skill(pranet_two_tests, tmp_path, monkeypatch):
    """`m2snet pipeline run --local --protocol polyp --preset tiny` on the kfp local runner: import, the
    PraNet split, 1 epoch at 64 px, both test sets and their no-skill rows on the parent run, a version of
    m2snet-polyp registered, and the promotion gate decided on its mean Dice vs no skill."""
    from mlflow import MlflowClient

    from m2snet.cli import app
    from m2snet.mlops.promotion_gate import NOSKILL_TAG, SCORE_TAG

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res = CliRunner().invoke(app, ["pipeline", "run", "--local", "--protocol", "polyp", "--preset", "tiny",
                                   "--data", str(pranet_two_tests), "--work-dir", str(tmp_path / "work"),
                                   "--set", "batch_size=2", "--set", "device=cpu"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert "model m2snet-polyp version 1" in res.output
    # The CV pipeline's console: a line per task from the protocol pipeline's own display names, each
    # task's output in its own log file (the runner's raw stream is not shown).
    for label in ("prepare + validate", "split", "train", "evaluate test sets", "register", "promote", "finalize"):
        assert any(line.split("]", 1)[-1].strip().startswith(label) and "done in" in line
                   for line in res.output.splitlines()), (label, res.output)
    assert "executor_input" not in res.output
    assert len(list((tmp_path / "work" / "logs").glob("*/train-protocol.log"))) == 1
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("m2snet-polyp", "1")
    parent = client.get_run(version.run_id)
    metrics = parent.data.metrics
    for name in ("CVC-300", "Kvasir", "mean"):
        assert 0.0 <= metrics[f"{name}_dice"] <= 1.0 and f"{name}_noskill_dice" in metrics, name
    assert metrics["CVC-300_n_cases"] == 2 and metrics["Kvasir_n_cases"] == 3
    assert metrics["Kvasir_noskill_dice"] == 0.0  # every synthetic case has a lesion: all background scores 0
    assert parent.data.params["protocol"] == "polyp" and parent.data.params["test_sets"] == "CVC-300,Kvasir"
    assert parent.info.status == "FINISHED"
    # The description: one row per test set and the mean, each followed by its no-skill row, then the paper.
    note = parent.data.tags["mlflow.note.content"]
    rows = [line.split("|")[1].strip() for line in note.splitlines() if line.startswith("| ")]
    assert rows[:7] == ["polyp", "CVC-300", "CVC-300: no skill", "Kvasir", "Kvasir: no skill", "mean",
                        "mean: no skill"]
    assert "| CVC-300 (CVC-T) | dice |" in note and "train_cases=6" in note and "pretrained=False" in note
    assert "| Kvasir: no skill | 3 | 0.000 |" in res.output
    # The version carries the gate's scores (fractions): the mean Dice and the no-skill predictor's.
    assert float(version.tags[SCORE_TAG]) == pytest.approx(metrics["mean_dice"], abs=1e-6)
    assert float(version.tags[NOSKILL_TAG]) == pytest.approx(metrics["mean_noskill_dice"], abs=1e-6)
    beats = metrics["mean_dice"] >= metrics["mean_noskill_dice"] + 0.05  # tiny: floor 0, no-skill margin 0.05
    assert version.tags["promotion_decision"].startswith("promoted" if beats else "rejected: no-skill rule")


def test_paper_compare_reads_a_cv_output_directory(tmp_path):
    """`m2snet paper-compare CV_DIR --protocol busi` on a real (tiny) `m2snet cv` output: ours beside Tab. 4
    with the difference, the no-skill column and the budget (epochs, size, training cases, seeds, pretrained);
    the same from its cv_per_case.csv alone."""
    import shutil

    from m2snet.cli import app
    from tests.conftest import make_tiny_dataset

    ds, split = make_tiny_dataset(tmp_path, n_per_class=(3, 3, 2))
    runner = CliRunner()
    res = runner.invoke(app, ["cv", "--data", str(ds), "--split", str(split), "--epochs", "1", "--size", "64",
                              "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "cv"), "--no-track",
                              "--set", "pretrained=false", "--set", "lossnet_weight=0", "--set", "progress=false",
                              "--set", "lossnet_pretrained=false", "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    res = runner.invoke(app, ["paper-compare", str(tmp_path / "cv"), "--protocol", "busi",
                              "--out", str(tmp_path / "busi.md")])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    dice, noskill = summary["mean_percent"]["dice"], summary["mean_percent"]["noskill_dice"]
    diff = dice - 79.21
    assert (f"| BUSI | dice | {dice:.2f} | {noskill:.2f} | 79.21 | {'+' if diff >= 0 else '-'}{abs(diff):.2f} |"
            in res.output)
    # 8 cases, 2 folds of 4: each fold trains on the other 4.
    assert "epochs=1, size=64, train_cases=4, seeds=42, pretrained=False" in res.output
    assert "folds=2 of 2" in res.output and (tmp_path / "busi.md").read_text().strip() == res.output.strip()
    # Only the per-case file left (a study's copy): the model's rows rebuilt, the same Dice; the no-skill
    # column from each case's lesion flag, the same as the CV computed.
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(tmp_path / "cv" / "cv_per_case.csv", only)
    res = runner.invoke(app, ["paper-compare", str(only), "--protocol", "busi"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert f"| BUSI | dice | {dice:.2f} | {noskill:.2f} | 79.21 |" in res.output and "epochs=unknown" in res.output
    fold0 = json.loads((tmp_path / "cv" / "fold0" / "fold_result.json").read_text())
    assert fold0["pretrained_source"] == "none (random init)"  # pretrained=false: what the budget can name later


def test_covid_takes_the_infnet_test_list_as_an_id_file(tmp_path):
    """Inf-Net's 48 test slices are not shipped: `--test COVID=ids:FILE` replaces the seeded 50/48 fallback,
    every other case training; the CLI refuses --train without --test."""
    from m2snet.cli import app
    from m2snet.data.importers import import_dataset
    from m2snet.workflows.protocols import get_protocol, protocol_split

    for i in range(6):
        image, mask = _pair(300 + i)
        _save(tmp_path / "src" / "images" / f"slice{i}.png", image)
        _save(tmp_path / "src" / "masks" / f"slice{i}.png", mask)
    info = import_dataset("folder", tmp_path / "src", tmp_path / "data", progress=False)
    ids = sorted(c.case_id for c in info.cases)
    (tmp_path / "infnet-test.txt").write_text("\n".join(ids[:2]) + "\n")
    covid = get_protocol("covid")
    assert "--test COVID=ids:FILE" in covid.notes
    split = protocol_split(covid, tmp_path / "data", out=tmp_path / "s.json",
                           options={"tests": {"COVID": f"ids:{tmp_path / 'infnet-test.txt'}"}})
    assert split.test_sets == {"COVID": ids[:2]} and split.fold(0).train == ids[2:]
    res = CliRunner().invoke(app, ["data", "split", str(tmp_path / "data"), "--protocol", "fixed", "--test",
                                   f"COVID=ids:{tmp_path / 'infnet-test.txt'}", "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 0 and "train: 4 cases, val: 0 cases\ntest COVID: 2 cases" in res.output, res.output
    res = CliRunner().invoke(app, ["benchmark", str(tmp_path / "data"), "--protocol", "covid", "--train", "rest",
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code != 0 and "--test NAME=SELECTOR" in str(res.exception)
    res = CliRunner().invoke(app, ["data", "split", str(tmp_path / "data"), "--protocol", "fixed", "--test", "COVID"])
    assert res.exit_code != 0 and "expected NAME=SELECTOR" in str(res.exception)


def test_the_cv_protocol_is_not_the_fixed_split_pipeline(tmp_path):
    from m2snet.cli import app
    from m2snet.errors import M2SNetError
    from m2snet.kubeflow.runner import LocalRunOptions

    with pytest.raises(M2SNetError, match="k-fold CV: run `m2snet pipeline run --local --preset busi`"):
        LocalRunOptions.for_protocol("busi", work_dir=tmp_path)
    with pytest.raises(M2SNetError, match="unknown protocol"):
        LocalRunOptions.for_protocol("lung", work_dir=tmp_path)
    options = LocalRunOptions.for_protocol("polyp", work_dir=tmp_path, seed=7)
    assert (options.preset, options.importer, options.model_name, options.seed) == (
        "polyp", "pranet", "m2snet-polyp", 7)
    res = CliRunner().invoke(app, ["pipeline", "run", "--local", "--protocol", "polyp", "--folds", "3",
                                   "--work-dir", str(tmp_path / "w")])
    assert res.exit_code != 0 and "--folds: CV options" in str(res.exception) and not (tmp_path / "w").exists()
