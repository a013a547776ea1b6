"""Metrics (checked against torchmetrics / known values), MED, and checkpoint evaluation end to end."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from m2snet.evaluation.metrics import (
    binary_metrics,
    case_metrics,
    mean_euclidean_distance,
    mean_metrics,
    multiclass_dice,
    sod_metrics,
)


def test_binary_metrics_agree_with_torchmetrics():
    from torchmetrics.functional.classification import (
        binary_f1_score,
        binary_jaccard_index,
        binary_precision,
        binary_recall,
        binary_specificity,
    )

    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = rng.random((40, 50)) > 0.7
        pred = rng.random((40, 50)) > 0.6
        ours = binary_metrics(pred, gt)
        p, t = torch.from_numpy(pred).int(), torch.from_numpy(gt).int()
        ref = {"dice": binary_f1_score(p, t), "iou": binary_jaccard_index(p, t), "precision": binary_precision(p, t),
               "recall": binary_recall(p, t), "specificity": binary_specificity(p, t)}
        for k, v in ref.items():
            assert ours[k] == pytest.approx(float(v), abs=1e-6), k


def test_empty_mask_convention():
    empty = np.zeros((8, 8), bool)
    spot = empty.copy()
    spot[2:4, 2:4] = True
    # normal case predicted empty: perfect
    assert binary_metrics(empty, empty) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0,
                                            "specificity": 1.0}
    # normal case with a false positive: Dice/IoU/precision/recall 0, specificity < 1
    fp = binary_metrics(spot, empty)
    assert (fp["dice"], fp["iou"], fp["precision"], fp["recall"]) == (0.0, 0.0, 0.0, 0.0)
    assert fp["specificity"] == pytest.approx(60 / 64)
    # lesion missed entirely: precision 0 (nothing predicted, something to find), specificity 1
    miss = binary_metrics(empty, spot)
    assert (miss["dice"], miss["precision"], miss["recall"], miss["specificity"]) == (0.0, 0.0, 0.0, 1.0)


def test_sod_metrics_perfect_and_imperfect():
    gt = np.zeros((32, 32), bool)
    gt[8:20, 10:24] = True
    perfect = sod_metrics(gt.astype(float), gt)
    assert perfect["mae"] == 0.0
    assert perfect["s_measure"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["weighted_f_measure"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["mean_e_measure"] > 0.99
    noisy = sod_metrics(np.clip(gt * 0.7 + np.random.default_rng(0).random(gt.shape) * 0.3, 0, 1), gt)
    assert 0 < noisy["mae"] < 0.3 and noisy["s_measure"] < perfect["s_measure"]
    assert noisy["weighted_f_measure"] < 1.0


def test_multiclass_dice_and_med():
    h, w = 30, 20
    gt = np.zeros((h, w), np.uint8)
    gt[5:10] = 1
    gt[10:18] = 2
    pred = np.roll(gt, 2, axis=0)  # every boundary shifted down by 2 rows
    med = mean_euclidean_distance(pred, gt, 3)
    assert med["med_c1"] == pytest.approx(2.0) and med["med_c2"] == pytest.approx(2.0) and med["med"] == 2.0
    d = multiclass_dice(pred, gt, 3)
    assert d["dice_c1"] == pytest.approx(2 * 3 / 10) and d["dice_c2"] == pytest.approx(2 * 6 / 16)
    # a layer missing from the prediction in a column costs the image height there
    pred2 = gt.copy()
    pred2[:, :5][pred2[:, :5] == 1] = 0
    assert mean_euclidean_distance(pred2, gt, 3)["med_c1"] == pytest.approx(5 * h / w)
    prob = np.stack([(gt == c).astype(float) for c in range(3)])
    m = case_metrics(prob, gt, n_classes=3)
    assert m["dice"] == 1.0 and m["med"] == 0.0
    # a case where a metric is NaN is left out of its mean and counted
    assert mean_metrics([{"a": 1.0, "b": float("nan")}, {"a": 0.0, "b": 2.0}]) == {"a": 0.5, "b": 2.0,
                                                                                   "n_nan_b": 1.0}


def test_specificity_of_a_perfect_prediction_on_an_all_foreground_mask_is_one():
    full = np.ones((6, 6), bool)
    assert binary_metrics(full, full) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0,
                                          "specificity": 1.0}
    # imperfect on an all-foreground mask: no negative pixel, but a missed one -> 0 (like recall on empty)
    part = full.copy()
    part[0, 0] = False
    assert binary_metrics(part, full)["specificity"] == 0.0


def test_s_measure_nan_on_a_case_is_counted_not_dropped_silently():
    gt = np.zeros((16, 16), bool)
    gt[15, 4:12] = True  # the centroid falls on the last row: pysodmetrics' S-measure is NaN there
    good = np.zeros((16, 16), bool)
    good[4:8, 4:8] = True
    rows = [case_metrics(gt.astype(float), gt), case_metrics(good.astype(float), good)]
    assert np.isnan(rows[0]["s_measure"]) and not np.isnan(rows[1]["s_measure"])
    means = mean_metrics(rows)
    assert means["s_measure"] == pytest.approx(rows[1]["s_measure"]) and means["n_nan_s_measure"] == 1
    assert "n_nan_dice" not in means


def test_multiclass_class_absent_from_both_maps_is_excluded_not_scored_one():
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 1
    pred = gt.copy()
    pred[2:6, 2] = 0  # class 1 imperfect; class 2 absent from both
    d = multiclass_dice(pred, gt, 3)
    assert np.isnan(d["dice_c2"])
    assert d["dice"] == pytest.approx(d["dice_c1"]) and d["dice"] < 1.0
    assert np.isnan(multiclass_dice(np.zeros_like(gt), np.zeros_like(gt), 3)["dice"])


def test_mae_is_reported_as_a_fraction_and_percent_metrics_in_percent():
    from m2snet.evaluation.metrics import is_percent_metric

    assert is_percent_metric("dice") and is_percent_metric("noskill_lesion_iou")
    assert not is_percent_metric("mae") and not is_percent_metric("noskill_mae") and not is_percent_metric("med")


def _reference_oracle(prob: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The authors' prediction_rgb.py + test_score.py, step by step (torchvision's ToPILImage for the PNG)."""
    from torchvision import transforms

    sal = transforms.ToPILImage()(torch.from_numpy(prob.astype(np.float32))[None])
    res = np.array(sal).astype(np.float64)
    res = res / 255 if res.max() == res.min() else (res - res.min()) / (res.max() - res.min())
    g = np.asarray(gt, np.float32)
    g /= g.max() + 1e-8
    g[g > 0.5] = 1
    g[g != 1] = 0
    dice = (2.0 * np.sum(g * res) + 1e-5) / (np.sum(g) + np.sum(res) + 1e-5)
    inter, union = ((res > 0.5) & (g > 0.5)).sum(), ((res > 0.5) | (g > 0.5)).sum()
    return {"dice": dice, "iou": (inter + 1e-5) / (union + 1e-5)}


def test_reference_protocol_scores_as_the_papers_test_score():
    rng = np.random.default_rng(0)
    gt = np.zeros((24, 30), np.uint8)
    gt[5:15, 8:20] = 255
    # a timid map: every probability below 0.5; the reference min-max rescales it, the project's does not
    prob = np.clip(0.1 + 0.3 * (gt > 0) + 0.05 * rng.random(gt.shape), 0, 1)
    ref = case_metrics(prob, gt, protocol="reference", with_sod=False)
    oracle = _reference_oracle(prob, gt)
    assert ref["dice"] == pytest.approx(oracle["dice"], rel=1e-9)
    assert ref["iou"] == pytest.approx(oracle["iou"], rel=1e-9)
    assert case_metrics(prob, gt, with_sod=False)["dice"] == 0.0 < ref["dice"]
    # an empty ground truth with an empty map: 1 (smoothing), as test_score.py gives
    empty = np.zeros_like(gt)
    assert case_metrics(np.zeros(gt.shape), empty, protocol="reference", with_sod=False)["dice"] == 1.0
    # Precision (not in test_score.py) of an empty prediction on a lesion: 0, not a smoothed 1
    assert case_metrics(np.zeros(gt.shape), gt, protocol="reference", with_sod=False)["precision"] == 0.0
    from m2snet.errors import M2SNetError

    with pytest.raises(M2SNetError, match="protocol"):
        case_metrics(prob, gt, protocol="paper")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BUSI-layout dataset with non-square images and a 1-epoch checkpoint."""
    from PIL import Image

    from m2snet.data.demo import make_demo_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.training.config import TrainConfig
    from m2snet.training.trainer import train

    base = tmp_path_factory.mktemp("evaldata")
    make_demo_dataset(base / "raw", n_per_class=(2, 1, 1), size=64, seed=1)
    # Make one case non-square so "original size" is really exercised.
    for name in ("benign (1).png", "benign (1)_mask.png"):
        p = base / "raw" / "benign" / name
        im = Image.open(p)
        im.resize((80, 56), Image.NEAREST).save(p)
    info = import_dataset("busi", base / "raw", base / "ds", progress=False)
    res = train(TrainConfig(data=str(base / "ds"), epochs=1, batch_size=2, size=64, pretrained=False,
                            lossnet_weight=0.0, device="cpu", progress=False, out_dir=str(base / "run"),
                            cache_dir=str(base / "cache")))
    return base / "ds", res.checkpoint, info


def test_evaluate_writes_per_case_csv_metrics_and_overlays(trained, tmp_path):
    from m2snet.evaluation.evaluate import EvalOptions, evaluate

    data, ckpt, info = trained
    res = evaluate([ckpt], data, out_dir=tmp_path / "ev", options=EvalOptions(device="cpu", progress=False))
    rows = list(csv.DictReader(open(res.per_case_csv)))
    assert len(rows) == len(info.cases) == res.n_cases
    sizes = {c.case_id: (c.height, c.width) for c in info.cases}
    assert (56, 80) in sizes.values()
    for r in rows:
        assert (int(r["height"]), int(r["width"])) == sizes[r["case_id"]]
        for k in ("dice", "iou", "precision", "recall", "specificity", "s_measure", "mean_e_measure",
                  "weighted_f_measure", "mae"):
            assert 0.0 <= float(r[k]) <= 1.0
    # the means are the per-image averages of the CSV
    assert res.metrics["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    assert res.overlay_png.stat().st_size > 1000 and res.metrics_json.is_file()
    # an ensemble of the same checkpoint twice with flip TTA runs and gives probabilities in range
    tta = evaluate([ckpt, ckpt], data, case_ids=[info.cases[0].case_id],
                   options=EvalOptions(device="cpu", tta_flip=True, progress=False))
    assert tta.n_cases == 1 and 0.0 <= tta.metrics["dice"] <= 1.0


def test_evaluate_scores_no_skill_and_lesion_cases_on_the_same_cases(trained):
    from PIL import Image

    from m2snet.evaluation.evaluate import EvalOptions, evaluate

    data, ckpt, info = trained
    res = evaluate([ckpt], data, options=EvalOptions(device="cpu", progress=False))
    lesion = [bool(np.asarray(Image.open(c.mask_path)).any()) for c in info.cases]
    m = res.metrics
    assert m["n_cases"] == len(info.cases) and m["n_lesion_cases"] == sum(lesion) > 0
    # all background: Dice 1 on each empty mask, 0 on each lesion
    assert m["noskill_dice"] == pytest.approx(1 - np.mean(lesion)) and m["noskill_specificity"] == 1.0
    assert m["noskill_lesion_dice"] == 0.0
    by_id = {r["case_id"]: r for r in res.rows}
    assert m["lesion_dice"] == pytest.approx(np.mean([by_id[c.case_id]["dice"] for c, les in zip(info.cases, lesion)
                                                      if les]))
    ref = evaluate([ckpt], data, options=EvalOptions(device="cpu", progress=False, protocol="reference"))
    assert ref.metrics["noskill_dice"] == pytest.approx(1 - np.mean(lesion), abs=1e-6)


def test_predictor_flip_tta_averages_flipped_pass(trained):
    from m2snet.evaluation.predict import Predictor

    _, ckpt, info = trained
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(info.cases[0].image_path).convert("RGB"))
    plain = Predictor.from_checkpoints([ckpt])
    tta = Predictor.from_checkpoints([ckpt], tta_flip=True)
    p = plain.predict_proba([image])[0]
    q = plain.predict_proba([image[:, ::-1]])[0][:, ::-1]
    assert p.shape == image.shape[:2]
    np.testing.assert_allclose(tta.predict_proba([image])[0], (p + q) / 2, atol=1e-5)


def test_evaluate_cli_no_skill_table_without_training(trained, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from m2snet.cli import app

    data, _, info = trained
    res = CliRunner().invoke(app, ["evaluate", "--no-skill", "--data", str(data), "--out", str(tmp_path / "ns"),
                                   "--metric-protocol", "reference"])
    assert res.exit_code == 0, res.output
    share_normal = 100 * np.mean([not np.asarray(Image.open(c.mask_path)).any() for c in info.cases])
    assert "| 1 fold, reference protocol |" in res.output
    assert f"| no skill: all cases ({len(info.cases)}) | {share_normal:.2f} ± 0.00 |" in res.output
    bad = CliRunner().invoke(app, ["evaluate", "--no-skill", "--data", str(data), "--out", str(tmp_path / "bad"),
                                   "--metric-protocol", "paper"])
    # an M2SNetError: the CLI's main() prints it as one line and exits 2
    assert type(bad.exception).__name__ == "M2SNetError" and "metric protocol 'paper'" in str(bad.exception)
    assert not (tmp_path / "bad").exists()
