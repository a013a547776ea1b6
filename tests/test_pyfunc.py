"""The MLflow pyfunc model: an ensemble of checkpoints, base64 images in, base64 masks out."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from PIL import Image

from m2snet.models.checkpoint import Checkpoint


def _random_checkpoint(path: Path, seed: int) -> Path:
    """A checkpoint in the trainer's format for a randomly initialised MSNet (no training needed)."""
    from m2snet.models import create_model

    torch.manual_seed(seed)
    model = create_model("msnet", n_classes=1, pretrained=False).eval()
    return Checkpoint(model_name="msnet", model_config={"n_classes": 1}, n_classes=1, image_size=64,
                      state_dict=model.state_dict(), train_config={}, epoch=1).save(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("pyfunc")
    return [_random_checkpoint(base / "a.pt", 1), _random_checkpoint(base / "b.pt", 2)]


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_ensemble_pyfunc_logs_loads_and_predicts_masks_at_input_size(checkpoints, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from m2snet.evaluation.predict import Predictor
    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.pyfunc_io import decode_mask, encode_image
    from m2snet.mlops.pyfunc_logging import log_segmentation_model
    from m2snet.mlops.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="pyfunc-test")
    tracker = Tracker.start(cfg, run_name="ensemble")
    info = log_segmentation_model(checkpoints, name="model", run_id=tracker.run_id, tracking_uri=cfg.uri,
                                  registered_model_name="m2snet-pyfunc-test")
    tracker.end()
    assert info.signature.inputs.input_names() == ["image"]
    assert info.saved_input_example_info is not None

    mlflow.set_tracking_uri(cfg.uri)
    try:
        # dst_path: without it MLflow downloads into a new temporary directory it never removes
        (tmp_path / "dl-run").mkdir(), (tmp_path / "dl-reg").mkdir()
        model = mlflow.pyfunc.load_model(f"runs:/{tracker.run_id}/model", dst_path=str(tmp_path / "dl-run"))
        registered = mlflow.pyfunc.load_model("models:/m2snet-pyfunc-test/1", dst_path=str(tmp_path / "dl-reg"))
    finally:
        mlflow.set_tracking_uri(None)
    rng = np.random.default_rng(0)
    grey = (rng.random((50, 70)) * 255).astype(np.uint8)
    rgb = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    frame = pd.DataFrame({"image": [encode_image(_png(grey)), encode_image(_png(rgb, "JPEG"))]})
    out = model.predict(frame)
    assert list(out.columns) == ["mask", "foreground_fraction"] and len(out) == 2
    masks = [decode_mask(m) for m in out["mask"]]
    assert masks[0].shape == (50, 70) and masks[1].shape == (48, 64)
    for m, frac in zip(masks, out["foreground_fraction"]):
        assert set(np.unique(m)) <= {0, 255}
        assert frac == pytest.approx((m > 0).mean())
    # the ensemble averages the two models' probabilities before thresholding
    both = Predictor.from_checkpoints(checkpoints)
    singles = [Predictor.from_checkpoints([c]) for c in checkpoints]
    expect = (singles[0].predict_proba([grey])[0] + singles[1].predict_proba([grey])[0]) / 2
    np.testing.assert_allclose(both.predict_proba([grey])[0], expect, atol=1e-5)
    np.testing.assert_array_equal(masks[0], (expect >= 0.5).astype(np.uint8) * 255)
    assert registered.predict(frame.iloc[:1])["mask"][0] == out["mask"][0]
    # logged as code (MLflow "models from code"): loading it unpickles nothing
    for downloaded in (tmp_path / "dl-run", tmp_path / "dl-reg"):
        assert "model_code_path" in next(downloaded.rglob("MLmodel")).read_text()
        assert not list(downloaded.rglob("*.pkl")), list(downloaded.rglob("*.pkl"))


def test_the_model_class_loads_without_mlflow_warnings():
    """MLflow checks a PythonModel's predict() where the class is defined, i.e. on every load of the model
    (it is logged as code): an unannotated input printed a coloured UserWarning before every `m2snet predict`."""
    code = "import warnings; warnings.simplefilter('always'); import m2snet.mlops.pyfunc"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode == 0 and "Warning" not in res.stderr, res.stderr


def test_a_local_store_keeps_one_copy_of_each_checkpoint(checkpoints, tmp_path, monkeypatch):
    """Each fold's model and the ensemble store the same checkpoints: in a local artifact store they are hard
    links to one file each, which outlive the runner's copy (removed after a run)."""
    import shutil

    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.pyfunc_logging import log_segmentation_model
    from m2snet.mlops.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    outputs = tmp_path / "task-outputs"  # the kfp runner's copies
    sources = []
    for i, checkpoint in enumerate(checkpoints):
        (outputs / f"fold{i}").mkdir(parents=True)
        sources.append(Path(shutil.copy(checkpoint, outputs / f"fold{i}" / "model.pt")))
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="one-copy")
    for i, source in enumerate(sources):
        with Tracker.start(cfg, run_name=f"fold-{i}") as fold:
            log_segmentation_model([source], run_id=fold.run_id, tracking_uri=cfg.uri)
    with Tracker.start(cfg, run_name="parent") as parent:
        log_segmentation_model(sources, run_id=parent.run_id, tracking_uri=cfg.uri)
    stored = [p for p in (tmp_path / "mlruns").rglob("*.pt")]
    assert len(stored) == 4 and len({p.stat().st_ino for p in stored}) == 2
    shutil.rmtree(outputs)
    for path in stored:
        Checkpoint.load(path)


class _PickledPayload(mlflow.pyfunc.PythonModel):
    """A python_model whose unpickling creates ``marker``: a model logged the pickled way."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))

    def predict(self, context, model_input, params=None):
        return model_input


def test_a_pickled_python_model_is_refused_unloaded(tmp_path):
    from m2snet.errors import M2SNetError
    from m2snet.mlops.serving import load_model

    marker = tmp_path / "pwned"
    mlflow.pyfunc.save_model(str(tmp_path / "old-model"), python_model=_PickledPayload(str(marker)),
                             pip_requirements=[])  # (inferring them would load, so unpickle, the model)
    assert (tmp_path / "old-model" / "python_model.pkl").is_file() and not marker.exists()
    with pytest.raises(M2SNetError, match=r"old-model: this model's python_model is a pickle; refusing to unpickle"):
        load_model(str(tmp_path / "old-model"))
    assert not marker.exists()


def test_bad_image_input_is_a_clear_400_error(checkpoints):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from m2snet.mlops.pyfunc import SegmentationPyfunc

    class Ctx:
        artifacts = {"checkpoint_0": str(checkpoints[0])}
        model_config = {}

    model = SegmentationPyfunc()
    model.load_context(Ctx())
    with pytest.raises(MlflowException, match="row 1: column 'image' is not base64 PNG/JPEG"):
        good = base64.b64encode(_png(np.zeros((8, 8), np.uint8))).decode()
        model.predict(None, pd.DataFrame({"image": [good, "not-an-image"]}))
    with pytest.raises(MlflowException, match="string column 'image'"):
        model.predict(None, pd.DataFrame({"x": ["a"]}))


def _loaded_pyfunc(checkpoint):
    from m2snet.mlops.pyfunc import SegmentationPyfunc

    class Ctx:
        artifacts = {"checkpoint_0": str(checkpoint)}
        model_config = {}

    model = SegmentationPyfunc()
    model.load_context(Ctx())
    return model


def test_a_16bit_grey_png_is_predicted_as_its_8bit_picture(checkpoints):
    """A 16-bit grey PNG (an 8-bit picture * 257) gives the same mask as the 8-bit PNG, not a saturated one."""
    import pandas as pd

    from m2snet.mlops.pyfunc_io import decode_image, encode_image

    rng = np.random.default_rng(3)
    grey = (rng.random((40, 52)) * 255).astype(np.uint8)
    sixteen = _png(grey.astype(np.uint16) * 257)
    assert np.array_equal(np.asarray(decode_image(encode_image(sixteen))), grey)
    model = _loaded_pyfunc(checkpoints[0])
    out = model.predict(None, pd.DataFrame({"image": [encode_image(sixteen), encode_image(_png(grey))]}))
    assert out["mask"][0] == out["mask"][1]


def _http_error(call) -> tuple[int, dict]:
    """The status and JSON body MLflow's scoring server would send for the MlflowException ``call`` raises."""
    import json

    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        call()
    return err.value.get_http_status_code(), json.loads(err.value.serialize_as_json())


def test_oversized_and_undecodable_images_are_413_and_400_with_one_line(checkpoints, monkeypatch):
    import pandas as pd

    from m2snet.mlops.pyfunc_io import encode_image

    model = _loaded_pyfunc(checkpoints[0])
    small, big = encode_image(_png(np.zeros((8, 8), np.uint8))), encode_image(_png(np.zeros((30, 40), np.uint8)))
    monkeypatch.setenv("M2SNET_MAX_PIXELS", "1000")
    status, body = _http_error(lambda: model.predict(None, pd.DataFrame({"image": [small, big]})))
    assert status == 413 and body["message"] == (
        "row 1: image is 40x30 = 1200 pixels, above the limit of 1000 (M2SNET_MAX_PIXELS)")
    monkeypatch.delenv("M2SNET_MAX_PIXELS")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own DecompressionBombError (above 200)
    status, body = _http_error(lambda: model.predict(None, pd.DataFrame({"image": [small, big]})))
    assert status == 413 and body["message"].startswith("row 1: image is too large to decode")
    monkeypatch.undo()
    noise = _png((np.random.default_rng(0).random((30, 40)) * 255).astype(np.uint8))
    truncated = encode_image(noise[: len(noise) // 2])
    status, body = _http_error(lambda: model.predict(None, pd.DataFrame({"image": [small, truncated]})))
    assert status == 400 and body["message"].startswith("row 1: cannot decode image")
    for message in (body["message"],):
        assert "\n" not in message and "Traceback" not in json.dumps(body) and "stack_trace" not in body


@pytest.mark.slow
def test_mlflow_models_serve_json_round_trip(checkpoints, tmp_path):
    """``mlflow models serve --env-manager local`` answers JSON with a mask of the input's size."""
    import json
    import urllib.request

    import mlflow

    from m2snet.mlops.pyfunc_io import decode_mask, encode_image
    from m2snet.mlops.pyfunc_logging import log_segmentation_model
    from m2snet.processes import free_port

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run():
            info = log_segmentation_model(checkpoints[:1], name="model")
        local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model"))
    finally:
        mlflow.set_tracking_uri(None)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", local, "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[encode_image(_png(np.full((40, 30), 90, np.uint8)))]]}})
        deadline = time.time() + 120
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                             headers={"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
        assert decode_mask(reply["predictions"][0]["mask"]).shape == (40, 30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
