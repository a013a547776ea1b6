"""Serving speed and accuracy cost of the fold ensemble on a CPU, per precision: PyTorch eager fp32,
ONNX Runtime fp32, bf16 (PyTorch CPU autocast bundle), int8 (ONNX Runtime static quantization).

Every back end runs the serving path (m2snet.evaluation.predict.Predictor: resize to the model's
size, normalise, average the folds' probabilities, resize back); only the ensemble graph differs.
The bf16 and int8 files are made by ``m2snet export --precision`` (m2snet.mlops.precision): int8
calibrated on the fold's training cases, both scored against fp32 on the fold's held-out cases (Dice
delta in points, mask agreement, max probability difference); the bench never refuses, it reports.

Per back end: ms/image at each batch (medians of ``--repeats`` round-robin runs, so a load change on
a shared box hits all alike), achieved GFLOP/s (the ensemble's MACs, m2snet.models.info, x 2 / time,
pre- and post-processing included in the time) beside the box's GEMM rate in the same precision
(model_speed.gemm_probe), and speed relative to ONNX Runtime fp32.

Weights: ``--checkpoints`` (trained), else random ones whose BatchNorm statistics are set on the
dataset's images (model_speed.calibrate_bn), so probabilities spread instead of sitting at 0/1 (the
spread is printed). Data: ``--data``/``--split``/``--fold``, else a generated demo set.

    python bench/serve_speed.py --checkpoints runs/seed42/fold0/model.pt --data busi \\
        --split busi.split-4fold-seed42.json --fold 0 --threads 1 --batches 1
    python bench/serve_speed.py --size 64 --folds 1 --repeats 1           # quick look, random weights

Target: int8 (or bf16) >= 2x faster than ONNX Runtime fp32 at batch 1, Dice within 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import calibrate_bn, gemm_probe, interleaved_medians, print_gemm, probability_spread, realistic_images

BACKENDS = ("eager_fp32", "ort_fp32", "bf16", "int8")
# ORT-vs-PyTorch export check: calibrated random weights are far less saturated than the export's default
# check assumes, and fp32 kernel rounding shows up to ~3e-4 there; the bench measures differences, not gates
ATOL = 1e-3
GEMM_OF = {"eager_fp32": "fp32", "ort_fp32": "fp32", "bf16": "bf16", "int8": "int8"}


def random_checkpoints(work: Path, model: str, folds: int, size: int, data: Path) -> list[Path]:
    """``folds`` random-weight checkpoints of ``model`` with BatchNorm statistics set on ``data``'s images."""
    from m2snet.models import create_model
    from m2snet.models.checkpoint import Checkpoint

    inputs = realistic_images(size, 8, data)
    paths = []
    for fold in range(folds):
        torch.manual_seed(fold)
        net = calibrate_bn(create_model(model, n_classes=1, pretrained=False), inputs)
        paths.append(Checkpoint(model_name=model, model_config={"n_classes": 1}, n_classes=1, image_size=size,
                                state_dict=net.state_dict(), train_config={}, epoch=1, fold=fold)
                     .save(work / f"fold{fold}.pt"))
    return paths


def demo_fold(work: Path, image_size: int) -> tuple[Path, Path]:
    """A generated BUSI-like set (m2snet layout) with a 4-fold split, for a run without --data."""
    from m2snet.data.demo import make_demo_dataset
    from m2snet.data.importers import import_dataset
    from m2snet.data.split import make_split

    make_demo_dataset(work / "raw", n_per_class=(8, 8, 4), size=image_size, seed=0)
    import_dataset("busi", work / "raw", work / "ds", progress=False)
    make_split(work / "ds", n_folds=4, seed=0, out=work / "split.json")
    return work / "ds", work / "split.json"


def load_line() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=None, help="default: random-weight folds")
    parser.add_argument("--model", default="m2snet")
    parser.add_argument("--folds", type=int, default=4, help="random-weight folds (without --checkpoints)")
    parser.add_argument("--size", type=int, default=352, help="random-weight models' input size")
    parser.add_argument("--data", type=Path, default=None, help="m2snet dataset (default: a generated demo set)")
    parser.add_argument("--split", type=Path, default=None)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--calibration-cases", type=int, default=64)
    parser.add_argument("--max-check-cases", type=int, default=None, help="held-out cases scored (default: all)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=256, help="demo set's image side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from m2snet.data.format import load_dataset
    from m2snet.data.images import read_rgb
    from m2snet.evaluation.predict import Predictor
    from m2snet.mlops.export import OnnxPredictor, export_onnx, load_exported
    from m2snet.mlops.precision import FoldData, export_model
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.models.info import count_macs

    print(f"load before: {load_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="m2snet-serve-speed-") as tmp:
        work = Path(tmp)
        data, split = (args.data, args.split) if args.data else demo_fold(work, args.image_size)
        if split is None:
            parser.error("--data needs --split (the fold's training cases calibrate, its held-out cases score)")
        fold_data = FoldData(data, split, args.fold)
        checkpoints = args.checkpoints or random_checkpoints(work, args.model, args.folds, args.size, data)
        ckpts = [Checkpoint.load(p) for p in checkpoints]
        size = ckpts[0].image_size
        gmacs = sum(count_macs(c.build_model(), size) for c in ckpts) / 1e9  # the ensemble, per image
        files, costs = {}, {}
        if "ort_fp32" in args.backends:
            files["ort_fp32"] = export_onnx(checkpoints, work / "fp32.onnx", atol=ATOL).path
        for precision in ("bf16", "int8"):
            if precision in args.backends:
                report = export_model(checkpoints, work / f"{precision}.export", precision, fold_data=fold_data,
                                      over_budget="warn", atol=ATOL, n_calibration=args.calibration_cases,
                                      max_check_cases=args.max_check_cases)
                files[precision], costs[precision] = report.path, report.cost
                print(report.cost.line(), flush=True)
        batch_size = max(args.batches)
        backends = {"eager_fp32": Predictor.from_checkpoints(checkpoints, device="cpu", batch_size=batch_size)}
        backends.update({k: (OnnxPredictor(f, batch_size=batch_size, threads=args.threads) if k == "ort_fp32"
                             else load_exported(f, batch_size=batch_size, threads=args.threads))
                         for k, f in files.items()})
        backends = {k: backends[k] for k in args.backends}
        info = load_dataset(data)
        held_out = fold_data.cases()[2]
        images = [read_rgb(info.case(c).image_path) for c in held_out[:batch_size]]  # real, held-out inputs

        def call(predictor, batch):
            def run() -> None:
                with torch.inference_mode():
                    predictor.predict_proba(images[:batch])
            return run

        with torch.inference_mode():
            spread = probability_spread(backends["eager_fp32"].predict_proba(images)) if "eager_fp32" in backends \
                else ""
        print(f"{len(ckpts)}-model ensemble at {size} px, {gmacs:.2f} GMACs/image; eager fp32 {spread}", flush=True)
        gemm = gemm_probe(threads=args.threads)
        print_gemm(gemm)
        rows = []
        for batch in args.batches:
            med = interleaved_medians({k: call(p, batch) for k, p in backends.items()}, "cpu", args.warmup,
                                      args.repeats)
            for backend, seconds in med.items():
                gflops = 2 * gmacs * batch / seconds
                rows.append({"backend": backend, "batch": batch, "ms_per_image": 1000 * seconds / batch,
                             "gflops": gflops, "gemm_gflops": gemm.get(GEMM_OF[backend])})
                print(f"batch {batch} {backend:11s} {1000 * seconds / batch:9.1f} ms/image", flush=True)
    load_after = load_line()
    print(f"load after: {load_after}")
    base = {r["batch"]: r["ms_per_image"] for r in rows if r["backend"] == "ort_fp32"}
    print(f"\n{len(ckpts)}-model ensemble at {size} px, held-out BUSI-size inputs, CPU {torch.get_num_threads()} "
          f"thread(s), median of {args.repeats} interleaved repeats")
    print(f"{'batch':>5s} {'backend':11s} {'ms/image':>9s} {'GFLOP/s':>8s} {'of GEMM':>8s} {'vs ORT fp32':>11s} "
          f"{'Dice delta':>10s} {'agreement':>9s} {'max |dp|':>9s}")
    for r in rows:
        cost = costs.get(r["backend"])
        r["speedup_vs_ort_fp32"] = base[r["batch"]] / r["ms_per_image"] if r["batch"] in base else None
        r.update({"dice_delta": -cost.delta, "agreement": cost.agreement, "max_prob_diff": cost.max_prob_diff,
                  "dice": cost.dice, "dice_fp32": cost.dice_fp32, "check_cases": cost.cases} if cost else {})
        of_gemm = f"{100 * r['gflops'] / r['gemm_gflops']:7.0f}%" if r["gemm_gflops"] else f"{'-':>8s}"
        speed = f"{r['speedup_vs_ort_fp32']:10.2f}x" if r["speedup_vs_ort_fp32"] else f"{'-':>11s}"
        acc = (f"{-cost.delta:+10.2f} {cost.agreement:9.2f} {cost.max_prob_diff:9.3g}" if cost
               else f"{'0 (ref)' if r['backend'] != 'eager_fp32' else '~0':>10s} {'-':>9s} {'-':>9s}")
        print(f"{r['batch']:5d} {r['backend']:11s} {r['ms_per_image']:9.1f} {r['gflops']:8.1f} {of_gemm} {speed} {acc}")
    if costs:
        any_cost = next(iter(costs.values()))
        print(f"(Dice delta: reduced minus fp32 mean Dice in points on {any_cost.cases} held-out cases of fold "
              f"{args.fold}, fp32 Dice {any_cost.dice_fp32:.2f}; agreement: Dice of the reduced masks vs the fp32 "
              f"masks; GFLOP/s include pre/post-processing time)")
    out = {"threads": torch.get_num_threads(), "size": size, "n_models": len(ckpts), "gmacs_per_image": gmacs,
           "gemm_gflops": gemm, "load_after": load_after, "rows": rows, "fold": args.fold,
           "checkpoints": [str(p) for p in args.checkpoints] if args.checkpoints else None}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
