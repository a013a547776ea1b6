"""Serving the production model: `mlflow models serve` answers a PNG with its mask; `m2snet predict` writes files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def production_model(tmp_path_factory):
    """A 1-epoch tiny model, logged as the pyfunc, registered and promoted to `production` (SQLite store)."""
    import mlflow

    from m2snet.data.demo import make_demo_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.data.split import make_split
    from m2snet.mlops.promotion_gate import PromotionPolicy
    from m2snet.mlops.pyfunc_logging import log_segmentation_model
    from m2snet.mlops.registry import promote, register_model_version
    from m2snet.training.trainer import train
    from m2snet.workflows.presets import train_config

    root = tmp_path_factory.mktemp("serving")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(root)
    mlflow.set_tracking_uri(uri)
    make_demo_dataset(root / "raw", n_per_class=3, size=64)
    import_dataset("busi", root / "raw", root / "ds", progress=False)
    make_split(root / "ds", n_folds=2, seed=0, out=root / "split.json")
    cfg = train_config("tiny", data=str(root / "ds"), split=str(root / "split.json"), fold=0,
                       out_dir=str(root / "fold0"))
    result = train(cfg)
    # The experiment through its public variable, undone with the fixture (not process-wide set_experiment).
    mp.setenv("MLFLOW_EXPERIMENT_ID", mlflow.MlflowClient(uri).create_experiment("serving-test"))
    with mlflow.start_run() as run:
        info = log_segmentation_model([result.checkpoint], run_id=run.info.run_id)
    mv = register_model_version(info.model_uri, "serve-test", idempotency_key="serving-fixture",
                                tags={"cv_dice": 0.9, "noskill_dice": 0.2})
    assert promote("serve-test", mv.version, PromotionPolicy(floor=0.0)).promoted
    yield {"uri": uri, "root": root, "image": root / "raw" / "benign" / "benign (1).png",
           "checkpoint": result.checkpoint}
    mlflow.set_tracking_uri(None)
    mp.undo()


def test_mlflow_models_serve_returns_a_mask(production_model):
    from m2snet.mlops.serving import request_masks, start_model_server

    image_path = production_model["image"]
    size = Image.open(image_path).size
    # A second, differently sized image: masks come back at each input's own size.
    other = Image.open(image_path).resize((80, 56))
    buf = io.BytesIO()
    other.save(buf, format="PNG")
    server = start_model_server("models:/serve-test@production", workdir=production_model["root"] / "serve",
                                env={"MLFLOW_TRACKING_URI": production_model["uri"]})
    try:
        masks = request_masks(server.url, [image_path, buf.getvalue()])
    finally:
        server.stop()
    assert not server.process.alive()
    assert masks[0].shape[:2] == (size[1], size[0])
    assert masks[1].shape[:2] == (56, 80)
    assert set(np.unique(masks[0])) <= {0, 255}


def test_predict_cli_writes_masks_and_overlays(production_model, tmp_path):
    from typer.testing import CliRunner

    from m2snet.cli import app

    folder = production_model["root"] / "raw" / "malignant"
    res = CliRunner().invoke(app, ["predict", str(folder), str(production_model["image"]),
                                   "--model", "models:/serve-test@production", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    masks = sorted(tmp_path.glob("*_mask.png"))
    overlays = sorted(tmp_path.glob("*_overlay.png"))
    assert len(masks) == len(overlays) == 4  # 3 malignant images (their *_mask files skipped) + 1 benign
    for m in masks:
        src = next(p for p in [*folder.iterdir(), production_model["image"]] if p.stem + "_mask" == m.stem)
        assert Image.open(m).size == Image.open(src).size
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "missing.png"),
                                   "--model", "models:/serve-test@production"])
    assert res.exit_code != 0 and "no such image" in str(res.exception)


def test_overlay_marks_the_mask_outline():
    from m2snet.mlops.serving import OVERLAY_COLOR, overlay

    image = np.zeros((9, 9, 3), np.uint8)
    mask = np.zeros((9, 9), np.uint8)
    mask[2:7, 2:7] = 255
    out = overlay(image, mask)
    assert tuple(out[2, 2]) == OVERLAY_COLOR  # outline: solid colour
    assert 0 < out[4, 4, 0] < OVERLAY_COLOR[0]  # inside: blended
    assert tuple(out[0, 0]) == (0, 0, 0)  # background untouched


def test_a_registered_model_is_downloaded_once_and_leaves_no_temporary_copy(production_model, tmp_path,
                                                                           monkeypatch):
    """mlflow.pyfunc.load_model(uri) alone downloads into a new temporary directory on every call and
    never removes it (a copy of the ensemble per prediction); the serving path keeps one copy per
    model version in the cache and reuses it."""
    import tempfile

    from m2snet.mlops.serving import load_model, local_model_dir

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where mkdtemp/mkstemp would leave copies
    cache = tmp_path / "cache"
    first = local_model_dir("models:/serve-test@production", cache)
    assert (first / "MLmodel").is_file() and first.parent.name.startswith("serve-test-v1-")
    stamp = (first / "MLmodel").stat().st_mtime_ns
    model = load_model("models:/serve-test@production", cache)
    assert local_model_dir("models:/serve-test/1", cache) == first  # the alias and the version: one copy
    assert (first / "MLmodel").stat().st_mtime_ns == stamp  # reused, not downloaded again
    assert [p.name for p in (cache / "models").iterdir()] == [first.parent.name]
    assert list(temp.iterdir()) == []
    assert model.metadata is not None



def test_readme_serve_command_works_without_activating_the_virtualenv(production_model, tmp_path):
    """`mlflow models serve` (which `m2snet serve` runs) starts `uvicorn` by name: the README's command must find
    the virtualenv's copy when the virtualenv was never activated (it failed with "uvicorn: not found")."""
    import os
    import re
    import subprocess
    import sys
    import time
    from pathlib import Path

    import requests

    from m2snet.processes import free_port

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"`([^`]*m2snet serve --model models:/m2snet-busi@production[^`]*)`", readme).group(1)
    port = free_port()
    command = command.replace("m2snet-busi", "serve-test").replace("--port 5001", f"--port {port}")
    # A checkout whose .venv is this interpreter's environment; a shell whose PATH does not hold it.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)
    bare_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                if Path(p).resolve() != Path(sys.executable).parent.resolve())
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PATH=bare_path, MLFLOW_TRACKING_URI=production_model["uri"])
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=checkout, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        assert proc.poll() is None, f"{command} exited: {log.read_text()[-2000:]}"
        assert requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def _main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run the real entry point (m2snet.cli:main, with its error boundary); exit code and stderr."""
    import sys

    from m2snet.cli import main

    monkeypatch.setattr(sys, "argv", ["m2snet", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_scoring_server_answers_413_and_400_with_one_line(production_model, monkeypatch, tmp_path):
    """MLflow's own scoring app (what `mlflow models serve` runs), in-process: an image above
    M2SNET_MAX_PIXELS is 413 and an undecodable one 400, each with a one-line message and no stack trace."""
    import json

    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    from m2snet.mlops.pyfunc_io import encode_image
    from m2snet.mlops.serving import load_model

    client = TestClient(scoring_server.init(load_model("models:/serve-test@production", tmp_path / "cache")))
    png = production_model["image"].read_bytes()

    def post(data: bytes):
        body = {"dataframe_split": {"columns": ["image"], "data": [[encode_image(data)]]}}
        return client.post("/invocations", json=body)

    assert post(png).status_code == 200
    monkeypatch.setenv("M2SNET_MAX_PIXELS", "100")
    too_large = post(png)
    monkeypatch.delenv("M2SNET_MAX_PIXELS")
    truncated = post(png[: len(png) // 2])
    for reply, status, start in ((too_large, 413, "row 0: image is 64x64 = 4096 pixels, above the limit of 100"),
                                 (truncated, 400, "row 0: cannot decode image")):
        body = reply.json()
        assert reply.status_code == status and body["message"].startswith(start), reply.text
        assert "\n" not in body["message"] and "stack_trace" not in body and "Traceback" not in json.dumps(body)


def test_predict_scales_a_16bit_grey_png_like_its_8bit_picture(production_model, tmp_path):
    from m2snet.mlops.serving import load_model, predict_files

    grey = np.asarray(Image.open(production_model["image"]).convert("L"))
    (tmp_path / "in8").mkdir(), (tmp_path / "in16").mkdir()
    Image.fromarray(grey).save(tmp_path / "in8" / "x.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "in16" / "x.png")
    model = load_model("models:/serve-test@production", tmp_path / "cache")
    eight = predict_files("", [tmp_path / "in8"], tmp_path / "out8", model=model)[0]
    sixteen = predict_files("", [tmp_path / "in16"], tmp_path / "out16", model=model)[0]
    assert np.array_equal(np.asarray(Image.open(sixteen.overlay)), np.asarray(Image.open(eight.overlay)))


def test_predict_on_a_corrupt_image_names_it_and_writes_nothing(production_model, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(production_model["image"].read_bytes())
    (folder / "b.png").write_bytes(production_model["image"].read_bytes()[:100])  # truncated
    out = tmp_path / "out"
    code, err = _main(["predict", str(folder), "--model", "models:/serve-test@production", "--out", str(out),
                       "--batch-size", "1"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and f"error: {folder / 'b.png'}: cannot decode image" in err, err
    assert not out.exists() or list(out.iterdir()) == []


def test_predict_into_an_impossible_out_folder_is_one_line(production_model, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _main(["predict", str(production_model["image"]), "--model", "models:/serve-test@production",
                       "--out", str(blocker / "sub")], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("predict")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: --out {blocker / 'sub'}: "), err


def test_concurrent_downloads_of_one_model_share_one_complete_copy(production_model, tmp_path):
    """Two `m2snet predict` processes starting at once download the same registered model into the
    shared cache: both must succeed and end with the one complete copy (first writer wins; before the
    cache was shared, the second would fail on the first's lock or replace a copy being read)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cache = tmp_path / "cache"
    # A barrier after the (slow, variable) imports, so the two downloads really overlap.
    code = ("import sys, time, pathlib; from m2snet.mlops.serving import local_model_dir\n"
            "ready = pathlib.Path(sys.argv[2]); (ready / sys.argv[3]).touch()\n"
            "while len(list(ready.iterdir())) < 2: time.sleep(0.01)\n"
            "print(local_model_dir('models:/serve-test@production', sys.argv[1]))")
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": production_model["uri"]}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache), str(ready), str(i)], env=env,
                              cwd=production_model["root"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    dirs = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(dirs) == 1 and (Path(dirs.pop()) / "MLmodel").is_file()
    leftovers = [p.name for p in (cache / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_m2snet_serve_answers_as_the_version_the_alias_named_at_start_and_a_restart_follows_promote_and_rollback(
        production_model, tmp_path):
    """The cluster's roll-forward/back mechanism, end to end on loopback: `m2snet serve` resolves the alias once;
    promote v2 -> the running server still answers as v1, a restarted one as v2; rollback -> restart -> v1."""
    import mlflow
    import requests

    from m2snet.mlops.promotion_gate import PromotionPolicy
    from m2snet.mlops.pyfunc_logging import log_segmentation_model
    from m2snet.mlops.registry import promote, register_model_version, rollback
    from m2snet.mlops.services import ManagedProcess
    from m2snet.mlops.serving import request_predictions
    from m2snet.processes import find_tool, free_port

    env = {"MLFLOW_TRACKING_URI": production_model["uri"], "M2SNET_CACHE_DIR": str(tmp_path / "cache")}
    client = mlflow.MlflowClient()
    v1 = client.get_model_version_by_alias("serve-test", "production").version

    def served_version() -> str:
        port = free_port()
        proc = ManagedProcess("m2snet serve", [find_tool("m2snet"), "serve", "--model", "models:/serve-test@production",
                                               "--port", str(port)], tmp_path / f"serve-{port}.log", env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            proc.wait_ready(lambda: requests.get(f"{url}/ping", timeout=2).status_code == 200, 180, f"{url}/ping")
            rows = request_predictions(url, [production_model["image"]])
        finally:
            proc.stop()
        assert not proc.alive()
        assert rows[0]["mask"].ndim >= 2
        return rows[0]["model_version"]

    assert served_version() == f"serve-test/{v1}"
    with mlflow.start_run():
        info = log_segmentation_model([production_model["checkpoint"]])
    v2 = register_model_version(info.model_uri, "serve-test", idempotency_key="serving-v2",
                                tags={"cv_dice": 0.95, "noskill_dice": 0.2}).version
    try:
        assert promote("serve-test", v2, PromotionPolicy(floor=0.0, margin=0.0)).promoted
        assert served_version() == f"serve-test/{v2}"
        rollback("serve-test")
        assert served_version() == f"serve-test/{v1}"
    finally:  # the module's other tests serve the production alias: leave it where it was
        client.set_registered_model_alias("serve-test", "production", v1)


def test_pixel_batches_bound_images_and_pixels():
    from m2snet.mlops.pyfunc_io import pixel_batches

    sizes = [(100, 100)] * 5 + [(7000, 7000)] + [(100, 100)] * 2
    assert pixel_batches(sizes, max_images=3, max_pixels=40_000) == [range(0, 3), range(3, 5), range(5, 6),
                                                                    range(6, 8)]
    assert pixel_batches([], 8, 10) == []


def test_server_refuses_a_request_over_its_pixel_budget(production_model, tmp_path):
    """`mlflow models serve` with M2SNET_MAX_REQUEST_PIXELS: a request whose images sum to more pixels than the
    budget is refused from the headers with 413 naming the budget; one just under it is predicted. `m2snet
    predict` under the same budget sends its images in batches within it."""
    import requests

    from m2snet.mlops.pyfunc_io import encode_image
    from m2snet.mlops.serving import predict_files, start_model_server

    MAX_REQUEST_PIXELS_ENV = "M2SNET_MAX_REQUEST_PIXELS"  # the server's documented setting

    png = production_model["image"].read_bytes()
    w, h = Image.open(production_model["image"]).size
    budget = 3 * w * h + 1  # three images just under, four over
    env = {"MLFLOW_TRACKING_URI": production_model["uri"], MAX_REQUEST_PIXELS_ENV: str(budget)}
    server = start_model_server("models:/serve-test@production", workdir=production_model["root"] / "serve-budget",
                                env=env)
    try:
        def post(n: int):
            body = {"dataframe_split": {"columns": ["image"], "data": [[encode_image(png)]] * n}}
            return requests.post(server.url + "/invocations", json=body, timeout=300)

        over, under = post(4), post(3)
    finally:
        server.stop()
    assert over.status_code == 413, over.text
    message = over.json()["message"]
    assert message == (f"request of 4 images decodes to {4 * w * h} pixels, above the per-request budget of "
                       f"{budget} pixels ({MAX_REQUEST_PIXELS_ENV}); send fewer or smaller images per request")
    assert under.status_code == 200 and len(under.json()["predictions"]) == 3, under.text[:300]

    mp = pytest.MonkeyPatch()
    mp.setenv(MAX_REQUEST_PIXELS_ENV, str(2 * w * h))
    try:
        inputs = []
        for i in range(5):
            inputs.append(tmp_path / f"img{i}.png")
            inputs[-1].write_bytes(png)
        preds = predict_files("models:/serve-test@production", inputs, tmp_path / "out", batch_size=8)
    finally:
        mp.undo()
    assert len(preds) == 5 and all(p.mask.is_file() for p in preds)
