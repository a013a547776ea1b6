"""Outputs that are never lost (issue 17): what ``--overwrite`` may replace, an atomic swap whatever
kills the writer, one writer at a time per DEST, shared caches that are first-writer-wins under
concurrent builders, a DEST that cannot be written reported in one line, and one atomic file write
(umask mode, fsync, rename) for every result file.

Concurrency and kills are exercised with real processes (subprocess), never threads or mocks.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2snet.data.demo import make_demo_dataset
from m2snet.data.format import load_dataset
from m2snet.data.importers import import_dataset
from m2snet.directories import atomic_directory
from m2snet.errors import M2SNetError
from m2snet.files import write_json
from m2snet.models.checkpoint import Checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _leftovers(parent: Path, name: str) -> list[Path]:
    """``name`` and everything m2snet may put beside it (partials, old copies, lock files)."""
    return sorted(p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def _m2snet(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a child process: its exit code and stderr are what a user sees."""
    return subprocess.run([sys.executable, "-m", "m2snet.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit 2 and a single ``error:`` line on stderr holding each of ``parts``; never a traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def raw(tmp_path) -> Path:
    """``datasets/busi_raw`` (BUSI layout) beside a neighbour ``datasets/other`` holding a user's file."""
    make_demo_dataset(tmp_path / "datasets" / "busi_raw", n_per_class=(2, 1, 1), size=48, seed=1)
    (tmp_path / "datasets" / "other").mkdir()
    (tmp_path / "datasets" / "other" / "notes.txt").write_text("keep me\n")
    return tmp_path / "datasets" / "busi_raw"


# ------------------------------------------------------------------ 1. what --overwrite may replace


def test_overwrite_onto_the_folder_above_the_source_is_refused_and_deletes_nothing(raw):
    """The issue's command: DEST the folder holding SRC and its neighbours."""
    before = _tree(raw.parent)
    proc = _m2snet("data", "import", "--format", "busi", raw, raw.parent, "--overwrite")
    _one_error_line(proc, str(raw.parent), "contains the source")
    assert _tree(raw.parent) == before
    assert _leftovers(raw.parent.parent, raw.parent.name) == [raw.parent]


@pytest.mark.parametrize("where", ["src", "inside src", "above src", "symlink to the folder above src"])
def test_a_dest_that_is_contains_or_sits_inside_the_source_is_refused(raw, where):
    dest = {
        "src": raw, "inside src": raw / "converted", "above src": raw.parent,
        "symlink to the folder above src": raw.parent.parent / "link",
    }[where]
    if where.startswith("symlink"):
        dest.symlink_to(raw.parent, target_is_directory=True)
    before = _tree(raw.parent)
    for overwrite in (False, True):
        with pytest.raises(M2SNetError, match="source") as err:
            import_dataset("busi", raw, dest, overwrite=overwrite, progress=False)
        assert str(dest) in str(err.value) and "\n" not in str(err.value)
    assert _tree(raw.parent) == before


def test_overwrite_replaces_only_a_previous_m2snet_dataset(raw, tmp_path):
    user_dir = tmp_path / "results"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("months of work\n")
    for overwrite in (True, False):
        with pytest.raises(M2SNetError, match=r"results: .*not an m2snet output \(no dataset.json\)") as err:
            import_dataset("busi", raw, user_dir, overwrite=overwrite, progress=False)
        assert "use --overwrite" not in str(err.value)  # not suggested for a folder it would refuse
    assert (user_dir / "thesis.tex").read_text() == "months of work\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(import_dataset("busi", raw, empty, overwrite=True, progress=False, validate=False).cases) == 4
    previous = import_dataset("busi", raw, tmp_path / "ds", progress=False, validate=False)
    with pytest.raises(M2SNetError, match="already exists.*use --overwrite"):
        import_dataset("busi", raw, tmp_path / "ds", progress=False)
    again = import_dataset("busi", raw, tmp_path / "ds", overwrite=True, progress=False, validate=False)
    assert again.version == previous.version
    assert _leftovers(tmp_path, "ds") == [tmp_path / "ds"]


# ------------------------------------------------------------------ 7. a DEST that cannot be written


@pytest.fixture
def corrupt_raw(raw) -> Path:
    """A source whose problem only conversion finds: a DEST problem must be reported before it."""
    (raw / "benign" / "benign (1).png").write_bytes(b"not a png")
    return raw


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_overwrite_onto_a_file_or_a_symlink_is_refused_before_the_import_runs(corrupt_raw, tmp_path, kind):
    dest = tmp_path / "dest"
    if kind == "file":
        dest.write_text("a user's file\n")
    else:
        (tmp_path / "real").mkdir()
        write_json(tmp_path / "real" / "dataset.json", {})
        dest.symlink_to(tmp_path / "real", target_is_directory=True)
    proc = _m2snet("data", "import", "-f", "busi", corrupt_raw, dest, "--overwrite")
    _one_error_line(proc, str(dest), "is a file" if kind == "file" else "is a symbolic link")
    assert dest.is_symlink() if kind == "symlink" else dest.read_text() == "a user's file\n"
    assert _leftovers(tmp_path, "dest") == [dest]


@pytest.mark.parametrize("where", ["/proc/m2snet-test/ds", "under a file"])
def test_an_impossible_dest_is_one_line(corrupt_raw, tmp_path, where):
    if where == "under a file":
        (tmp_path / "afile").write_text("x")
        dest = tmp_path / "afile" / "ds"
    else:
        dest = Path(where)
    proc = _m2snet("data", "import", "-f", "busi", corrupt_raw, dest)
    _one_error_line(proc, str(dest), "cannot write")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_dest_folder_is_one_line(corrupt_raw, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        _one_error_line(_m2snet("data", "import", "-f", "busi", corrupt_raw, ro / "ds"), str(ro / "ds"), "cannot write")
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------ 8. an atomic swap, one writer at a time

_REWRITER = """
import json, os, sys
from pathlib import Path
from m2snet.directories import atomic_directory
dest, n = Path(sys.argv[1]), int(sys.argv[2])
generation = 0
while True:  # replace DEST again and again until killed
    generation += 1
    with atomic_directory(dest, overwrite=True) as tmp:
        for i in range(n):
            (tmp / f"{i}.txt").write_text(str(generation))
        meta = {"n": n, "generation": generation, "writer": os.getpid()}
        (tmp / "dataset.json").write_text(json.dumps(meta))
"""


def _complete_generation(dest: Path) -> dict:
    """What DEST holds, checked complete: every file listed, all of one generation."""
    meta = json.loads((dest / "dataset.json").read_text())
    files = sorted(p.name for p in dest.iterdir() if p.name != "dataset.json")
    assert files == sorted(f"{i}.txt" for i in range(meta["n"])), f"{len(files)} of {meta['n']} files"
    assert {(dest / f).read_text() for f in files} == {str(meta["generation"])}
    return meta


def _writer(dest: Path) -> int:
    """Which process wrote DEST; its dataset.json must be there and whole at every instant."""
    return json.loads((dest / "dataset.json").read_text())["writer"]


def test_overwrite_leaves_old_or_new_complete_whatever_kills_the_writer(tmp_path):
    """A writer replaces DEST in a loop: DEST, watched all along, is always complete, and after a kill
    (SIGKILL, SIGTERM) at a random moment too; the next writer removes what the killed one left."""
    script, dest, n = tmp_path / "rewrite.py", tmp_path / "out", 300
    script.write_text(_REWRITER)
    with atomic_directory(dest) as tmp:
        (tmp / "dataset.json").write_text(json.dumps({"n": 0, "generation": 0, "writer": os.getpid()}))
    rng = random.Random(0)
    for round_ in range(10):
        proc = subprocess.Popen([sys.executable, str(script), str(dest), str(n)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = None  # set once this writer has replaced DEST: then it is in its loop
        while deadline is None or time.monotonic() < deadline:
            if deadline is None and _writer(dest) == proc.pid:
                deadline = time.monotonic() + rng.uniform(0, 0.1)
            assert proc.poll() is None
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL if round_ % 2 else signal.SIGTERM)
        proc.wait(timeout=60)
        assert _complete_generation(dest)["writer"] == proc.pid
    with atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "dataset.json").write_text(json.dumps({"n": 0, "generation": 0, "writer": os.getpid()}))
    assert _leftovers(tmp_path, "out") == [dest]


def test_the_fallback_swap_is_atomic_and_a_killed_one_is_restored(tmp_path, monkeypatch):
    """Where the kernel cannot exchange two directories, DEST is moved aside and the new copy renamed
    in; a writer killed between the two leaves the old copy aside, and the next writer puts it back."""
    import m2snet.directories as directories

    dest = tmp_path / "out"
    with atomic_directory(dest) as tmp:
        (tmp / "dataset.json").write_text("old")
    monkeypatch.setattr(directories, "_exchange", lambda a, b: False)
    with atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "dataset.json").write_text("new")
    assert (dest / "dataset.json").read_text() == "new" and _leftovers(tmp_path, "out") == [dest]

    # What a SIGKILL between the two renames leaves: DEST moved aside by a process that is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".out.{os.uname().nodename}-{dead.pid}.x1y2z3.old"
    dest.rename(aside)
    assert directories.remove_stale_partials(dest) == [] and (dest / "dataset.json").read_text() == "new"
    assert _leftovers(tmp_path, "out") == [dest]


def _start_frozen_import(src: Path, dest: Path) -> subprocess.Popen:
    """A real import to ``dest``, stopped (SIGSTOP) while it writes: it holds DEST's lock."""
    proc = subprocess.Popen([sys.executable, "-m", "m2snet.cli", "data", "import", "-f", "busi", str(src), str(dest)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        partial = [p for p in _leftovers(dest.parent, dest.name) if p.name.endswith(".partial")]
        if partial and (partial[0] / "images").is_dir():
            proc.send_signal(signal.SIGSTOP)
            if partial[0].is_dir():  # still writing once stopped
                return proc
            proc.send_signal(signal.SIGCONT)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the import never started writing")


def test_a_second_concurrent_writer_fails_clearly_and_the_first_completes(tmp_path):
    src = tmp_path / "src"
    make_demo_dataset(src, n_per_class=(4, 3, 2), size=64, seed=5)
    dest = tmp_path / "out"
    first = _start_frozen_import(src, dest)
    try:
        for extra in ([], ["--overwrite"]):
            second = _m2snet("data", "import", "-f", "busi", src, dest, *extra)
            _one_error_line(second, str(dest), "another m2snet process")
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert len(load_dataset(dest).cases) == 9
    assert _leftovers(tmp_path, "out") == [dest]  # no lock file left beside DEST


# ------------------------------------------------------------------ 2. shared caches: first writer wins

_CACHE_BUILDER = """
import json, os, sys, time
from pathlib import Path
from m2snet.data.cache import ArrayCache, build_cache
from m2snet.data.format import load_dataset
root, cache_dir, sync, me, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
info = load_dataset(root)
(sync / f"ready-{me}").touch()
while len(list(sync.glob("ready-*"))) < n:  # start building together
    time.sleep(0.001)
path = build_cache(info, 32, cache_dir, progress=False)
inode = os.stat(path / "images.npy").st_ino
(sync / f"built-{me}").touch()
reads = 0
while len(list(sync.glob("built-*"))) < n or reads < 20:  # a fold training on it while the others build
    ArrayCache(path).get(info.cases[-1].case_id)
    reads += 1
print(json.dumps({"inode": inode, "reads": reads}))
"""


def test_concurrent_cache_builders_share_the_first_complete_cache(tmp_path):
    make_demo_dataset(tmp_path / "raw", n_per_class=(10, 8, 6), size=64, seed=3)
    info = import_dataset("busi", tmp_path / "raw", tmp_path / "ds", progress=False, validate=False)
    script, sync, cache_dir, n = tmp_path / "build.py", tmp_path / "sync", tmp_path / "cache", 3
    script.write_text(_CACHE_BUILDER)
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(info.root), str(cache_dir), str(sync), str(i), str(n)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err
    inodes = {json.loads(out)["inode"] for out, _ in results}
    final = cache_dir / info.version / "32"
    # Never removed nor replaced: every builder used the one cache the first finisher published.
    assert inodes == {os.stat(final / "images.npy").st_ino}
    assert _leftovers(final.parent, "32") == [final]


# ------------------------------------------------------------------ 11. one atomic file write


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoints_and_json_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        ckpt = Checkpoint(model_name="unet", state_dict={"w": torch.zeros(2)}).save(tmp_path / "run" / "model.pt")
        write_json(tmp_path / "run" / "history.json", [])
    finally:
        os.umask(old)
    for path in (ckpt, tmp_path / "run" / "history.json"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path, oct(path.stat().st_mode))
    assert torch.equal(Checkpoint.load(ckpt).state_dict["w"], torch.zeros(2))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["history.json", "model.pt"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from m2snet.files import atomic_file

    target = tmp_path / "result.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_sigtermed_atomic_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom m2snet.files import atomic_file\n"
        "with atomic_file(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half')\n    Path(sys.argv[1] + '.ready').touch()\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], env=ENV, stderr=subprocess.PIPE, text=True)
    while not Path(f"{target}.ready").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "Terminated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt.ready"]


# ------------------------------------------------------------------ a command never deletes what it did not write


def test_demo_overwrite_replaces_only_a_previous_demo(tmp_path):
    """``data demo DEST --overwrite`` onto a user's folder is refused, intact; onto its own output it works."""
    user_dir = tmp_path / "results"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("months of work\n")
    proc = _m2snet("data", "demo", user_dir, "--overwrite", "--n-per-class", "1", "--size", "32")
    _one_error_line(proc, str(user_dir), "not an m2snet output")
    assert _tree(user_dir) == {"thesis.tex": b"months of work\n"}
    assert _leftovers(tmp_path, "results") == [user_dir]

    demo = tmp_path / "demo"
    make_demo_dataset(demo, n_per_class=1, size=32, seed=1)
    proc = _m2snet("data", "demo", demo, "--overwrite", "--n-per-class", "1", "--size", "32", "--seed", "2")
    assert proc.returncode == 0, proc.stderr
    again = make_demo_dataset(tmp_path / "fresh", n_per_class=1, size=32, seed=2)
    assert _tree(demo) == _tree(again)
    assert _leftovers(tmp_path, "demo") == [demo]
    # The marker is no image of the raw layout: the BUSI importer reads the demo's cases only.
    assert len(import_dataset("busi", demo, tmp_path / "ds", progress=False, validate=False).cases) == 3


# ------------------------------------------------------------------ every result file through atomic_file

# Writes that are not a whole result file, each with why it needs no atomic_file: (module, function).
PLAIN_WRITES_ALLOWED = {
    ("m2snet/data/format.py", "write_png"): "an image inside import_dataset's atomic_directory (one fsync per image "
                                             "would be wasted: the folder is swapped in whole)",
    ("m2snet/mlops/services.py", "__init__"): "a service's log, streamed while it runs (append)",
    ("m2snet/kubeflow/runview.py", "_line"): "a step's log, streamed while it runs (append)",
}
_ATOMIC = {"atomic_file", "atomic_directory"}
_SAVERS = {("np", "save"), ("np", "savez"), ("np", "savez_compressed"), ("torch", "save")}


def _plain_writes(path: Path) -> list[tuple[str, int, str]]:
    """(function, line, call) of each file write in ``path`` outside a ``with atomic_file/atomic_directory``:
    ``.write_text``, ``.write_bytes``, ``.savefig``, ``np.save``/``torch.save`` and ``open`` with a write mode."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    found = []

    def is_write(call: ast.Call) -> str | None:
        f = call.func
        if isinstance(f, ast.Attribute) and f.attr in ("write_text", "write_bytes", "savefig"):
            return f.attr
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in _SAVERS:
            return f"{f.value.id}.{f.attr}"
        if isinstance(f, ast.Name) and f.id == "open":
            modes = [*call.args[1:2], *(k.value for k in call.keywords if k.arg == "mode")]
            mode = modes[0] if modes else None
            if mode is not None and not (isinstance(mode, ast.Constant) and set(str(mode.value)).isdisjoint("wax+")):
                return "open(..., write mode)"
        return None

    def is_atomic(node: ast.With) -> bool:
        calls = [i.context_expr for i in node.items if isinstance(i.context_expr, ast.Call)]
        return any(getattr(c.func, "id", getattr(c.func, "attr", None)) in _ATOMIC for c in calls)

    def visit(node: ast.AST, function: str, atomic: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function, atomic = node.name, False  # a nested function runs later, maybe outside the block
        if isinstance(node, (ast.With, ast.AsyncWith)) and is_atomic(node):
            atomic = True
        if isinstance(node, ast.Call) and not atomic and (what := is_write(node)):
            found.append((function, node.lineno, what))
        for child in ast.iter_child_nodes(node):
            visit(child, function, atomic)

    visit(tree, "<module>", False)
    return found


def test_the_package_writes_result_files_only_through_atomic_file():
    """A killed process never leaves half a result file: every write goes through atomic_file (or a helper on
    it: write_json, write_text, write_csv) or into an atomic_directory, except the few allowed above."""
    offenders, used = [], set()
    for path in sorted((REPO_ROOT / "m2snet").rglob("*.py")):
        module = path.relative_to(REPO_ROOT).as_posix()
        for function, line, what in _plain_writes(path):
            if (module, function) in PLAIN_WRITES_ALLOWED:
                used.add((module, function))
            else:
                offenders.append(f"{module}:{line} {function}: {what}")
    assert not offenders, "plain writes of result files (use m2snet.files.atomic_file):\n" + "\n".join(offenders)
    assert used == set(PLAIN_WRITES_ALLOWED), f"stale allowances: {set(PLAIN_WRITES_ALLOWED) - used}"


def test_the_scan_flags_a_plain_write(tmp_path):
    """The scan above can fail: each kind of plain write is found, the atomic ones are not."""
    src = tmp_path / "m.py"
    src.write_text(
        "def bad(p, fig, d):\n    p.write_text('x')\n    fig.savefig(p)\n    open(p, 'a')\n    np.save(p, d)\n"
        "def good(p, fig):\n    open(p)\n    open(p, 'rb')\n"
        "    with atomic_file(p) as tmp, open(tmp, 'w') as f:\n        fig.savefig(tmp, format='png')\n"
    )
    assert [(f, what) for f, _, what in _plain_writes(src)] == [
        ("bad", "write_text"), ("bad", "savefig"), ("bad", "open(..., write mode)"), ("bad", "np.save")]


def test_a_per_case_table_whose_writer_is_interrupted_keeps_the_old_table(tmp_path):
    """Behaviour, not just the scan: Ctrl-C while ``cv_per_case.csv`` is written (its second row) leaves the
    previous table whole and no temporary beside it (a plain ``open(.., "w")`` had truncated it)."""
    from m2snet.mlops.cv_results import CV_PER_CASE, write_cv_per_case

    class Interrupted:
        def __str__(self):
            raise KeyboardInterrupt

    write_cv_per_case([{"case_id": "a", "dice": 0.5}], tmp_path, {"run": "old"})
    before = (tmp_path / CV_PER_CASE).read_bytes()
    with pytest.raises(KeyboardInterrupt):
        write_cv_per_case([{"case_id": "b", "dice": 0.7}, {"case_id": "c", "dice": Interrupted()}], tmp_path, {})
    assert (tmp_path / CV_PER_CASE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CV_PER_CASE, "cv_lineage.json"])
