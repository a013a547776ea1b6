"""Issue 29.3: one split validator that every consumer of a split file calls.

Per fold, no case on both sides (and none twice on one side), every id in the dataset, and the
dataset version the split was made for equal to the data's unless the user names the version it
accepts. Each consumer (train, cv, evaluate, export --precision int8, the pipeline's train, tune and
evaluate steps) is shown refusing a bad split with one line naming the file, the fold and the case.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

from m2snet.data.split import load_split
from m2snet.errors import M2SNetError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    from tests.conftest import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("splitcheck"), n_per_class=(2, 2, 2), size=32)


def _edit(split: Path, out: Path, edit) -> Path:
    data = json.loads(split.read_text())
    edit(data)
    out.write_text(json.dumps(data))
    return out


def _one_error_line(code: int, err: str, *parts: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _cli(args: list[object], monkeypatch, capsys) -> tuple[int, str]:
    """``m2snet ARGS`` through the CLI's own entry point (its error boundary included): (exit code, stderr)."""
    from m2snet.cli import main

    monkeypatch.setattr(sys, "argv", ["m2snet", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


@pytest.fixture
def leaky(tiny, tmp_path) -> tuple[Path, str]:
    """The tiny split with fold 0's first validation case added to fold 0's training list."""
    _, split = tiny
    case = json.loads(split.read_text())["folds"][0]["val"][0]
    return _edit(split, tmp_path / "leaky.json", lambda d: d["folds"][0]["train"].append(case)), case


TRAIN_ARGS = ["--epochs", "1", "--size", "32", "--batch-size", "2", "--device", "cpu", "--no-track",
              "--set", "pretrained=false", "--set", "lossnet_weight=0", "--set", "progress=false"]


def test_train_refuses_a_case_on_both_sides_of_a_fold(tiny, leaky, tmp_path, monkeypatch, capsys):
    """The issue's reproduction: `m2snet train --split that.json --fold 0` trained and scored a training case."""
    data, _ = tiny
    split, case = leaky
    code, err = _cli(["train", "--data", data, "--split", split, "--fold", 0, "--out", tmp_path / "run",
                      *TRAIN_ARGS], monkeypatch, capsys)
    _one_error_line(code, err, str(split), "fold 0", case, "train and val")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_every_consumer_calls_the_validator(tiny, leaky, tmp_path, monkeypatch, capsys):
    data, _ = tiny
    split, case = leaky
    # cv, evaluate, export --precision int8 (whose own overlap check is now this one): the same line.
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")  # never read: the split is refused first
    for args in (["cv", "--data", data, "--split", split, "--out", tmp_path / "cv", *TRAIN_ARGS],
                 ["evaluate", "--checkpoint", ckpt, "--data", data, "--split", split, "--out", tmp_path / "ev"],
                 ["export", ckpt, "--out", tmp_path / "m.onnx", "--precision", "int8", "--data", data,
                  "--split", split]):
        code, err = _cli(args, monkeypatch, capsys)
        _one_error_line(code, err, str(split), "fold 0", case)
    # The pipeline's steps: tune (its inner split), train and evaluate.
    from m2snet.workflows import steps

    with pytest.raises(M2SNetError, match=f"fold 0: case {case} is in both train and val"):
        steps.tune_step(str(data), str(split), str(tmp_path / "best.json"), preset="tiny", n_trials=1,
                        workdir=str(tmp_path / "tune"))
    with pytest.raises(M2SNetError, match=f"fold 0: case {case} is in both train and val"):
        steps.train_fold_step(str(data), str(split), 0, "", str(tmp_path / "fold0"), preset="tiny")
    with pytest.raises(M2SNetError, match=f"fold 0: case {case} is in both train and val"):
        steps.evaluate_fold_step(str(data), str(split), 0, str(tmp_path / "fold0"), str(tmp_path / "ev0"))


def test_ids_twice_on_one_side_unknown_ids_and_empty_files(tiny, tmp_path):
    data, split = tiny
    from m2snet.data.format import load_dataset

    info = load_dataset(data)
    first = json.loads(split.read_text())["folds"][1]["train"][0]
    twice = _edit(split, tmp_path / "twice.json", lambda d: d["folds"][1]["train"].append(first))
    with pytest.raises(M2SNetError, match=f"twice.json: fold 1: case {first} is listed twice in train"):
        load_split(twice)
    ghost = _edit(split, tmp_path / "ghost.json", lambda d: d["folds"][1]["val"].append("benign_9999"))
    with pytest.raises(M2SNetError, match=f"ghost.json: fold 1: case benign_9999 .*not in {data}"):
        load_split(ghost, info)
    as_text = _edit(split, tmp_path / "as_text.json", lambda d: d["folds"][0].update(train=first))
    with pytest.raises(M2SNetError, match="as_text.json: malformed split file .*list of case ids"):
        load_split(as_text)
    # Item 29.7: a split file that is not an object is one line naming it.
    for text in ("[]", '"x"', "3"):
        (tmp_path / "odd.json").write_text(text)
        with pytest.raises(M2SNetError, match="odd.json: a split file is a JSON object"):
            load_split(tmp_path / "odd.json")


def test_a_split_made_for_another_dataset_version_needs_it_named(tiny, tmp_path, monkeypatch, capsys, caplog):
    """Same ids, other bytes: refused unless the user names the split's version (recorded in the run)."""
    from m2snet.data.format import load_dataset
    from m2snet.mlops.training_run import config_params
    from m2snet.training.cases import resolve_cases
    from m2snet.training.config import TrainConfig

    data, split = tiny
    other = tmp_path / "other"
    shutil.copytree(data, other)
    mask = sorted((other / "masks").iterdir())[0]
    mask.write_bytes(mask.read_bytes() + b"\0")  # any byte changes the data version (DVC's hash)
    made_for = load_split(split).dataset_version
    now = load_dataset(other).version
    assert made_for and now != made_for
    code, err = _cli(["train", "--data", other, "--split", split, "--fold", 0, "--out", tmp_path / "run",
                      *TRAIN_ARGS], monkeypatch, capsys)
    _one_error_line(code, err, str(split), made_for, now, f"--accept-split-version {made_for}")
    cfg = TrainConfig(data=str(other), split=str(split), fold=0)
    with pytest.raises(M2SNetError, match="made for dataset version"):
        resolve_cases(cfg)
    with pytest.raises(M2SNetError, match="not the version it was made for"):
        resolve_cases(cfg.override(accept_split_version=now))  # naming another version accepts nothing
    with caplog.at_level(logging.WARNING, logger="m2snet.data.split"):
        accepted = resolve_cases(cfg.override(accept_split_version=made_for))
    assert accepted.reported == load_split(split).fold(0).val
    assert "accepted by name" in caplog.text and str(split) in caplog.text
    assert config_params(cfg.override(accept_split_version=made_for).to_dict())[
        "config.accept_split_version"] == made_for  # what the run records


def test_a_legacy_split_without_a_version_is_used_with_a_warning(tiny, tmp_path, caplog):
    from m2snet.data.format import load_dataset

    data, split = tiny
    legacy = _edit(split, tmp_path / "legacy.json", lambda d: d.pop("dataset_version"))
    with caplog.at_level(logging.WARNING, logger="m2snet.data.split"):
        loaded = load_split(legacy, load_dataset(data))
    assert loaded.dataset_version is None
    assert "legacy.json" in caplog.text and "records no dataset version" in caplog.text
