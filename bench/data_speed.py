"""Does the data path keep up with training? The training loader's images/s against the model's.

The loader is the trainer's own: SegmentationDataset (decoded + resized arrays from the
preprocessed cache, or decoding every PNG with ``--no-cache``), flip + rotation augmentation,
normalisation, then MultiScaleCollate (every batch resized to one of the recipe's scales), in a
DataLoader with ``--workers`` processes. The model's rate is one full training step
(bench/train_speed.py's TrainStep) on random batches of the same size. The data path is not the
bottleneck when loader images/s >= 3x the model's.

    python bench/data_speed.py --busi /work/shared/data/busi --size 128 --workers 0 2 --threads 1
    python bench/data_speed.py --busi .device/busi --size 352 --workers 0 4 8     # GPU machine
    python bench/data_speed.py --demo 24 --size 64                                # no data at hand

Also reported: building the cache (PNG decode + resize of every case, once per dataset and size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import _sync
from train_speed import MODES, batch_at, bench_setup, make_step, runner, timed_first

TARGET_RATIO = 3.0


def dataset(args, work: Path):
    """DatasetInfo of --data, of --busi imported into ``work``, or of a generated demo set."""
    from m2snet.data.format import load_dataset
    from m2snet.data.importers import import_dataset

    if args.data:
        return load_dataset(args.data)
    src = args.busi
    if not src:
        from m2snet.data.demo import make_demo_dataset

        src = make_demo_dataset(work / "demo-raw", n_per_class=args.demo)
    # No great-expectations validation: GPU machines lack it, and it is not what is timed here.
    import_dataset("busi", src, work / "busi", progress=False, validate=False)
    return load_dataset(work / "busi")


def loader_rate(info, size: int, batch: int, workers: int, cache_dir: Path | None, epochs: int,
                max_batches: int | None) -> float:
    """Images/s of the trainer's loader over ``epochs`` passes (the first batch of each pass, which
    pays for starting the workers, is counted: the trainer pays it every epoch too)."""
    from torch.utils.data import DataLoader

    from m2snet.data.dataset import SegmentationDataset
    from m2snet.models.preprocessing import DEFAULT_NORMALIZATION
    from m2snet.training.batches import MultiScaleCollate, epoch_seed
    from m2snet.training.config import TrainConfig

    ds = SegmentationDataset(info, None, size, augment=True, cache_dir=cache_dir, normalization=DEFAULT_NORMALIZATION)
    collate = MultiScaleCollate(TrainConfig(size=size).scales())
    collate([ds[0]])  # one-time imports (torchvision's transforms) out of the timing
    rates = []
    for epoch in range(epochs):
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(epoch_seed(0, epoch)))
        n, start = 0, time.perf_counter()
        for i, b in enumerate(loader):
            n += b["image"].shape[0]
            if max_batches and i + 1 >= max_batches:
                break
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def model_rate(device: str, size: int, batch: int, mode: str, repeats: int, steps: int) -> float:
    """Training images/s of M2SNet (fast MSU) at the loader's size, random batches."""
    from m2snet.training.losses import TotalLoss

    loss_fn = TotalLoss(n_classes=1, lossnet_weight=0.1, lossnet_pretrained=False).to(device)
    step, _ = make_step("m2snet_fast", mode, device, size, batch, loss_fn)
    x, y = batch_at(size, batch, device)
    run = runner(step, x, y, steps)
    timed_first(run, device)  # warm-up (compiles in a compiled mode)
    times = [timed_first(run, device) for _ in range(repeats)]
    _sync(device)
    return batch * steps / statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="an m2snet dataset directory")
    src.add_argument("--busi", default=None, help="raw BUSI folder, imported into a temporary directory")
    parser.add_argument("--demo", type=int, default=24, help="demo cases per class when neither is given")
    parser.add_argument("--size", type=int, default=None, help="default: 352 on CUDA, 128 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 8 on CPU")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2, help="loader passes (median images/s)")
    parser.add_argument("--max-batches", type=int, default=None, help="cap each pass (quick runs)")
    parser.add_argument("--no-cache", action="store_true", help="also time decoding every PNG each epoch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--mode", default=None, choices=list(MODES),
                        help="model's train step mode (default: compiled_cl_fused on CUDA, eager on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-model", action="store_true", help="loader only")
    parser.add_argument("--model-from", default=None,
                        help="take the model's images/s from a train_speed.py --json file (fastest m2snet_fast row)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    device, on_cuda, size, batch = bench_setup(args, cpu_batch=8)
    mode = args.mode or ("compiled_cl_fused" if on_cuda else "eager")

    out: dict = {"device": device, "cuda_device": torch.cuda.get_device_name() if on_cuda else None,
                 "threads": torch.get_num_threads(), "size": size, "batch": batch, "loader": []}
    with tempfile.TemporaryDirectory(prefix="m2snet-data-speed-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        info = dataset(args, work)
        out["cases"], out["import_s"] = len(info.cases), time.perf_counter() - start
        print(f"dataset ready in {out['import_s']:.1f} s", flush=True)
        from m2snet.data.cache import build_cache

        start = time.perf_counter()
        build_cache(info, size, work / "cache", progress=False)
        out["cache_build_img_per_s"] = len(info.cases) / (time.perf_counter() - start)
        print(f"{len(info.cases)} cases; cache build (decode + resize) {out['cache_build_img_per_s']:.1f} img/s",
              flush=True)
        for cached in ([True, False] if args.no_cache else [True]):
            for workers in args.workers:
                rate = loader_rate(info, size, batch, workers, work / "cache" if cached else None, args.epochs,
                                   args.max_batches)
                out["loader"].append({"cache": cached, "workers": workers, "img_per_s": rate})
                print(f"loader {'cache' if cached else 'decode'} workers {workers}: {rate:.1f} img/s", flush=True)
    if args.model_from:
        rows = [r for r in json.loads(Path(args.model_from).read_text())["rows"] if r["variant"] == "m2snet_fast"]
        best = max(rows, key=lambda r: r["img_per_s"])
        out["model_mode"], out["model_img_per_s"] = f"{best['mode']} (from {args.model_from})", best["img_per_s"]
    elif not args.skip_model:
        out["model_mode"] = mode
        out["model_img_per_s"] = model_rate(device, size, batch, mode, args.repeats, args.steps)
    if "model_img_per_s" in out:
        print(f"model m2snet {out['model_mode']} training step: {out['model_img_per_s']:.1f} img/s", flush=True)
        for row in out["loader"]:
            row["loader_over_model"] = row["img_per_s"] / out["model_img_per_s"]
    where = out["cuda_device"] or f"cpu ({out['threads']} threads)"
    print(f"\n{where}, {size} px, batch {batch}, {out['cases']} cases, augment + multi-scale")
    print(f"{'loader':8s} {'workers':>7s} {'img/s':>8s} {'loader/model':>13s}")
    for row in out["loader"]:
        ratio = f"{row['loader_over_model']:12.1f}x" if "loader_over_model" in row else f"{'-':>13s}"
        print(f"{'cache' if row['cache'] else 'decode':8s} {row['workers']:7d} {row['img_per_s']:8.1f} {ratio}")
    if "model_img_per_s" in out:
        print(f"model    {'':7s} {out['model_img_per_s']:8.1f}   (target: loader >= {TARGET_RATIO:.0f}x model)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
