"""Reduced-precision export (``m2snet export --precision bf16|int8``) with its measured accuracy cost.

- **int8**: ONNX Runtime static quantization of the fp32 export (QDQ, per-channel int8 weights,
  uint8 activations; ONNX Runtime fuses the pairs into integer convolutions using the CPU's VNNI
  instructions). Activation ranges are calibrated on the fold's **training** cases only; the fold's
  validation cases, which score the result, are never read for calibration (checked, not assumed).
- **bf16**: the checkpoints in a torch bundle, run under PyTorch's bf16 CPU autocast (oneDNN).

Every reduced-precision export is scored against the fp32 ensemble on the fold's validation cases
(:class:`AccuracyCost`): mean Dice of each against the ground truth, their difference in Dice points,
the Dice of the reduced masks against the fp32 masks, and the largest probability difference. Past
the budget (``DEFAULT_DICE_BUDGET`` points lost) the export is refused and nothing is written, or,
with ``over_budget="warn"``, written with a loud warning. The figures ride in the file's metadata.

With a fold ensemble the validation cases of fold k were training cases of the other folds' models:
the absolute Dice is then optimistic, but the fp32-vs-reduced difference still measures what precision
costs on the same inputs.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from m2snet.data.format import load_dataset
from m2snet.data.images import read_mask, read_rgb
from m2snet.data.split import check_disjoint, load_split
from m2snet.errors import M2SNetError
from m2snet.evaluation.metrics import binary_metrics
from m2snet.evaluation.predict import Predictor
from m2snet.files import atomic_file
from m2snet.mlops.export import (
    DEFAULT_ATOL,
    OnnxPredictor,
    export_onnx,
    load_bundle,
    onnx_meta,
    set_onnx_meta,
    write_bundle,
)

log = logging.getLogger(__name__)

DEFAULT_DICE_BUDGET = 0.5  # Dice points (of 100) the reduced-precision ensemble may lose against fp32
DEFAULT_CALIBRATION_CASES = 64  # training cases whose activations set the int8 ranges
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class FoldData:
    """The dataset and the fold whose training cases calibrate and whose validation cases score."""

    data: Path
    split: Path
    fold: int = 0
    accept_split_version: str | None = None  # a split made for another data version, accepted by name

    def cases(self) -> tuple[object, list[str], list[str]]:
        """(dataset info, training case ids, validation case ids) of the fold."""
        info = load_dataset(self.data)
        split = load_split(self.split, info, accept_version=self.accept_split_version)
        fold = split.fold(self.fold)
        return info, list(fold.train), list(fold.val)


def calibration_cases(train: Sequence[str], held_out: Sequence[str], n: int,
                      seed: int = CALIBRATION_SEED) -> list[str]:
    """``n`` of the training cases (seeded), refusing any that is also held out: a case scored by the
    accuracy check must never have set the quantization ranges."""
    check_disjoint({"training": train, "held-out": held_out}, "calibration")
    ids = sorted(train)
    return ids if n >= len(ids) else sorted(random.Random(seed).sample(ids, n))


def calibration_batches(predictor: Predictor, info, case_ids: Sequence[str]) -> Iterator[np.ndarray]:
    """The cases as the ensemble graph sees them in serving: resized, normalised, one per batch."""
    for cid in case_ids:
        image = read_rgb(info.case(cid).image_path)
        yield predictor._batch_tensor([image]).numpy()


@dataclass
class AccuracyCost:
    precision: str
    cases: int
    dice_fp32: float  # mean Dice vs the ground truth, in points (0-100)
    dice: float  # the same for the reduced-precision ensemble
    agreement: float  # mean Dice of the reduced masks against the fp32 masks, in points
    max_prob_diff: float  # largest |p_reduced - p_fp32| over every pixel of every case
    budget: float  # Dice points the reduced ensemble may lose

    @property
    def delta(self) -> float:
        """Dice points lost against fp32 (negative: the reduced ensemble scored higher)."""
        return self.dice_fp32 - self.dice

    @property
    def within_budget(self) -> bool:
        return self.delta <= self.budget

    def to_dict(self) -> dict:
        return {**asdict(self), "delta": self.delta, "within_budget": self.within_budget}

    def line(self) -> str:
        return (f"{self.precision} vs fp32 on {self.cases} held-out cases: "
                f"Dice {self.dice:.2f} vs {self.dice_fp32:.2f} "
                f"({-self.delta:+.2f} points; budget -{self.budget:g}), mask agreement Dice {self.agreement:.2f}, "
                f"max |probability difference| {self.max_prob_diff:.3g}")


def accuracy_cost(reference: Predictor, reduced: Predictor, info, case_ids: Sequence[str], precision: str,
                  budget: float = DEFAULT_DICE_BUDGET) -> AccuracyCost:
    """Score both ensembles on ``case_ids`` at each image's original size (see :class:`AccuracyCost`)."""
    if not case_ids:
        raise M2SNetError("accuracy check: no held-out cases to score")
    ref_dice, dice, agree, max_diff = [], [], [], 0.0
    for start in range(0, len(case_ids), reference.batch_size):
        cases = [info.case(c) for c in case_ids[start:start + reference.batch_size]]
        images = [read_rgb(c.image_path) for c in cases]
        for case, p_ref, p in zip(cases, reference.predict_proba(images), reduced.predict_proba(images)):
            gt = read_mask(case.mask_path) > 0
            m_ref, m = reference.to_mask(p_ref) > 0, reduced.to_mask(p) > 0
            ref_dice.append(binary_metrics(m_ref, gt)["dice"])
            dice.append(binary_metrics(m, gt)["dice"])
            agree.append(binary_metrics(m, m_ref)["dice"])
            max_diff = max(max_diff, float(np.abs(p - p_ref).max()))
    return AccuracyCost(precision, len(case_ids), 100 * float(np.mean(ref_dice)), 100 * float(np.mean(dice)),
                        100 * float(np.mean(agree)), max_diff, budget)


def quantize_int8(fp32_path: Path, out: Path, batches: Iterator[np.ndarray], work: Path) -> Path:
    """Static int8 quantization of an fp32 export: QDQ, per-channel symmetric int8 weights, uint8
    activations with MinMax ranges over ``batches``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(batches, None)
            return None if batch is None else {"image": batch}

    prepared = work / "prepared.onnx"
    # Shape inference and graph fusion first, as ONNX Runtime recommends for static quantization.
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


@dataclass
class PrecisionReport:
    path: Path
    precision: str
    n_models: int
    image_size: int
    cost: AccuracyCost | None
    calibration_cases: int = 0
    lines: list[str] = field(default_factory=list)  # what the export checked, one line each


def export_model(checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike, precision: str = "fp32", *,
                 fold_data: FoldData | None = None, tta_flip: bool = False, atol: float = DEFAULT_ATOL,
                 budget: float = DEFAULT_DICE_BUDGET, over_budget: str = "refuse",
                 n_calibration: int = DEFAULT_CALIBRATION_CASES, max_check_cases: int | None = None) -> PrecisionReport:
    """Export the ensemble at ``precision``; a reduced one is checked against fp32 on ``fold_data``'s
    validation cases and refused past ``budget`` (``over_budget="warn"``: written, with a warning)."""
    out = Path(out)
    if precision not in ("fp32", "bf16", "int8"):
        raise M2SNetError(f"export: unknown precision {precision!r} (fp32 | bf16 | int8)")
    if over_budget not in ("refuse", "warn"):
        raise M2SNetError(f"export: over_budget must be refuse or warn, not {over_budget!r}")
    if precision == "fp32":
        report = export_onnx(checkpoints, out, tta_flip=tta_flip, atol=atol)
        return PrecisionReport(report.path, precision, report.n_models, report.image_size, None, lines=[
            f"max |ONNX Runtime - PyTorch| {report.max_abs_diff:.2e}, BatchNorm nodes left {report.batch_norms_left}"])
    if fold_data is None:
        raise M2SNetError(f"export --precision {precision}: needs --data and --split (the fold's training cases "
                          "calibrate, its validation cases measure the accuracy cost)")
    info, train, held_out = fold_data.cases()
    held_out = held_out[:max_check_cases] if max_check_cases else held_out
    calib = calibration_cases(train, held_out, n_calibration) if precision == "int8" else []
    reference = Predictor.from_checkpoints(checkpoints, device="cpu", tta_flip=tta_flip)
    meta = {**onnx_meta(reference, precision),
            "calibration": {"cases": len(calib), "source": f"fold {fold_data.fold} training cases",
                            "split": str(fold_data.split),
                            **({"accepted_split_version": fold_data.accept_split_version}
                               if fold_data.accept_split_version else {})} if calib else None}
    with tempfile.TemporaryDirectory(prefix="m2snet-precision-") as tmp:
        work = Path(tmp)
        fp32 = export_onnx(checkpoints, work / "fp32.onnx", tta_flip=tta_flip, atol=atol).path
        if precision == "int8":
            candidate = quantize_int8(fp32, work / "int8.onnx",
                                      calibration_batches(reference, info, calib), work)
            _stamp_onnx(candidate, meta)
            reduced: Predictor = OnnxPredictor(candidate)
        else:
            candidate = write_bundle(checkpoints, work / "bf16.pt", meta)
            reduced = load_bundle(candidate)
        cost = accuracy_cost(OnnxPredictor(fp32), reduced, info, held_out, precision, budget)
        log.info("%s", cost.line())
        if not cost.within_budget:
            message = f"{out}: {cost.line()}: over the budget"
            if over_budget == "refuse":
                raise M2SNetError(f"{message}; not written (raise --budget or use --warn-only to keep it)")
            log.warning("%s; written anyway (--warn-only)", message)
        meta["accuracy"] = cost.to_dict()
        if precision == "int8":
            _stamp_onnx(candidate, meta)
        else:
            candidate = write_bundle(checkpoints, candidate, meta)
        _move(candidate, out)
    return PrecisionReport(out, precision, meta["n_models"], meta["image_size"], cost, len(calib), [cost.line()])


def _stamp_onnx(path: Path, meta: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    set_onnx_meta(model, meta)
    onnx.save(model, str(path))


def _move(src: Path, out: Path) -> None:
    """Into place through the one atomic write (a kill leaves the old file or the new one)."""
    with atomic_file(out) as tmp:
        shutil.copyfile(src, tmp)

