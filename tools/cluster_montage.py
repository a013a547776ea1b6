"""A montage of a dataset's duplicate clusters, to check by eye that a cluster shows one scene.

The split keeps each duplicate cluster (the manifest's ``group``) in one fold, so a cluster of
unrelated images costs fold balance and a missed copy leaks; neither shows in numbers. This draws
the largest clusters (or the ones named), one row per cluster, each image captioned with its case
id, label and its distance in bits to the cluster's first case, and the row with the cluster's
diameter (the largest distance between two of its members; at most the import threshold).

Usage: python tools/cluster_montage.py DATASET [--out montage.png] [--largest N] [--group ID ...]
                                       [--tile 160] [--per-row 8]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2snet.data.duplicates import perceptual_hashes
from m2snet.data.format import CaseRecord, load_dataset

CAPTION = 28  # pixels of text under each tile
HEADER = 20  # pixels of text above each cluster


def clusters_of(cases: list[CaseRecord]) -> dict[str, list[CaseRecord]]:
    """group -> its cases, for groups of more than one case."""
    by_group: dict[str, list[CaseRecord]] = defaultdict(list)
    for case in cases:
        by_group[case.group].append(case)
    return {g: sorted(cs, key=lambda c: c.case_id) for g, cs in by_group.items() if len(cs) > 1}


def pick(clusters: dict[str, list[CaseRecord]], groups: list[str], largest: int) -> list[str]:
    """The named groups, else the ``largest`` biggest (ties by group id)."""
    if groups:
        missing = [g for g in groups if g not in clusters]
        if missing:
            raise SystemExit(f"no cluster of more than one case with group {missing} (see manifest.csv's group)")
        return groups
    return sorted(clusters, key=lambda g: (-len(clusters[g]), g))[:largest]


def distance(a: np.ndarray, b: np.ndarray) -> int:
    """Bits between two cases: the smallest Hamming distance over their centre-crop hashes, as the import."""
    return int(np.bitwise_count(a[:, None] ^ b[None, :]).min())


def montage(cases_by_cluster: list[tuple[str, list[CaseRecord]]], tile: int, per_row: int) -> Image.Image:
    font = ImageFont.load_default()
    rows: list[tuple[str, list[tuple[Image.Image, str]]]] = []
    for group, cases in cases_by_cluster:
        thumbs, hashes = [], []
        for case in cases:
            with Image.open(case.image_path) as im:
                rgb = im.convert("RGB")
            hashes.append(perceptual_hashes(rgb))
            rgb.thumbnail((tile, tile))
            thumbs.append(rgb)
        diameter = max(distance(a, b) for a in hashes for b in hashes)
        header = f"group {group}: {len(cases)} cases, diameter {diameter} bits"
        tiles = [(t, f"{c.case_id} ({c.label})\n{distance(hashes[0], h)} bits") for t, c, h in
                 zip(thumbs, cases, hashes)]
        for start in range(0, len(tiles), per_row):
            rows.append((header if start == 0 else "", tiles[start:start + per_row]))
    width = per_row * tile
    height = sum(HEADER + tile + CAPTION for _ in rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for header, tiles in rows:
        draw.text((4, y + 4), header, fill="black", font=font)
        y += HEADER
        for k, (thumb, caption) in enumerate(tiles):
            x = k * tile
            canvas.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
            draw.text((x + 4, y + tile + 2), caption, fill="black", font=font)
        y += tile + CAPTION
    return canvas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="an m2snet dataset directory (from `m2snet data import`)")
    parser.add_argument("--out", type=Path, default=Path("cluster-montage.png"))
    parser.add_argument("--largest", type=int, default=1, help="how many of the largest clusters to draw")
    parser.add_argument("--group", nargs="*", default=[], help="draw these clusters (manifest group ids) instead")
    parser.add_argument("--tile", type=int, default=160, help="tile side in pixels")
    parser.add_argument("--per-row", type=int, default=8, help="tiles per row before a cluster wraps")
    args = parser.parse_args(argv)
    info = load_dataset(args.dataset)
    clusters = clusters_of(info.cases)
    if not clusters:
        raise SystemExit(f"{args.dataset}: no cluster holds more than one case")
    chosen = pick(clusters, args.group, args.largest)
    montage([(g, clusters[g]) for g in chosen], args.tile, args.per_row).save(args.out)
    sizes = ", ".join(f"{g} ({len(clusters[g])})" for g in chosen)
    print(f"{args.out}: clusters {sizes}; {len(clusters)} multi-case clusters in {args.dataset}")


if __name__ == "__main__":
    main()
