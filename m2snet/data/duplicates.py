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
bits.

Clusters: byte-identical images (same sha256) are one node, always together; the nodes are then
grouped by complete linkage cut at ``max_distance``: every two members of a cluster are within the
threshold of each other, so a cluster's diameter is bounded by the threshold. Why complete linkage:
the first version took the connected components (single linkage, union-find) of the near pairs,
which chains: on endoscopy, where every frame is a bright, round, reddish scene and unrelated
images sit 8-10 bits apart, Kvasir-SEG got one cluster of 143 different polyps and CVC-ClinicDB one
of 252 frames from 21 videos. A medoid bound (every member within the threshold of one centre)
still allows a diameter of twice the threshold, and its hubs are the same problem at a smaller
scale: on Kvasir-SEG one image is within 8 bits of 18 others, which a medoid rule makes one
cluster of 19. Complete linkage keeps only groups that are pairwise near duplicates (Kvasir-SEG:
at most 3 cases), and on BUSI, whose copies are tight (0-4 bits), it keeps 327 of the 329 cases
the chains held (numbers in docs/data-format.md). Ties are broken by case id, so the clusters do not
depend on the order the cases are listed in.

Distances are always even: pHash sets the bits above the median, so every hash has 32 ones.
Default ``max_distance`` = 8 bits, from the measurement on BUSI (``bench/busi_near_duplicates.py``,
numbers in docs/data-format.md): the 220 pairs at <= 8 bits are the same scan on inspection, the 17 pairs at
10 bits are half the same scene and half different lesions, and from 12 bits on unrelated pairs
dominate (61, 275, 1121 pairs at 12, 14, 16 bits). Copies of BUSI images resized, re-encoded as
JPEG or cropped by up to 10% per side stay within 8 bits; one-sided crops of 5% mostly do.

A cluster's id (the manifest's ``group``) is its smallest case id, so a singleton's group is its
own case id and the id does not depend on the order cases were read in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from m2snet.errors import M2SNetError

HASH_METHOD = "phash64-centre-crops"
CROP_SCALES = (1.0, 0.9, 0.8)
HASH_BITS = 64
# How near pairs become clusters (recorded in dataset.json): every two members within the threshold.
LINKAGE = "complete"
DEFAULT_MAX_DISTANCE = 8
# Endoscopy (Kvasir-SEG, PraNet, CVC-ClinicDB): every frame has the same black corners and overlay
# box, which dominate a 32x32 thumbnail's low frequencies, so different polyps sit 2-8 bits apart.
# On Kvasir-SEG, looked at pair by pair: the 3 pairs at 0 bits are one scene, the one at 2 bits two
# scenes, of the 7 at 4 bits 2 are one scene (a crop and a zoom), 4 two, 1 unclear; the pairs at 6 bits
# (8 of 46 looked at) and 8 bits (a cluster of 5) different polyps. 4 bits finds every copy seen, at
# the price of 5-6 pairs of different polyps kept in one fold: a missed copy leaks, a wrong pair
# costs nothing but a little fold balance.
ENDOSCOPY_MAX_DISTANCE = 4
# A cluster of more cases than this is named in a warning: same-picture copies come in twos and
# threes (BUSI: at most 4); ten pairwise near-identical images usually mean a video or a detector
# that does not fit the images, worth a look (tools/cluster_montage.py).
DEFAULT_WARN_CLUSTER_SIZE = 10
# Rows of the pairwise distance matrix computed at once: bounds memory to ~BLOCK * n bytes per crop pair.
_BLOCK = 512


@dataclass(frozen=True)
class NearDuplicateConfig:
    """How near duplicates are detected; ``enabled=False`` keeps exact (sha256) duplicates only.

    ``warn_cluster_size``: clusters of more cases are named in a warning (import and validation);
    it changes no cluster, so dataset.json does not record it.
    """

    enabled: bool = True
    max_distance: int = DEFAULT_MAX_DISTANCE
    warn_cluster_size: int = field(default=DEFAULT_WARN_CLUSTER_SIZE, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance < HASH_BITS:
            raise M2SNetError(f"near-duplicate threshold must be 0..{HASH_BITS - 1} bits, got {self.max_distance}")
        if self.warn_cluster_size < 2:
            raise M2SNetError(f"warn_cluster_size must be at least 2, got {self.warn_cluster_size}")

    def to_meta(self) -> dict[str, Any] | None:
        """What dataset.json records (None = near duplicates off)."""
        if not self.enabled:
            return None
        return {"method": HASH_METHOD, "max_distance": self.max_distance, "hash_bits": HASH_BITS,
                "linkage": LINKAGE}

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
    # Pairs within the threshold that the diameter bound put in different clusters (the cost of not
    # chaining: on BUSI 4 of 220, links of a probe sweep; on Kvasir-SEG 176 of 276, unrelated polyps).
    near_pairs_across: int = 0

    @property
    def conflicts(self) -> list[DuplicateCluster]:
        return [c for c in self.clusters if c.label_conflict]

    @property
    def large_clusters(self) -> list[DuplicateCluster]:
        """Clusters of more than ``config.warn_cluster_size`` cases."""
        return [c for c in self.clusters if len(c.case_ids) > self.config.warn_cluster_size]

    def large_cluster_warnings(self) -> list[str]:
        """One line per large cluster, naming it (for the import log and the validation report)."""
        return [
            f"duplicate cluster {c.group} holds {len(c.case_ids)} cases (more than "
            f"{self.config.warn_cluster_size}): {', '.join(c.case_ids[:12])}{' ...' if len(c.case_ids) > 12 else ''}; "
            "check by eye that they show one scene (tools/cluster_montage.py), or lower the threshold"
            for c in self.large_clusters
        ]

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
            "largest_cluster": max((len(c.case_ids) for c in self.clusters), default=1),
            "near_pairs_across_clusters": self.near_pairs_across,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "near_duplicates": self.config.to_meta(),
            **self.counts(),
            "warn_cluster_size": self.config.warn_cluster_size,
            "large_clusters": [c.group for c in self.large_clusters],
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


def complete_linkage(n: int, pairs: Sequence[tuple[int, int, int]], max_distance: int) -> list[list[int]]:
    """Clusters of nodes 0..n-1 (ascending, in order of first member) in which every two members are
    within ``max_distance``: complete linkage cut at ``max_distance``.

    ``pairs``: ``(i, j, distance)`` for every pair within ``max_distance`` (the others are farther).
    Only connected components of the pair graph can share a cluster, so linkage runs per component,
    on its members in index order (ties between equal distances are then broken by index); a
    distance above the cut is entered as ``max_distance + 1``, which decides no merge below the cut.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    components = UnionFind(n)
    for i, j, _ in pairs:
        components.union(i, j)
    dist: dict[tuple[int, int], int] = {}
    for i, j, d in pairs:
        key = (min(i, j), max(i, j))
        dist[key] = min(d, dist.get(key, d))
    clusters: list[list[int]] = []
    for members in components.components().values():
        m = len(members)
        if m < 3:  # one node, or a pair within the threshold
            clusters.append(members)
            continue
        condensed = np.full(m * (m - 1) // 2, max_distance + 1, dtype=np.float64)
        pos = {node: k for k, node in enumerate(members)}
        for (i, j), d in dist.items():
            if i in pos and j in pos:
                a, b = pos[i], pos[j]  # a < b: members are ascending
                condensed[m * a - a * (a + 1) // 2 + (b - a - 1)] = d
        flat = fcluster(linkage(condensed, method="complete"), t=max_distance, criterion="distance")
        by_label: dict[int, list[int]] = {}
        for node, label in zip(members, flat.tolist()):
            by_label.setdefault(label, []).append(node)
        clusters.extend(by_label.values())
    return sorted(clusters, key=lambda c: c[0])


def find_duplicates(
    case_ids: Sequence[str],
    labels: Sequence[str],
    sha256s: Sequence[str],
    hashes: np.ndarray | None,
    config: NearDuplicateConfig = NearDuplicateConfig(),
) -> DuplicateReport:
    """Clusters of exact (same sha256) and near (perceptual hash) duplicates, of bounded diameter.

    Byte-identical images are one node; nodes are grouped by :func:`complete_linkage` at
    ``config.max_distance``, so every two cases of a cluster are within the threshold. The result
    does not depend on the order of the cases (they are processed in case-id order).
    ``hashes``: uint64 [n, len(CROP_SCALES)] from :func:`perceptual_hashes`, row i for case i
    (may be None when ``config.enabled`` is False).
    """
    order = sorted(range(len(case_ids)), key=lambda i: case_ids[i])
    ids = [case_ids[i] for i in order]
    # Nodes: one per distinct image bytes (an empty sha256 is an image of its own).
    node_of: list[int] = []
    node_members: list[list[int]] = []
    node_by_sha: dict[str, int] = {}
    for k, i in enumerate(order):
        sha = sha256s[i]
        if sha and sha in node_by_sha:
            node_of.append(node_by_sha[sha])
            node_members[node_by_sha[sha]].append(k)
            continue
        node_of.append(len(node_members))
        node_members.append([k])
        if sha:
            node_by_sha[sha] = node_of[-1]
    node_pairs: list[tuple[int, int, int]] = []
    if config.enabled:
        if hashes is None:
            raise ValueError("near-duplicate detection needs the perceptual hashes")
        first = [members[0] for members in node_members]  # identical bytes: identical hashes
        node_hashes = np.asarray(hashes, dtype=np.uint64)[[order[k] for k in first]]
        node_pairs = near_pairs(node_hashes, config.max_distance)
    node_clusters = complete_linkage(len(node_members), node_pairs, config.max_distance)

    group_of: dict[str, str] = {}
    clusters: list[DuplicateCluster] = []
    cluster_of_node: dict[int, DuplicateCluster] = {}
    for nodes in node_clusters:
        members = sorted(k for node in nodes for k in node_members[node])
        for k in members:
            group_of[ids[k]] = ids[members[0]]
        if len(members) > 1:
            cluster = DuplicateCluster(ids[members[0]], [ids[k] for k in members],
                                       {ids[k]: labels[order[k]] for k in members})
            clusters.append(cluster)
            for node in nodes:
                cluster_of_node[node] = cluster
    for members in node_members:
        for k in members[1:]:
            cluster_of_node[node_of[k]].links.append(
                {"a": ids[members[0]], "b": ids[k], "kind": "exact", "bits": 0, "similarity": 1.0})
    across = 0
    for a, b, bits in node_pairs:
        cluster = cluster_of_node.get(a)
        if cluster is None or cluster is not cluster_of_node.get(b):
            across += len(node_members[a]) * len(node_members[b])
        else:
            for ka in node_members[a]:
                for kb in node_members[b]:
                    x, y = sorted((ids[ka], ids[kb]))
                    cluster.links.append({"a": x, "b": y, "kind": "near", "bits": bits,
                                          "similarity": round(1 - bits / HASH_BITS, 4)})
    for c in clusters:
        c.links.sort(key=lambda link: (link["a"], link["b"]))
    exact = sorted([ids[k] for k in members] for members in node_members if len(members) > 1)
    return DuplicateReport(config=config, clusters=clusters, group_of={c: group_of[c] for c in case_ids},
                           exact_groups=exact, near_pairs_across=across)

