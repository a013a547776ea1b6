"""Serving speed of the fold ensemble on a CPU: PyTorch eager vs ONNX Runtime.

Both back ends run the serving path (m2snet.evaluation.predict.Predictor: resize to the model's
size, normalise, average the folds' probabilities, resize back to each image's size); only the
ensemble graph differs (OnnxPredictor runs the `m2snet export` file, BatchNorm folded). Per-image
latency and images/s at batch 1 and 8, medians of ``--repeats`` round-robin runs, and the max
difference of the probabilities the two return.

    python bench/serve_speed.py --threads 2                        # 4 random-weight M2SNet folds, 352 px
    python bench/serve_speed.py --checkpoints runs/f*/model.pt      # real checkpoints
    python bench/serve_speed.py --size 64 --folds 2 --repeats 1    # quick look

Target: ONNX Runtime >= 2x faster than PyTorch for the 4-fold ensemble.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import interleaved_medians


def random_checkpoints(work: Path, model: str, folds: int, size: int) -> list[Path]:
    """``folds`` checkpoints of randomly initialised ``model``. Speed does not depend on the weights,
    but the output difference does: with the initial BatchNorm statistics a random network's logits
    reach 1e10 and every probability is exactly 0 or 1, so the statistics are first estimated on
    two random batches (as training would), giving unsaturated probabilities to compare."""
    from m2snet.models import create_model
    from m2snet.models.checkpoint import Checkpoint

    paths = []
    for fold in range(folds):
        torch.manual_seed(fold)
        net = create_model(model, n_classes=1, pretrained=False).train()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        with torch.no_grad():
            for _ in range(2):
                net(torch.randn(4, 3, size, size))
        net.eval()
        paths.append(Checkpoint(model_name=model, model_config={"n_classes": 1}, n_classes=1, image_size=size,
                                state_dict=net.state_dict(), train_config={}, epoch=1, fold=fold)
                     .save(work / f"fold{fold}.pt"))
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=None, help="default: random-weight folds")
    parser.add_argument("--model", default="m2snet")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, nargs=2, default=[500, 600], help="input H W (BUSI-like)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from m2snet.evaluation.predict import Predictor
    from m2snet.mlops.export import OnnxPredictor, export_onnx

    with tempfile.TemporaryDirectory(prefix="m2snet-serve-speed-") as tmp:
        work = Path(tmp)
        checkpoints = args.checkpoints or random_checkpoints(work, args.model, args.folds, args.size)
        start = time.perf_counter()
        report = export_onnx(checkpoints, work / "ensemble.onnx")
        export_s = time.perf_counter() - start
        print(f"exported {report.n_models} model(s) at {report.image_size} px in {export_s:.1f} s; "
              f"BatchNorm left {report.batch_norms_left}; export check max diff {report.max_abs_diff:.2e}", flush=True)
        backends = {"pytorch": Predictor.from_checkpoints(checkpoints, device="cpu", batch_size=max(args.batches)),
                    "onnxruntime": OnnxPredictor(report.path, batch_size=max(args.batches), threads=args.threads)}
        rng = np.random.default_rng(0)
        h, w = args.image_size
        images = [(rng.random((h, w)) * 255).astype(np.uint8) for _ in range(max(args.batches))]

        def call(predictor, batch):
            def run() -> None:
                with torch.inference_mode():
                    predictor.predict_proba(images[:batch])
            return run

        with torch.inference_mode():
            probs = {k: p.predict_proba(images) for k, p in backends.items()}
        max_diff = max(float(np.abs(a - b).max()) for a, b in zip(probs["pytorch"], probs["onnxruntime"]))
        # Share of probabilities away from 0 and 1, where a difference could show at all.
        unsaturated = float(np.mean([((p > 1e-3) & (p < 1 - 1e-3)).mean() for p in probs["pytorch"]]))
        rows = []
        for batch in args.batches:
            med = interleaved_medians({k: call(p, batch) for k, p in backends.items()}, "cpu", args.warmup,
                                      args.repeats)
            for backend, seconds in med.items():
                rows.append({"backend": backend, "batch": batch, "ms_per_image": 1000 * seconds / batch,
                             "img_per_s": batch / seconds})
                print(f"batch {batch} {backend:12s} {1000 * seconds / batch:9.1f} ms/image", flush=True)
    out = {"threads": torch.get_num_threads(), "size": report.image_size, "n_models": report.n_models,
           "input": [h, w], "export_s": export_s, "max_abs_diff": max_diff, "unsaturated": unsaturated, "rows": rows,
           "speedup": {b: next(r["ms_per_image"] for r in rows if r["batch"] == b and r["backend"] == "pytorch")
                       / next(r["ms_per_image"] for r in rows if r["batch"] == b and r["backend"] == "onnxruntime")
                       for b in args.batches}}
    print(f"\n{report.n_models}-model {args.model if not args.checkpoints else 'checkpoint'} ensemble at "
          f"{report.image_size} px, {h}x{w} inputs, CPU {out['threads']} threads, median of {args.repeats}")
    print(f"{'batch':>5s} {'backend':12s} {'ms/image':>9s} {'img/s':>7s}")
    for r in rows:
        print(f"{r['batch']:5d} {r['backend']:12s} {r['ms_per_image']:9.1f} {r['img_per_s']:7.2f}")
    for b, s in out["speedup"].items():
        print(f"batch {b}: ONNX Runtime {s:.2f}x faster than PyTorch (target >= 2x)")
    print(f"max |probability difference| over {len(images)} images: {max_diff:.2e} "
          f"({100 * unsaturated:.0f}% of the probabilities in (0.001, 0.999))")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
