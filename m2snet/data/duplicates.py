"""Exact and near-duplicate images: clusters that the split keeps in one fold.

Why: public sets hold the same scan saved twice, with a slightly different crop or size or
re-encoded (BUSI: ``benign (1)`` and ``benign (318)``; about 19% of BUSI's images per Pawlowska et
al., Data in Brief 2023). Byte identity (sha256) misses all of those, and a twin in another fold
is a validation case the model trained on.

How: a 64-bit perceptual hash (imagehash's pHash: the signs of the 8x8 lowest DCT frequencies of
a 32x32 grey thumbnail) is taken of the whole image and of its centre crops at 90% and 80%; two
images are near duplicates when the smallest Hamming distance over the 3x3 crop pairs is at most
``max_distance`` bits. The thumbnail makes the hash blind to size and JPEG re-encoding; the centre
crops make it survive a crop of a few percent per side, which moves a full-image pHash by 6-20
bits. Clusters are the connected components (union-find) of exact (same sha256) and near pairs.

Distances are always even: pHash sets the bits above the median, so every hash has 32 ones.
Default ``max_distance`` = 8 bits, from the measurement on BUSI (``bench/busi_near_duplicates.py``,
numbers in the README): the 220 pairs at <= 8 bits are the same scan on inspection, the 17 pairs at
10 bits are half the same scene and half different lesions, and from 12 bits on unrelated pairs
dominate (61, 275, 1121 pairs at 12, 14, 16 bits). Copies of BUSI images resized, re-encoded as
JPEG or cropped by up to 10% per side stay within 8 bits; one-sided crops of 5% mostly do.

A cluster's id (the manifest's ``group``) is its smallest case id, so a singleton's group is its
own case id and the id does not depend on the order cases were read in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from m2snet.common import M2SNetError

HASH_METHOD = "phash64-centre-crops"
CROP_SCALES = (1.0, 0.9, 0.8)
HASH_BITS = 64
DEFAULT_MAX_DISTANCE = 8
# Rows of the pairwise distance matrix computed at once: bounds memory to ~BLOCK * n bytes per crop pair.
_BLOCK = 512


@dataclass(frozen=True)
class NearDuplicateConfig:
    """How near duplicates are detected; ``enabled=False`` keeps exact (sha256) duplicates only."""

    enabled: bool = True
    max_distance: int = DEFAULT_MAX_DISTANCE

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance < HASH_BITS:
            raise M2SNetError(f"near-duplicate threshold must be 0..{HASH_BITS - 1} bits, got {self.max_distance}")

    def to_meta(self) -> dict[str, Any] | None:
        """What dataset.json records (None = near duplicates off)."""
        if not self.enabled:
            return None
        return {"method": HASH_METHOD, "max_distance": self.max_distance, "hash_bits": HASH_BITS}

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> "NearDuplicateConfig":
        if not meta:
            return cls(enabled=False)
        return cls(enabled=True, max_distance=int(meta.get("max_distance", DEFAULT_MAX_DISTANCE)))


def perceptual_hashes(image: Any) -> np.ndarray:
    """uint64 [len(CROP_SCALES)]: the pHash of a PIL image and of its centre crops."""
    import imagehash

    grey = image.convert("L")
    w, h = grey.size
    out = np.zeros(len(CROP_SCALES), dtype=np.uint64)
    for k, scale in enumerate(CROP_SCALES):
        dx, dy = round(w * (1 - scale) / 2), round(h * (1 - scale) / 2)
        crop = grey if scale == 1.0 else grey.crop((dx, dy, w - dx, h - dy))
        bits = imagehash.phash(crop, hash_size=8).hash.flatten()  # 64 bools, row-major
        out[k] = np.packbits(bits).view(">u8")[0]
    return out


def near_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """``(i, j, bits)`` with i < j for every pair within ``max_distance`` bits (min over crop pairs)."""
    n, s = hashes.shape
    pairs = []
    for start in range(0, n, _BLOCK):
        rows = hashes[start:start + _BLOCK]
        best = np.full((len(rows), n), HASH_BITS, dtype=np.uint8)
        for a in range(s):
            for b in range(s):
                np.minimum(best, np.bitwise_count(rows[:, a, None] ^ hashes[None, :, b]), out=best)
        ii, jj = np.nonzero(best <= max_distance)
        for i, j in zip(ii.tolist(), jj.tolist()):
            if start + i < j:
                pairs.append((start + i, j, int(best[i, j])))
    return pairs


@dataclass
class DuplicateCluster:
    """Cases that show the same picture. ``links``: the pairs that joined them."""

    group: str
    case_ids: list[str]
    labels: dict[str, str]  # case_id -> label
    links: list[dict[str, Any]] = field(default_factory=list)  # {a, b, kind: exact|near, bits, similarity}

    @property
    def label_conflict(self) -> bool:
        return len(set(self.labels.values())) > 1

    @property
    def exact_only(self) -> bool:
        return all(link["kind"] == "exact" for link in self.links)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group, "case_ids": self.case_ids, "labels": self.labels,
            "label_conflict": self.label_conflict, "links": self.links,
        }

    def describe(self) -> str:
        cases = ", ".join(f"{c} ({self.labels[c]})" for c in self.case_ids)
        near = [link for link in self.links if link["kind"] == "near"]
        how = "identical bytes" if not near else f"similarity >= {min(link['similarity'] for link in near):.2f}"
        return f"{cases} [{how}]"


@dataclass
class DuplicateReport:
    """Every multi-case cluster, plus the cluster id of each case."""

    config: NearDuplicateConfig
    clusters: list[DuplicateCluster]
    group_of: dict[str, str]
    exact_groups: list[list[str]]

    @property
    def conflicts(self) -> list[DuplicateCluster]:
        return [c for c in self.clusters if c.label_conflict]

    @property
    def near_clusters(self) -> list[DuplicateCluster]:
        """Clusters joined by at least one near (not byte-identical) pair."""
        return [c for c in self.clusters if not c.exact_only]

    def counts(self) -> dict[str, int]:
        return {
            "exact_duplicate_groups": len(self.exact_groups),
            "duplicate_clusters": len(self.clusters),
            "near_duplicate_clusters": len(self.near_clusters),
            "cases_in_clusters": sum(len(c.case_ids) for c in self.clusters),
            "label_conflicts": len(self.conflicts),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "near_duplicates": self.config.to_meta(),
            **self.counts(),
            "exact_groups": self.exact_groups,
            "clusters": [c.to_dict() for c in self.clusters],
        }


class UnionFind:
    """Disjoint sets over 0..n-1 (path halving); the root of a set is its smallest member."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def components(self) -> dict[int, list[int]]:
        """root -> its members in ascending order, roots in order of first member."""
        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        return members


def find_duplicates(
    case_ids: Sequence[str],
    labels: Sequence[str],
    sha256s: Sequence[str],
    hashes: np.ndarray | None,
    config: NearDuplicateConfig = NearDuplicateConfig(),
) -> DuplicateReport:
    """Union-find over exact (same sha256) and near (perceptual hash) pairs.

    ``hashes``: uint64 [n, len(CROP_SCALES)] from :func:`perceptual_hashes`, row i for case i
    (may be None when ``config.enabled`` is False).
    """
    n = len(case_ids)
    sets = UnionFind(n)
    links: list[tuple[int, int, str, int]] = []
    first_of: dict[str, int] = {}
    by_sha: dict[str, list[int]] = {}
    for i, sha in enumerate(sha256s):
        if not sha:
            continue
        by_sha.setdefault(sha, []).append(i)
        if sha in first_of:
            links.append((first_of[sha], i, "exact", 0))
        else:
            first_of[sha] = i
    if config.enabled:
        if hashes is None:
            raise ValueError("near-duplicate detection needs the perceptual hashes")
        for i, j, bits in near_pairs(np.asarray(hashes, dtype=np.uint64), config.max_distance):
            if sha256s[i] and sha256s[i] == sha256s[j]:
                continue  # already an exact link
            links.append((i, j, "near", bits))
    for i, j, _, _ in links:
        sets.union(i, j)

    members = sets.components()
    group_of = {}
    clusters_by_root: dict[int, DuplicateCluster] = {}
    for root, idx in members.items():
        ids = sorted(case_ids[i] for i in idx)
        for i in idx:
            group_of[case_ids[i]] = ids[0]
        if len(idx) > 1:
            labels_by_id = {case_ids[i]: labels[i] for i in sorted(idx, key=lambda k: case_ids[k])}
            clusters_by_root[root] = DuplicateCluster(ids[0], ids, labels_by_id)
    for i, j, kind, bits in links:
        a, b = sorted((case_ids[i], case_ids[j]))
        clusters_by_root[sets.find(i)].links.append(
            {"a": a, "b": b, "kind": kind, "bits": bits, "similarity": round(1 - bits / HASH_BITS, 4)}
        )
    clusters = sorted(clusters_by_root.values(), key=lambda c: c.group)
    for c in clusters:
        c.links.sort(key=lambda link: (link["a"], link["b"]))
    exact = sorted(sorted(case_ids[i] for i in idx) for idx in by_sha.values() if len(idx) > 1)
    return DuplicateReport(config=config, clusters=clusters, group_of=group_of, exact_groups=exact)


def hash_files(paths: Iterable[Any]) -> np.ndarray:
    """Perceptual hashes of image files, uint64 [n, len(CROP_SCALES)]."""
    from m2snet.data.images import read_image

    rows = [perceptual_hashes(read_image(path)) for path in paths]
    return np.stack(rows) if rows else np.zeros((0, len(CROP_SCALES)), dtype=np.uint64)
