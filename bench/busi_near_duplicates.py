"""Near-duplicate detection on real BUSI: the evidence for the default threshold, and its cost.

Prints
1. the number of image pairs at each Hamming distance (min over centre-crop pairs) from 0 to 16
   bits: near duplicates form a separate population at small distances, unrelated pairs start
   above it; the default threshold sits in the gap;
2. the distance of the known twins (``benign (1)``/``benign (318)``: resized; ``benign (433)``/
   ``malignant (145)``: byte-identical);
3. the distance between every 5th BUSI image and a copy of it resized, re-encoded as JPEG, or
   cropped (symmetric and one-sided), i.e. what the detector must survive;
4. clusters, cases in them and cross-label clusters at thresholds around the default;
5. the time hashing and clustering take.

    python bench/busi_near_duplicates.py [BUSI_ROOT]   (default $M2SNET_BUSI_ROOT or ../shared/data/busi)
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2snet.data.duplicates import (
    DEFAULT_MAX_DISTANCE,
    HASH_BITS,
    NearDuplicateConfig,
    find_duplicates,
    near_pairs,
    perceptual_hashes,
)


def _crop(im: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = im.size
    return im.crop((int(w * left), int(h * top), w - int(w * right), h - int(h * bottom)))


def _jpeg(im: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    im.convert("L").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("L")


TRANSFORMS = {
    "resize x0.6": lambda im: im.resize((int(im.width * 0.6), int(im.height * 0.6)), Image.BILINEAR),
    "JPEG q70": _jpeg,
    "crop 3% each side": lambda im: _crop(im, 0.03, 0.03, 0.03, 0.03),
    "crop 6% each side": lambda im: _crop(im, 0.06, 0.06, 0.06, 0.06),
    "crop 10% each side": lambda im: _crop(im, 0.10, 0.10, 0.10, 0.10),
    "crop 5% left only": lambda im: _crop(im, 0.05, 0, 0, 0),
    "crop 5% top + 3% right": lambda im: _crop(im, 0, 0.05, 0.03, 0),
    "crop 4/2/2/5% + x0.7 + JPEG": lambda im: _jpeg(
        _crop(im, 0.04, 0.02, 0.02, 0.05).resize((int(im.width * 0.66), int(im.height * 0.65)))
    ),
}


def main() -> None:
    default_root = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi"
    root = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("M2SNET_BUSI_ROOT", default_root))
    paths = sorted(p for p in root.glob("*/*.png") if "_mask" not in p.name)
    if not paths:
        raise SystemExit(f"{root}: no BUSI images found")
    names = [f"{p.parent.name}/{p.stem}" for p in paths]
    labels = [p.parent.name for p in paths]
    t0 = time.perf_counter()
    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("L"))
    t1 = time.perf_counter()
    hashes = np.stack([perceptual_hashes(im) for im in images])
    t2 = time.perf_counter()
    pairs = near_pairs(hashes, 16)
    t3 = time.perf_counter()
    print(f"{len(paths)} images from {root}")
    print(f"time: decode {t1 - t0:.2f} s, hash {t2 - t1:.2f} s ({1e3 * (t2 - t1) / len(paths):.2f} ms/image), "
          f"all {len(paths) * (len(paths) - 1) // 2} pairs compared in {t3 - t2:.2f} s")

    print("\n1. pairs per distance (bits of 64, min over centre-crop pairs); cumulative")
    per_bits = Counter(b for _, _, b in pairs)
    total = 0
    for b in range(17):
        total += per_bits[b]
        mark = "  <- default threshold" if b == DEFAULT_MAX_DISTANCE else ""
        print(f"   {b:2d} bits: {per_bits[b]:5d} pairs (cumulative {total:5d}){mark}")

    print("\n2. known twins")
    index = {n: i for i, n in enumerate(names)}
    for a, b in (("benign/benign (1)", "benign/benign (318)"), ("benign/benign (433)", "malignant/malignant (145)")):
        ha, hb = hashes[index[a]], hashes[index[b]]
        bits = int(min(np.bitwise_count(x ^ y) for x in ha for y in hb))
        size_a, size_b = images[index[a]].size, images[index[b]].size
        print(f"   {a} {size_a} ~ {b} {size_b}: {bits} bits")

    print("\n3. a copy of every 5th image vs. its original: distance in bits (median / 95th pct / max)")
    sample = list(range(0, len(images), 5))
    for name, fn in TRANSFORMS.items():
        dists = []
        for i in sample:
            h = perceptual_hashes(fn(images[i]))
            dists.append(int(min(np.bitwise_count(x ^ y) for x in hashes[i] for y in h)))
            full_only = int(np.bitwise_count(hashes[i][0] ^ h[0]))
            dists[-1] = (dists[-1], full_only)
        d = np.array([x for x, _ in dists])
        f = np.array([y for _, y in dists])
        missed = int((d > DEFAULT_MAX_DISTANCE).sum())
        print(f"   {name:30s} {np.median(d):4.0f} / {np.quantile(d, 0.95):4.0f} / {d.max():3d}   "
              f"missed at {DEFAULT_MAX_DISTANCE} bits: {missed}/{len(d)}   "
              f"(full-image pHash alone: {np.median(f):.0f} / {np.quantile(f, 0.95):.0f} / {f.max()})")

    print("\n4. clusters by threshold (exact + near, union-find)")
    sha = [__import__("hashlib").sha256(p.read_bytes()).hexdigest() for p in paths]
    for bits in sorted({6, 8, DEFAULT_MAX_DISTANCE, 10, 12}):
        t = time.perf_counter()
        rep = find_duplicates(names, labels, sha, hashes, NearDuplicateConfig(max_distance=bits))
        dt = time.perf_counter() - t
        c = rep.counts()
        sizes = Counter(len(cl.case_ids) for cl in rep.clusters)
        print(f"   <= {bits:2d} bits: {c['duplicate_clusters']} clusters holding {c['cases_in_clusters']} cases "
              f"(sizes {dict(sorted(sizes.items()))}), {c['label_conflicts']} cross-label, "
              f"{c['exact_duplicate_groups']} exact groups; clustering {dt:.2f} s")
    rep = find_duplicates(names, labels, sha, hashes, NearDuplicateConfig())
    print(f"\n   cross-label clusters at the default ({DEFAULT_MAX_DISTANCE} bits):")
    for cl in rep.conflicts:
        print(f"     {cl.describe()}")
    print(f"   exact groups: {rep.exact_groups}")
    print(f"   similarity of a near pair = 1 - bits/{HASH_BITS}")


if __name__ == "__main__":
    main()
