"""Progress events (m2snet.progress): whole JSON lines from concurrent processes, task marks, the real emitters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from m2snet import progress

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, events: Path | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    env["PYTHONPATH"] = str(REPO)
    if events is not None:
        env[progress.ENV] = str(events)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_emit_without_the_variable_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    progress.emit("epoch", epoch=1, epochs=2)
    assert progress.task_started("train-fold", 3) == "train-fold-3"  # the key, and no mark, no event
    assert list(tmp_path.iterdir()) == []


def test_concurrent_processes_append_whole_lines(tmp_path):
    """Four processes append 300 events of 3 kB each at once: every line is one whole event."""
    events = tmp_path / "events.jsonl"
    code = ("import sys\nfrom m2snet import progress\n"
            "for i in range(300):\n    progress.emit('epoch', epoch=i, filler=sys.argv[1] * 3000)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, letter], env={**os.environ, "PYTHONPATH": str(REPO),
                                                                         progress.ENV: str(events)})
             for letter in "abcd"]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    lines = _events(events)
    assert len(lines) == 1200
    for letter in "abcd":
        mine = [e for e in lines if e["filler"] == letter * 3000]
        assert [e["epoch"] for e in mine] == list(range(300))  # each process's events, in its order


def test_a_task_process_marks_its_stream_and_reports_how_it_ended(tmp_path):
    events = tmp_path / "events.jsonl"
    code = ("import sys\nfrom m2snet import progress\n"
            "progress.task_started('train-fold', 2, pipeline_run_id='job-1')\n"
            "progress.emit('epoch', epoch=1, epochs=1)\nprint('work')\n"
            "if sys.argv[1] == 'fail':\n    raise ValueError('corrupt')\n")
    ok = _python(code, events, "ok")
    assert ok.returncode == 0, ok.stderr
    marks = [progress.parse_mark(line) for line in ok.stdout.splitlines()]
    assert marks == [{"task": "train-fold-2", "event": "start"}, None, {"task": "train-fold-2", "event": "end"}]
    start, epoch, end = _events(events)
    assert start["kind"] == "task_start" and start["item"] == 2 and start["pipeline_run_id"] == "job-1"
    assert epoch["task"] == "train-fold-2" and end == {**end, "kind": "task_end", "ok": True}

    events.unlink()
    failed = _python(code, events, "fail")
    assert failed.returncode == 1 and "ValueError: corrupt" in failed.stderr
    assert _events(events)[-1] == {**_events(events)[-1], "kind": "task_end", "ok": False,
                                   "error": "ValueError: corrupt"}
    assert progress.parse_mark(failed.stdout.splitlines()[-1]) == {"task": "train-fold-2", "event": "end"}


def test_training_and_evaluation_emit_their_progress(tmp_path, monkeypatch):
    """The trainer's epoch end and the evaluation's summary are events (what the console reads), not log wording."""
    from m2snet.evaluation.evaluate import EvalOptions, evaluate
    from m2snet.training.config import TrainConfig
    from m2snet.training.trainer import train
    from tests.conftest import make_tiny_dataset

    data, split = make_tiny_dataset(tmp_path / "data", n_per_class=(2, 2, 0), size=64)
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.ENV, str(events))
    res = train(TrainConfig(data=str(data), split=str(split), fold=0, model="unet", epochs=2, batch_size=2, size=64,
                            pretrained=False, lossnet_weight=0.0, lossnet_pretrained=False, device="cpu",
                            progress=False, out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                            max_train_cases=2, max_val_cases=1))
    epochs = [e for e in _events(events) if e["kind"] == "epoch"]
    assert [(e["epoch"], e["epochs"]) for e in epochs] == [(1, 2), (2, 2)]
    assert epochs[-1]["val_dice"] == res.history[-1]["val_dice"] and epochs[-1]["loss"] == res.history[-1]["train_loss"]

    result = evaluate([res.checkpoint], data, out_dir=tmp_path / "eval",
                      options=EvalOptions(device="cpu", progress=False, with_sod=False))
    (evaluated,) = [e for e in _events(events) if e["kind"] == "evaluated"]
    assert evaluated["cases"] == len(result.rows) and evaluated["dice"] == result.metrics["dice"]


def test_train_into_a_file_writes_plain_lines_not_carriage_returns(tmp_path):
    """`m2snet train > log 2>&1`: no tqdm redraws (one per batch, joined by carriage returns) in the file."""
    from tests.conftest import make_tiny_dataset

    data, split = make_tiny_dataset(tmp_path / "data", n_per_class=(2, 2, 0), size=64)
    log = tmp_path / "train.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(progress.ENV, None)
    with open(log, "w") as out:
        res = subprocess.run([sys.executable, "-m", "m2snet.cli", "train", "--data", str(data), "--split", str(split),
                              "--fold", "0", "--model", "unet", "--epochs", "1", "--batch-size", "1", "--size", "64",
                              "--no-track", "--device", "cpu", "--out", str(tmp_path / "run"),
                              "--set", "pretrained=false", "--set", "lossnet_pretrained=false"],
                             stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_bytes()  # not read_text(): universal newlines would turn each \r into a line end
    assert res.returncode == 0, text
    assert b"\r" not in text and b"epoch 1/1: loss" in text  # the trainer's own line per epoch


def test_a_long_loop_off_a_terminal_prints_a_plain_line_now_and_then(monkeypatch, capsys):
    import time

    monkeypatch.setattr(progress, "PLAIN_BAR_EVERY_S", 0.2)
    for _ in progress.bar(range(12), desc="evaluate", unit="img"):
        time.sleep(0.05)
    for _ in progress.bar(range(3), desc="short", unit="img"):  # over before the first line is due: silent
        pass
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 6 and "\r" not in "".join(lines), lines
    assert all(line.startswith("evaluate: ") for line in lines) and lines[-1].startswith("evaluate: 12/12 img")
