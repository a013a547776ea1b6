"""Training throughput: images/s of one full training step, per model and per speed setting.

One step is exactly what the trainer runs (``m2snet.training.step.TrainStep``): forward under
autocast, TotalLoss with LossNet, backward, SGD step. Models: M2SNet (fast MSU), M2SNet (dense
all-ones MSU, the reference's form), MSNet, and the authors' own M2SNet class when ``--reference``
points at a checkout of their code (CUDA only: their fixed filters call ``.cuda()``). Modes are
TrainConfig speed settings (eager, channels-last, fused SGD, torch.compile, CUDA graphs), each
measured as images/s = batch x steps / median time of ``--steps`` consecutive steps, the
(model, mode) pairs timed round-robin (see model_speed.interleaved_medians).

    python bench/train_speed.py                               # CUDA: batch 16, 352 px, AMP
    python bench/train_speed.py --device cpu                   # CPU: batch 4, 128 px, fp32
    python bench/train_speed.py --modes eager compiled_cl_fused --multiscale
    python bench/train_speed.py --precisions 128 160 352 --threads 1 --variants m2snet_fast msnet   # CPU precisions

``--multiscale`` also runs the recipe's multi-scale batches (5 scales) for each pair: the first
step at each scale (compile time of a new shape) and the steady images/s cycling the scales.
Targets (CUDA, batch 16 AMP): M2SNet within 1.1x of MSNet, >= 1.5x the dense form.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import VARIANTS, _sync, interleaved_medians

# mode -> TrainConfig speed overrides (compile/fused act under CUDA only; amp/channels_last on CUDA and on a
# CPU with native bf16 units)
MODES: dict[str, dict] = {
    "eager": {"channels_last": False},
    "cl": {"channels_last": True},
    # CPU precisions (training.speed: they act on a CPU with native bf16 units, else all run fp32)
    "fp32": {"amp": False, "channels_last": False},
    "fp32_cl": {"amp": False, "channels_last": True},
    "bf16": {"amp": True, "channels_last": False},
    "bf16_cl": {"amp": True, "channels_last": True},
    "fused": {"fused_optimizer": True},
    "cl_fused": {"channels_last": True, "fused_optimizer": True},
    "compiled": {"compile": True},
    "compiled_cl_fused": {"compile": True, "channels_last": True, "fused_optimizer": True},
    "compiled_cg": {"compile": True, "compile_mode": "reduce-overhead", "channels_last": True,
                    "fused_optimizer": True},
    "compiled_dynamic": {"compile": True, "compile_dynamic": True, "channels_last": True,
                         "fused_optimizer": True},
}
REFERENCE = "reference"
# A speed mode must keep each step's loss within this relative difference of the eager step's
# (mixed precision and a different kernel order change the last bits; a wrong graph changes more).
NUMERICS_RTOL = 0.02


def reference_model(checkout: str) -> torch.nn.Module:
    """The authors' M2SNet class from a checkout of their code (model/miccai_msnet.py), random init.

    Their constructor asks for ImageNet weights from the network; the bench has none, so the
    encoder factory is called with pretrained=False (the architecture is the same).
    """
    sys.path.insert(0, str(Path(checkout).resolve()))
    module = importlib.import_module("model.miccai_msnet")
    module.res2net50_v1b_26w_4s = functools.partial(module.res2net50_v1b_26w_4s, pretrained=False)
    return module.M2SNet()


def build_model(label: str, reference: str | None) -> torch.nn.Module:
    from m2snet.models import create_model

    torch.manual_seed(0)
    if label == REFERENCE:
        return reference_model(reference)
    name, config = VARIANTS[label]
    return create_model(name, pretrained=False, **config)


def make_step(label: str, mode: str, device: str, size: int, batch: int, loss_fn: torch.nn.Module,
              reference: str | None = None, amp: bool = True):
    """(TrainStep, its TrainConfig) for one model in one mode; lr small so random data stays finite."""
    from m2snet.training.config import TrainConfig
    from m2snet.training.step import TrainStep, build_optimizer

    cfg = TrainConfig(**{"size": size, "batch_size": batch, "backbone_lr": 1e-4, "head_lr": 1e-3, "amp": amp,
                         **MODES[mode]})
    model = build_model(label, reference).to(device).train()
    on_cuda = device.startswith("cuda")
    if hasattr(model, "backbone_parameters"):
        optimizer = build_optimizer(model, cfg, on_cuda)
    else:  # the authors' class has no backbone/head split: one group at the head LR
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.head_lr,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                    nesterov=cfg.nesterov, fused=True if (cfg.fused_optimizer and on_cuda) else None)
    return TrainStep(model, loss_fn, optimizer, cfg, device), cfg


def batch_at(size: int, batch: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = (torch.rand(batch, 1, size, size, generator=gen) > 0.5).float()
    return x.to(device), y.to(device)


def loss_curves(variant: str, modes: list[str], device: str, size: int, batch: int, n_steps: int,
                amp: bool = True, lossnet_weight: float = 0.1) -> dict[str, list[float]]:
    """The total loss of ``n_steps`` training steps per mode, from the same initial weights on the
    same batches (blob-shaped masks), so that a speed mode can be checked against eager numerics."""
    from m2snet.training.losses import TotalLoss

    torch.manual_seed(0)
    loss_fn = TotalLoss(n_classes=1, lossnet_weight=lossnet_weight, lossnet_pretrained=False).to(device)
    batches = []
    for i in range(n_steps):
        x, noise = batch_at(size, batch, device, seed=1000 + i)
        batches.append((x, (torch.nn.functional.avg_pool2d(noise, 15, 1, 7) > 0.5).float()))
    curves = {}
    for mode in modes:
        step, _ = make_step(variant, mode, device, size, batch, loss_fn, amp=amp)
        curves[mode] = [float(step(x, y)["loss"]) for x, y in batches]
    return curves


def max_relative_difference(curve: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(curve, reference))


def runner(step, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(steps):
            step(x, y)
    return run


def timed_first(fn: Callable[[], None], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def multiscale(step, scales: list[int], batch: int, device: str, rounds: int) -> dict:
    """First-step seconds at each scale (a new shape: compile time when compiled), then the steady
    images/s of ``rounds`` passes over all scales."""
    data = {s: batch_at(s, batch, device, seed=s) for s in scales}
    first = {s: timed_first(runner(step, *data[s], 1), device) for s in scales}
    per_round = []
    for _ in range(rounds):
        per_round.append(sum(timed_first(runner(step, *data[s], 1), device) for s in scales))
    return {"first_step_s": first, "img_per_s": batch * len(scales) / statistics.median(per_round)}


def step_gflop(step, x: torch.Tensor, y: torch.Tensor) -> float:
    """GFLOP of one training step (forward + backward), counted by torch's FlopCounterMode (convolutions
    and matmuls: the work that precision changes the speed of)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(x, y)
    return counter.get_total_flops() / 1e9


def gemm_probe(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype`` on this CPU (the best of ``repeats``: a ceiling, so the
    run least disturbed by other work counts): what a training step in that precision can approach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (oneDNN picks its kernel)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


CPU_PRECISIONS = ("fp32", "bf16", "bf16_cl")


def precision_table(sizes: list[int], variants: list[str], modes: list[str], batch: int, repeats: int,
                    steps: int) -> dict:
    """img/s and achieved GFLOP/s of the training step per (size, model, precision) on the CPU, timed
    round-robin per size, beside the fp32 and bf16 GEMM probes; speed-up = mode img/s / fp32 img/s."""
    from m2snet.training.losses import TotalLoss
    from m2snet.training.speed import cpu_bf16_flags

    loss_fn = TotalLoss(n_classes=1, lossnet_weight=0.0, lossnet_pretrained=False)
    gemm = {"fp32": gemm_probe(torch.float32), "bf16": gemm_probe(torch.bfloat16)}
    out = {"threads": torch.get_num_threads(), "batch": batch, "cpu_bf16_flags": sorted(cpu_bf16_flags()),
           "gemm_gflops": gemm, "rows": []}
    print(f"GEMM probe (1024^3): fp32 {gemm['fp32']:.0f} GFLOP/s, bf16 {gemm['bf16']:.0f} GFLOP/s "
          f"({gemm['bf16'] / gemm['fp32']:.2f}x); native bf16 flags: {out['cpu_bf16_flags'] or 'none'}", flush=True)
    for size in sizes:
        x, y = batch_at(size, batch, "cpu")
        y = (torch.nn.functional.avg_pool2d(y, 5, 1, 2) > 0.5).float()
        fns, gflop = {}, {}
        for variant in variants:
            for mode in modes:
                step, _ = make_step(variant, mode, "cpu", size, batch, loss_fn)
                if variant not in gflop:
                    gflop[variant] = step_gflop(step, x, y)
                fns[f"{variant}|{mode}"] = runner(step, x, y, steps)
        medians = interleaved_medians(fns, "cpu", warmup=1, repeats=repeats)
        for variant in variants:
            base = batch * steps / medians[f"{variant}|{modes[0]}"]
            for mode in modes:
                t = medians[f"{variant}|{mode}"]
                img_s = batch * steps / t
                achieved = gflop[variant] * steps / t
                ceiling = gemm["bf16" if mode.startswith("bf16") else "fp32"]
                row = {"size": size, "variant": variant, "mode": mode, "img_per_s": img_s,
                       "gflop_per_step": gflop[variant], "gflops": achieved, "of_gemm": achieved / ceiling,
                       f"vs_{modes[0]}": img_s / base}
                out["rows"].append(row)
                print(f"{size:4d} px {variant:13s} {mode:8s} {img_s:6.2f} img/s {achieved:7.1f} GFLOP/s "
                      f"({100 * achieved / ceiling:4.1f} % of its GEMM) {img_s / base:5.2f}x {modes[0]}", flush=True)
    return out


def write(path: str | None, out: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(out, indent=2))


def ratios(rows: list[dict]) -> list[dict]:
    """Per mode: m2snet/msnet and dense/fast step time; per model: eager/mode (speed-up)."""
    by = {(r["variant"], r["mode"]): r for r in rows}
    out = []
    for (variant, mode), r in by.items():
        fast = by.get(("m2snet_fast", mode))
        if variant == "msnet" and fast:
            out.append({"mode": mode, "ratio": "m2snet/msnet time", "value": fast["ms_step"] / r["ms_step"]})
        if variant == "m2snet_dense" and fast:
            out.append({"mode": mode, "ratio": "dense/m2snet time", "value": r["ms_step"] / fast["ms_step"]})
        if variant == REFERENCE and fast:
            out.append({"mode": mode, "ratio": "reference/m2snet time", "value": r["ms_step"] / fast["ms_step"]})
        eager = by.get((variant, "eager"))
        if eager and mode != "eager":
            out.append({"mode": mode, "variant": variant, "ratio": f"{variant} eager/{mode}",
                        "value": eager["ms_step"] / r["ms_step"]})
    return out


def bench_setup(args, cpu_batch: int) -> tuple[str, bool, int, int]:
    """Quiet logging, ``--threads``, and (device, on_cuda, size, batch) with the machine's defaults:
    352 px / batch 16 on CUDA (the paper's setting), 128 px / ``cpu_batch`` on the CPU."""
    logging.basicConfig(level=logging.ERROR)  # random-weight warnings are expected here
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    return device, on_cuda, args.size or (352 if on_cuda else 128), args.batch or (16 if on_cuda else cpu_batch)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--size", type=int, default=None, help="default: 352 on CUDA, 128 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 4 on CPU")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, REFERENCE])
    parser.add_argument("--reference", default=None, help="checkout of the authors' code: adds their M2SNet")
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help="default: eager cl_fused compiled_cl_fused on CUDA, eager on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first (compiling) step")
    parser.add_argument("--steps", type=int, default=3, help="consecutive steps per timed run")
    parser.add_argument("--multiscale", action="store_true", help="also time the 5-scale multi-scale batches")
    parser.add_argument("--check-numerics", type=int, default=0, metavar="N",
                        help="also compare N steps' losses of each mode with eager (m2snet_fast)")
    parser.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too")
    parser.add_argument("--lossnet-weight", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_out", default=None, help="write results here (also partial ones)")
    parser.add_argument("--precisions", type=int, nargs="*", default=None, metavar="SIZE",
                        help="CPU: the precision table (fp32, bf16, bf16_cl) at these sizes, e.g. 128 160 352")
    args = parser.parse_args(argv)
    if args.precisions is not None:
        logging.basicConfig(level=logging.ERROR)
        if args.threads:
            torch.set_num_threads(args.threads)
        modes = args.modes or list(CPU_PRECISIONS)
        out = precision_table(args.precisions or [128, 160, 352], [v for v in args.variants if v in VARIANTS],
                              modes, args.batch or 8, args.repeats, args.steps)
        write(args.json_out, out)
        return out
    device, on_cuda, size, batch = bench_setup(args, cpu_batch=4)
    modes = args.modes or (["eager", "cl_fused", "compiled_cl_fused"] if on_cuda else ["eager"])
    variants = list(args.variants) + ([REFERENCE] if args.reference and REFERENCE not in args.variants else [])
    from m2snet.training.losses import TotalLoss

    loss_fn = TotalLoss(n_classes=1, lossnet_weight=args.lossnet_weight, lossnet_pretrained=False).to(device)
    out = {"device": device, "cuda_device": torch.cuda.get_device_name() if on_cuda else None,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "size": size, "batch": batch,
           "amp": on_cuda and not args.no_amp, "steps": args.steps, "repeats": args.repeats,
           "rows": [], "multiscale": []}

    # Build and warm every (model, mode): the first step compiles; its time is reported.
    x, y = batch_at(size, batch, device)
    fns, steps = {}, {}
    for variant in variants:
        for mode in modes:
            key = f"{variant}|{mode}"
            try:
                step, _ = make_step(variant, mode, device, size, batch, loss_fn, args.reference,
                                    amp=not args.no_amp)
            except Exception as err:  # noqa: BLE001 - e.g. the reference's .cuda() on a CPU box
                print(f"skip {variant} {mode}: {type(err).__name__}: {err}", flush=True)
                break
            first = timed_first(runner(step, x, y, 1), device)
            quick = timed_first(runner(step, x, y, args.steps), device)
            print(f"warm {variant:13s} {mode:18s} first step {first:7.1f} s, then "
                  f"{batch * args.steps / quick:7.1f} img/s", flush=True)
            fns[key], steps[key] = runner(step, x, y, args.steps), step
            out["rows"].append({"variant": variant, "mode": mode, "first_step_s": first,
                                "ms_step": 1000 * quick / args.steps, "img_per_s": batch * args.steps / quick,
                                "interleaved": False})
            write(args.json_out, out)

    medians = interleaved_medians(fns, device, args.warmup, args.repeats)
    for row in out["rows"]:
        t = medians[f"{row['variant']}|{row['mode']}"]
        row.update(ms_step=1000 * t / args.steps, img_per_s=batch * args.steps / t, interleaved=True)
    out["ratios"] = ratios(out["rows"])
    write(args.json_out, out)

    if args.multiscale:
        from m2snet.training.config import TrainConfig

        scales = TrainConfig(size=size).scales()
        for key, step in steps.items():
            variant, mode = key.split("|")
            ms = multiscale(step, scales, batch, device, rounds=max(1, args.repeats // 2))
            out["multiscale"].append({"variant": variant, "mode": mode, **ms})
            firsts = " ".join(f"{s}:{t:.1f}s" for s, t in ms["first_step_s"].items())
            print(f"multiscale {variant:13s} {mode:18s} {ms['img_per_s']:7.1f} img/s; first step {firsts}",
                  flush=True)
            write(args.json_out, out)

    if args.check_numerics:
        curves = loss_curves("m2snet_fast", ["eager", *[m for m in modes if m != "eager"]], device, size, batch,
                             args.check_numerics, amp=not args.no_amp, lossnet_weight=args.lossnet_weight)
        out["numerics"] = {"rtol": NUMERICS_RTOL, "curves": curves,
                           "max_rel_diff": {m: max_relative_difference(c, curves["eager"]) for m, c in curves.items()}}
        for mode, diff in out["numerics"]["max_rel_diff"].items():
            verdict = "ok" if diff <= NUMERICS_RTOL else "DIFFERS"
            print(f"numerics m2snet_fast {mode:18s} max relative loss difference vs eager over "
                  f"{args.check_numerics} steps: {diff:.2e} ({verdict}, tolerance {NUMERICS_RTOL})", flush=True)
        write(args.json_out, out)

    where = out["cuda_device"] or f"cpu ({out['threads']} threads)"
    print(f"\n{where}, torch {out['torch']}, batch {batch}, {size} px, "
          f"{'AMP (fp16 autocast)' if out['amp'] else 'fp32'}, {args.steps} steps x {args.repeats} repeats")
    print(f"{'model':14s} {'mode':18s} {'first step s':>12s} {'ms/step':>9s} {'img/s':>8s}")
    for r in out["rows"]:
        print(f"{r['variant']:14s} {r['mode']:18s} {r['first_step_s']:12.1f} {r['ms_step']:9.1f} {r['img_per_s']:8.1f}")
    print("\nratios (m2snet/msnet <= 1.1 wanted; dense/m2snet >= 1.5 wanted; eager/mode > 1 = faster)")
    for r in out["ratios"]:
        print(f"{r['mode']:18s} {r['ratio']:34s} {r['value']:.2f}x")
    return out


if __name__ == "__main__":
    main()
