"""Parallel ``m2snet cv`` workers sharing one ``--out`` (bench/busi_cpu_cv.sh: ``--folds 0,2`` in one process,
``--folds 1,3`` in another): the CV-level report covers every completed task of the same CV whichever worker
finished last, and two processes on the same task cannot race.

Concurrency is exercised with real processes (subprocess), never threads or mocks.
"""

from __future__ import annotations

import os

from tests.conftest import make_tiny_dataset


def test_the_cv_key_names_the_cv_not_the_worker(tmp_path):
    from m2snet.data.split import load_split
    from m2snet.training.config import TrainConfig
    from m2snet.workflows.cv import cv_key
    from m2snet.workflows.folds import FoldOptions, ScoreOptions
    from m2snet.workflows.tuning import TuningConfig

    data, split_file = make_tiny_dataset(tmp_path)
    split = load_split(split_file)
    cfg = TrainConfig(data=str(data), split=str(split_file), epochs=1)
    key = cv_key(cfg, split, [], FoldOptions())
    # What two workers of one CV may differ in: where and how fast they run, how the data path is spelled.
    worker = cfg.override(out_dir="elsewhere", fold=1, progress=False, num_workers=2, device="cpu", cache=False,
                          data=os.path.relpath(data), split=os.path.relpath(split_file))
    assert cv_key(worker, split, [], FoldOptions(resume=True, log_model=False)) == key
    tuned = FoldOptions(tuning=TuningConfig(n_trials=2))
    assert cv_key(cfg, split, [], FoldOptions(tuning=TuningConfig(n_trials=2, storage="journal:x"))) == \
        cv_key(cfg, split, [], tuned)
    # What makes another CV.
    others = [cv_key(cfg.override(epochs=2), split, [], FoldOptions()), cv_key(cfg, split, [42, 43], FoldOptions()),
              cv_key(cfg, split, [], FoldOptions(score=ScoreOptions(protocol="reference"))),
              cv_key(cfg, split, [], tuned),
              cv_key(cfg, split, [], FoldOptions(tuning=TuningConfig(n_trials=2), explicit=frozenset({"head_lr"})))]
    assert len({key, *others}) == 1 + len(others)
