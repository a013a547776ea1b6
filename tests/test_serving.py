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
    from m2snet.mlops.pyfunc import log_segmentation_model
    from m2snet.mlops.registry import PromotionPolicy, promote, register_model_version
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
    mlflow.set_experiment("serving-test")
    with mlflow.start_run() as run:
        info = log_segmentation_model([result.checkpoint], run_id=run.info.run_id)
    mv = register_model_version(info.model_uri, "serve-test", idempotency_key="serving-fixture",
                                tags={"cv_dice": 0.9})
    assert promote("serve-test", mv.version, PromotionPolicy(floor=0.0)).promoted
    yield {"uri": uri, "root": root, "image": root / "raw" / "benign" / "benign (1).png"}
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
    """`mlflow models serve` starts `uvicorn` by name: the README's command must find the virtualenv's copy
    when the virtualenv was never activated (it failed with "uvicorn: not found")."""
    import os
    import re
    import subprocess
    import sys
    import time
    from pathlib import Path

    import requests

    from m2snet.common import free_port

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"`([^`]*mlflow models serve -m models:/m2snet-busi@production[^`]*)`", readme).group(1)
    port = free_port()
    command = command.replace("m2snet-busi", "serve-test").replace("-p 5001", f"-p {port}")
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
