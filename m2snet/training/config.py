"""The one typed configuration of a training run.

Every knob of the trainer lives in :class:`TrainConfig`. The config is saved next to the run
(``train_config.json``) and inside every checkpoint, and can be loaded back from a JSON or YAML
file; CLI options override single fields (``--set key=value``) on top of a file.

Defaults are the paper's / reference script's recipe (spec "Training recipe"): SGD with
Nesterov momentum 0.9, weight decay 5e-4, backbone max LR 0.005 and head max LR 0.05 on the
triangular schedule, batch 16, 352 px with multi-scale batches, flip + rotation, AMP on CUDA.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from m2snet.data.split import INNER_VAL_FRACTION
from m2snet.errors import M2SNetError
from m2snet.files import write_json
from m2snet.training.selection import list_selections

# The reference's multi-scale set at a 352 px base size (spec: "every batch resized to one of ...").
REFERENCE_SCALES = (224, 256, 288, 320, 352)
REFERENCE_BASE_SIZE = 352
# Every registered encoder's output stride: train sizes are multiples of it, and the deepest feature map of
# a size-32 input is 1x1 (a batch of one there leaves BatchNorm one value per channel).
ENCODER_STRIDE = 32


# A training run's directory: the resumable checkpoint of the latest epoch, and the checkpoint the
# selection rule chose (what evaluation, export and serving use).
LAST = "last.pt"
SELECTED = "model.pt"

@dataclass
class TrainConfig:
    # --- data -----------------------------------------------------------------------------------
    data: str = ""  # dataset directory (m2snet.data layout)
    split: str | None = None  # split file; None = train on all cases, no validation
    fold: int = 0  # which fold of the split file
    cache: bool = True  # read decoded+resized arrays from the preprocessed cache (m2snet.data.cache)
    cache_dir: str | None = None  # None = m2snet.data.cache.default_cache_dir()
    num_workers: int = 0
    max_train_cases: int | None = None  # subsample (first N after a seeded shuffle) for quick runs
    max_val_cases: int | None = None
    # --- model selection (which checkpoint is THE result of the run) ----------------------------
    # A registered rule (m2snet.training.selection): "final" (the last epoch; the default),
    # "inner" (the best epoch on an inner split of the fold's training cases) or "fold_best" (the
    # best epoch on the fold's own validation cases -- test-set selection, kept to measure it).
    selection: str = "final"
    inner_val_fraction: float = INNER_VAL_FRACTION  # selection="inner": share of the fold's training cases held out
    # Refuse a split whose folds put two copies of one image (a duplicate cluster) on both sides.
    leak_check: bool = True
    # A split made for another version of the data (its recorded ``dataset_version``) is refused;
    # naming that version here (``--accept-split-version``) uses it anyway, and the run's params record it.
    accept_split_version: str | None = None
    # --- model / loss ---------------------------------------------------------------------------
    model: str = "m2snet"
    model_config: dict[str, Any] = field(default_factory=dict)  # extra create_model kwargs
    pretrained: bool | str = True  # True = hub when reachable, path = local weights, False = random
    lossnet_weight: float = 0.1  # lambda of L_f; 0 disables the LossNet term
    lossnet_pretrained: bool | str = True
    # --- optimisation (spec recipe) -------------------------------------------------------------
    epochs: int = 50
    batch_size: int = 16
    backbone_lr: float = 0.005
    head_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: Literal["triangle", "constant"] = "triangle"
    schedule_unit: Literal["epoch", "step"] = "epoch"  # triangle evaluated per epoch or per step
    # Where the triangle peaks, as a share of the run: 0.5 = the reference (rise over half the run);
    # smaller = a shorter warm-up and a longer decay (m2snet.training.schedule).
    warmup_fraction: float = 0.5
    grad_clip: float | None = None  # max grad norm; None = no clipping (reference has none)
    # --- input / augmentation -------------------------------------------------------------------
    size: int = 352  # base train size; the multi-scale set is REFERENCE_SCALES scaled by size/352
    multiscale: bool = True
    augment: bool = True  # flip + rotation within +-10 degrees (done by the dataset)
    # --- hardware -------------------------------------------------------------------------------
    device: str = "auto"
    # Speed knobs of the training step (m2snet.training.step.TrainStep; bench/train_speed.py
    # measures each). amp and channels_last act on CUDA and on a CPU with native bf16 units
    # (m2snet.training.speed: bf16 autocast + NHWC, 2.3x fp32 for M2SNet at 128 px on an EPYC with
    # avx512_bf16); a CPU without them trains fp32 NCHW whatever these say. compile and the fused
    # optimizer are CUDA only. On an H200 (batch 16, 352 px, AMP) channels_last + fused SGD gave
    # 1.10x (M2SNet), 1.15x (MSNet) images/s (bench/gpu_speed.sh, docs/benchmarks.md).
    amp: bool = True  # mixed precision: fp16 autocast on CUDA, bf16 on a CPU with native bf16
    channels_last: bool = True  # NHWC activations and weights (tensor cores; oneDNN's native layout)
    compile: bool = False  # torch.compile (inductor) the model; not measured to pay yet (docs/benchmarks.md)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # False: one static graph per (batch, scale) shape, compiled on first use (the multi-scale set
    # has 5 scales, x2 for a short last batch); True: one dynamic-shape graph for all of them.
    compile_dynamic: bool = False
    fused_optimizer: bool = True  # SGD(fused=True): one kernel, and no host sync under GradScaler
    # --- reproducibility ------------------------------------------------------------------------
    seed: int = 42
    # Seed of WHICH cases a run uses (max_train_cases / max_val_cases subsamples, the inner split);
    # None = ``seed``. ``m2snet cv --seeds`` fixes it, so repeated seeds vary only the initialisation
    # and the data order, and score the same cases (what a paired comparison needs).
    case_seed: int | None = None
    deterministic: bool = False
    # --- output ---------------------------------------------------------------------------------
    out_dir: str = "runs/train"
    val_every: int = 1
    # Re-estimate the BatchNorm statistics of the saved checkpoints over the training cases after
    # the last epoch (m2snet.training.bn_recalibration). Off: on BUSI it helped at 128 px / 128
    # cases and hurt at 352 px / 585 cases (docs/model.md).
    recalibrate_bn: bool = False
    # last.pt holds optimizer + RNG state for --resume; False: removed once the run has finished
    # (written every epoch all the same, so a crash can still be resumed).
    keep_last_checkpoint: bool = True
    progress: bool = True  # tqdm bar

    # -------------------------------------------------------------------------------------------
    def scales(self) -> list[int]:
        """The multi-scale set for this base size.

        The reference set {224, ..., 352} spans [0.636, 1] x 352 in steps of 32 (the encoder's
        stride; smp decoders need multiples of 32). For another base size we keep every multiple
        of 32 in [size * 224/352, size]: 352 gives the reference set, 256 gives {192, 224, 256},
        and a tiny test size like 64 gives just {64}.
        """
        if not self.multiscale:
            return [self.size]
        low = self.size * REFERENCE_SCALES[0] / REFERENCE_BASE_SIZE
        return [s for s in range(32, self.size + 1, 32) if s >= low - 1e-6]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """The config from a mapping (a file, the pipeline's ``train_overrides`` JSON, ``--set``): every value
        checked against the field's annotation (the one schema, enforced by pydantic), then :meth:`validate`."""
        from pydantic import ValidationError

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise M2SNetError(f"{source}: unknown training option(s) {unknown}; known: {sorted(known)}")
        try:
            cfg = _schema().validate_python(dict(data))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg'].lower()}"
                                 for e in err.errors())
            raise M2SNetError(f"{source}: {problems}") from None
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise M2SNetError(f"{path}: config file not found")
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as err:
            raise M2SNetError(f"{path}: cannot parse config ({err})") from err
        if not isinstance(data, dict):
            raise M2SNetError(f"{path}: config must be a mapping of option -> value")
        return cls.from_dict(data, source=str(path))

    def override(self, **changes: Any) -> "TrainConfig":
        """A copy with the given fields replaced (None values are ignored: 'not given on the CLI')."""
        changes = {k: v for k, v in changes.items() if v is not None}
        merged = {**self.to_dict(), **changes}
        return type(self).from_dict(merged, source="overrides")

    def override_strings(self, assignments: list[str]) -> "TrainConfig":
        """Apply ``key=value`` strings (from ``--set``), parsing each value by the field's type."""
        hints = get_type_hints(type(self))
        changes: dict[str, Any] = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in hints:
                raise M2SNetError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(hints)}")
            changes[key] = _parse_value(raw.strip(), hints[key], key)
        return self.override(**changes)

    def validate(self, source: str = "config") -> None:
        problems = []
        # NaN or an infinity in any number (a rate, a weight, a fraction) only shows once the loss is NaN.
        infinite = {f.name for f in fields(self)
                    if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))}
        problems += [f"{name}={getattr(self, name)} must be a finite number" for name in sorted(infinite)]

        def at_least(name: str, low: float, strict: bool = False, none: str = "") -> None:
            value = getattr(self, name)
            if name in infinite or value is None or (value > low if strict else value >= low):
                return
            problems.append(f"{name}={value} must be {'>' if strict else '>='} {low:g}" + (f" (or none: {none})"
                                                                                             if none else ""))

        at_least("head_lr", 0, strict=True)
        at_least("backbone_lr", 0)  # 0: a frozen backbone
        at_least("weight_decay", 0)
        at_least("lossnet_weight", 0)  # 0: no LossNet term
        at_least("grad_clip", 0, strict=True, none="no clipping")
        at_least("max_train_cases", 1, none="all")
        at_least("max_val_cases", 0, none="all")
        at_least("val_every", 1)
        if "momentum" not in infinite and not 0 <= self.momentum < 1:
            problems.append(f"momentum={self.momentum} must be within [0, 1)")
        if self.epochs < 1:
            problems.append(f"epochs={self.epochs} must be >= 1")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if self.size < ENCODER_STRIDE or self.size % ENCODER_STRIDE:
            problems.append(f"size={self.size} must be a multiple of {ENCODER_STRIDE} (the encoder's stride)")
        if "warmup_fraction" not in infinite and not 0.0 < self.warmup_fraction < 1.0:
            problems.append(f"warmup_fraction={self.warmup_fraction} must be in (0, 1)")
        if self.schedule not in ("triangle", "constant"):
            problems.append(f"schedule={self.schedule!r} must be 'triangle' or 'constant'")
        if self.schedule_unit not in ("epoch", "step"):
            problems.append(f"schedule_unit={self.schedule_unit!r} must be 'epoch' or 'step'")
        if self.selection not in list_selections():
            problems.append(f"selection={self.selection!r} must be one of {', '.join(list_selections())}")
        if "inner_val_fraction" not in infinite and not 0 < self.inner_val_fraction < 1:
            problems.append(f"inner_val_fraction={self.inner_val_fraction} must be within (0, 1)")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune-no-cudagraphs"):
            problems.append(f"compile_mode={self.compile_mode!r} is not a torch.compile mode this trainer supports")
        if self.num_workers < 0:
            problems.append("num_workers must be >= 0")
        if problems:
            raise M2SNetError(f"{source}: " + "; ".join(problems))


@functools.cache
def _schema():
    """pydantic's validator of :class:`TrainConfig` from its annotations (lax: "3" is 3, 1 is 1.0; "ten",
    2.5 epochs or a list for a dict are errors)."""
    from pydantic import TypeAdapter

    return TypeAdapter(TrainConfig)


def _parse_value(raw: str, hint: Any, key: str) -> Any:
    """Parse a CLI string by the dataclass annotation (bool | str, int | None, dict, ...)."""
    if raw.lower() in ("none", "null") and type(None) in get_args(hint):
        return None
    if get_origin(hint) is dict or hint is dict:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise M2SNetError(f"--set {key}=...: expected a JSON object ({err})") from err
    candidates = [a for a in (get_args(hint) or (hint,)) if a is not type(None)]
    if get_origin(hint) is Literal:
        if raw not in get_args(hint):
            raise M2SNetError(f"--set {key}={raw}: must be one of {get_args(hint)}")
        return raw
    for typ in candidates:
        if typ is bool:
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
        elif typ in (int, float):
            try:
                return typ(raw)
            except ValueError:
                continue
        elif typ is str:
            return raw
    raise M2SNetError(f"--set {key}={raw}: cannot parse as {hint}")
