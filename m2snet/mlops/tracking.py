"""MLflow tracking that survives a flaky tracking server.

:class:`Tracker` wraps one MLflow run (parent or child) through ``MlflowClient`` (no global
"active run", so a CV parent and its fold children can be open at once). It

* logs the whole config flattened as params, with secret-looking keys dropped and credentials
  stripped from URLs (secrets never become params);
* buffers metrics locally and sends them in batches (``log_batch``), retrying with exponential
  back-off; a batch is removed from the buffer only after the server accepted it, so a metric
  accepted by :meth:`Tracker.log_metrics` is never lost: if the server stays down the pending
  metrics are written to a JSONL spool file named in the error, and :func:`replay_spool` (or a
  later :meth:`Tracker.flush` in the same process) sends them once it is back;
* retries artifact uploads the same way.

MLflow's own HTTP layer also retries (7 times, factor 2 by default: minutes on a dead server);
this module turns that down to one quick retry unless the user set
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` themselves, because
the back-off here is the one that knows about buffering.

Default tracking URI: ``sqlite:///mlflow.db`` with artifacts in ``./mlruns`` (or
``$MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from m2snet.errors import M2SNetError, database_driver_hint
from m2snet.files import atomic_file, write_json, write_text
from m2snet.locks import writer_lock
from m2snet.redaction import SECRET_NAME, redact
from m2snet.runtime import git_commit
from m2snet.training.selection import selection_rule

if TYPE_CHECKING:
    from m2snet.training.callbacks import EpochEnd, TrainEnd, TrainStart

log = logging.getLogger("m2snet.mlops.tracking")
T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Two experiments, two purposes: stand-alone runs of the CLI (`m2snet train / cv / compare`) and pipeline runs.
CLI_EXPERIMENT = "m2snet"
PIPELINE_EXPERIMENT = "m2snet-busi-cv"  # the pipeline's MLflow experiment (and KFP experiment on submit)
PIPELINE_RUN_TAG = "m2snet.pipeline_run_id"  # on a pipeline's parent run: the KFP job id that finds it
MAX_PARAM_LENGTH = 6000  # MLflow 3 limit for a param value
# The experiment tag MLflow 3's UI reads to pick an experiment's landing page: "custom_model_development"
# opens the training runs table (its default for untagged experiments is the GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's / experiment's description in the UI (markdown)
MAX_DATASET_DIGEST = 36  # MLflow's limit; a DVC directory hash ("<md5>.dir") is exactly 36
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


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> ``{"a.b": "value"}`` strings; secret-looking keys are dropped."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if SECRET_NAME.search(str(k)):
                continue
            out.update(flatten_params(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1] if prefix.endswith(".") else prefix
    text = redact(json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj))
    out[key] = text[:MAX_PARAM_LENGTH]
    return out


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


class Tracker:
    """One MLflow run with buffered, retried metric logging. Use :meth:`start` to create one."""

    def __init__(self, client, run_id: str, cfg: TrackingConfig):
        self.client = client
        self.run_id = run_id
        self.cfg = cfg
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self._logged_params: dict[str, str] = {}

    # --- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: TrackingConfig | None = None, run_name: str | None = None,
              parent: "Tracker | None" = None, run_id: str | None = None,
              tags: dict[str, str] | None = None) -> "Tracker":
        """Create a run (a child of ``parent`` if given) or reopen ``run_id`` (resume)."""
        cfg = cfg or (parent.cfg if parent else TrackingConfig())
        client = parent.client if parent else mlflow_client(cfg.resolved_uri(), writes=True)
        if run_id:
            with_retry(lambda: client.update_run(run_id, status="RUNNING"), f"reopen run {run_id}", cfg)
            return cls(client, run_id, cfg)
        exp_id = ensure_experiment(client, cfg)
        all_tags = {"m2snet.git_commit": git_commit(), **(tags or {})}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run = with_retry(lambda: client.create_run(exp_id, run_name=run_name, tags=all_tags),
                         f"create run {run_name!r}", cfg)
        log.info("tracking: run %s (%s) at %s", run.info.run_id, run_name, redact(cfg.resolved_uri()))
        return cls(client, run.info.run_id, cfg)

    def child(self, run_name: str, tags: dict[str, str] | None = None) -> "Tracker":
        return Tracker.start(self.cfg, run_name=run_name, parent=self, tags=tags)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        with_retry(lambda: self.client.set_terminated(self.run_id, status=status),
                   f"end run {self.run_id}", self.cfg)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            # Keep the original error; still try to save what was accepted.
            try:
                self.end("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
            except Exception as err:  # noqa: BLE001
                log.error("tracking: could not close run %s: %s", self.run_id, err)

    # --- params / tags --------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Flatten and log; a param already logged with the same value is skipped (resume)."""
        from mlflow.entities import Param

        flat = {k: v for k, v in flatten_params(params).items() if self._logged_params.get(k) != v}
        if not flat:
            return
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            chunk = [Param(k, v) for k, v in items[i:i + 100]]
            with_retry(lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk),
                       f"log {len(chunk)} params", self.cfg)
        self._logged_params.update(flat)

    def set_description(self, markdown: str) -> None:
        """The run's description (the UI's "Description" box / overview)."""
        self.set_tags({NOTE_TAG: markdown})

    def log_dataset(self, lineage: "DatasetLineage", context: str = "training",
                    tags: dict[str, Any] | None = None) -> None:
        """Record the dataset as an MLflow dataset input (the runs table's Dataset column, lineage)."""
        from mlflow.entities import DatasetInput, InputTag

        input_tags = [InputTag("mlflow.data.context", context)]
        input_tags += [InputTag(k, redact(str(v))) for k, v in (tags or {}).items() if v not in (None, "")]
        item = DatasetInput(lineage.to_mlflow(), input_tags)
        with_retry(lambda: self.client.log_inputs(self.run_id, datasets=[item]),
                   f"log dataset {lineage.name}@{lineage.digest}", self.cfg)

    def dataset_inputs(self) -> list["DatasetLineage"]:
        """The datasets this run logged (e.g. a parent's, for its fold runs to log too)."""
        run = with_retry(lambda: self.client.get_run(self.run_id), f"read run {self.run_id}", self.cfg)
        inputs = run.inputs.dataset_inputs if run.inputs else []
        return [DatasetLineage.from_mlflow(i.dataset) for i in inputs]

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        chunk = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        with_retry(lambda: self.client.log_batch(self.run_id, tags=chunk), "set tags", self.cfg)

    # --- metrics --------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int = 0, flush: bool = False) -> None:
        """Accept metrics into the local buffer; send when the buffer is full or ``flush``."""
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None:
                continue
            v = float(v)
            if math.isnan(v):
                continue  # MLflow stores NaN, but it breaks comparisons/plots; skip (e.g. MED of absent layer)
            self._pending.append((k, v, ts, int(step)))
        if flush or len(self._pending) >= self.cfg.flush_every:
            self.flush()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Send buffered metrics in batches; on final failure spool them to a file and raise."""
        from mlflow.entities import Metric

        while self._pending:
            chunk = self._pending[:1000]  # MLflow's batch limit
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in chunk]
            try:
                with_retry(functools.partial(self.client.log_batch, self.run_id, metrics=metrics),
                           f"log {len(chunk)} metrics", self.cfg)
            except TrackingError as err:
                spool = self._spool()
                raise TrackingError(
                    f"{err}; {len(self._pending)} accepted metric values kept in memory and in {spool} "
                    f"(send them later with m2snet.mlops.tracking.replay_spool)"
                ) from err
            del self._pending[:len(chunk)]

    def _spool(self) -> Path:
        spool_dir = Path(self.cfg.spool_dir or ".")
        spool_dir.mkdir(parents=True, exist_ok=True)
        path = spool_dir / f"mlflow-pending-{self.run_id}.jsonl"
        with atomic_file(path) as tmp, open(tmp, "w") as f:
            for k, v, ts, step in self._pending:
                f.write(json.dumps({"run_id": self.run_id, "key": k, "value": v, "timestamp": ts,
                                    "step": step}) + "\n")
        return path

    # --- artifacts ------------------------------------------------------------------------------
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or folder; a text file (a task's log, a report) goes up masked (:func:`redact`)."""
        path = Path(path)
        with tempfile.TemporaryDirectory(prefix="m2snet-artifact-") as tmp:
            if path.is_dir():
                fn = lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path)  # noqa: E731
            else:
                upload = _masked_copy(path, Path(tmp))
                fn = lambda: self.client.log_artifact(self.run_id, str(upload), artifact_path)  # noqa: E731
            with_retry(fn, f"upload artifact {path.name}", self.cfg)


# Files read and masked before upload: the text a process wrote (logs, reports, tables), never a model.
_TEXT_ARTIFACTS = (".log", ".txt", ".md", ".json", ".jsonl", ".yaml", ".yml", ".csv")
_MAX_MASKED_BYTES = 64 << 20


def _masked_copy(path: Path, tmp: Path) -> Path:
    """``path``, or a copy of it in ``tmp`` (same name) with its secrets masked when it holds any.

    The log files are masked as they are written (RunView); this is the second line, for any text file
    that reaches MLflow, whoever wrote it (a library's own log file, a report quoting a URI)."""
    if path.suffix.lower() not in _TEXT_ARTIFACTS or not path.is_file() or path.stat().st_size > _MAX_MASKED_BYTES:
        return path
    text = path.read_text(encoding="utf-8", errors="replace")
    clean = redact(text)
    if clean == text:
        return path
    copy = tmp / path.name
    write_text(copy, clean)
    return copy


def parent_run(pipeline_run_id: str, experiment: str = "", create: bool = True,
               cfg: TrackingConfig | None = None) -> Tracker | None:
    """The MLflow parent run of a pipeline run, found by its :data:`PIPELINE_RUN_TAG` (created on first use;
    idempotent, so a retried step never opens a second parent). ``cfg``: where to look (default: the
    environment's tracking URI and ``experiment``, else the pipeline's)."""
    if not pipeline_run_id:
        return None
    cfg = cfg or TrackingConfig(experiment=experiment or PIPELINE_EXPERIMENT)
    client = mlflow_client(cfg.resolved_uri(), writes=True)
    exp_id = ensure_experiment(client, cfg)
    found = with_retry(lambda: client.search_runs(
        [exp_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'", order_by=["start_time ASC"]),
        "find the pipeline's parent run", cfg)
    if found:
        return Tracker(client, found[0].info.run_id, cfg)
    if not create:
        return None
    return Tracker.start(cfg, run_name=f"pipeline-{pipeline_run_id}",
                         tags={PIPELINE_RUN_TAG: pipeline_run_id, "m2snet.kind": "pipeline"})


@dataclass(frozen=True)
class DatasetLineage:
    """Which data a run used, as MLflow records a dataset input.

    ``digest`` is the m2snet data version (the DVC directory hash), ``source`` says where the
    data came from: a DVC repository + revision + path, or a directory.
    """

    name: str
    digest: str
    uri: str  # a directory, or the DVC repository (URL or path)
    dvc_rev: str = ""
    dvc_path: str = ""
    importer: str = ""  # the raw layout it was imported from, if it was
    n_cases: int | None = None

    def __post_init__(self) -> None:
        # A record of where the data came from, never used to fetch it: keep no credentials in it
        # (a DVC repository given as https://user:token@host/... would reach MLflow's inputs verbatim).
        object.__setattr__(self, "uri", redact(self.uri))

    @property
    def source_type(self) -> str:
        # MLflow's UI links "external" sources by their "url" and shows "local" ones by their "uri".
        return "external" if re.match(r"^(https?|ssh|git)://|^git@", self.uri) else "local"

    def source(self) -> dict[str, Any]:
        key = "url" if self.source_type == "external" else "uri"
        extra = {"dvc_rev": self.dvc_rev, "dvc_path": self.dvc_path, "importer": self.importer}
        return {key: self.uri, **{k: v for k, v in extra.items() if v}}

    def to_mlflow(self):
        from mlflow.entities import Dataset

        if len(self.digest) > MAX_DATASET_DIGEST:
            raise M2SNetError(f"dataset {self.name}: digest {self.digest!r} is longer than MLflow's "
                              f"{MAX_DATASET_DIGEST} characters")
        profile = {"num_cases": self.n_cases} if self.n_cases is not None else None
        return Dataset(name=self.name, digest=self.digest, source_type=self.source_type,
                       source=json.dumps(self.source()), profile=json.dumps(profile) if profile else None)

    @classmethod
    def from_mlflow(cls, ds) -> "DatasetLineage":
        try:
            source = json.loads(ds.source or "{}")
        except json.JSONDecodeError:
            source = {"uri": ds.source}
        try:
            n_cases = json.loads(ds.profile).get("num_cases") if ds.profile else None
        except (json.JSONDecodeError, AttributeError):
            n_cases = None
        return cls(name=ds.name, digest=ds.digest, uri=source.get("url") or source.get("uri") or "",
                   dvc_rev=source.get("dvc_rev", ""), dvc_path=source.get("dvc_path", ""),
                   importer=source.get("importer", ""), n_cases=n_cases)


def replay_spool(path: str | os.PathLike, cfg: TrackingConfig | None = None) -> int:
    """Send the metrics of a spool file written by :meth:`Tracker.flush`; return how many."""
    from mlflow.entities import Metric

    cfg = cfg or TrackingConfig()
    client = mlflow_client(cfg.resolved_uri(), writes=True)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    by_run: dict[str, list] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(Metric(r["key"], r["value"], r["timestamp"], r["step"]))
    for run_id, metrics in by_run.items():
        for i in range(0, len(metrics), 1000):
            chunk = metrics[i:i + 1000]
            with_retry(functools.partial(client.log_batch, run_id, metrics=chunk), "replay metrics", cfg)
    Path(path).unlink()
    return len(rows)


def config_params(train_config: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig as params: ``config.<field>``, except the learning rates, one per optimizer param
    group (``<group>_lr``: ``head_lr``, ``backbone_lr``), which keep their field name: ONE spelling per rate
    in MLflow, beside its provenance ``<group>_lr.source`` (m2snet.workflows.presets.settle_config)."""
    return {(k if k.endswith("_lr") else f"config.{k}"): v for k, v in train_config.items()}


def run_params(train_config: dict[str, Any], *, dataset_version: str | None, split_sha256: str | None,
               pretrained: str | None, loss_pretrained: str | None, device: str, seed: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The params every training run records (the contract in docs/architecture.md)."""
    return {
        **config_params(train_config),
        "data_version": dataset_version or "unknown",
        "split_sha256": split_sha256 or "none",
        "git_commit": git_commit(),
        "pretrained": pretrained or "none (random init)",
        "lossnet_pretrained": loss_pretrained or "none (random init)",
        "device": device,
        "seed": seed,
        **(extra or {}),
    }


# --- a run directory's MLflow run ---------------------------------------------------------------
RUN_FILE = "mlflow_run.json"  # in a training run's / fold's directory: the run its metrics went to
PARENT_RUN_FILE = "mlflow_parent.json"  # in a CV's directory: the parent run of its folds


def write_run_file(path: str | os.PathLike, tracker: Tracker) -> Path:
    """Record ``tracker``'s run in ``path`` (``<dir>/mlflow_run.json``), so a later step or a resume reopens it."""
    write_json(path, {"run_id": tracker.run_id, "tracking_uri": redact(tracker.cfg.resolved_uri())})
    return Path(path)


def read_run_file(path: str | os.PathLike) -> str | None:
    """The run id recorded by :func:`write_run_file` (None when there is no such file)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["run_id"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise M2SNetError(f"{path}: not an MLflow run record ({err})") from err


def reopen_run(path: str | os.PathLike, cfg: TrackingConfig | None = None) -> Tracker | None:
    """The run recorded in ``path``, reopened (None without a record)."""
    run_id = read_run_file(path)
    return Tracker.start(cfg or TrackingConfig(), run_id=run_id) if run_id else None


class MlflowCallback:
    """A training callback (m2snet.training.callbacks.TrainCallback) that logs the run to ``tracker``:
    the params of :func:`run_params` at the start (and the run in ``<out_dir>/mlflow_run.json``), every
    epoch's history row as metrics at step = epoch, and ``selected_epoch`` at the end."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_train_start(self, event: TrainStart) -> None:
        cfg = event.config
        self.tracker.log_params(run_params(
            cfg.to_dict(), dataset_version=event.dataset_version, split_sha256=event.split_sha256,
            pretrained=event.pretrained_source, loss_pretrained=event.loss_pretrained_source,
            device=event.device, seed=cfg.seed,
            extra={"n_train": len(event.train_cases), "n_val": len(event.reported_cases),
                   "n_epoch_val": len(event.epoch_val_cases), "step_precision": event.step_precision,
                   "epoch_val_cases": selection_rule(cfg.selection).description if cfg.split else "none"}))
        write_run_file(Path(event.out_dir) / RUN_FILE, self.tracker)

    def on_epoch_end(self, event: EpochEnd) -> None:
        self.tracker.log_metrics({k: v for k, v in event.metrics.items() if k != "epoch"}, step=event.epoch,
                                 flush=True)

    def on_train_end(self, event: TrainEnd) -> None:
        self.tracker.log_metrics({"selected_epoch": event.selected_epoch}, step=event.config.epochs, flush=True)


def iter_child_runs(client, parent_run_id: str) -> Iterable:
    """Child runs of a parent (for reports and tests)."""
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def tracking_callbacks(tracker: Tracker | None) -> list[MlflowCallback]:
    """The training callbacks that log a run to ``tracker`` (None: no tracking). The workflow layer
    attaches them: ``train(cfg, callbacks=tracking_callbacks(tracker))``."""
    return [] if tracker is None else [MlflowCallback(tracker)]
