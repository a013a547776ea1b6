"""CVC-ClinicDB: the source's frame-to-sequence table recorded by the importer, a split that keeps
every sequence on one side (issue 17.5, issue 20), and the swapped-folders fix as importer options
that work on a read-only copy (issue 17.11)."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2snet.cli import app
from m2snet.data.format import load_dataset
from m2snet.data.importers import import_dataset
from m2snet.data.importers.clinicdb import CLINICDB_SEQUENCES, clinicdb_sequence
from m2snet.data.split import load_split, make_split
from m2snet.errors import M2SNetError

N_FRAMES = 612
H, W = 36, 44


def test_the_sequence_table_is_the_sources():
    """The table of /work/shared/docs/cvc-clinicdb-sequences.md (the dataset's README): 29 sequences of
    contiguous frames covering 1..612."""
    assert len(CLINICDB_SEQUENCES) == 29
    frames = [f for first, last in CLINICDB_SEQUENCES for f in range(first, last + 1)]
    assert frames == list(range(1, N_FRAMES + 1))
    assert CLINICDB_SEQUENCES[9] == (200, 205) and CLINICDB_SEQUENCES[28] == (592, 612)
    assert [clinicdb_sequence(f) for f in (1, 25, 26, 205, 206, 478, 479, 612)] == [1, 1, 2, 10, 11, 23, 24, 29]
    assert clinicdb_sequence(0) is None and clinicdb_sequence(613) is None


def _sequence_of(frame: int) -> int:
    return next(k for k, (first, last) in enumerate(CLINICDB_SEQUENCES, 1) if first <= frame <= last)


def _frame(frame: int) -> tuple[np.ndarray, np.ndarray]:
    """A small 'video frame': a window moving across its sequence's smooth random scene (the camera
    moves, so first and last frames of a sequence differ), and a polyp mask that moves with it."""
    seq = _sequence_of(frame)
    first, _ = CLINICDB_SEQUENCES[seq - 1]
    rng = np.random.default_rng(seq)
    coarse = rng.uniform(0, 255, (8, 16, 3)).astype(np.uint8)
    scene = np.asarray(Image.fromarray(coarse).resize((3 * W, 2 * H), Image.BICUBIC))
    k = frame - first  # one pixel a frame: neighbours are near duplicates, a sequence's ends are not
    y, x = (k // 2) % H, k
    image = scene[y:y + H, x:x + W]
    mask = np.zeros((H, W), np.uint8)
    mask[10:22, max(0, 8 + k % 10):max(0, 8 + k % 10) + 14] = 255
    return image, mask


def _clinicdb(root: Path, swapped: bool = False, n_frames: int = N_FRAMES) -> Path:
    import tifffile

    images, masks = ("Ground Truth", "Original") if swapped else ("Original", "Ground Truth")
    (root / images).mkdir(parents=True)
    (root / masks).mkdir()
    for frame in range(1, n_frames + 1):
        image, mask = _frame(frame)
        tifffile.imwrite(root / images / f"{frame}.tif", image)
        tifffile.imwrite(root / masks / f"{frame}.tif", mask)
    return root


@pytest.fixture(scope="module")
def clinicdb(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clinicdb")
    return import_dataset("cvc-clinicdb", _clinicdb(root / "src"), root / "ds", progress=False).root


def test_import_records_each_frames_sequence(clinicdb):
    info = load_dataset(clinicdb)
    assert len(info.cases) == N_FRAMES
    assert info.case("clinicdb_0025").column("sequence") == "1"
    assert info.case("clinicdb_0026").column("sequence") == "2"
    assert info.case("clinicdb_0612").column("sequence") == "29"
    assert Counter(c.column("sequence") for c in info.cases) == {
        str(k): last - first + 1 for k, (first, last) in enumerate(CLINICDB_SEQUENCES, 1)}
    header = (clinicdb / "manifest.csv").read_text().splitlines()[0].split(",")
    assert header[-1] == "sequence"


def _folds_of_sequences(split, info) -> dict[str, set[int]]:
    folds: dict[str, set[int]] = {}
    for k, fold in enumerate(split.folds):
        for cid in fold.val:
            folds.setdefault(info.case(cid).column("sequence"), set()).add(k)
    return folds


def test_split_by_sequence_keeps_every_sequence_in_one_fold(clinicdb, tmp_path):
    info = load_dataset(clinicdb)
    # Without the source's grouping, the duplicate clusters alone leave sequences across folds.
    plain = make_split(info, n_folds=4, seed=0, out=tmp_path / "plain.json", group_by=None)
    assert sum(len(f) > 1 for f in _folds_of_sequences(plain, info).values()) > 0

    out = tmp_path / "by-sequence.json"
    result = CliRunner().invoke(app, ["data", "split", str(clinicdb), "--folds", "4", "--seed", "0",
                                      "--group-by", "sequence", "--out", str(out)])
    assert result.exit_code == 0, result.output
    split = load_split(out)
    assert all(len(f) == 1 for f in _folds_of_sequences(split, info).values())
    sizes = [len(f.val) for f in split.folds]
    assert sum(sizes) == N_FRAMES and max(sizes) - min(sizes) <= 30, sizes  # 29 sequences of 6..26 frames
    recorded = json.loads(out.read_text())
    assert recorded["group_by"] == {"column": "sequence", "values": 29, "cases_without_value": 0}
    assert split.group_by == "sequence"
    assert "sequence" in result.output


def _balanced(split) -> list[int]:
    sizes = [len(f.val) for f in split.folds]
    # 29 sequences of 6..26 frames: whole sequences fill the folds to within one long sequence.
    assert sum(sizes) == N_FRAMES and max(sizes) - min(sizes) <= max(b - a + 1 for a, b in CLINICDB_SEQUENCES)
    return sizes


def test_the_importers_grouping_is_the_default(clinicdb, tmp_path):
    """Issue 29.6: `m2snet data split` and the pipeline's split step grouped by sequence only when told to;
    with the defaults 29 of 29 sequences had frames in two or more folds. The importer records its grouping
    in dataset.json, every split uses it unless told `--group-by none`, and says so."""
    from m2snet.workflows import steps

    info = load_dataset(clinicdb)
    assert json.loads((clinicdb / "dataset.json").read_text())["group_by"] == "sequence"
    out = tmp_path / "default.json"
    result = CliRunner().invoke(app, ["data", "split", str(clinicdb), "--out", str(out)])
    assert result.exit_code == 0, result.output
    split = load_split(out, info)
    across = [s for s, folds in _folds_of_sequences(split, info).items() if len(folds) > 1]
    assert across == [] and split.group_by == "sequence" and split.n_folds == 4
    _balanced(split)
    assert "group by 'sequence' (dataset.json" in result.output and "--group-by none" in result.output
    # The pipeline's split step: the same rule, through the same function.
    steps.split_dataset(str(clinicdb), str(tmp_path / "pipeline.json"), n_folds=4, seed=42)
    piped = load_split(tmp_path / "pipeline.json", info)
    assert all(len(f) == 1 for f in _folds_of_sequences(piped, info).values()) and piped.group_by == "sequence"
    _balanced(piped)
    # Turned off by name: duplicates only, and the output says what it dropped.
    off = tmp_path / "off.json"
    result = CliRunner().invoke(app, ["data", "split", str(clinicdb), "--group-by", "none", "--out", str(off)])
    assert result.exit_code == 0, result.output
    plain = load_split(off, info)
    assert plain.group_by is None and json.loads(off.read_text())["group_by"] is None
    assert sum(len(f) > 1 for f in _folds_of_sequences(plain, info).values()) > 0
    assert "not grouped by 'sequence'" in result.output
    # The fixed protocol's grouped fractions too.
    fixed = tmp_path / "fixed.json"
    result = CliRunner().invoke(app, ["data", "split", str(clinicdb), "--protocol", "fixed", "--fractions",
                                      "60/20/20", "--out", str(fixed)])
    assert result.exit_code == 0, result.output
    assert load_split(fixed, info).group_by == "sequence" and load_split(fixed).crossings == []


def test_a_dataset_json_grouping_must_name_a_manifest_column(clinicdb, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(clinicdb, ds)
    meta = json.loads((ds / "dataset.json").read_text())
    for value, problem in (("patient", "no such manifest column"), (3, "must be a manifest column's name")):
        (ds / "dataset.json").write_text(json.dumps({**meta, "group_by": value}))
        with pytest.raises(M2SNetError, match=rf"{ds / 'dataset.json'}: group_by .*{problem}"):
            load_dataset(ds)
    # Imported before dataset.json recorded it: the importer's grouping all the same.
    (ds / "dataset.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "group_by"}))
    assert make_split(ds, out=tmp_path / "legacy.json").group_by == "sequence"


def test_swapped_folders_are_fixed_by_options_on_a_read_only_copy(tmp_path):
    src = _clinicdb(tmp_path / "src", swapped=True, n_frames=6)
    for path in [*src.rglob("*"), src]:
        os.chmod(path, stat.S_IREAD | stat.S_IEXEC if path.is_dir() else stat.S_IREAD)
    try:
        with pytest.raises(M2SNetError) as err:
            import_dataset("cvc-clinicdb", src, tmp_path / "out", progress=False)
        message = str(err.value)
        assert "images and masks look swapped in 6 of 6 cases" in message
        assert "-o images_dir='Ground Truth' -o masks_dir=Original" in message
        info = import_dataset("cvc-clinicdb", src, tmp_path / "out", progress=False,
                              options={"images_dir": "Ground Truth", "masks_dir": "Original"})
        assert len(info.cases) == 6 and info.case("clinicdb_0001").column("sequence") == "1"
        with pytest.raises(M2SNetError, match="Nope: images folder not found"):
            import_dataset("cvc-clinicdb", src, tmp_path / "out2", progress=False, options={"images_dir": "Nope"})
    finally:
        for path in [src, *src.rglob("*")]:
            os.chmod(path, stat.S_IRWXU)


def test_fixed_clip_split_60_20_20_by_sequence(clinicdb, tmp_path):
    """The paper's video protocol (Tab. 2): whole sequences dealt 60 / 20 / 20 into train / val / test."""
    info = load_dataset(clinicdb)
    out = tmp_path / "clips.json"
    result = CliRunner().invoke(app, ["data", "split", str(clinicdb), "--protocol", "fixed", "--fractions",
                                      "60/20/20", "--group-by", "sequence", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    split = load_split(out)
    sides = {"train": split.fold(0).train, "val": split.fold(0).val, "test": split.test_sets["test"]}
    sequences = {side: {info.case(c).column("sequence") for c in ids} for side, ids in sides.items()}
    assert sum(map(len, sequences.values())) == 29  # each sequence on exactly one side
    assert sum(map(len, sides.values())) == N_FRAMES and split.crossings == []
    shares = [len(sides[s]) / N_FRAMES for s in ("train", "val", "test")]
    assert shares == pytest.approx([0.6, 0.2, 0.2], abs=0.05), shares
