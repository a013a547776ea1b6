"""The Kubeflow pipeline definition: compiled YAML up to date and well-formed, thin components, submit."""

from __future__ import annotations

import ast
import http.server
import inspect
import textwrap
import threading

import pytest
import yaml
from typer.testing import CliRunner

from m2snet.errors import M2SNetError
from m2snet.kubeflow.cluster import compile_pipeline, compiled_pipeline_path, parse_params, submit
from m2snet.kubeflow.image import COMPONENT_IMAGE
from m2snet.processes import free_port
from m2snet.workflows.presets import PRESETS, train_config


def _spec(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


@pytest.fixture(scope="module")
def fresh_yaml(tmp_path_factory):
    return compile_pipeline(tmp_path_factory.mktemp("compile") / "busi_cv.yaml")


def test_committed_yaml_is_not_stale(fresh_yaml):
    committed = compiled_pipeline_path()
    assert committed.is_file(), "m2snet/kubeflow/pipelines/busi_cv.yaml missing: run `m2snet pipeline compile`"
    assert committed.read_text() == fresh_yaml.read_text(), (
        "m2snet/kubeflow/pipelines/busi_cv.yaml is stale: run `m2snet pipeline compile` and commit it")


def test_yaml_is_a_pipeline_spec_with_gpu_training(fresh_yaml):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    spec, platform = _spec(fresh_yaml)
    # Strict proto parse: unknown or mistyped fields fail here.
    parsed = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    assert parsed.pipeline_info.name == "m2snet-busi-cv"

    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {COMPONENT_IMAGE}
    train = executors["exec-train-fold"]["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert str(train["accelerator"]["resourceCount"]) == "1"
    assert "resourceMemoryLimit" in train and "resourceCpuLimit" in train
    # Only training asks for a GPU.
    others = [n for n, e in executors.items() if "accelerator" in e["container"].get("resources", {})]
    assert others == ["exec-train-fold"]

    # The fold loop: ParallelFor over the split's fold list, with nested tuning -> train -> evaluate
    # inside (each fold tunes on its own inner split) and retries on train.
    loop = next(c for n, c in spec["components"].items() if n.startswith("comp-for-loop"))
    assert set(loop["dag"]["tasks"]) == {"tune-hyperparameters", "train-fold", "evaluate-fold"}
    assert loop["dag"]["tasks"]["tune-hyperparameters"]["inputs"]["parameters"]["fold"]
    assert loop["dag"]["tasks"]["train-fold"]["retryPolicy"]["maxRetryCount"] == 2
    # An exit handler closes the MLflow parent run whatever happens: the steps run inside its group,
    # the finalize task after it, even when a step failed.
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finalize-run"}
    assert root["finalize-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert root["finalize-run"]["inputs"]["parameters"]["status"]["taskFinalStatus"]["producerTask"] == "exit-handler-1"
    assert spec["root"]["outputDefinitions"]["parameters"]["Output"]  # the registered version, from finalize
    root_tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    loop_task = next(t for n, t in root_tasks.items() if n.startswith("for-loop"))
    assert loop_task["parameterIterator"]["items"]["inputParameter"]
    assert {"prepare-dataset", "split-dataset", "aggregate-cv", "register-model",
            "promote-model"} <= set(root_tasks) and "tune-hyperparameters" not in root_tasks
    # Collected fan-in: aggregate and register consume the loop's outputs.
    assert "fold_metrics" in root_tasks["aggregate-cv"]["inputs"]["artifacts"]
    assert "models" in root_tasks["register-model"]["inputs"]["artifacts"]
    # Every task reads the MLflow credentials from the Secret on the cluster.
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in executors:
        secrets = {s.get("secretName") or s.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant")
                   for s in k8s[name]["secretAsEnv"]}
        assert {"mlflow-client", "s3-credentials"} <= secrets, name
        # ... and runs as the image's non-root user (docker/Dockerfile's USER).
        assert k8s[name]["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}, name
    assert k8s["exec-train-fold"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_components_are_thin():
    """Each component body masks credentials in what the task logs (m2snet.redaction.install_redaction: a pod's
    log on a cluster as the CLI's console), announces itself to the local console (m2snet.progress.task_started,
    under its own component name: the key the console's plan gives it) and calls exactly one
    m2snet.workflows.steps function."""
    from m2snet.kubeflow import components

    for name in components.__all__:
        comp = getattr(components, name)
        tree = ast.parse(textwrap.dedent(inspect.getsource(comp.python_func)))
        body = tree.body[0].body
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert [(i.module, [a.name for a in i.names]) for i in imports] == [
            ("m2snet.progress", ["task_started"]), ("m2snet.redaction", ["install_redaction"]),
            ("m2snet.workflows", ["steps"])], name
        assert any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "install_redaction"
                   for n in ast.walk(tree)), name
        (announce,) = [n for n in ast.walk(tree)
                       if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "task_started"]
        assert announce.args[0].value == comp.component_spec.name, name
        naming = set(ast.walk(announce))  # steps.loop_item(fold, seed) only names the task
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and isinstance(n.func.value, ast.Name) and n.func.value.id == "steps" and n not in naming]
        assert len(calls) == 1, f"{name} calls {len(calls)} library functions"
        assert len(body) <= 9, f"{name}: {len(body)} statements; move logic into m2snet.workflows.steps"
        assert comp.component_spec.implementation.container.image == COMPONENT_IMAGE


def test_component_sources_run_alone():
    """kfp ships each component's source without its module: the signature may name nothing of it
    (a default like ``metric_protocol=DEFAULT_PROTOCOL`` is a NameError in the task)."""
    from m2snet.kubeflow import components

    for name in components.__all__:
        source = textwrap.dedent(inspect.getsource(components.__dict__[name].python_func))
        source = "\n".join(line for line in source.splitlines() if not line.startswith("@"))
        # what kfp's executor puts above the function (its ephemeral_component.py)
        namespace: dict = {}
        exec("import kfp\nfrom kfp import dsl\nfrom kfp.dsl import *\nfrom typing import *\n" + source, namespace)
        assert callable(namespace[name]), name


def test_presets_build_valid_training_configs():
    for name, preset in PRESETS.items():
        cfg = train_config(name, '{"epochs": 3}', data="d", split="s.json", fold=1, out_dir="o")
        assert cfg.epochs == 3 and cfg.fold == 1, name
        assert preset.n_trials >= 1 and preset.n_folds == 4
    with pytest.raises(M2SNetError, match="unknown pipeline preset"):
        train_config("nope")
    with pytest.raises(M2SNetError, match="unknown training option"):
        train_config("tiny", '{"epoch": 3}')
    with pytest.raises(M2SNetError, match="JSON"):
        train_config("tiny", "{epochs: 3")
    # The pipeline's train_overrides are checked by the same schema as --set and config files.
    with pytest.raises(M2SNetError, match="multiscale='sometimes': input should be a valid boolean"):
        train_config("tiny", '{"multiscale": "sometimes"}')


def test_param_parsing_is_typed_and_checked():
    got = parse_params(["n_folds=5", "promote_floor=0.7", "preset=busi", "dvc_rev=v1.2"])
    assert got == {"n_folds": 5, "promote_floor": 0.7, "preset": "busi", "dvc_rev": "v1.2"}
    with pytest.raises(M2SNetError, match="not a parameter"):
        parse_params(["folds=5"])
    with pytest.raises(M2SNetError, match="integer"):
        parse_params(["n_folds=five"])
    with pytest.raises(M2SNetError, match="NAME=VALUE"):
        parse_params(["n_folds"])


class _NotKfp(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # http.server API name
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_submit_fails_clearly_when_the_host_is_unreachable_or_not_kfp():
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(M2SNetError, match="unreachable"):
        submit(dead, timeout_s=2)
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(M2SNetError, match="does not look like a Kubeflow Pipelines"):
            submit(f"http://127.0.0.1:{server.server_port}", timeout_s=2)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(M2SNetError, match="http"):
        submit("ftp://example.org")


def test_cli_submit_and_run_argument_errors():
    from m2snet.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["pipeline", "submit", "--host", f"http://127.0.0.1:{free_port()}",
                              "--param", "n_folds=3", "--run-name", "x"])
    assert res.exit_code != 0 and "unreachable" in str(res.exception)
    res = runner.invoke(app, ["pipeline", "submit", "--host", "http://h", "--param", "bogus=1"])
    assert "not a parameter" in str(res.exception)
    res = runner.invoke(app, ["pipeline", "run"])
    assert "--local" in str(res.exception)
    res = runner.invoke(app, ["pipeline", "run", "--local", "--importer", "nope"])
    assert "unknown layout" in str(res.exception) and "kvasir" in str(res.exception)
    res = runner.invoke(app, ["pipeline", "compile", "--check"])
    assert res.exit_code == 0, res.output


def test_cluster_defaults_are_the_busi_preset(fresh_yaml):
    spec, _ = _spec(fresh_yaml)
    params = spec["root"]["inputDefinitions"]["parameters"]
    busi = PRESETS["busi"]
    assert params["preset"]["defaultValue"] == "busi"
    assert params["promote_floor"]["defaultValue"] == busi.promotion.floor
    assert params["promote_margin"]["defaultValue"] == busi.promotion.margin
    assert params["n_folds"]["defaultValue"] == busi.n_folds


def test_importer_reaches_the_prepare_step(fresh_yaml):
    """`--importer` is a pipeline parameter that the prepare task receives (any raw layout, not only BUSI)."""
    spec, _ = _spec(fresh_yaml)
    assert spec["root"]["inputDefinitions"]["parameters"]["importer"]["defaultValue"] == "busi"
    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    given = body["prepare-dataset"]["inputs"]["parameters"]["importer"]["componentInputParameter"]
    assert given == "pipelinechannel--importer"
    assert "importer" in spec["components"]["comp-prepare-dataset"]["inputDefinitions"]["parameters"]
