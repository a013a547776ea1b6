"""Speed of M2SNet (fast MSU; shared or per-site filter statistics) vs M2SNet (dense all-ones MSU)
vs MSNet.

Times the forward pass (eval mode, no grad) and a training step (train mode, forward +
TotalLoss with LossNet + backward + SGD step) at batch 1 and 4, on CPU and CUDA when present.
Each figure is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones; the
variants are timed round-robin, so load from other processes affects them alike.

    python bench/model_speed.py                       # 352x352, batches 1 and 4, every device
    python bench/model_speed.py --repeats 3 --batches 1 --device cpu --no-train

Weights: ``--checkpoint`` times a trained model beside the variants; the variants' random weights get
their BatchNorm statistics from a few train-mode passes on realistic inputs first (``--data``: real
images, else smooth synthetic ones), since with the initial statistics an untrained network's eval
logits reach 1e9 and every probability is 0 or 1 (the spread is printed). Each forward time is also
given as achieved GFLOP/s (the model's MACs from m2snet.models.info x 2 / time) beside the box's
measured matrix-product rate in the same precision (``gemm_probe``), i.e. how far from the limit it is.

Targets (forward, batch 1, CPU): M2SNet within 1.1x of MSNet, >= 1.8x faster than the dense MSU.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

VARIANTS = {  # label -> (registry name, config)
    "m2snet_fast": ("m2snet", {"msu_impl": "fast", "msu_norm": "shared"}),
    "m2snet_fast_per_site": ("m2snet", {"msu_impl": "fast", "msu_norm": "per_site"}),
    "m2snet_dense": ("m2snet", {"msu_impl": "dense", "msu_norm": "shared"}),
    "msnet": ("msnet", {}),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], None]], device: str, warmup: int,
                        repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (one run of each per repeat) so that a
    load change on a shared machine hits every variant alike instead of biasing one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def realistic_images(size: int, n: int, data: str | Path | None = None, seed: int = 0) -> torch.Tensor:
    """``n`` normalised [3, size, size] inputs: the first ``n`` images of the m2snet dataset ``data``
    (any cases: nothing is scored), else smooth grey speckle (an ultrasound-like low-pass texture),
    both with ImageNet normalisation, as the models are fed."""
    from PIL import Image

    from m2snet.models.preprocessing import Normalization

    if data is not None:
        from m2snet.data.format import load_dataset
        from m2snet.data.images import read_rgb

        arrays = [read_rgb(c.image_path) for c in load_dataset(data).cases[:n]]
    else:
        rng = np.random.default_rng(seed)
        arrays = []
        for _ in range(n):
            coarse = (rng.random((size // 8, size // 8)) * 255).astype(np.uint8)
            grey = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
            grey = np.clip(grey * rng.gamma(4.0, 0.25, grey.shape), 0, 255).astype(np.uint8)  # speckle
            arrays.append(np.repeat(grey[..., None], 3, axis=2))
    x = torch.stack([torch.from_numpy(np.array(Image.fromarray(a).resize((size, size), Image.BILINEAR)))
                     .permute(2, 0, 1) for a in arrays]).float()
    norm = Normalization.from_dict(None)
    return (x - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1)


def calibrate_bn(model: torch.nn.Module, inputs: torch.Tensor, batch: int = 4) -> torch.nn.Module:
    """Set a random-weight model's BatchNorm statistics as training would: equal-weight averages over
    train-mode passes on ``inputs`` (m2snet's own BatchNorm recalibration, per call site for the MSU
    filters of a per-site M2SNet); the model ends in eval mode."""
    from m2snet.training.bn_recalibration import recalibrate_bn

    recalibrate_bn(model, [inputs[start:start + batch] for start in range(0, len(inputs), batch)])
    return model


def probability_spread(probs: Iterator[np.ndarray] | list) -> str:
    """One line: quantiles of the probabilities and the share away from 0 and 1 (where a reduced
    precision's difference can show at all)."""
    flat = np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in probs])
    q = np.quantile(flat, [0.01, 0.5, 0.99])
    inside = float(((flat > 0.01) & (flat < 0.99)).mean())
    return (f"probabilities: 1% {q[0]:.3g}, median {q[1]:.3g}, 99% {q[2]:.3g}; "
            f"{100 * inside:.0f}% in (0.01, 0.99)")


def _int8_gemm_session(n: int, threads: int | None):
    """ONNX Runtime MatMulInteger (uint8 x int8 -> int32), the kernel int8 convolutions run on."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def gemm_probe(n: int = 1024, repeats: int = 5, threads: int | None = None) -> dict[str, float]:
    """The box's measured matrix-product rate in GFLOP/s (int8: GOP/s) for an n x n x n product:
    fp32 and bf16 ``torch.matmul`` (oneDNN / MKL), int8 ONNX Runtime MatMulInteger; median of
    ``repeats``. A small probe: it shares the machine with whatever else runs, like the models do."""
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        rates[name] = 2 * n ** 3 / _median_seconds(lambda a=a, b=b: torch.matmul(a, b), repeats) / 1e9
    try:
        session = _int8_gemm_session(n, threads)
    except Exception:  # noqa: BLE001 - no ONNX Runtime: no int8 probe
        return rates
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    rates["int8"] = 2 * n ** 3 / _median_seconds(lambda: session.run(None, feeds), repeats) / 1e9
    return rates


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_gemm(rates: dict[str, float]) -> None:
    print("GEMM probe (1024^3 matmul, this box now): "
          + ", ".join(f"{k} {v:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in rates.items()), flush=True)


def build_models(labels: list[str], size: int, inputs: torch.Tensor,
                 checkpoint: str | None = None) -> dict[str, torch.nn.Module]:
    """The variants with BatchNorm-calibrated random weights, and the trained ``checkpoint`` if given."""
    from m2snet.models import create_model

    models = {}
    for label in labels:
        name, config = VARIANTS[label]
        torch.manual_seed(0)
        models[label] = calibrate_bn(create_model(name, pretrained=False, **config), inputs)
    if checkpoint:
        from m2snet.models.checkpoint import Checkpoint

        models["checkpoint"] = Checkpoint.load(checkpoint).build_model()
    return models


def bench_batch(models: dict[str, torch.nn.Module], device: str, size: int, batch: int, warmup: int, repeats: int,
                loss_fn: torch.nn.Module | None, amp: bool = False) -> dict[str, dict[str, float]]:
    """{variant: {"forward_ms": ..., "train_step_ms": ...}} for one device and batch size."""
    labels = list(models)
    models = {k: m.to(device) for k, m in models.items()}
    x = torch.randn(batch, 3, size, size, device=device)

    # Mixed precision as the training recipe (bfloat16 autocast: no loss scaler needed).
    def autocast() -> torch.autocast:
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp)

    def forward_fn(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast():
                model(x)
        return run

    for model in models.values():
        model.eval()
    fwd = interleaved_medians({k: forward_fn(m) for k, m in models.items()}, device, warmup, repeats)
    rows = {label: {"forward_ms": 1000 * fwd[label]} for label in labels}
    if loss_fn is None:
        return rows

    mask = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()

    def step_fn(model: torch.nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(x), mask)["loss"]
            loss.backward()
            opt.step()
        return run

    for model in models.values():
        model.train()
    steps = interleaved_medians({k: step_fn(m) for k, m in models.items()}, device,
                                max(1, warmup // 2), repeats)
    for label in labels:
        rows[label]["train_step_ms"] = 1000 * steps[label]
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: every one present)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-train", action="store_true", help="forward only")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (mixed precision)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--checkpoint", default=None, help="also time this trained checkpoint (at --size)")
    parser.add_argument("--data", default=None, help="m2snet dataset whose images set the random weights' "
                        "BatchNorm statistics (default: synthetic speckle)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # random-weight warnings are expected here
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    from m2snet.models.info import count_macs

    inputs = realistic_images(args.size, 8, args.data)
    models = build_models(args.variants, args.size, inputs, args.checkpoint)
    with torch.no_grad():
        for label, model in models.items():
            print(f"{label:20s} {probability_spread([torch.sigmoid(model(inputs[:4]).float())])}", flush=True)
    gmacs = {label: count_macs(model, args.size) / 1e9 for label, model in models.items()}
    gemm = gemm_probe(threads=args.threads) if "cpu" in devices else {}
    if gemm:
        print_gemm(gemm)

    results = []
    for device in devices:
        loss_fn = None
        if not args.no_train:
            from m2snet.training.losses import TotalLoss

            loss_fn = TotalLoss(n_classes=1, lossnet_weight=0.1, lossnet_pretrained=False).to(device)
        for batch in args.batches:
            rows = bench_batch(models, device, args.size, batch, args.warmup, args.repeats,
                               loss_fn, amp=args.amp)
            for label, row in rows.items():
                row.update(device=device, batch=batch, variant=label,
                           forward_gflops=2 * gmacs[label] * batch / (row["forward_ms"] / 1000))
                results.append(row)
                cols = "  ".join(f"{k} {v:9.1f}" for k, v in row.items() if k.endswith(("_ms", "_gflops")))
                print(f"{device:5s} batch {batch}  {label:20s} {cols}", flush=True)

    limit = gemm.get("bf16" if args.amp else "fp32")
    print(f"\n{'device':6s} {'batch':>5s} {'variant':20s} {'GMACs':>6s} {'forward ms':>11s} {'GFLOP/s':>8s} "
          f"{'of GEMM':>8s} {'train step ms':>14s}")
    for r in results:
        train = f"{r['train_step_ms']:14.1f}" if "train_step_ms" in r else f"{'-':>14s}"
        share = f"{100 * r['forward_gflops'] / limit:7.0f}%" if limit and r["device"] == "cpu" else f"{'-':>8s}"
        print(f"{r['device']:6s} {r['batch']:5d} {r['variant']:20s} {gmacs[r['variant']]:6.2f} {r['forward_ms']:11.1f} "
              f"{r['forward_gflops']:8.1f} {share} {train}")
    if limit:
        print(f"(GFLOP/s = 2 x GMACs x batch / forward time; 'of GEMM' = that / the {'bf16' if args.amp else 'fp32'} "
              f"matmul probe's {limit:.0f} GFLOP/s)")
    ratios = []
    by_key = {(r["device"], r["batch"], r["variant"]): r for r in results}
    for device in devices:
        for batch in args.batches:
            fast = by_key.get((device, batch, "m2snet_fast"))
            for other, label in (("msnet", "m2snet/msnet"), ("m2snet_dense", "dense/fast"),
                                 ("m2snet_fast_per_site", "per_site/shared")):
                ref = by_key.get((device, batch, other))
                if not fast or not ref:
                    continue
                for metric in ("forward_ms", "train_step_ms"):
                    if metric in fast:
                        value = ref[metric] / fast[metric] if label != "m2snet/msnet" else fast[metric] / ref[metric]
                        ratios.append({"device": device, "batch": batch, "ratio": label,
                                       "metric": metric, "value": value})
    print("\nratios (m2snet/msnet: <= 1.1 wanted; dense/fast: >= 1.8 wanted)")
    for r in ratios:
        print(f"{r['device']:6s} batch {r['batch']}  {r['ratio']:13s} {r['metric']:14s} {r['value']:.2f}x")
    out = {"size": args.size, "repeats": args.repeats, "warmup": args.warmup, "amp": args.amp,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "gmacs": gmacs, "gemm_gflops": gemm, "results": results, "ratios": ratios}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
