"""Hyper-parameter tuning with Optuna: the two learning rates of the recipe.

Search space (both log scale): the head's max learning rate, and the backbone/head ratio (the
reference uses 0.005 / 0.05 = 0.1). Searching the ratio rather than two independent rates keeps
the space small and well conditioned: most of the effect is the overall scale.

Objective: the final validation Dice of a short training run on an INNER split of one CV fold's
training cases (``m2snet.data.split.inner_split``: stratified, duplicate groups on one side). The
fold's validation cases are never seen, and since every fold tunes on its own inner split (nested
tuning, ``m2snet.workflows.folds.tune_fold``), no fold is scored on cases that chose its
hyper-parameters. Each epoch's validation Dice is reported to Optuna through the trainer's
``callbacks`` hook so a MedianPruner can stop poor trials early.

Sharing: the study lives in ``storage`` -- a SQLite URL or ``journal:PATH`` (JournalFileBackend)
locally, a PostgreSQL URL on the cluster -- and is opened with ``load_if_exists``, so several
workers (several ``m2snet tune`` processes or pipeline pods) can run trials of ONE study; a
``MaxTrialsCallback`` caps the study's finished trials at ``n_trials`` in total.

Tracking: each trial is an MLflow run nested under the tuning run (itself optionally a child of a
pipeline/CV parent run); the study's plots are logged as PNG artifacts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from m2snet import progress
from m2snet.data.format import load_dataset
from m2snet.data.split import INNER_VAL_FRACTION, load_split, write_inner_split
from m2snet.errors import M2SNetError, database_driver_hint
from m2snet.files import atomic_file, write_json
from m2snet.hashing import sha256_bytes
from m2snet.mlops.mlflow_store import TrackingConfig
from m2snet.mlops.tracking import Tracker
from m2snet.mlops.training_run import tracking_callbacks
from m2snet.redaction import redact

if TYPE_CHECKING:
    import optuna

    from m2snet.training.config import TrainConfig

log = logging.getLogger("m2snet.workflows.tuning")

OBJECTIVE_METRIC = "val_dice"
# In each trial folder: what marks it as one a trial made, so only such a folder is ever removed.
TRIAL_MARKER = ".m2snet-trial"


@dataclass
class TuningConfig:
    n_trials: int = 20  # finished (complete + pruned) trials in the whole study, all workers together
    epochs: int | None = None  # per trial; None = the base training config's epochs
    storage: str | None = None  # None/"" = SQLite beside out_dir; "journal:PATH"; sqlite:///...; postgresql://...
    study_name: str = "m2snet"
    head_lr: tuple[float, float] = (1e-3, 1e-1)
    backbone_ratio: tuple[float, float] = (0.01, 1.0)
    inner_val_fraction: float = INNER_VAL_FRACTION
    seed: int = 42
    pruner_startup_trials: int = 2  # no pruning until this many trials finished
    pruner_warmup_epochs: int = 1  # nor before this many epochs of a trial
    timeout_s: float | None = None
    keep_trial_dirs: bool = False  # trial checkpoints are large and not needed afterwards

    def validate(self) -> None:
        problems = []
        if self.n_trials < 1:
            problems.append(f"n_trials={self.n_trials} must be >= 1")
        for name in ("head_lr", "backbone_ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                problems.append(f"{name} range {lo}..{hi} must satisfy 0 < low <= high (log scale)")
        if not 0 < self.inner_val_fraction < 1:
            problems.append(f"inner_val_fraction={self.inner_val_fraction} must be within (0, 1)")
        if problems:
            raise M2SNetError("tuning config: " + "; ".join(problems))


@dataclass
class TuningResult:
    study_name: str
    storage: str
    best_params: dict[str, float]  # training config fields: head_lr, backbone_lr
    best_value: float
    best_trial: int
    n_complete: int
    n_pruned: int
    plots: list[str] = field(default_factory=list)
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- storage / study ----------------------------------------------------------------------------
def make_storage(url: str | None, default_dir: str | Path | None = None):
    """An Optuna storage for a URL: ``journal:PATH`` -> JournalFileBackend, otherwise RDB (SQLite, PostgreSQL)."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if not url:
        if default_dir is None:
            raise M2SNetError("tuning: no storage given (use sqlite:///..., journal:PATH or postgresql://...)")
        Path(default_dir).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(default_dir).resolve() / 'optuna.db'}"
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise M2SNetError(f"tuning storage {redact(url)!r}: expected sqlite:///FILE, journal:PATH or postgresql://...")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from sqlalchemy.exc import SQLAlchemyError

    shown = f"tuning storage {redact(url)!r}"
    try:
        # pool_pre_ping: a long study outlives idle PostgreSQL connections.
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if url.startswith("postgresql") else None)
    except ImportError as err:  # Optuna re-raises SQLAlchemy's failed import of the URL's driver
        missing = getattr(err.__cause__, "name", None) or getattr(err, "name", None) or "its driver module"
        raise M2SNetError(f"{shown}: its database driver {missing} is not installed "
                          f"({database_driver_hint(missing)})") from None
    except SQLAlchemyError as err:  # a server that does not answer, refuses the login, a missing database
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise M2SNetError(redact(f"{shown}: cannot open the database ({reason})")) from None


def trial_seed(seed: int, trial_number: int) -> int:
    """The sampler seed of trial ``trial_number`` of a study seeded ``seed``: the first 32 bits of
    sha256("<seed>:<trial number>"), a function of the two alone (any process, any machine)."""
    return int(sha256_bytes(f"{seed}:{trial_number}".encode())[:8], 16)


def trial_seeded_sampler(seed: int, make: "Callable[[int], optuna.samplers.BaseSampler]"):
    """A sampler that proposes each trial with a fresh ``make(trial_seed(seed, trial.number))``.

    Workers sharing a study (several ``m2snet tune`` processes or pipeline pods) each hold a sampler; seeded
    alike, they proposed the same trials. The storage hands out each trial number once, so seeding by it
    gives every worker's trial its own draws, with no worker index to assign, and a study run again
    with the same seed proposes trial n as before given the same finished trials.
    """
    from optuna.samplers import BaseSampler

    class TrialSeededSampler(BaseSampler):
        def __init__(self) -> None:
            self._by_trial: dict[int, BaseSampler] = {}

        def _for(self, trial) -> BaseSampler:
            if trial.number not in self._by_trial:
                self._by_trial[trial.number] = make(trial_seed(seed, trial.number))
            return self._by_trial[trial.number]

        def infer_relative_search_space(self, study, trial):
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial) -> None:
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values) -> None:
            self._for(trial).after_trial(study, trial, state, values)
            self._by_trial.pop(trial.number, None)

        def reseed_rng(self) -> None:
            pass  # the seeds come from the trial numbers (Optuna reseeds for n_jobs > 1, unused here)

    return TrialSeededSampler()


def open_study(cfg: TuningConfig, storage) -> "optuna.Study":
    import optuna

    startup = max(2, cfg.pruner_startup_trials)
    return optuna.create_study(
        study_name=cfg.study_name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        # TPE seeded per trial from (seed, trial number): parallel workers never repeat each other's proposals.
        sampler=trial_seeded_sampler(cfg.seed, lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=startup)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_epochs),
    )


def suggest(trial: "optuna.Trial", cfg: TuningConfig) -> dict[str, float]:
    """The trial's training-config values (plus the ratio, for the record)."""
    head_lr = trial.suggest_float("head_lr", *cfg.head_lr, log=True)
    ratio = trial.suggest_float("backbone_ratio", *cfg.backbone_ratio, log=True)
    return {"head_lr": head_lr, "backbone_lr": head_lr * ratio}


def best_training_params(study: "optuna.Study") -> dict[str, float]:
    p = study.best_trial.params
    return {"head_lr": float(p["head_lr"]), "backbone_lr": float(p["head_lr"] * p["backbone_ratio"])}


# --- plots --------------------------------------------------------------------------------------
def save_study_plots(study: "optuna.Study", out_dir: str | Path) -> list[Path]:
    """Optuna's matplotlib plots as PNGs; a plot that needs more finished trials is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "intermediate_values": ovm.plot_intermediate_values,
        "slice": ovm.plot_slice,
        "contour": ovm.plot_contour,
        "param_importances": ovm.plot_param_importances,
    }
    written = []
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                # Optuna marks its matplotlib plots experimental and warns on tiny studies: noise in logs.
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(7, 5)
            with atomic_file(out_dir / f"{name}.png") as tmp:  # the temporary's suffix is .tmp: name the format
                fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
            plt.close(fig)
            written.append(out_dir / f"{name}.png")
        except Exception as err:  # noqa: BLE001 - e.g. importances need >= 2 complete trials
            log.warning("tuning: plot %s skipped (%s: %s)", name, type(err).__name__, err)
            plt.close("all")
    return written


# --- the study ----------------------------------------------------------------------------------
def _fresh_trial_dir(trial_dir: Path) -> None:
    """An empty ``trial_dir`` holding :data:`TRIAL_MARKER`. What is there already is removed only if a
    trial made it (a crashed earlier attempt of the same trial number), never a folder of the user's."""
    if trial_dir.exists():
        if any(trial_dir.iterdir()) and not (trial_dir / TRIAL_MARKER).is_file():
            raise M2SNetError(f"{trial_dir}: exists and was not written by m2snet tune (no {TRIAL_MARKER}); "
                              "move it or choose another output folder")
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True)
    (trial_dir / TRIAL_MARKER).touch()


def tune(
    base: "TrainConfig",
    cfg: TuningConfig,
    out_dir: str | Path,
    *,
    parent: "Tracker | None" = None,
    tracking: bool = True,
    seed_tag: int | None = None,
) -> TuningResult:
    """Run trials of the shared study (until it holds ``cfg.n_trials`` finished ones) and return the best.

    ``base``: the training config of the fold being tuned (``base.split`` / ``base.fold``). ``parent``:
    an MLflow run to nest the tuning run under (e.g. the pipeline's parent run). With ``tracking``,
    the tuning run and one nested run per trial are logged; ``seed_tag`` names and tags it with its seed
    (one seed of a repeated CV, as the fold's own run).
    """
    cfg.validate()
    if not base.split:
        raise M2SNetError("tuning needs a split file (the objective is the Dice of an inner split of a fold)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = _inner_split(base, cfg, out_dir)  # checked and written before a study is opened for it
    storage_url = cfg.storage or f"sqlite:///{(out_dir / 'optuna.db').resolve()}"
    study = open_study(cfg, make_storage(storage_url))
    # A trial scores its final epoch on the inner validation cases (the selection rule the CV uses).
    trial_base = base.override(split=str(inner), fold=0, epochs=cfg.epochs or base.epochs, val_every=1,
                               selection="final")
    run = _start_tuning_run(base, cfg, inner, storage_url, parent, seed_tag) if tracking else None
    with run or contextlib.nullcontext():  # the tuning run ends FINISHED, or FAILED on an error
        _run_trials(study, cfg, _objective(cfg, trial_base, out_dir, run))
        result = _best_result(study, cfg, out_dir, storage_url, run)
        write_json(out_dir / "best_params.json", result.to_dict())
        if run:
            _log_result(run, result, out_dir)
        log.info("tuning: best %s=%.4f (trial %d): %s", OBJECTIVE_METRIC, result.best_value, result.best_trial,
                 json.dumps(result.best_params))
        return result


def _inner_split(base: "TrainConfig", cfg: TuningConfig, out_dir: Path) -> Path:
    """The fold's inner split (its training cases into inner train / validation), written into ``out_dir``."""
    info = load_dataset(base.data)
    outer = load_split(base.split, info, accept_version=base.accept_split_version)
    return write_inner_split(info, outer, base.fold, out_dir / "inner_split.json", cfg.inner_val_fraction, cfg.seed)


def _start_tuning_run(base: "TrainConfig", cfg: TuningConfig, inner: Path, storage_url: str,
                      parent: "Tracker | None", seed_tag: int | None) -> Tracker:
    """The MLflow run of this tuning (nested under ``parent`` when given), with the search as its params."""
    tags = {"m2snet.kind": "tuning", "optuna.study": cfg.study_name}
    tags["m2snet.fold"] = str(base.fold)
    if seed_tag is not None:
        tags["m2snet.seed"] = str(seed_tag)
    name = (f"seed-{seed_tag}-" if seed_tag is not None else "") + f"tune-fold-{base.fold}"
    run = parent.child(name, tags=tags) if parent else Tracker.start(TrackingConfig(), run_name=name, tags=tags)
    # The search ranges are not rates: "<name>_range", so "head_lr" stays the one spelling of a rate used.
    run.log_params({"tuning": {(f"{k}_range" if k in ("head_lr", "backbone_ratio") else k): v
                               for k, v in asdict(cfg).items() if k != "storage"},
                    "tuning.storage": redact(storage_url), "tuning.fold": base.fold,
                    "tuning.inner_split": str(inner)})
    return run


def _objective(cfg: TuningConfig, trial_base: "TrainConfig", out_dir: Path,
               run: Tracker | None) -> "Callable[[optuna.Trial], float]":
    """Optuna's objective: train one trial in its own folder (and nested run), reporting each epoch's
    :data:`OBJECTIVE_METRIC` so the pruner can stop it; the value is the final epoch's."""
    # optuna and the trainer (torch) are imported when a study runs, not when the workflows are imported.
    import optuna

    from m2snet.training.trainer import train

    def objective(trial: "optuna.Trial") -> float:
        progress.emit("trial", number=trial.number, of=cfg.n_trials)
        params = suggest(trial, cfg)
        trial_dir = out_dir / f"trial-{trial.number:04d}"
        _fresh_trial_dir(trial_dir)
        tcfg = trial_base.override(out_dir=str(trial_dir), **params)
        child = run.child(f"trial-{trial.number}", tags={"optuna.trial": str(trial.number),
                                                          "optuna.study": cfg.study_name}) if run else None

        def report(end) -> None:
            value = end.metrics.get(OBJECTIVE_METRIC)
            if value is None:
                return
            trial.report(float(value), end.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {end.epoch}: {OBJECTIVE_METRIC}={value:.4f} below the median")

        status = "FAILED"
        try:
            result = train(tcfg, callbacks=[*tracking_callbacks(child), report])
            value = float(result.selection_score)
            if not math.isfinite(value):
                raise M2SNetError(f"trial {trial.number}: objective is {value}")
            status = "FINISHED"
            if child:
                child.log_metrics({"objective": value}, flush=True)
                child.set_tags({"optuna.state": "COMPLETE"})
            return value
        except optuna.TrialPruned:
            status = "FINISHED"  # pruning is a normal outcome, not a failure
            if child:
                child.set_tags({"optuna.state": "PRUNED"})
            raise
        except KeyboardInterrupt:  # Ctrl-C, or the local runner stopping its tasks: stopped, not failed
            status = "KILLED"
            raise
        finally:
            if child:
                child.end(status)
            if not cfg.keep_trial_dirs:
                shutil.rmtree(trial_dir, ignore_errors=True)

    return objective


def _run_trials(study: "optuna.Study", cfg: TuningConfig, objective: "Callable[[optuna.Trial], float]") -> None:
    """Run this worker's share: trials until the study holds ``cfg.n_trials`` finished (complete or pruned)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = cfg.n_trials - len(study.get_trials(deepcopy=False, states=finished))
    log.info("tuning: study %r has %d/%d finished trials; running up to %d here",
             cfg.study_name, cfg.n_trials - max(remaining, 0), cfg.n_trials, max(remaining, 0))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, timeout=cfg.timeout_s, catch=(M2SNetError,),
                       callbacks=[MaxTrialsCallback(cfg.n_trials, states=finished)])


def _best_result(study: "optuna.Study", cfg: TuningConfig, out_dir: Path, storage_url: str,
                 run: Tracker | None) -> TuningResult:
    """The study's best trial as training-config values, with its plots; an error when no trial completed."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise M2SNetError(f"tuning study {cfg.study_name!r}: no trial completed (see the trial runs' errors)")
    plots = save_study_plots(study, out_dir / "plots")
    return TuningResult(
        study_name=cfg.study_name, storage=str(redact(storage_url)), best_params=best_training_params(study),
        best_value=float(study.best_value), best_trial=study.best_trial.number, n_complete=len(complete),
        n_pruned=len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
        plots=[str(p) for p in plots], run_id=run.run_id if run else None,
    )


def _log_result(run: Tracker, result: TuningResult, out_dir: Path) -> None:
    """The study's choice on the tuning run, under the rates' one spelling (head_lr, backbone_lr) with its
    source, its metrics, plots and best_params.json."""
    best_params = result.best_params
    run.log_params({**best_params, **{f"{k}.source": "tuned" for k in best_params}})
    run.log_metrics({"best_" + OBJECTIVE_METRIC: result.best_value, "n_complete": result.n_complete,
                     "n_pruned": result.n_pruned}, flush=True)
    for p in result.plots:
        run.log_artifact(p, "optuna_plots")
    run.log_artifact(out_dir / "best_params.json")
