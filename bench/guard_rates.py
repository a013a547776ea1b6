"""The input guard's rates on a CV's fold models: false flags on held-out in-distribution cases, flags and
AUROC on out-of-distribution sets, and the latency it adds to a prediction.

    python bench/guard_rates.py --data busi --split busi.split.json --runs runs/m2snet --folds 0 1 \
        --kvasir ../shared/data/kvasir-seg/images

Members: the fold models ``RUNS/fold<k>/model.pt`` (an ensemble, as the pipeline registers it). The guard is
fitted as registration fits it (m2snet.evaluation.guard.fit_guard): member k on fold k's training cases,
its threshold from half of fold k's held-out cases; the other half ("held-out") measures false flags with
member k alone (the only member that never trained on them). Out-of-distribution sets, scored by the whole
ensemble as a deployed model scores them: Kvasir-SEG polyp frames, blank images (black, white, mid-grey),
uniform noise, and the held-out BUSI images inverted (255 - x). AUROC: held-out vs each set, per member,
averaged. Latency: predict_proba with and without the guard on the same images, interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    from m2snet.data.format import load_dataset
    from m2snet.data.images import read_rgb
    from m2snet.data.split import load_split
    from m2snet.evaluation.guard import auroc, backbone_features, fit_guard
    from m2snet.evaluation.predict import Predictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", required=True)
    parser.add_argument("--runs", required=True, help="a CV's output folder (fold<k>/model.pt inside)")
    parser.add_argument("--folds", type=int, nargs="+", required=True)
    parser.add_argument("--kvasir", default=None, help="folder of Kvasir-SEG images (skipped when absent)")
    parser.add_argument("--n-ood", type=int, default=100, help="images per out-of-distribution set")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    info, split = load_dataset(args.data), load_split(args.split)
    predictor = Predictor.from_checkpoints([Path(args.runs) / f"fold{k}" / "model.pt" for k in args.folds])
    start = time.perf_counter()
    fit = fit_guard(predictor, info, split, args.folds)
    fit_s = time.perf_counter() - start
    guard = fit.guard
    by_id = {c.case_id: c for c in info.cases}
    held = [[read_rgb(by_id[i].image_path) for i in ids] for ids in fit.held_out_ids]

    rng = np.random.default_rng(0)
    n = args.n_ood
    ood: dict[str, list[np.ndarray]] = {}
    if args.kvasir and Path(args.kvasir).is_dir():
        files = sorted(Path(args.kvasir).glob("*.jpg"))[:n]
        ood["kvasir-seg"] = [read_rgb(f) for f in files]
    ood["blank"] = [np.full((256, 256, 3), v, np.uint8) for v in (0, 128, 255)]
    ood["noise"] = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(min(n, 20))]
    ood["inverted"] = [255 - im for ims in held for im in ims][:n]

    def member_scores(member: int, images: list[np.ndarray]) -> np.ndarray:
        m = guard.members[member]
        return m.distances(backbone_features(predictor, member, images)) / m.threshold

    rows = [{"set": "held-out BUSI (member k on fold k)", "n": int(sum(map(len, held))),
             "flagged": float(np.mean(np.concatenate(fit.held_out_scores) > 1)), "auroc": None}]
    for name, images in ood.items():
        ensemble = guard.scores([backbone_features(predictor, i, images) for i in range(len(args.folds))])
        aucs = [auroc(fit.held_out_scores[i], member_scores(i, images)) for i in range(len(args.folds))]
        rows.append({"set": name, "n": len(images), "flagged": float(np.mean(ensemble > 1)),
                     "auroc": float(np.mean(aucs))})

    # Latency: the same images predicted with and without the guard, interleaved.
    sample = [im for ims in held for im in ims][:16]
    plain = Predictor(predictor.models, predictor.meta, batch_size=8)
    guarded = Predictor(predictor.models, predictor.meta, batch_size=8)
    guarded.attach_guard(guard)
    times: dict[str, list[float]] = {"plain": [], "guarded": []}
    for _ in range(3):
        for label, fn in (("plain", lambda: plain.predict_proba(sample)),
                          ("guarded", lambda: guarded.predict_guarded(sample))):
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    per_image = {k: statistics.median(v) / len(sample) for k, v in times.items()}
    out = {"folds": args.folds, "quantile": guard.quantile, "fit_seconds": fit_s, "rows": rows,
           "latency_ms_per_image": {k: 1000 * v for k, v in per_image.items()},
           "added_latency": per_image["guarded"] / per_image["plain"] - 1}
    print(f"guard on {args.runs} folds {args.folds} (threshold: quantile {guard.quantile} of held-out distances); "
          f"fitted in {fit_s:.0f} s")
    print("| set | images | flagged | AUROC vs held-out |\n|---|---|---|---|")
    for r in rows:
        auc = "" if r["auroc"] is None else f"{r['auroc']:.3f}"
        print(f"| {r['set']} | {r['n']} | {100 * r['flagged']:.1f} % | {auc} |")
    print(f"latency per image: plain {out['latency_ms_per_image']['plain']:.1f} ms, guarded "
          f"{out['latency_ms_per_image']['guarded']:.1f} ms ({100 * out['added_latency']:+.1f} %)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
