"""The training step's speed knobs: inert on CPU, numerics of the compiled step on CUDA, and the
GPU speed script's logic (a CPU dry run with the GPU machine's missing packages blocked)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2snet.training.config import TrainConfig
from m2snet.training.trainer import build_optimizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import train_speed  # noqa: E402


def test_speed_knobs_leave_the_cpu_step_as_it_was() -> None:
    # On CPU every knob is off whatever the config says: same losses bit for bit as plain eager.
    curves = train_speed.loss_curves("m2snet_fast", ["eager", "compiled_cl_fused"], "cpu", size=64, batch=2,
                                     n_steps=2, lossnet_weight=0.0)
    assert curves["eager"] == curves["compiled_cl_fused"]
    assert curves["eager"][0] != curves["eager"][1]  # the step did update the weights
    step, _ = train_speed.make_step("msnet", "compiled_cl_fused", "cpu", 64, 2,
                                    torch.nn.Identity())
    assert step.forward is step.model and not step.channels_last and not step.amp
    assert not build_optimizer(step.model, TrainConfig(fused_optimizer=True), on_cuda=False).defaults["fused"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_step_keeps_the_loss_curve_of_eager() -> None:
    curves = train_speed.loss_curves("m2snet_fast", ["eager", "compiled_cl_fused"], "cuda", size=128, batch=4,
                                     n_steps=8)
    diff = train_speed.max_relative_difference(curves["compiled_cl_fused"], curves["eager"])
    assert diff <= train_speed.NUMERICS_RTOL, (diff, curves)


BLOCKER = '''
import sys
BLOCK = {"segmentation_models_pytorch", "pysodmetrics", "py_sod_metrics", "mlflow", "kfp", "dvc",
         "great_expectations", "optuna", "imagehash"}
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine)")
sys.meta_path.insert(0, _Blocker())
'''


@pytest.mark.slow
def test_gpu_speed_script_dry_run(tmp_path: Path) -> None:
    # The one GPU window must not be lost to a typo or to an import the lent machine lacks.
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "TINY": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "PYTHONPATH": str(tmp_path / "block")}
    proc = subprocess.run(["bash", "bench/gpu_speed.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exits = re.findall(r"=== (\w+): exit (\d+)", proc.stdout)
    assert exits == [("train_eager", "0"), ("data", "0"), ("train_compiled", "0")], proc.stdout[-3000:]
    for name in ("train_eager", "data", "train_compiled"):
        assert json.loads((tmp_path / "out" / f"{name}.json").read_text())
    numerics = json.loads((tmp_path / "out" / "train_compiled.json").read_text())["numerics"]
    assert numerics["max_rel_diff"]["compiled_cl_fused"] == 0.0  # CPU: the knobs are inert
