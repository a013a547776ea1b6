"""Pipeline presets: their tuning budget and search ranges, and that the demo preset's model learns."""

from __future__ import annotations

import pytest

from m2snet.workflows.presets import PRESETS, get_preset, train_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_tuning_config_carries_the_budget_and_ranges(name):
    preset = PRESETS[name]
    cfg = preset.tuning_config(seed=7, study_name="s")
    cfg.validate()
    assert (cfg.n_trials, cfg.epochs, cfg.seed, cfg.study_name) == (preset.n_trials, preset.tune_epochs, 7, "s")
    if preset.tune_head_lr is not None:
        assert cfg.head_lr == preset.tune_head_lr
    if preset.tune_backbone_ratio is not None:
        assert cfg.backbone_ratio == preset.tune_backbone_ratio
    assert preset.tuning_config(epochs=5, n_trials=3).epochs == 5  # the caller's fields win


def test_demo_search_range_holds_the_demo_learning_rates():
    """Short trials barely separate learning rates, so the study's best must be a rate that trains:
    the demo searches a narrow range around the rates its folds are known to learn with."""
    demo = get_preset("demo")
    cfg, tuning = train_config("demo"), demo.tuning_config()
    lo, hi = tuning.head_lr
    assert lo <= cfg.head_lr <= hi and hi / lo <= 10
    lo, hi = tuning.backbone_ratio
    assert lo <= cfg.backbone_lr / cfg.head_lr <= hi and hi / lo <= 10
    assert cfg.pretrained is False  # the demo needs no network: the same random start everywhere


@pytest.mark.slow  # about a minute of CPU: one fold of the demo preset's training
def test_demo_preset_learns_on_a_fold(tmp_path):
    """``make run``'s training, on fold 0 of the tracked demo set: every lesion case is found."""
    from m2snet.data.demo import build_demo_dataset
    from m2snet.data.split import make_split
    from m2snet.workflows.folds import ScoreOptions, fit_fold, score_fold

    data = tmp_path / "demo"
    build_demo_dataset(data)
    split = make_split(data, n_folds=4, seed=42, out=tmp_path / "split.json")
    cfg = train_config("demo", data=str(data), split=str(tmp_path / "split.json"), progress=False)
    fit = fit_fold(cfg, 0, tmp_path / "fold0")
    ev = score_fold(fit.checkpoint, data, split.fold(0).val, tmp_path / "eval", options=ScoreOptions(with_sod=False))
    lesions = [r for r in ev.rows if r["label"] != "normal"]
    assert lesions and all(r["pred_foreground_fraction"] > 0 and r["dice"] > 0.5 for r in lesions), ev.rows
    assert ev.metrics["dice"] >= 0.8, ev.metrics
