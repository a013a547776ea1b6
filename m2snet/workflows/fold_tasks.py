"""A cross-validation as ONE list of (fold, seed) tasks, whoever runs them.

``m2snet cv`` runs the list in one process (:func:`m2snet.workflows.cv.run_cv`), the pipeline fans it
out (its split step returns it; each item is one tune -> train -> evaluate of ``dsl.ParallelFor``), and
both hand each task to the same step functions (:mod:`m2snet.workflows.folds`). So the rules that make
two runs of one CV alike live here, once:

- the seed rule (:meth:`FoldTask.config`): a repeated seed changes initialisation and data order, never
  which cases a fold uses (``case_seed`` stays the config's seed);
- the naming of runs (:attr:`FoldTask.run_name`, :attr:`FoldTask.tags`): ``fold-K``, or ``seed-S-fold-K``
  when the CV repeats seeds (the tuning study's run is ``[seed-S-]tune-fold-K``,
  :func:`m2snet.workflows.tuning.tune`);
- where a task writes in a CV's directory (:attr:`FoldTask.dir_name`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from m2snet.errors import M2SNetError
from m2snet.training.config import TrainConfig

NO_SEED = -1  # a task's seed when the CV repeats no seeds: the training config's own


def parse_seeds(text: str | None, option: str = "seeds") -> list[int]:
    """Repeated training seeds, "42,43,44" (the pipeline's ``seeds``, the CLI's ``--seeds``); empty: none
    repeated, the training config's one seed."""
    try:
        seeds = [int(x) for x in str(text or "").split(",") if x.strip()]
    except ValueError:
        raise M2SNetError(f"{option} {text!r}: expected comma-separated integers like 42,43,44") from None
    if len(set(seeds)) != len(seeds) or any(x < 0 for x in seeds):
        raise M2SNetError(f"{option} {text!r}: give distinct non-negative seeds")
    return seeds


@dataclass(frozen=True)
class FoldTask:
    """One fold of a CV, trained with one seed.

    ``seed``: the training seed (:data:`NO_SEED`: the config's own); ``n_seeds``: how many seeds the CV
    repeats (more than one: the seed names the task's runs and directory)."""

    fold: int
    seed: int = NO_SEED
    n_seeds: int = 1

    @property
    def repeated(self) -> bool:
        return self.n_seeds > 1

    @property
    def seed_tag(self) -> int | None:
        """The seed that names and tags the task's runs (None: a CV of one seed)."""
        return self.seed if self.repeated and self.seed != NO_SEED else None

    def config(self, cfg: TrainConfig) -> TrainConfig:
        """THE seed rule: the task's training config. A given seed changes initialisation and data order;
        the cases stay those of ``cfg``'s seed (``case_seed``)."""
        if self.seed == NO_SEED:
            return cfg
        return cfg.override(seed=self.seed, case_seed=cfg.seed if cfg.case_seed is None else cfg.case_seed)

    @property
    def run_name(self) -> str:
        """The fold's MLflow run: ``fold-K``, or ``seed-S-fold-K`` in a CV of several seeds."""
        return f"fold-{self.fold}" if self.seed_tag is None else f"seed-{self.seed}-fold-{self.fold}"

    @property
    def tags(self) -> dict[str, str]:
        """The fold run's tags (``m2snet.seed`` in a CV of several seeds)."""
        seed = {} if self.seed_tag is None else {"m2snet.seed": str(self.seed)}
        return {"m2snet.fold": str(self.fold), "m2snet.kind": "fold", **seed}

    @property
    def dir_name(self) -> str:
        """Where ``m2snet cv`` writes the task, under its output directory: ``fold<K>``, or
        ``seed<S>/fold<K>`` in a CV of several seeds."""
        return f"fold{self.fold}" if self.seed_tag is None else f"seed{self.seed}/fold{self.fold}"

    @classmethod
    def in_pipeline(cls, fold: int, seed: int = NO_SEED, seeds: str = "") -> "FoldTask":
        """A pipeline task's own: its loop item's fold and seed, and the pipeline's ``seeds`` parameter."""
        return cls(fold, seed, max(1, len(parse_seeds(seeds))))

    def as_item(self) -> dict[str, int]:
        """The task as an item of the pipeline's ``dsl.ParallelFor``: ``{"fold": k, "seed": s}``."""
        return {"fold": self.fold, "seed": self.seed}


def fold_tasks(folds: Sequence[int], seeds: Sequence[int] = ()) -> list[FoldTask]:
    """THE CV's task list, seed by seed, fold by fold (no ``seeds``: one pass with the config's seed)."""
    seeds = list(seeds)
    return [FoldTask(k, s, max(1, len(seeds))) for s in seeds or [NO_SEED] for k in folds]


def loop_item(fold: int, seed: int = NO_SEED) -> str:
    """The console's name of one task of the pipeline's loop: ``2``, or ``2-seed43`` when seeds are given;
    its tasks announce themselves as ``train-fold-<item>``."""
    return str(fold) if seed == NO_SEED else f"{fold}-seed{seed}"


def loop_items(n_folds: int, seeds: str = "") -> list[str]:
    """Every item of the pipeline's fold loop, in :func:`fold_tasks`'s order."""
    return [loop_item(t.fold, t.seed) for t in fold_tasks(range(n_folds), parse_seeds(seeds))]
