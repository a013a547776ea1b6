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
    from m2snet.data.split import load_split

    # The scrambled copy is another dataset version: the split is accepted for it by name.
    b = train(_cfg(other, split, tmp_path / "b", selection=selection,
                   accept_split_version=load_split(split).dataset_version))
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
        fold = load_split(split).fold(0)
        assert set(a.selection_cases) <= set(fold.train) and set(a.selection_cases).isdisjoint(a.train_cases)
        dices = [row["val_dice"] for row in a.history]
        assert a.selected_epoch == 1 + int(np.argmax(dices))


def test_cv_records_the_rule_and_scores_only_unselected_cases(data, tmp_path):
    """The fold engine reports metrics of model.pt on the fold's validation cases and records the rule."""
    import json

    from m2snet.workflows.cv import run_cv

    ds, split = data
    res = run_cv(_cfg(ds, split, tmp_path / "unused", epochs=2, selection="inner"), tmp_path / "cv", [0, 1])
    for fr in res.folds:
        record = json.loads((fr.out_dir / "fold_result.json").read_text())
        assert record["selection"] == "inner" and record["selected_epoch"] in (1, 2)
        assert Path(record["checkpoint"]).name == "model.pt"
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert [row["fold"] for row in summary["per_fold"]] == [0, 1]


# --- rules as objects: a new rule is one register_selection call, here in the test file -------------
@pytest.fixture
def two_epoch_mean():
    """A toy rule registered the way a new one would be: the lowest inner validation loss averaged over
    the last two epochs (a smoothed "best"), scored on the inner split of the fold's training cases.
    (The loss, not the Dice: a 4-epoch 32 px model scores a constant Dice, which cannot tell rules apart.)"""
    from dataclasses import dataclass

    from m2snet.training import selection

    @dataclass(frozen=True)
    class MeanOfLastTwo(selection.SelectionRule):
        def score(self, history):
            return -float(np.mean([row["val_loss"] for row in history[-2:]]))

    rule = selection.register_selection(MeanOfLastTwo("toy_mean2", "inner split (toy: mean of 2)", epoch_cases="inner"))
    yield rule
    selection._RULES.pop(rule.name)


def test_a_rule_registered_in_one_place_is_validated_used_and_recorded(data, tmp_path, two_epoch_mean):
    from mlflow.tracking import MlflowClient

    from m2snet.mlops.mlflow_store import TrackingConfig
    from m2snet.mlops.tracking import Tracker
    from m2snet.mlops.training_run import tracking_callbacks
    from m2snet.training.trainer import train

    ds, split = data
    cfg = _cfg(ds, split, tmp_path / "toy", epochs=4).override_strings(["selection=toy_mean2"])  # as --set does
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Tracker.start(TrackingConfig(uri=uri, experiment="toy-rule"), run_name="toy") as tracker:
        res = train(cfg, callbacks=tracking_callbacks(tracker))
    params = MlflowClient(uri).get_run(tracker.run_id).data.params
    assert params["epoch_val_cases"] == "inner split (toy: mean of 2)"  # the rule describes itself
    losses = [row["val_loss"] for row in res.history]
    means = [-np.mean(losses[max(0, i - 1):i + 1]) for i in range(len(losses))]
    assert res.selected_epoch == 1 + int(np.argmax(means))  # the first of equal means: "better" is strict
    assert res.selection_score == pytest.approx(max(means))
    assert set(res.selection_cases).isdisjoint(res.val_cases)  # epoch_cases="inner": the fold's cases unread
    meta = torch.load(res.checkpoint, map_location="cpu", weights_only=True)
    assert (meta["selection"], meta["selected_epoch"], meta["epoch"]) == ("toy_mean2", res.selected_epoch,
                                                                          res.selected_epoch)


def test_an_unknown_or_twice_registered_rule_is_refused(two_epoch_mean):
    from m2snet.errors import M2SNetError
    from m2snet.training.selection import SelectionRule, register_selection

    with pytest.raises(M2SNetError, match=r"selection='best' must be one of final, inner, fold_best, toy_mean2"):
        TrainConfig(data="d", selection="best").validate()
    with pytest.raises(ValueError, match="'inner' registered twice"):
        register_selection(SelectionRule("inner", "again"))
