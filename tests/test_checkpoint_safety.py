"""Loading a checkpoint never runs code: tensors and plain data only (``torch.load(weights_only=True)``).

A planted checkpoint whose pickle would create a marker file is refused by every command that reads a
checkpoint, with one line naming the file and exit 2, and the marker never appears. What m2snet writes
(the slim ``model.pt`` and the resumable ``last.pt`` with optimizer and RNG state) loads weights-only.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m2snet.errors import M2SNetError
from m2snet.models.checkpoint import Checkpoint, capture_rng_state, restore_rng_state


class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint would run instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> Path:
    """A torch.save file shaped like an m2snet checkpoint, with the payload in its metadata."""
    torch.save({"format_version": 1, "model_name": "m2snet", "state_dict": {}, "metrics": _Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    from tests.conftest import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_per_class=(1, 1, 1), size=48)


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``m2snet ARGS`` through the CLI's own entry point (its error boundary included): (exit code, stderr)."""
    from m2snet.cli import main

    monkeypatch.setattr(sys, "argv", ["m2snet", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


def test_load_refuses_a_planted_checkpoint_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = plant(tmp_path / "evil.pt", marker)
    with pytest.raises(M2SNetError, match=r"evil.pt is not a safe m2snet checkpoint: it holds objects other than "
                                          r"tensors and plain data.*refusing to unpickle it"):
        Checkpoint.load(evil)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["export", "evaluate", "recalibrate-bn", "train --resume"])
def test_every_command_refuses_a_planted_checkpoint(command, tiny_data, tmp_path, monkeypatch, capsys):
    data, split = tiny_data
    marker = tmp_path / "pwned"
    if command == "train --resume":
        run = tmp_path / "run"
        run.mkdir()
        evil = plant(run / "last.pt", marker)
        args = ["train", "--data", str(data), "--out", str(run), "--resume", "--no-track", "--device", "cpu",
                "--epochs", "1", "--size", "64", "--set", "pretrained=false", "--set", "lossnet_pretrained=false"]
    else:
        evil = plant(tmp_path / "evil.pt", marker)
        args = {"export": ["export", str(evil), "--out", str(tmp_path / "m.onnx")],
                "evaluate": ["evaluate", "--checkpoint", str(evil), "--data", str(data), "--device", "cpu",
                             "--out", str(tmp_path / "eval")],
                "recalibrate-bn": ["recalibrate-bn", str(evil), "--data", str(data), "--device", "cpu",
                                   "--out", str(tmp_path / "recal.pt")]}[command]
    monkeypatch.chdir(tmp_path)
    code, err = _cli(args, monkeypatch, capsys)
    assert not marker.exists(), f"{command}: the checkpoint's payload ran"
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{evil} is not a safe m2snet checkpoint" in lines[0] and "refusing to unpickle it" in lines[0]


def _file(kind: str, path: Path) -> Path:
    import pickle

    if kind == "zip cut short":  # a torch.save copy that stopped early
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "pickle":  # a plain pickle.dump, not torch.save
        path.write_bytes(pickle.dumps({"state_dict": {}}, protocol=4))
    else:
        path.write_bytes({"text": b"e not a checkpoint", "empty": b""}[kind])
    return path


@pytest.mark.parametrize("kind, says", [
    ("text", r"neither a torch\.save zip archive nor a pickle \(it starts with b'e not a c'\)"),
    ("empty", r"the file is empty"),
    ("zip cut short", r"a damaged torch\.save zip archive \(failed finding central directory\); copy or save it again"),
    ("pickle", r"a Python pickle \(protocol 4\), not written by torch\.save; m2snet reads checkpoints as tensors and "
               r"plain data only and does not unpickle other files"),
])
def test_an_unreadable_file_is_named_with_what_it_is(tmp_path, kind, says):
    """One line naming the file and what it is: never torch's bare opcode ("(101)") nor its advice to retry
    with weights_only=False, which would run whatever the file holds."""
    path = _file(kind, tmp_path / "model.pt")
    with pytest.raises(M2SNetError) as err:
        Checkpoint.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a readable torch checkpoint: ") and re.search(says, message), message
    assert "\n" not in message and "weights_only" not in message.replace("weights-only", "")


def test_rng_state_round_trips_weights_only(tmp_path):
    """The resumable checkpoint's RNG state: tensors and plain data, restoring every generator exactly."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian is part of numpy's state too
    state = capture_rng_state()
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    torch.save(state, tmp_path / "rng.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_metadata_is_saved_as_plain_data(tmp_path):
    """numpy scalars/arrays and paths in metadata are written as plain values, and load weights-only."""
    ckpt = Checkpoint(model_name="unet", state_dict={"w": torch.ones(2)},
                      metrics={"val_dice": np.float32(0.5), "epoch": np.int64(3)},
                      extra={"where": Path("runs/x"), "sizes": np.arange(3), "pair": (1, 2)})
    path = ckpt.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["metrics"] == {"val_dice": 0.5, "epoch": 3} and type(payload["metrics"]["epoch"]) is int
    assert payload["where"] == "runs/x" and payload["sizes"] == [0, 1, 2] and payload["pair"] == (1, 2)
    assert Checkpoint.load(path).extra == {"where": "runs/x", "sizes": [0, 1, 2], "pair": (1, 2)}
    with pytest.raises(TypeError, match="'bad'.*object"):
        Checkpoint(model_name="unet", state_dict={}, extra={"bad": object()}).save(tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def _legacy_last(path: Path, extra: dict | None = None) -> Path:
    """A resumable checkpoint as m2snet wrote it before plain data: numpy's RNG state as numpy's tuple."""
    ckpt = Checkpoint(model_name="unet", state_dict={"w": torch.ones(2)}, epoch=1)
    payload = {**ckpt.to_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}, "history": [], "selected": {},
               "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                       "cuda": []}, **(extra or {})}
    torch.save(payload, path)
    return path


def test_an_older_last_pt_is_refused_then_upgraded_to_plain_data(tmp_path, monkeypatch, capsys):
    np.random.seed(5)
    old = _legacy_last(tmp_path / "last.pt")
    expected = np.random.standard_normal(3).tolist()
    with pytest.raises(M2SNetError, match=r"not a safe m2snet checkpoint.*refusing to unpickle it \(an m2snet "
                                          r"checkpoint from before weights-only loading: `m2snet upgrade-checkpoint"):
        Checkpoint.load(old)
    code, err = _cli(["upgrade-checkpoint", str(old), "--out", str(tmp_path / "new.pt")], monkeypatch, capsys)
    assert code == 0, err
    torch.load(tmp_path / "new.pt", weights_only=True)
    new = Checkpoint.load(tmp_path / "new.pt")
    assert new.resumable and new.epoch == 1
    np.random.seed(0)
    restore_rng_state(new.resume.rng)
    assert np.random.standard_normal(3).tolist() == expected


def test_upgrade_still_refuses_anything_but_numpy_rng_state(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    evil = _legacy_last(tmp_path / "last.pt", extra={"metrics": _Payload(marker)})
    code, err = _cli(["upgrade-checkpoint", str(evil), "--out", str(tmp_path / "new.pt")], monkeypatch, capsys)
    assert code == 2 and f"{evil} is not a safe m2snet checkpoint" in err and "upgrade-checkpoint" not in err, err
    assert not marker.exists() and not (tmp_path / "new.pt").exists()
