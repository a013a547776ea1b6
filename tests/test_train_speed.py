"""The training step's speed knobs: bf16 + channels_last on a CPU with native bf16 (fp32 without), compile and
the fused optimizer inert on the CPU, numerics of the compiled step on CUDA, and the GPU speed script's logic
(a CPU dry run with the GPU machine's missing packages blocked)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2snet.training import speed
from m2snet.training.config import TrainConfig
from m2snet.training.step import build_optimizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import train_speed  # noqa: E402


def test_compile_and_fused_optimizer_are_inert_on_the_cpu() -> None:
    # compile and the fused optimizer act on CUDA only: with the precision pinned, the step is plain eager.
    fp32 = {"amp": False, "channels_last": False}
    train_speed.MODES["_fp32_compiled_fused"] = {**fp32, "compile": True, "fused_optimizer": True}
    try:
        curves = train_speed.loss_curves("m2snet_fast", ["fp32", "_fp32_compiled_fused"], "cpu", size=64, batch=2,
                                         n_steps=2, lossnet_weight=0.0)
    finally:
        del train_speed.MODES["_fp32_compiled_fused"]
    assert curves["fp32"] == curves["_fp32_compiled_fused"]
    assert curves["fp32"][0] != curves["fp32"][1]  # the step did update the weights
    step, _ = train_speed.make_step("msnet", "compiled_cl_fused", "cpu", 64, 2, torch.nn.Identity())
    assert step.forward is step.model
    assert not build_optimizer(step.model, TrainConfig(fused_optimizer=True), on_cuda=False).defaults["fused"]


def _conv_output_dtypes(step, x: torch.Tensor, y: torch.Tensor) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for m in step.model.modules() if isinstance(m, torch.nn.Conv2d)]
    step(x, y)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.skipif(not speed.cpu_has_native_bf16(), reason="this CPU has no native bf16 units (avx512_bf16/amx_bf16)")
def test_amp_and_channels_last_run_bf16_nhwc_on_a_cpu_with_native_bf16() -> None:
    from m2snet.training.losses import TotalLoss

    x, y = train_speed.batch_at(64, 2, "cpu")
    loss_fn = TotalLoss(n_classes=1, lossnet_weight=0.0, lossnet_pretrained=False)
    step, _ = train_speed.make_step("m2snet_fast", "bf16_cl", "cpu", 64, 2, loss_fn)
    assert step.amp and step.channels_last and step.precision.dtype == torch.bfloat16
    assert not step.scaler.is_enabled()  # bf16 needs no loss scaling
    assert _conv_output_dtypes(step, x, y) == {torch.bfloat16}
    conv = next(m for m in step.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # The same training, fp32 and bf16 from the same weights on the same batches: bf16 rounds, the loss
    # follows (the accuracy cost on real data: docs/results/busi-cpu.md, a paired CI).
    curves = train_speed.loss_curves("m2snet_fast", ["fp32", "bf16_cl"], "cpu", size=64, batch=2, n_steps=3,
                                     lossnet_weight=0.0)
    assert curves["fp32"] != curves["bf16_cl"]
    assert train_speed.max_relative_difference(curves["bf16_cl"], curves["fp32"]) < 0.05, curves


def test_a_cpu_without_native_bf16_trains_fp32_nchw_whatever_the_config_says(monkeypatch) -> None:
    # Emulated bf16 is slower than fp32 there: amp and channels_last are declined, bit for bit plain fp32.
    monkeypatch.setattr(speed, "cpu_bf16_flags", lambda: frozenset())
    precision = speed.step_precision("cpu", amp=True, channels_last=True)
    assert (precision.amp, precision.channels_last, precision.dtype) == (False, False, None)
    assert "without native bf16" in precision.describe()
    curves = train_speed.loss_curves("m2snet_fast", ["fp32", "bf16_cl"], "cpu", size=64, batch=2, n_steps=2,
                                     lossnet_weight=0.0)
    assert curves["fp32"] == curves["bf16_cl"]


def test_the_cpu_bf16_flags_come_from_cpuinfo() -> None:
    flags = speed.cpu_bf16_flags()
    assert flags <= speed.NATIVE_BF16_FLAGS
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert bool(flags) == any(f in text.split() for f in speed.NATIVE_BF16_FLAGS)


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
