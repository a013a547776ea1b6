"""Where runs go: the tracking configuration (URI, experiment, retries), the one way to an
``MlflowClient``, the checks and set-up of a local store, and MLflow calls retried with back-off.

MLflow's own HTTP layer also retries (7 times, factor 2 by default: minutes on a dead server);
this module turns that down to one quick retry unless the user set
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` themselves, because
the back-off here (:func:`with_retry`) is the one that knows about buffering.

Default tracking URI: ``sqlite:///mlflow.db`` with artifacts in ``./mlruns`` (or
``$MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from m2snet.errors import M2SNetError, database_driver_hint
from m2snet.locks import writer_lock
from m2snet.redaction import redact

log = logging.getLogger("m2snet.mlops.tracking")
T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Two experiments, two purposes: stand-alone runs of the CLI (`m2snet train / cv / compare`) and pipeline runs.
CLI_EXPERIMENT = "m2snet"
PIPELINE_EXPERIMENT = "m2snet-busi-cv"  # the pipeline's MLflow experiment (and KFP experiment on submit)
# The experiment tag MLflow 3's UI reads to pick an experiment's landing page: "custom_model_development"
# opens the training runs table (its default for untagged experiments is the GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow error codes that retrying cannot fix (a bad request, not an unreachable server).
_PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                     "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def absolute_sqlite_uri(uri: str) -> str:
    """A relative SQLite store URI made absolute, so that processes with another working directory (the
    pipeline's task subprocesses) open the same file; any other URI unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


class TrackingError(M2SNetError):
    """The tracking server stayed unreachable after all retries."""


@dataclass
class TrackingConfig:
    uri: str | None = None  # None -> $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = CLI_EXPERIMENT
    retries: int = 5
    backoff_s: float = 1.0  # waits backoff_s * 2**attempt between tries
    max_backoff_s: float = 30.0
    flush_every: int = 100  # buffered metrics before an automatic batch send
    spool_dir: str | None = None  # where pending metrics go if the server stays down (default: cwd)

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI



def _is_permanent(err: Exception) -> bool:
    """Errors a retry cannot fix: a rejected request, or a bug/misconfiguration on our side."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in _PERMANENT_ERRORS
    return isinstance(err, (ValueError, TypeError, KeyError, AttributeError))


def with_retry(fn: Callable[[], T], what: str, cfg: TrackingConfig) -> T:
    """Call ``fn`` with exponential back-off; raise :class:`TrackingError` when all tries fail."""
    last: Exception | None = None
    for attempt in range(cfg.retries + 1):
        try:
            return fn()
        except Exception as err:
            if _is_permanent(err):
                raise
            last = err
            if attempt < cfg.retries:
                wait = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** attempt)
                log.warning("tracking: %s failed (%s: %s); retry %d/%d in %.1fs", what,
                            type(err).__name__, redact(str(err).splitlines()[0][:200]), attempt + 1, cfg.retries,
                            wait)
                time.sleep(wait)
    raise TrackingError(redact(
        f"tracking server {cfg.resolved_uri()} unreachable: {what} failed after {cfg.retries + 1} tries "
        f"({type(last).__name__}: {str(last).splitlines()[0][:300] if last else ''})"
    ))


def _quiet_mlflow_http_retries() -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


_READY_SQLITE_STORES: set[str] = set()  # SQLite stores this process has seen created and migrated


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None: another store, or an in-memory one)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _ready_sqlite_store(uri: str) -> None:
    """Create and migrate a SQLite store under a lock beside its file, once per process.

    MLflow creates a fresh store's tables and runs its schema migrations on the first connection, with
    no lock between processes: two first runs against one fresh file (two pipelines, two folds, two
    ``m2snet train``) both migrate and one fails on alembic's version row. The first here does it alone;
    the others wait, then find it done. A store we cannot put a lock beside (read-only) is left to MLflow.
    """
    path = _sqlite_path(uri)
    if path is None or uri in _READY_SQLITE_STORES:
        return
    from mlflow.tracking import MlflowClient

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(writer_lock(path, wait=True))
        except M2SNetError as err:
            log.debug("tracking: no lock beside %s (%s); MLflow creates the store unguarded", path, err)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # the tracking tables, created or migrated
        client.search_registered_models(max_results=1)  # the registry's, on the same file
    _READY_SQLITE_STORES.add(uri)


def _local_store_path(uri: str) -> Path | None:
    """The file (SQLite) or folder (file store) a local tracking URI names; None for a server or database."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///").split("?", 1)[0]
        return None if path in ("", ":memory:") or path.startswith("file:") else Path(path)
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    if ":" in uri.split("/", 1)[0] or uri in ("databricks", "databricks-uc", "uc"):  # a scheme: a server, a database
        return None
    return Path(uri)  # a bare path is a file store


def check_store_writable(uri: str) -> None:
    """Refuse, in one line naming the file, a local tracking store this process cannot write.

    Called before a command that writes to the store (a run, a promotion) starts its work: MLflow would
    otherwise fail on its first write, after the work, with a traceback per retry. A store on a server
    answers for itself. ``os.access`` also sees an immutable file (chattr +i) for root."""
    path = _local_store_path(uri)
    if path is None:
        return
    # SQLite writes the database and a journal beside it; a file store writes inside its folder.
    needed = [path, path.parent] if uri.startswith("sqlite:") else [path]
    for p in needed:
        while not p.exists() and p != p.parent:  # not created yet: its nearest existing folder must be writable
            p = p.parent
        if not os.access(p, os.W_OK):
            what = "the tracking store is read-only" if p == path else f"the tracking store's folder {p} is read-only"
            raise M2SNetError(f"{path}: {what}; make it writable or point --tracking-uri / $MLFLOW_TRACKING_URI at "
                              "another store (commands that log runs also take --no-track)")


@contextlib.contextmanager
def tracking_uri_scope(uri: str):
    """MLflow's process-wide tracking URI set to ``uri`` for the block, then given back as it was.

    ``mlflow.set_tracking_uri`` also writes ``$MLFLOW_TRACKING_URI``, and ``get_tracking_uri()`` answers with
    the environment's value when none was set: restoring that answer would pin it for the rest of the
    process (a later caller's environment no longer counts). So an explicit URI is restored, an unset one
    unset again, and the variable put back as it was."""
    import mlflow

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    explicit_before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(explicit_before if explicit_before != env_before else None)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def mlflow_client(uri: str | None = None, *, writes: bool = False):
    """The package's one way to an ``MlflowClient``: tracking and model registry both at ``uri``.

    ``uri=None`` leaves the choice to MLflow (``mlflow.set_tracking_uri``, ``$MLFLOW_TRACKING_URI``);
    a :class:`TrackingConfig`'s is ``cfg.resolved_uri()``. ``writes``: the caller will write (runs,
    aliases), so a read-only local store is refused now (:func:`check_store_writable`). A URI MLflow
    has no store for is one line naming it, not MLflow's traceback. A SQLite store is created and
    migrated by one process at a time (:func:`_ready_sqlite_store`).
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _quiet_mlflow_http_retries()
    resolved = uri or mlflow.get_tracking_uri()
    if writes:
        check_store_writable(resolved)
    shown = f"tracking URI {resolved!r} (--tracking-uri or $MLFLOW_TRACKING_URI)"
    try:
        _ready_sqlite_store(resolved)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    except ImportError as err:  # SQLAlchemy's driver of a database URI (a bare postgresql:// is psycopg 3)
        missing = err.name or "its driver module"
        raise M2SNetError(redact(f"{shown}: its database driver {missing} is not installed "
                                 f"({database_driver_hint(missing)})")) from None
    except MlflowException as err:
        scheme = resolved.split("://", 1)[0] if "://" in resolved else ""
        why = (f"MLflow has no store for the scheme {scheme!r}; use sqlite:///FILE, a folder, http(s)://HOST:PORT "
               "or postgresql://..." if "unsupported uri" in err.message.lower() and scheme
               else err.message.strip().splitlines()[0])
        raise M2SNetError(redact(f"{shown}: {why}")) from None
    return client


def ensure_experiment(client, cfg: TrackingConfig) -> str:
    """The experiment id of ``cfg.experiment``, created if missing (artifacts in ./mlruns for sqlite).

    The experiment is tagged as a model-training one (:data:`EXPERIMENT_KIND`), so MLflow 3's UI
    opens it on its runs table rather than on the GenAI traces overview.
    """
    def get_or_create() -> str:
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # created by an older m2snet or by hand
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        uri = cfg.resolved_uri()
        if uri.startswith("sqlite:") or uri.startswith("postgresql"):
            # A database store with no server: artifacts go to ./mlruns beside the database.
            location = Path("mlruns").resolve().as_uri()
        try:
            return client.create_experiment(cfg.experiment, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception as err:
            exp = client.get_experiment_by_name(cfg.experiment)
            if exp is None:
                raise err
            return exp.experiment_id

    return with_retry(get_or_create, f"get/create experiment {cfg.experiment!r}", cfg)
