"""ONNX export: BatchNorm folded, same probabilities as PyTorch, served by the pyfunc through ONNX
Runtime with the same masks as the PyTorch back end; bad input fails by name, leaving nothing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.test_pyfunc import _png, _random_checkpoint

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from m2snet.mlops.export import export_onnx

    base = tmp_path_factory.mktemp("export")
    checkpoints = [_random_checkpoint(base / "a.pt", 1), _m2snet_checkpoint(base / "b.pt", 2)]
    return checkpoints, export_onnx(checkpoints, base / "ensemble.onnx")


def _m2snet_checkpoint(path, seed):
    """An M2SNet checkpoint: its fast MSU has an in-place no-grad path the exporter must not meet."""
    import dataclasses

    import torch

    from m2snet.models import create_model
    from m2snet.models.checkpoint import Checkpoint

    torch.manual_seed(seed)
    ckpt = Checkpoint.load(_random_checkpoint(path, seed))
    model = create_model("m2snet", n_classes=1, pretrained=False).eval()
    return dataclasses.replace(ckpt, model_name="m2snet", state_dict=model.state_dict()).save(path)


def test_export_folds_batchnorm_and_matches_pytorch(exported) -> None:
    from m2snet.evaluation.predict import Predictor
    from m2snet.mlops.export import OnnxPredictor, read_onnx_meta

    checkpoints, report = exported
    graph = onnx.load(str(report.path))
    ops = {node.op_type for node in graph.graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops and report.batch_norms_left == 0
    assert report.n_models == 2 and report.max_abs_diff < 1e-4
    meta = read_onnx_meta(report.path)
    assert meta["image_size"] == 64 and meta["n_models"] == 2 and meta["tta_flip"] is False
    rng = np.random.default_rng(0)
    images = [(rng.random((50, 70)) * 255).astype(np.uint8), (rng.random((81, 40, 3)) * 255).astype(np.uint8),
              (rng.random((64, 64, 3)) * 255).astype(np.uint8)]  # 3 images: a batch size not exported
    torch_probs = Predictor.from_checkpoints(checkpoints).predict_proba(images)
    onnx_probs = OnnxPredictor(report.path).predict_proba(images)
    for a, b, im in zip(torch_probs, onnx_probs, images):
        assert b.shape == im.shape[:2]
        np.testing.assert_allclose(b, a, atol=1e-4)


def test_pyfunc_serves_through_onnxruntime_with_the_torch_masks(exported, tmp_path, monkeypatch) -> None:
    import mlflow
    import pandas as pd

    from m2snet.mlops.export import OnnxPredictor, model_checkpoints
    from m2snet.mlops.pyfunc import BACKEND_ENV
    from m2snet.mlops.pyfunc_io import encode_image
    from m2snet.mlops.pyfunc_logging import log_segmentation_model

    checkpoints, _ = exported
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run():
            info = log_segmentation_model(checkpoints, name="model", onnx=True)
        # dst_path: without it MLflow downloads into a new temporary directory it never removes
        (tmp_path / "dl-onnx").mkdir(), (tmp_path / "dl-torch").mkdir()
        served = mlflow.pyfunc.load_model(info.model_uri, dst_path=str(tmp_path / "dl-onnx"))
        monkeypatch.setenv(BACKEND_ENV, "torch")
        plain = mlflow.pyfunc.load_model(info.model_uri, dst_path=str(tmp_path / "dl-torch"))
        assert [p.name for p in model_checkpoints(info.model_uri, tmp_path / "dl")] == ["a.pt", "b.pt"]
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(served.unwrap_python_model().predictor, OnnxPredictor)
    assert not isinstance(plain.unwrap_python_model().predictor, OnnxPredictor)
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"image": [encode_image(_png((rng.random((45, 52)) * 255).astype(np.uint8))),
                                    encode_image(_png((rng.random((30, 90, 3)) * 255).astype(np.uint8)))]})
    a, b = served.predict(frame), plain.predict(frame)
    # Random-weight probabilities sit near 0.5, so a pixel may flip on a 1e-6 difference: compare
    # the fractions loosely and most of the mask exactly.
    np.testing.assert_allclose(a["foreground_fraction"], b["foreground_fraction"], atol=0.01)
    from m2snet.mlops.pyfunc_io import decode_mask

    for ma, mb in zip(a["mask"], b["mask"]):
        assert (decode_mask(ma) == decode_mask(mb)).mean() > 0.99


def test_export_cli_and_its_errors(exported, tmp_path) -> None:
    checkpoints, _ = exported
    out = tmp_path / "one.onnx"
    ok = subprocess.run([sys.executable, "-m", "m2snet.cli", "export", str(checkpoints[0]), "--out", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "1 model(s) at 64 px" in ok.stdout and "BatchNorm nodes left 0" in ok.stdout and out.is_file()
    # A check that cannot pass (negative tolerance) writes nothing.
    bad = tmp_path / "never.onnx"
    fail = subprocess.run([sys.executable, "-m", "m2snet.cli", "export", str(checkpoints[0]), "--out", str(bad),
                           "--atol", "-1"], capture_output=True, text=True)
    assert fail.returncode == 2 and "differs from PyTorch" in fail.stderr and "not written" in fail.stderr
    assert not bad.exists() and list(tmp_path.glob(".never.onnx*")) == []
    # Not a checkpoint, not a model: one line naming it.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    fail = subprocess.run([sys.executable, "-m", "m2snet.cli", "export", str(junk), "--out", str(bad)],
                          capture_output=True, text=True)
    assert fail.returncode == 2 and str(junk) in fail.stderr and "Traceback" not in fail.stderr
