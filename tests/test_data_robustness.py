"""The data layer under real-world input (issue 10): one test per defect found importing public sets.

Content sanity checks (swapped image/mask folders, photos as masks), imports that die cleanly
(exception, SIGINT, SIGTERM; SIGKILL leftovers removed by the next import), a dataset version that
is a function of the data only, files readable by others (umask), label conflicts among
duplicates, format sniffing by content, and the COVID-CT layout's Doctor-label/ level.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2snet.cli import app
from m2snet.data.demo import make_case, make_demo_dataset
from m2snet.data.format import load_dataset
from m2snet.data.importers import import_dataset
from m2snet.data.split import make_split
from m2snet.data.validation import report_paths, validate_dataset
from m2snet.data.versioning import dataset_version
from m2snet.errors import M2SNetError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _photo(seed: int, size: int = 64) -> Image.Image:
    """A colour 'endoscopy photo': smooth colour gradients plus noise (channels disagree)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([200 * xx + 30, 120 * yy + 40, 90 * (1 - xx) + 20], axis=2)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8), "RGB")


def _polyp_mask(seed: int, size: int = 64) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    y, x = 10 + seed % 20, 8 + seed % 24
    m[y:y + 18, x:x + 22] = 255
    return m


def _kvasir(root: Path, n: int = 4, swapped: bool = False) -> Path:
    """Kvasir-SEG layout; ``swapped``: images/ holds the grey masks and masks/ the RGB photos."""
    for i in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        photo, mask = _photo(i), Image.fromarray(_polyp_mask(i), "L")
        image_dir, mask_dir = ("masks", "images") if swapped else ("images", "masks")
        photo.save(root / image_dir / f"cju{i}.jpg", quality=90)
        mask.save(root / mask_dir / f"cju{i}.jpg", quality=90)
    return root


def _leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# ------------------------------------------------------------------ 1. content sanity checks


def test_swapped_image_and_mask_folders_are_refused_with_the_fix(tmp_path):
    src = _kvasir(tmp_path / "kvasir", n=4, swapped=True)
    with pytest.raises(M2SNetError) as err:
        import_dataset("kvasir", src, tmp_path / "out", progress=False)
    message = str(err.value)
    # Said once for the dataset (all 4 cases look swapped), with the fix.
    assert "images and masks look swapped in 4 of 4 cases" in message
    assert "Swap the folders" in message and "cju0.jpg" in message
    assert _leftovers(tmp_path, "out") == []
    # The same files, the right way round, import; the foreground fraction is the masks'.
    info = import_dataset("kvasir", _kvasir(tmp_path / "good", n=4), tmp_path / "good_out", progress=False)
    report = json.loads(report_paths(info.root)[0].read_text())
    assert 0.05 < report["foreground_fraction"]["polyp"]["mean"] < 0.15


def test_one_swapped_case_is_named_and_a_colour_photo_mask_is_refused(tmp_path):
    src = _kvasir(tmp_path / "kvasir", n=4)
    # Case 1: image and mask exchanged; case 2: a colour photo where the mask should be.
    _photo(1).save(src / "masks" / "cju1.jpg", quality=90)
    Image.fromarray(_polyp_mask(1), "L").save(src / "images" / "cju1.jpg", quality=90)
    _photo(7).save(src / "masks" / "cju2.jpg", quality=90)
    with pytest.raises(M2SNetError) as err:
        import_dataset("kvasir", src, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "2 of 4 cases could not be imported" in message
    assert "images/cju1.jpg: images and masks look swapped" in message
    assert "masks/cju2.jpg: mask is a colour image" in message
    # A grey photo as a (JPEG, thresholded) mask is no two-level map either.
    _photo(1).convert("L").save(src / "masks" / "cju1.jpg", quality=90)
    Image.fromarray(_polyp_mask(2), "L").save(src / "masks" / "cju2.jpg", quality=90)
    _photo(1).save(src / "images" / "cju1.jpg", quality=90)
    with pytest.raises(M2SNetError, match=r"masks/cju1\.jpg: mask is not a two-level map"):
        import_dataset("kvasir", src, tmp_path / "out", progress=False)


def test_foreground_outliers_are_listed(tmp_path):
    src = _kvasir(tmp_path / "kvasir", n=4)
    big = np.full((64, 64), 255, np.uint8)
    big[:8] = 0
    Image.fromarray(big, "L").save(src / "masks" / "cju3.jpg", quality=95)
    info = import_dataset("kvasir", src, tmp_path / "out", progress=False)
    report = validate_dataset(info.root)
    assert [(o["case_id"], o["why"]) for o in report.outliers] == [("cju3", "mask covers 88% of the image")]
    assert "outlier: cju3 (polyp): mask covers 88% of the image" in report.summary()


# ------------------------------------------------------------------ 2. atomic imports


def _slow_source(root: Path) -> Path:
    """A BUSI-layout source big enough that an import is still running when it is signalled."""
    make_demo_dataset(root, n_per_class=(12, 8, 6), size=96, seed=5)
    return root


def _start_import(src: Path, dest: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "m2snet.cli", "data", "import", "-f", "busi", str(src), str(dest)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as in a terminal: a suite started in the background (`cmd &`) ignores SIGINT, and a
        # Python child that inherits SIG_IGN never raises KeyboardInterrupt (it would finish the import).
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_partial(parent: Path, name: str, proc: subprocess.Popen, timeout: float = 120,
                      freeze: bool = False) -> Path:
    """The import's partial output directory, once conversion has written files into it (so there is
    something to clean up). With ``freeze``, the process is stopped (SIGSTOP) as soon as the directory
    is found, and the check is repeated while it is stopped: the partial is still there, so the import
    cannot have finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        partial = [p for p in _leftovers(parent, name) if p.name.endswith(".partial")]
        if partial and (partial[0] / "images").is_dir() and any((partial[0] / "images").iterdir()):
            if not freeze:
                return partial[0]
            proc.send_signal(signal.SIGSTOP)
            if partial[0].is_dir():
                return partial[0]
            proc.send_signal(signal.SIGCONT)  # renamed into place in between: too late, look again
        assert proc.poll() is None, f"import ended before it could be signalled: {proc.communicate()}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no partial directory appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_import_leaves_nothing_behind(tmp_path, sig):
    src = _slow_source(tmp_path / "src")
    proc = _start_import(src, tmp_path / "out")
    # Freeze the import the moment its partial output is seen, signal it, then let it run, so the
    # signal always lands while the import is still writing, however busy the box.
    _wait_for_partial(tmp_path, "out", proc, freeze=True)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert _leftovers(tmp_path, "out") == []
    assert proc.returncode != 0
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "partial output removed" in err


def test_a_sigkilled_imports_partial_is_removed_by_the_next_import(tmp_path, caplog):
    src = _slow_source(tmp_path / "src")
    proc = _start_import(src, tmp_path / "out")
    partial = _wait_for_partial(tmp_path, "out", proc)
    proc.kill()
    proc.wait(timeout=60)
    assert partial.is_dir()  # SIGKILL cannot be caught: this is what it leaves
    with caplog.at_level(logging.WARNING, logger="m2snet"):
        import_dataset("busi", src, tmp_path / "out", progress=False)
    assert f"removed {partial}: a partial output left by a killed run" in caplog.text
    assert _leftovers(tmp_path, "out") == [tmp_path / "out"]


def test_a_live_writers_partial_is_not_removed(tmp_path):
    from m2snet.directories import remove_stale_partials

    live = tmp_path / f".out.{os.uname().nodename}-{os.getpid()}.abcd1234.partial"
    live.mkdir()
    assert remove_stale_partials(tmp_path / "out") == [] and live.is_dir()


# ------------------------------------------------------------------ 3. the version is a function of the data


def test_version_ignores_validation_options_and_the_name(tmp_path):
    make_demo_dataset(tmp_path / "raw", n_per_class=(3, 2, 2), size=48, seed=2)
    a = import_dataset("busi", tmp_path / "raw", tmp_path / "first_name", progress=False)
    b = import_dataset("busi", tmp_path / "raw", tmp_path / "sub" / "second_name", progress=False)
    assert a.version == b.version
    runner = CliRunner()
    for args in ([], ["--no-allow-duplicates"], ["--near-duplicate-threshold", "20"], ["--near-duplicates", "off"]):
        result = runner.invoke(app, ["data", "validate", str(a.root), *args])
        assert result.exit_code in (0, 1), result.output
        assert dataset_version(a.root) == a.version, args
    assert sorted(p.name for p in a.root.iterdir()) == ["dataset.json", "images", "manifest.csv", "masks"]
    assert report_paths(a.root)[0].is_file()


# ------------------------------------------------------------------ 4. files readable by others


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_files_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    make_demo_dataset(tmp_path / "raw", n_per_class=(3, 2, 2), size=48, seed=2)
    old = os.umask(umask)
    try:
        info = import_dataset("busi", tmp_path / "raw", tmp_path / "ds", progress=False)
        split = make_split(info, n_folds=2, seed=0)
    finally:
        os.umask(old)
    paths = [info.root, *info.root.rglob("*"), split.path, *report_paths(info.root)]
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (dir_mode if path.is_dir() else file_mode), (path, oct(mode))


# ------------------------------------------------------------------ 5. label conflicts among duplicates


def _busi_with_a_twin_under_another_label(root: Path) -> Path:
    make_demo_dataset(root, n_per_class=(3, 2, 2), size=64, seed=4)
    # malignant (3): benign (2) resized and re-encoded (a near duplicate) with its own mask.
    image = Image.open(root / "benign" / "benign (2).png")
    image.resize((56, 56), Image.BILINEAR).save(root / "malignant" / "malignant (3).png")
    mask = np.zeros((56, 56), np.uint8)
    mask[20:30, 20:30] = 255
    Image.fromarray(mask).save(root / "malignant" / "malignant (3)_mask.png")
    return root


def test_label_conflicts_are_warnings_for_busi_and_errors_when_not_allowed(tmp_path):
    src = _busi_with_a_twin_under_another_label(tmp_path / "src")
    result = CliRunner().invoke(app, ["data", "import", "-f", "busi", str(src), str(tmp_path / "ok"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert payload["label_conflicts"] == [["benign_0002", "malignant_0003"]]
    assert payload["duplicate_counts"]["label_conflicts"] == 1
    info = load_dataset(tmp_path / "ok")
    assert info.case("malignant_0003").group == info.case("benign_0002").group == "benign_0002"
    summary = validate_dataset(info.root).summary()
    assert "label conflict WARNING (allowed): benign_0002 (benign), malignant_0003 (malignant)" in summary
    with pytest.raises(M2SNetError, match=r"1 duplicate cluster\(s\) hold cases with different labels.*\n"
                                          r"  benign_0002 \(benign\), malignant_0003 \(malignant\)"):
        import_dataset("busi", src, tmp_path / "strict", allow_label_conflicts=False, progress=False)
    assert _leftovers(tmp_path, "strict") == []
    strict = validate_dataset(info.root, allow_label_conflicts=False, write_report=False)
    assert not strict.success and "label conflict ERROR" in strict.summary()


def test_an_exact_duplicate_under_two_labels_is_a_label_conflict(tmp_path):
    src = tmp_path / "src"
    make_demo_dataset(src, n_per_class=(3, 2, 2), size=64, seed=4)
    (src / "malignant" / "malignant (2).png").write_bytes((src / "benign" / "benign (1).png").read_bytes())
    info = import_dataset("busi", src, tmp_path / "out", progress=False)
    report = json.loads(report_paths(info.root)[0].read_text())
    assert report["duplicates"] == [["benign_0001", "malignant_0002"]]
    assert [c["case_ids"] for c in report["label_conflicts"]] == [["benign_0001", "malignant_0002"]]


# ------------------------------------------------------------------ 6. format sniffing, COVID-CT layout


def test_a_jpeg_named_png_is_read_by_content_with_a_note(tmp_path):
    src = _kvasir(tmp_path / "kvasir", n=3)
    _photo(0).save(src / "images" / "cju0.png", format="JPEG", quality=90)  # JPEG bytes, .png name
    (src / "images" / "cju0.jpg").unlink()
    result = CliRunner().invoke(app, ["data", "import", "-f", "kvasir", str(src), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"note: {src / 'images' / 'cju0.png'}: content is JPEG, not the PNG its extension says" in result.output


def test_covid_ct_names_the_doctor_label_level_and_reads_it(tmp_path):
    root = tmp_path / "LungInfection-Train"
    root.mkdir()
    with pytest.raises(M2SNetError, match=r"Doctor-label/Imgs and Doctor-label/GT"):
        import_dataset("covid-ct", root, tmp_path / "out", progress=False)
    (root / "Doctor-label" / "Imgs").mkdir(parents=True)
    (root / "Doctor-label" / "GT").mkdir()
    for i in range(2):
        Image.fromarray(make_case(0, "benign", i + 1, 64)[0]).save(root / "Doctor-label" / "Imgs" / f"Image{i}.jpg")
        Image.fromarray(_polyp_mask(i)).save(root / "Doctor-label" / "GT" / f"Image{i}.png")
    info = import_dataset("covid-ct", root, tmp_path / "out", progress=False)
    assert [c.source_image for c in info.cases] == ["Doctor-label/Imgs/Image0.jpg", "Doctor-label/Imgs/Image1.jpg"]


def test_format_1_datasets_ask_for_a_reimport(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "dataset.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(M2SNetError, match=r"format_version 1 .* re-import"):
        load_dataset(tmp_path / "old")


# ------------------------------------------------------------------ the CLI's error boundary: one line, exit 2


def _main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run the real entry point (``m2snet`` = m2snet.cli:main, with its error boundary); exit code and stderr."""
    from m2snet.cli import main

    monkeypatch.setattr(sys, "argv", ["m2snet", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_cli_bad_importer_option_value_is_one_line(tmp_path, monkeypatch, capsys):
    src = _kvasir(tmp_path / "kvasir", n=2)
    code, err = _main(["data", "import", "-f", "kvasir", str(src), str(tmp_path / "out"), "-o", "threshold=abc"],
                      monkeypatch, capsys)
    assert code == 2 and "option threshold='abc'" in _one_error_line(err)
    assert _leftovers(tmp_path, "out") == []


def test_cli_decompression_bomb_on_import_is_an_error_naming_the_file(tmp_path, monkeypatch, capsys):
    src = _kvasir(tmp_path / "kvasir", n=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 images: PIL's bomb error (above 2000 pixels)
    code, err = _main(["data", "import", "-f", "kvasir", str(src), str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and "cju0.jpg: image is too large to decode" in err, err
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_cli_validate_refuses_an_absolute_manifest_path(tmp_path, monkeypatch, capsys, where):
    import csv

    info = import_dataset("kvasir", _kvasir(tmp_path / "kvasir", n=2), tmp_path / "ds", progress=False)
    target = info.cases[0].image_path
    if where == "outside":
        target = Path(shutil.copy(target, tmp_path / "elsewhere.png"))
    manifest = tmp_path / "ds" / "manifest.csv"
    rows = list(csv.DictReader(manifest.open(newline="")))
    rows[0]["image"] = str(target)
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, err = _main(["data", "validate", str(tmp_path / "ds")], monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and "manifest.csv:2" in line and str(target) in line and "relative" in line


def test_cli_an_os_error_on_a_user_path_is_one_line(monkeypatch, capsys):
    """The boundary's safety net: an OSError the command did not turn into its own message (here the
    dataset folder cannot be created under /proc) is still one line naming the path, exit 2."""
    code, err = _main(["data", "demo", "/proc/m2snet-cannot-exist"], monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and "/proc/" in line and "No such file or directory" in line


def test_cli_a_source_file_name_that_is_not_utf8_is_one_line(tmp_path, monkeypatch, capsys):
    """Issue 29.7: a name with a Latin-1 byte (``cju1\\xe9.jpg``) crashed the manifest write with a
    UnicodeEncodeError traceback. Refused up front, naming the file (its bytes escaped)."""
    src = _kvasir(tmp_path / "kvasir", n=3)
    for folder in ("images", "masks"):
        os.rename(os.fsencode(src / folder / "cju1.jpg"), os.fsencode(src / folder) + b"/cju1\xe9.jpg")
    code, err = _main(["data", "import", "-f", "kvasir", str(src), str(tmp_path / "out")], monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and "not valid UTF-8" in line and "images/cju1\\xe9.jpg" in line, line
    assert _leftovers(tmp_path, "out") == []
