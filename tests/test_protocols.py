"""Fixed-split protocols (issue 20): split files with named test sets, clip splits, one row per test set,
the protocol registry and the paper's figures."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2snet.data.fixed_split import deal_groups, make_fixed_split, parse_fractions
from m2snet.data.format import MANIFEST_CSV, load_dataset
from m2snet.data.importers import import_dataset
from m2snet.data.split import load_split, make_split
from m2snet.errors import M2SNetError

H, W = 40, 48
PRANET_SETS = (("TrainDataset", 4), ("TestDataset/CVC-300", 2), ("TestDataset/ETIS-LaribPolypDB", 2),
               ("TestDataset/Kvasir", 3))


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A distinct random image (no near duplicates between seeds) and a box mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    y, x = 4 + seed % 9, 5 + seed % 11
    mask[y:y + 14, x:x + 16] = 255
    return image, mask


@pytest.fixture(scope="module")
def pranet(tmp_path_factory) -> Path:
    """A synthetic PraNet layout (TrainDataset + three test subsets) imported into the m2snet format."""
    base = tmp_path_factory.mktemp("pranet")
    seed = 0
    for folder, n in PRANET_SETS:
        for i in range(n):
            image, mask = _pair(seed)
            seed += 1
            _save(base / "src" / folder / "images" / f"{i + 1}.png", image)
            _save(base / "src" / folder / "masks" / f"{i + 1}.png", mask)
    import_dataset("pranet", base / "src", base / "data", progress=False)
    return base / "data"


def _video_dataset(base: Path, clips: int = 10, frames: int = 3) -> Path:
    """A synthetic video layout: ``clips`` clips of ``frames`` frames, a ``clip`` column added to the manifest."""
    for c in range(clips):
        for f in range(frames):
            image, mask = _pair(100 + c * frames + f)
            _save(base / "src" / "images" / f"c{c:02d}f{f}.png", image)
            _save(base / "src" / "masks" / f"c{c:02d}f{f}.png", mask)
    import_dataset("folder", base / "src", base / "data", progress=False)
    manifest = base / "data" / MANIFEST_CSV
    rows = list(csv.DictReader(manifest.open()))
    for row in rows:
        row["clip"] = re.match(r".*c(\d+)f\d+", row["case_id"]).group(1)
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return base / "data"


def test_pranet_subsets_become_named_test_sets(pranet, tmp_path):
    split = make_fixed_split(pranet, out=tmp_path / "fixed.json")
    assert split.is_fixed and split.n_folds == 1
    assert sorted(split.test_sets) == ["CVC-300", "ETIS-LaribPolypDB", "Kvasir"]
    assert [len(split.test_sets[k]) for k in ("CVC-300", "ETIS-LaribPolypDB", "Kvasir")] == [2, 2, 3]
    assert len(split.fold(0).train) == 4 and split.fold(0).val == []
    info = load_dataset(pranet)
    subset = {c.case_id: c.subset for c in info.cases}
    assert {subset[i] for i in split.fold(0).train} == {"train"}
    assert all(subset[i] == name for name, ids in split.test_sets.items() for i in ids)
    data = json.loads((tmp_path / "fixed.json").read_text())
    assert data["format_version"] == 3 and data["protocol"] == "fixed" and data["crossings"] == []


def test_kfold_files_are_unchanged_and_still_load(pranet, tmp_path):
    kfold = make_split(pranet, n_folds=2, seed=1, out=tmp_path / "k.json")
    data = json.loads((tmp_path / "k.json").read_text())
    assert data["format_version"] == 2 and "protocol" not in data and "test_sets" not in data
    assert not kfold.is_fixed and kfold.test_sets == {}
    # A version-1 file (groups by sha256) loads too.
    v1 = {"format_version": 1, "n_folds": 2, "seed": 0, "folds": [{"fold": 0, "train": ["a"], "val": ["b"]},
                                                                  {"fold": 1, "train": ["b"], "val": ["a"]}]}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert load_split(tmp_path / "v1.json").protocol == "kfold"


def test_clip_split_keeps_every_clip_on_one_side(tmp_path):
    data = _video_dataset(tmp_path)
    split = make_fixed_split(data, fractions="60/20/20", group_by="clip", seed=3, out=tmp_path / "clips.json")
    clip = {c.case_id: c.column("clip") for c in load_dataset(data).cases}
    sides = {"train": split.fold(0).train, "val": split.fold(0).val, "test": split.test_sets["test"]}
    clips_of = {side: {clip[i] for i in ids} for side, ids in sides.items()}
    assert not clips_of["train"] & clips_of["val"] and not clips_of["train"] & clips_of["test"]
    assert not clips_of["val"] & clips_of["test"]
    assert sum(map(len, sides.values())) == 30 and split.crossings == []
    assert [len(clips_of[s]) for s in ("train", "val", "test")] == [6, 2, 2]  # 60/20/20 of 10 clips


def test_subset_split_reports_or_refuses_a_group_on_two_sides(pranet, tmp_path):
    # Two cases of one 'patient' in training and in the Kvasir test set: the subsets put them apart.
    info = load_dataset(pranet)
    train_id = sorted(c.case_id for c in info.cases if c.subset == "train")[0]
    test_id = sorted(c.case_id for c in info.cases if c.subset == "Kvasir")[0]
    data = tmp_path / "data"
    import shutil

    shutil.copytree(pranet, data)
    manifest = data / MANIFEST_CSV
    rows = list(csv.DictReader(manifest.open()))
    for row in rows:
        row["patient"] = "p1" if row["case_id"] in (train_id, test_id) else ""
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    split = make_fixed_split(data, group_by="patient", out=tmp_path / "r.json")
    assert split.crossings == [{"sets": ["train", "test:Kvasir"], "cases": sorted([train_id, test_id])}]
    with pytest.raises(M2SNetError, match="on two sides"):
        make_fixed_split(data, group_by="patient", out=tmp_path / "x.json", on_leak="refuse")
    assert not (tmp_path / "x.json").exists()


def test_selectors_ids_rest_and_errors(pranet, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# the held-out cases\nKvasir_0001\nKvasir_0002\n")
    split = make_fixed_split(pranet, tests={"mine": f"ids:{ids}"}, val="subset:CVC-300", out=tmp_path / "s.json")
    assert split.test_sets == {"mine": ["Kvasir_0001", "Kvasir_0002"]}
    assert len(split.fold(0).val) == 2 and len(split.fold(0).train) == 11 - 4  # rest
    with pytest.raises(M2SNetError, match="no subset 'CVC-612'"):
        make_fixed_split(pranet, tests={"x": "subset:CVC-612"}, out=tmp_path / "e.json")
    with pytest.raises(M2SNetError, match="both hold"):
        make_fixed_split(pranet, train="subset:train,Kvasir", tests={"k": "subset:Kvasir"}, out=tmp_path / "e.json")
    with pytest.raises(M2SNetError, match="fractions"):
        parse_fractions("60/40")


def test_deal_groups_fills_shares_with_whole_groups():
    sides = deal_groups([1] * 1000, parse_fractions("900/0/100"), seed=0)
    assert [sides.count(s) for s in (0, 1, 2)] == [900, 0, 100]
    assert deal_groups([1] * 10, (0.5, 0.0, 0.5), seed=1) == deal_groups([1] * 10, (0.5, 0.0, 0.5), seed=1)


def test_train_and_evaluate_report_one_row_per_test_set(pranet, tmp_path):
    """`m2snet train --split FIXED` trains on the training set and reports every test set plus the mean;
    `m2snet evaluate --split FIXED` gives the same rows; MLflow holds <set>_<metric>."""
    import mlflow

    from m2snet.cli import app

    split = tmp_path / "fixed.json"
    runner = CliRunner()
    res = runner.invoke(app, ["data", "split", str(pranet), "--protocol", "fixed", "--out", str(split)])
    assert res.exit_code == 0, res.output
    assert "test Kvasir: 3 cases" in res.output
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = runner.invoke(app, ["train", "--data", str(pranet), "--split", str(split), "--epochs", "1", "--size", "64",
                              "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "run"),
                              "--set", "pretrained=false", "--set", "lossnet_weight=0", "--set", "progress=false",
                              "--set", f"cache_dir={tmp_path / 'cache'}", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "run" / "test_sets.md").read_text().splitlines()
    assert table[0].startswith("| test set | n | mDice | mIoU | wFm | Sm | mEm | MAE |")
    labels = [line.split("|")[1].strip() for line in table[2:]]
    assert labels == [x for s in ("CVC-300", "ETIS-LaribPolypDB", "Kvasir", "mean") for x in (s, f"{s}: no skill")]
    # The no-skill row (all background) on the same cases: every synthetic case has a lesion, so its Dice is 0.
    noskill = next(line for line in table if line.startswith("| Kvasir: no skill |")).split("|")
    assert noskill[2].strip() == "3" and noskill[3].strip() == "0.000"
    rows = json.loads((tmp_path / "run" / "test_sets.json").read_text())
    assert {k: v["n_cases"] for k, v in rows["rows"].items()} == {"CVC-300": 2, "ETIS-LaribPolypDB": 2, "Kvasir": 3}
    assert rows["mean"]["dice"] == pytest.approx(np.mean([r["dice"] for r in rows["rows"].values()]))
    run_id = json.loads((tmp_path / "run" / "fixed_result.json").read_text())["run_id"]
    metrics = mlflow.tracking.MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["Kvasir_dice"] == pytest.approx(rows["rows"]["Kvasir"]["dice"])
    assert "ETIS-LaribPolypDB_mae" in metrics and "mean_dice" in metrics
    assert metrics["Kvasir_noskill_dice"] == 0.0 and metrics["mean_noskill_mae"] == pytest.approx(
        rows["mean"]["noskill_mae"])
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "run" / "model.pt"), "--data", str(pranet),
                              "--split", str(split), "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "eval" / "test_sets.json").read_text())
    assert again["rows"]["Kvasir"]["dice"] == pytest.approx(rows["rows"]["Kvasir"]["dice"], abs=1e-6)
    assert (tmp_path / "eval" / "CVC-300" / "per_case.csv").is_file()


def test_paper_figures_are_the_papers(tmp_path):
    """Every figure stored is printed in the paper's text, in its M2SNet row."""
    from m2snet.workflows.paper import paper_comparison, paper_results
    from m2snet.workflows.protocols import PROTOCOLS

    # ../shared/paper beside the checkout (a worktree sits one level deeper).
    root = Path(__file__).resolve().parents[1]
    paper = next((p / "shared" / "paper" / "m2snet-paper.txt" for p in (root.parent, root.parent.parent)
                  if (p / "shared" / "paper" / "m2snet-paper.txt").is_file()), None)
    if paper is None:
        pytest.skip("the paper's text (../shared/paper/m2snet-paper.txt) is not on this machine")
    text = paper.read_text()
    for name, entry in paper_results()["protocols"].items():
        assert name in PROTOCOLS
        for figures in entry["sets"].values():
            for metric, value in figures.items():
                if metric != "paper_name":
                    assert f"{value:.2f}" in text or f"{value:.3f}" in text or f"{value:.4f}" in text, (name, metric)
    report = paper_comparison("polyp", {"Kvasir": {"dice": 0.5, "iou": 0.4}}, {"epochs": 1, "pretrained": False})
    assert "| Kvasir | dice | 0.500 | n/a | 0.912 | -0.412 |" in report
    assert "epochs=1, size=unknown, train_cases=unknown, seeds=unknown, pretrained=False" in report
    assert "Tab. 1" in report


def test_protocol_split_uses_subsets_or_its_fallback(pranet, tmp_path):
    from m2snet.workflows.protocols import get_protocol, protocol_split

    polyp = get_protocol("polyp")
    assert sorted(protocol_split(polyp, pranet, out=tmp_path / "a.json").test_sets) == [
        "CVC-300", "ETIS-LaribPolypDB", "Kvasir"]
    # A dataset without PraNet's subsets (Kvasir-SEG alone): the seeded 900/100 fallback, test set "Kvasir".
    video = _video_dataset(tmp_path / "v")
    split = protocol_split(polyp, video, out=tmp_path / "b.json")
    assert list(split.test_sets) == ["Kvasir"] and len(split.test_sets["Kvasir"]) == 3
    assert len(split.fold(0).train) == 27
    clips = protocol_split(get_protocol("polyp-video"), video, out=tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["group_by"]["column"] == "clip" and not clips.crossings
    with pytest.raises(M2SNetError, match="unknown protocol 'lung'"):
        get_protocol("lung")


@pytest.mark.slow  # two minutes on a loaded 2-core box (training, pyfunc logging, registration)
def test_benchmark_polyp_on_a_pranet_layout(pranet, tmp_path):
    """Import + split + train + one row per test set + the paper's figures + a registered model version."""
    from mlflow import MlflowClient

    from m2snet.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["benchmark", str(pranet.parent / "src"), "--protocol", "polyp", "--format",
                                   "pranet", "--out", str(tmp_path / "b"), "--epochs", "1", "--size", "64",
                                   "--batch-size", "2", "--tracking-uri", uri, "--set", "pretrained=false",
                                   "--set", "lossnet_weight=0", "--set", "device=cpu", "--set", "progress=false",
                                   "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert res.exit_code == 0, res.output
    comparison = (tmp_path / "b" / "paper_comparison.md").read_text()
    assert "| CVC-300 (CVC-T) | dice |" in comparison and "| Kvasir | mae |" in comparison
    assert "epochs=1" in comparison and "pretrained=False" in comparison
    assert json.loads((tmp_path / "b" / "split.json").read_text())["protocol"] == "fixed"
    assert "registered model: m2snet-polyp/1" in res.output
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("m2snet-polyp", "1")
    rows = json.loads((tmp_path / "b" / "run" / "test_sets.json").read_text())
    assert float(version.tags["cv_dice"]) == pytest.approx(rows["mean"]["dice"], abs=1e-6)
    run = client.get_run(version.run_id)
    assert "ours vs the paper (Tab. 1" in run.data.tags["mlflow.note.content"]


def test_cv_refuses_a_fixed_split(pranet, tmp_path):
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.cv import run_cv

    split = make_fixed_split(pranet, out=tmp_path / "fixed.json")
    with pytest.raises(M2SNetError, match="a fixed split"):
        run_cv(TrainConfig(data=str(pranet), split=str(split.path)), tmp_path / "cv")


def test_comparison_from_a_finished_cv_and_fixed_run(tmp_path):
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.paper import comparison_from_results

    cv = tmp_path / "cv"
    (cv / "fold0").mkdir(parents=True)
    TrainConfig(epochs=3, size=96, pretrained=False).save(cv / "fold0" / "train_config.json")
    (cv / "cv_summary.json").write_text(json.dumps({"n_folds": 4, "folds": [0, 1, 2, 3],
                                                    "mean_percent": {"dice": 70.0, "iou": 60.0},
                                                    "std_percent": {"dice": 2.0, "iou": 1.0}}))
    text = comparison_from_results("busi", cv / "cv_summary.json")
    assert "| BUSI | dice | 70.00 | n/a | 79.21 | -9.21 |" in text
    assert "| BUSI (std) | iou | 1.00 | n/a | 1.19 | -0.19 |" in text
    assert "epochs=3, size=96" in text and "pretrained=False" in text and "folds=4 of 4" in text
    (tmp_path / "test_sets.json").write_text(json.dumps({"rows": {"CVC-300": {"dice": 0.9, "mae": 0.01,
                                                                              "noskill_mae": 0.05}}}))
    assert "| CVC-300 (CVC-T) | mae | 0.010 | 0.050 | 0.009 | +0.001 |" in comparison_from_results(
        "polyp", tmp_path / "test_sets.json")
    with pytest.raises(M2SNetError, match="results file not found"):
        comparison_from_results("polyp", tmp_path / "nope.json")
