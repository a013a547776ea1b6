"""Speed of M2SNet (fast MSU; shared or per-site filter statistics) vs M2SNet (dense all-ones MSU)
vs MSNet.

Times the forward pass (eval mode, no grad) and a training step (train mode, forward +
TotalLoss with LossNet + backward + SGD step) at batch 1 and 4, on CPU and CUDA when present.
Each figure is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones; the
variants are timed round-robin, so load from other processes affects them alike.

    python bench/model_speed.py                       # 352x352, batches 1 and 4, every device
    python bench/model_speed.py --repeats 3 --batches 1 --device cpu --no-train

Targets (forward, batch 1, CPU): M2SNet within 1.1x of MSNet, >= 1.8x faster than the dense MSU.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Callable

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


def bench_batch(labels: list[str], device: str, size: int, batch: int, warmup: int, repeats: int,
                loss_fn: torch.nn.Module | None, amp: bool = False) -> dict[str, dict[str, float]]:
    """{variant: {"forward_ms": ..., "train_step_ms": ...}} for one device and batch size."""
    from m2snet.models import create_model

    models = {}
    for label in labels:
        name, config = VARIANTS[label]
        torch.manual_seed(0)
        models[label] = create_model(name, pretrained=False, **config).to(device)
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
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # random-weight warnings are expected here
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    results = []
    for device in devices:
        loss_fn = None
        if not args.no_train:
            from m2snet.training.losses import TotalLoss

            loss_fn = TotalLoss(n_classes=1, lossnet_weight=0.1, lossnet_pretrained=False).to(device)
        for batch in args.batches:
            rows = bench_batch(args.variants, device, args.size, batch, args.warmup, args.repeats,
                               loss_fn, amp=args.amp)
            for label, row in rows.items():
                row.update(device=device, batch=batch, variant=label)
                results.append(row)
                cols = "  ".join(f"{k} {v:9.1f}" for k, v in row.items() if k.endswith("_ms"))
                print(f"{device:5s} batch {batch}  {label:20s} {cols}", flush=True)

    print(f"\n{'device':6s} {'batch':>5s} {'variant':20s} {'forward ms':>11s} {'train step ms':>14s}")
    for r in results:
        train = f"{r['train_step_ms']:14.1f}" if "train_step_ms" in r else f"{'-':>14s}"
        print(f"{r['device']:6s} {r['batch']:5d} {r['variant']:20s} {r['forward_ms']:11.1f} {train}")
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
           "results": results, "ratios": ratios}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
