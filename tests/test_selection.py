"""Model selection never sees the reported fold: the checkpoint a fold reports on is chosen without
its validation cases (final epoch, or the best epoch on an inner split of the training cases)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2snet.training.config import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """A 15-case demo set (48 px) with a 3-fold split."""
    from tests.conftest import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("selection"), n_per_class=(6, 5, 4), size=48, n_folds=3, seed=3)


def _cfg(ds: Path, split: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(ds), split=str(split), fold=0, model="msnet", epochs=3, batch_size=4, size=32,
                multiscale=False, pretrained=False, lossnet_weight=0.0, lossnet_pretrained=False, device="cpu",
                deterministic=True, progress=False, out_dir=str(out), cache=False)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _scramble_val_masks(ds: Path, split: Path, dest: Path) -> Path:
    """A copy of the dataset whose fold-0 validation masks are inverted (what the fold reports on)."""
    from m2snet.data.split import load_split

    shutil.copytree(ds, dest)
    for cid in load_split(split).fold(0).val:
        mask = dest / "masks" / f"{cid}.png"
        arr = np.asarray(Image.open(mask))
        Image.fromarray((1 - arr).astype(np.uint8)).save(mask)
    return dest


@pytest.mark.parametrize("selection", ["final", "inner"])
def test_selected_checkpoint_does_not_depend_on_the_reported_cases(data, tmp_path, selection):
    """Same seed, same training cases, the fold's validation masks inverted: the same model.pt.

    Under ``fold_best`` the chosen epoch follows the validation Dice, so inverting those masks can
    change the checkpoint; under the honest rules it cannot.
    """
    from m2snet.training.trainer import train

    ds, split = data
    other = _scramble_val_masks(ds, split, tmp_path / "scrambled")
    a = train(_cfg(ds, split, tmp_path / "a", selection=selection))
    b = train(_cfg(other, split, tmp_path / "b", selection=selection))
    assert a.selected_epoch == b.selected_epoch
    wa, wb = _weights(a.checkpoint), _weights(b.checkpoint)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not set(a.selection_cases) & set(a.val_cases) if selection == "inner" else True
    meta = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    assert meta["selection"] == selection and meta["selected_epoch"] == a.selected_epoch
    if selection == "final":
        assert a.selected_epoch == 3
        last = _weights(a.last_checkpoint)
        assert all(torch.equal(wa[k], last[k]) for k in wa)
    else:
        # The best epoch by Dice on the inner cases, which are training cases of the fold.
        from m2snet.data.split import load_split

        fold = load_split(split).fold(0)
        assert set(a.selection_cases) <= set(fold.train) and set(a.selection_cases).isdisjoint(a.train_cases)
        dices = [row["val_dice"] for row in a.history]
        assert a.selected_epoch == 1 + int(np.argmax(dices))


def test_cv_records_the_rule_and_scores_only_unselected_cases(data, tmp_path):
    """The fold engine reports metrics of model.pt on the fold's validation cases and records the rule."""
    import json

    from m2snet.workflows.folds import run_cv

    ds, split = data
    res = run_cv(_cfg(ds, split, tmp_path / "unused", epochs=2, selection="inner"), tmp_path / "cv", [0, 1])
    for fr in res.folds:
        record = json.loads((fr.out_dir / "fold_result.json").read_text())
        assert record["selection"] == "inner" and record["selected_epoch"] in (1, 2)
        assert Path(record["checkpoint"]).name == "model.pt"
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert [row["fold"] for row in summary["per_fold"]] == [0, 1]
