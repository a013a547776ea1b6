"""The run context: where a CV's runs are tracked, as one typed value every door passes down.

``m2snet train`` / ``m2snet cv`` build it from their options (:meth:`RunContext.for_cli`), each pipeline
component from its two KFP parameters (:meth:`RunContext.for_pipeline`); the fold runner
(:mod:`m2snet.workflows.folds`) and every pipeline step (:mod:`m2snet.workflows.steps`) take it instead
of a tracking config, an experiment and a pipeline run id threaded through their signatures.

The CV's PARENT MLflow run is found in ONE place, :meth:`RunContext.parent`: by its id (``m2snet cv
--parent-run-id``, a resumed CV), or, in a pipeline, by the tag ``m2snet.pipeline_run_id``
(:func:`m2snet.mlops.tracking.parent_run`: looked up or created, idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from m2snet.mlops.mlflow_store import PIPELINE_EXPERIMENT, TrackingConfig
from m2snet.mlops.tracking import Tracker, parent_run


@dataclass(frozen=True)
class RunContext:
    """Tracking settings and the CV's parent run. ``tracking`` None: nothing is tracked."""

    tracking: TrackingConfig | None = None
    pipeline_run_id: str = ""  # a pipeline run: its parent is the run tagged with it
    parent_run_id: str | None = None  # an existing parent run (attach folds to it, resume)

    @classmethod
    def for_cli(cls, uri: str | None, experiment: str, *, track: bool = True,
                parent_run_id: str | None = None) -> "RunContext":
        return cls(TrackingConfig(uri=uri, experiment=experiment) if track else None, parent_run_id=parent_run_id)

    @classmethod
    def for_pipeline(cls, pipeline_run_id: str, experiment: str = "") -> "RunContext":
        """A pipeline step's context (no run id: run by hand, untracked)."""
        tracking = TrackingConfig(experiment=experiment or PIPELINE_EXPERIMENT) if pipeline_run_id else None
        return cls(tracking, pipeline_run_id=pipeline_run_id)

    @property
    def tracked(self) -> bool:
        return self.tracking is not None

    def with_parent(self, run_id: str | None) -> "RunContext":
        return replace(self, parent_run_id=run_id)

    def parent(self, create: bool = True, *, run_name: str = "", tags: dict[str, str] | None = None) -> Tracker | None:
        """THE parent-run lookup: the recorded parent, the pipeline's (found by tag, else created unless
        ``create`` is False), or a new one named ``run_name`` (a CV's); None untracked."""
        if self.tracking is None:
            return None
        if self.parent_run_id:
            return Tracker.start(self.tracking, run_id=self.parent_run_id)
        if self.pipeline_run_id:  # found by its tag (mlops.tracking.parent_run), else created
            return parent_run(self.pipeline_run_id, create=create, cfg=self.tracking)
        if not create or not run_name:
            return None
        return Tracker.start(self.tracking, run_name=run_name, tags=tags)


UNTRACKED = RunContext()  # the default of every step and fold function: nothing tracked
