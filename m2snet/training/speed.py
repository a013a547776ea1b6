"""What the training step runs fast on this machine: the precision and memory format per device.

``TrainConfig.amp`` and ``channels_last`` ask for the fast path; this module decides where it exists.
On CUDA both act as they always did (fp16/bf16 autocast, NHWC for tensor cores). On the CPU they act
only where the processor has native bf16 units (x86 ``avx512_bf16`` or ``amx_bf16``, ARM ``bf16``):
there oneDNN runs bf16 convolutions and GEMMs at 2-4x fp32, and NHWC is oneDNN's native layout. A CPU
without them would emulate bf16 (slower than fp32) and run NHWC through reorders, so there the step
stays plain fp32 NCHW whatever the config says (``bench/train_speed.py`` measures both).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# /proc/cpuinfo flags of native bf16 arithmetic: AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake+),
# AMX-BF16 (Intel Sapphire Rapids+), ARMv8.6 BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> frozenset[str]:
    """The native-bf16 flags this CPU reports (empty when it has none or /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags & NATIVE_BF16_FLAGS)


def cpu_has_native_bf16() -> bool:
    return bool(cpu_bf16_flags()) and torch.backends.mkldnn.is_available()


@dataclass(frozen=True)
class StepPrecision:
    """The settings a training step runs with on one device, and why (logged once per run)."""

    amp: bool  # autocast on
    dtype: torch.dtype | None  # the autocast dtype (None: the device's default)
    channels_last: bool
    reason: str

    def describe(self) -> str:
        precision = f"{str(self.dtype).removeprefix('torch.')} autocast" if self.amp else "fp32"
        return f"{precision}, {'channels_last' if self.channels_last else 'NCHW'} ({self.reason})"


def step_precision(device: str, amp: bool, channels_last: bool) -> StepPrecision:
    """What ``amp``/``channels_last`` mean on ``device`` (see the module docstring)."""
    device_type = device.split(":")[0]
    if device_type == "cuda":
        return StepPrecision(amp, None, channels_last, "CUDA")
    if device_type == "cpu" and cpu_has_native_bf16():
        flags = ", ".join(sorted(cpu_bf16_flags()))
        why = f"CPU with native bf16: {flags}" if amp or channels_last else f"as asked; the CPU has {flags}"
        return StepPrecision(amp, torch.bfloat16 if amp else None, channels_last, why)
    if amp or channels_last:
        return StepPrecision(False, None, False, "CPU without native bf16 units: bf16 would be emulated")
    return StepPrecision(False, None, False, "asked for")
