"""The input guard (m2snet.evaluation.guard): fitted per fold model on the cases it trained on, calibrated on
cases it did not, scored from the prediction's own forward pass, stored without pickles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from m2snet.data.format import load_dataset
from m2snet.data.split import load_split
from m2snet.errors import M2SNetError
from m2snet.evaluation.guard import InputGuard, backbone_features, fit_guard, held_out_halves
from m2snet.evaluation.predict import Predictor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    from tests.conftest import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("guard"), n_per_class=(4, 4, 4), size=64)


def _predictor(n_models: int) -> Predictor:
    from m2snet.models import create_model
    from m2snet.models.preprocessing import DEFAULT_NORMALIZATION

    torch.manual_seed(0)
    models = [create_model("m2snet", pretrained=False) for _ in range(n_models)]
    return Predictor(models, {"image_size": 64, "n_classes": 1, "normalization": DEFAULT_NORMALIZATION.to_dict()})


def test_fitted_guard_flags_noise_and_blank_images_and_scores_from_the_prediction_itself(tiny, tmp_path):
    data, split = tiny
    info, sp = load_dataset(data), load_split(split)
    predictor = _predictor(2)
    fit = fit_guard(predictor, info, sp, folds=[0, 1])
    guard = fit.guard
    assert len(guard.members) == 2 and all(m.threshold > 0 for m in guard.members)
    # Each member's held-out measurement half is disjoint from the cases it was fitted or calibrated on.
    for k, ids in enumerate(fit.held_out_ids):
        calibration, measurement = held_out_halves(sp.fold(k).val)
        assert ids == measurement and not set(ids) & set(calibration) and not set(ids) & set(sp.fold(k).train)
    assert guard.rates["held_out_cases"] == sum(len(i) for i in fit.held_out_ids)

    rng = np.random.default_rng(0)
    strange = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.zeros((64, 64, 3), np.uint8),
               np.full((80, 50, 3), 255, np.uint8)]
    predictor.attach_guard(guard)
    probs, scores = predictor.predict_guarded(strange)
    assert len(probs) == len(scores) == 3 and probs[2].shape == (80, 50)
    assert InputGuard.flags(scores).all(), scores
    # The scores of a prediction equal the guard on the encoder-only features (one forward, no second pass).
    direct = guard.scores([backbone_features(predictor, i, strange) for i in range(2)])
    np.testing.assert_allclose(scores, direct, rtol=1e-4)

    saved = InputGuard.load(guard.save(tmp_path / "guard.safetensors"))
    np.testing.assert_allclose(saved.scores([backbone_features(predictor, i, strange) for i in range(2)]), direct,
                               rtol=1e-6)
    assert saved.rates == guard.rates and saved.quantile == guard.quantile


def test_a_file_that_is_not_a_guard_is_refused_naming_it(tmp_path):
    pickle = tmp_path / "guard.safetensors"
    torch.save({"a": 1}, pickle)
    with pytest.raises(M2SNetError, match=r"guard\.safetensors: not a readable input guard"):
        InputGuard.load(pickle)
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(M2SNetError, match=r"other\.safetensors: not an m2snet input guard"):
        InputGuard.load(tmp_path / "other.safetensors")


def test_a_guard_for_another_ensemble_size_is_refused():
    predictor = _predictor(1)
    guard = InputGuard(members=[])
    with pytest.raises(M2SNetError, match="0 members for an ensemble of 1"):
        predictor.attach_guard(guard)


def test_a_model_logged_with_its_guard_returns_scores_from_the_pyfunc_and_predict_warns(tiny, tmp_path, monkeypatch):
    """register_step's path without the pipeline: fit_input_guard on fold checkpoints, the pyfunc logged with it,
    then `m2snet predict --json` on an in-distribution image and a blank one (the CLI, in process)."""
    import json

    import mlflow
    from PIL import Image
    from typer.testing import CliRunner

    from m2snet.cli import app
    from m2snet.mlops.pyfunc_logging import log_segmentation_model
    from m2snet.models import create_model
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.workflows.steps import fit_input_guard

    data, split = tiny
    torch.manual_seed(0)
    checkpoints = []
    for k in (0, 1):
        model = create_model("m2snet", pretrained=False)
        checkpoints.append(Checkpoint(model_name="m2snet", state_dict=model.state_dict(), model_config={},
                                      image_size=64, fold=k).save(tmp_path / f"fold{k}.pt"))
    # The tiny set's folds hold a handful of held-out cases: registration leaves the guard out by default.
    assert fit_input_guard(checkpoints, str(data), str(split), tmp_path) is None
    guard = fit_input_guard(checkpoints, str(data), str(split), tmp_path, min_calibration=1)
    assert guard is not None and guard.rates["quantile"] == 0.975
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("M2SNET_CACHE_DIR", str(tmp_path / "cache"))
    known = next(Path(data).rglob("images/*.png"))
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64)).save(blank)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run():
            info = log_segmentation_model(checkpoints, guard=guard.path)
        result = CliRunner().invoke(app, ["predict", "--model", info.model_uri, str(known), str(blank),
                                          "--out", str(tmp_path / "out"), "--json"])
    finally:
        mlflow.set_tracking_uri(None)
    assert result.exit_code == 0, result.output
    rows = {Path(r["image"]).name: r for r in map(json.loads, result.stdout.strip().splitlines())}
    assert set(rows) == {known.name, "blank.png"}
    for r in rows.values():
        assert r["ood_threshold"] == 1.0 and r["ood_flag"] == (r["ood_score"] > 1.0)
    assert rows["blank.png"]["ood_flag"] is True
    assert f"warning: {blank}: unlike the images this model was trained on" in result.stderr
