"""``m2snet benchmark``: one of the paper's protocols end to end -- import (if needed), split by the protocol's
recipe, train (``m2snet cv`` for k-fold, the fixed-split run otherwise), evaluate, compare with the paper's
figures and register the model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from m2snet.data.format import DATASET_JSON
from m2snet.data.importers import import_dataset
from m2snet.errors import M2SNetError
from m2snet.files import write_text
from m2snet.mlops.mlflow_store import mlflow_client, tracking_uri_scope
from m2snet.mlops.registry import register_model_version
from m2snet.mlops.tracking import Tracker
from m2snet.training.config import TrainConfig
from m2snet.workflows.context import RunContext
from m2snet.workflows.cv import run_cv
from m2snet.workflows.folds import FoldOptions
from m2snet.workflows.paper import comparison_from_results, paper_comparison
from m2snet.workflows.protocols import (
    FixedResult,
    Protocol,
    get_protocol,
    protocol_split,
    registered_model_name,
    run_fixed,
    version_tags,
)


@dataclass
class BenchmarkResult:
    protocol: str
    table_md: Path
    comparison_md: Path
    run_id: str | None
    registered: str | None = None  # "<model name>/<version>"


def register_protocol_model(protocol: str, fr: FixedResult, tracking, description: str) -> str:
    """Register the run's pyfunc model as a version of ``m2snet-<protocol>`` (once per run); the score
    the promotion gate reads is the mean Dice over the test sets."""
    if fr.model_uri is None or fr.run_id is None:
        raise M2SNetError(f"protocol {protocol}: the run logged no model to register")
    uri = tracking.resolved_uri()
    with tracking_uri_scope(uri):
        tags = {"run_id": fr.run_id, **version_tags(protocol, fr.report.mean)}
        mv = register_model_version(fr.model_uri, registered_model_name(protocol), idempotency_key=fr.run_id,
                                    tags=tags, description=description,
                                    client=mlflow_client(uri))
    return f"{registered_model_name(protocol)}/{mv.version}"


def _dataset(data: Path, fmt: str | None, out: Path, protocol: Protocol) -> Path:
    """``data`` itself when it is an m2snet dataset, else ``out/data`` imported from it with ``fmt``."""
    if (data / DATASET_JSON).is_file():
        return data
    dest = out / "data"
    if (dest / DATASET_JSON).is_file():
        return dest
    if fmt is None:
        raise M2SNetError(f"{data}: not an m2snet dataset (no {DATASET_JSON}); give --format "
                          f"({' or '.join(protocol.formats)}) to import it")
    import_dataset(fmt, data, dest, progress=False)
    return dest


def benchmark(protocol_name: str, data: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str | None = None,
              train_overrides: Mapping[str, Any] | None = None, seed: int = 42, tracking=None,
              log_model: bool = True, split_options: Mapping[str, Any] | None = None) -> BenchmarkResult:
    """Run one protocol end to end into ``out_dir``; writes ``<table>.md`` and ``paper_comparison.md``.
    ``split_options``: sets replacing the protocol's split recipe (see :func:`protocol_split`)."""
    protocol = get_protocol(protocol_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = _dataset(Path(data), fmt, out, protocol)
    split = protocol_split(protocol, root, out=out / "split.json", seed=seed, options=split_options)
    fields = {**protocol.train, **dict(train_overrides or {}), "data": str(root), "split": str(split.path),
              "seed": seed}
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **fields}, source=f"protocol {protocol.name!r}")
    if protocol.kfold:
        res = run_cv(cfg, out / "cv", ctx=RunContext(tracking), run_name=f"benchmark-{protocol.name}",
                     options=FoldOptions(log_model=log_model))
        comparison = comparison_from_results(protocol.name, out / "cv")
        table_md, run_id = out / "cv" / "cv_table.md", res.parent_run_id
    else:
        fr = run_fixed(cfg, out / "run", tracking=tracking, run_name=f"benchmark-{protocol.name}",
                       protocol=protocol.name, log_model=log_model)
        comparison = paper_comparison(protocol.name, fr.report.rows, fr.budget)
        table_md, run_id = fr.table_md, fr.run_id
    comparison_md = out / "paper_comparison.md"
    write_text(comparison_md, f"{protocol.description}\n\n{protocol.notes}\n\n{comparison}\n")
    registered = None
    if tracking is not None and run_id is not None:
        tracker = Tracker.start(tracking, run_id=run_id)
        tracker.set_description(table_md.read_text() + "\n\n" + comparison)
        tracker.log_artifact(comparison_md, "report")
        tracker.end("FINISHED")
        if log_model and not protocol.kfold:
            # k-fold (busi): the pipeline registers the folds' ensemble (m2snet pipeline run --preset busi).
            registered = register_protocol_model(protocol.name, fr, tracking, comparison)
    return BenchmarkResult(protocol.name, table_md, comparison_md, run_id, registered)
