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

Where runs go (the configuration, the client, retries): :mod:`m2snet.mlops.mlflow_store`; the data a run
used: :mod:`m2snet.mlops.lineage`; a training run's params and callback: :mod:`m2snet.mlops.training_run`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from m2snet.errors import M2SNetError
from m2snet.files import atomic_file, write_json, write_text
from m2snet.mlops.lineage import DatasetLineage
from m2snet.mlops.mlflow_store import (
    PIPELINE_EXPERIMENT,
    TrackingConfig,
    TrackingError,
    ensure_experiment,
    mlflow_client,
    with_retry,
)
from m2snet.redaction import SECRET_NAME, redact
from m2snet.runtime import git_commit

log = logging.getLogger("m2snet.mlops.tracking")

PIPELINE_RUN_TAG = "m2snet.pipeline_run_id"  # on a pipeline's parent run: the KFP job id that finds it
MAX_PARAM_LENGTH = 6000  # MLflow 3 limit for a param value
NOTE_TAG = "mlflow.note.content"  # a run's / experiment's description in the UI (markdown)


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


def iter_child_runs(client, parent_run_id: str) -> Iterable:
    """Child runs of a parent (for reports and tests)."""
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
