"""Trainer: config, schedule, multi-scale collate, exact resume, NaN stop, checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m2snet.errors import M2SNetError
from m2snet.training.config import TrainConfig
from m2snet.training.schedule import build_scheduler, triangle_factor


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """A 6-case demo dataset (64 px) in the m2snet layout, with a 2-fold split."""
    from tests.conftest import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_per_class=(2, 2, 2), size=64)


def tiny_config(data: Path, split: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), split=str(split), fold=0, model="m2snet", epochs=2, batch_size=2, size=64,
                pretrained=False, lossnet_weight=0.0, lossnet_pretrained=False, device="cpu",
                deterministic=True, progress=False, out_dir=str(out), cache_dir=str(out.parent / "cache"),
                max_train_cases=2, max_val_cases=1)
    base.update(kw)
    return TrainConfig(**base)


# --- config / schedule ------------------------------------------------------------------------
def test_triangle_schedule_matches_formula():
    assert [round(triangle_factor(e, 3), 6) for e in range(3)] == [0.5, 1.0, 0.5]
    # E = 4: lr(e) = 1 - |2 (e+1)/5 - 1| -> 0.4, 0.8, 0.8, 0.4
    assert [round(triangle_factor(e, 4), 6) for e in range(4)] == [0.4, 0.8, 0.8, 0.4]
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.005}, {"params": [p2], "lr": 0.05}], lr=0.05)
    sched = build_scheduler(opt, "triangle", 3)
    seen = []
    for _ in range(3):
        seen.append([round(g["lr"], 8) for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen == [[0.0025, 0.025], [0.005, 0.05], [0.0025, 0.025]]


def test_triangle_peak_moves_the_apex():
    # E = 9 epochs, x = (e + 1) / 10; peak 0.2: rise x / 0.2 to e = 1, then (1 - x) / 0.8.
    assert [round(triangle_factor(e, 9, 0.2), 6) for e in range(4)] == [0.5, 1.0, 0.875, 0.75]
    # peak 0.5 is the reference's triangle, factor for factor.
    assert all(abs(triangle_factor(e, 7, 0.5) - triangle_factor(e, 7)) < 1e-12 for e in range(7))
    with pytest.raises(ValueError):
        triangle_factor(0, 3, 1.0)
    with pytest.raises(M2SNetError, match="warmup_fraction"):
        TrainConfig(data="d", warmup_fraction=0.0).validate()


def test_msu_bn_momentum_reaches_the_filter_norms():
    from m2snet.models import create_model

    model = create_model("m2snet", pretrained=False, msu_bn_momentum=0.01)
    assert model.conv_3.norm.momentum == model.conv_5.norm.momentum == 0.01
    assert create_model("m2snet", pretrained=False).conv_3.norm.momentum == 0.1
    scaled = create_model("m2snet", pretrained=False, msu_gamma_init=0.5)
    assert float(scaled.conv_3.norm.weight.max()) == float(scaled.conv_5.norm.weight.min()) == pytest.approx(0.5)
    # Default: the random-initialisation recipe without pretrained weights (the reference's 1.0 with them).
    from m2snet.models.m2snet import RANDOM_INIT_MSU_GAMMA

    random_init = create_model("m2snet", pretrained=False)
    assert random_init.pretrained_source is None
    assert float(random_init.conv_3.norm.weight.max()) == pytest.approx(RANDOM_INIT_MSU_GAMMA)


def test_config_file_roundtrip_and_overrides(tmp_path):
    cfg = TrainConfig(data="d", epochs=3, model_config={"msu_impl": "dense"})
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.from_file(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("epochs: 7\nhead_lr: 0.01\npretrained: false\n")
    y = TrainConfig.from_file(tmp_path / "c.yaml")
    assert (y.epochs, y.head_lr, y.pretrained) == (7, 0.01, False)
    o = y.override_strings(["batch_size=4", "pretrained=/w/res2net.pth", "max_train_cases=none",
                            "model_config={\"msu_impl\": \"fast\"}", "schedule_unit=step"])
    assert (o.batch_size, o.pretrained, o.max_train_cases, o.model_config, o.schedule_unit) == \
        (4, "/w/res2net.pth", None, {"msu_impl": "fast"}, "step")
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    with pytest.raises(M2SNetError, match=r"bad.yaml: unknown training option\(s\) \['epoch'\]"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(M2SNetError, match="size=100 must be a multiple of 32"):
        cfg.override(size=100)
    # Every value is checked against its field's type, whichever door it came through: a file ...
    (tmp_path / "typed.yaml").write_text("epochs: ten\nhead_lr: fast\nmodel_config: [1]\n")
    with pytest.raises(M2SNetError, match=r"typed.yaml: model_config=\[1\]: input should be a valid dictionary; "
                                          r"epochs='ten': input should be a valid integer.*; "
                                          r"head_lr='fast': input should be a valid number"):
        TrainConfig.from_file(tmp_path / "typed.yaml")
    # ... --set (typed by the same annotations), or a JSON override; a number in a string is read as one.
    with pytest.raises(M2SNetError, match="epochs=2.5: input should be a valid integer"):
        cfg.override(epochs=2.5)
    assert cfg.override(epochs="4", head_lr="0.02").epochs == 4 and cfg.override(head_lr="0.02").head_lr == 0.02


@pytest.mark.parametrize("assignment, problem", [
    ("head_lr=nan", "head_lr=nan must be a finite number"),
    ("backbone_lr=inf", "backbone_lr=inf must be a finite number"),
    ("lossnet_weight=-inf", "lossnet_weight=-inf must be a finite number"),
    ("head_lr=0", "head_lr=0.0 must be > 0"),
    ("backbone_lr=-0.001", "backbone_lr=-0.001 must be >= 0"),
    ("weight_decay=-1", "weight_decay=-1.0 must be >= 0"),
    ("momentum=1.5", "momentum=1.5 must be within [0, 1)"),
    ("lossnet_weight=-0.1", "lossnet_weight=-0.1 must be >= 0"),
    ("grad_clip=0", "grad_clip=0.0 must be > 0 (or none: no clipping)"),
    ("grad_clip=nan", "grad_clip=nan must be a finite number"),
    ("max_train_cases=-2", "max_train_cases=-2 must be >= 1 (or none: all)"),
    ("max_val_cases=-1", "max_val_cases=-1 must be >= 0 (or none: all)"),
    ("val_every=0", "val_every=0 must be >= 1"),
])
def test_a_meaningless_number_is_refused_at_config_validation_naming_the_field(assignment, problem):
    """NaN, infinities and negatives where they mean nothing: refused before any work (head_lr=nan was caught
    only once the loss went NaN; max_train_cases=-2 and val_every=0 were tracebacks)."""
    with pytest.raises(M2SNetError) as err:
        TrainConfig(data="d").override_strings([assignment])
    assert str(err.value) == f"overrides: {problem}"


def test_multiscale_set_scales_with_base_size():
    assert TrainConfig(size=352).scales() == [224, 256, 288, 320, 352]
    assert TrainConfig(size=256).scales() == [192, 224, 256]
    assert TrainConfig(size=64).scales() == [64]
    assert TrainConfig(size=352, multiscale=False).scales() == [352]


def test_multiscale_collate_resizes_whole_batch_and_keeps_binary_masks():
    from m2snet.training.batches import MultiScaleCollate

    torch.manual_seed(0)
    collate = MultiScaleCollate([96, 128])
    batch = [{"image": torch.randn(3, 128, 128), "mask": (torch.rand(1, 128, 128) > 0.5).float(), "case_id": str(i)}
             for i in range(3)]
    sizes = set()
    for _ in range(12):
        out = collate(batch)
        s = out["image"].shape[-1]
        sizes.add(s)
        assert out["image"].shape == (3, 3, s, s) and out["mask"].shape == (3, 1, s, s)
        assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    assert sizes == {96, 128}
    multi = [{"image": torch.randn(3, 128, 128), "mask": torch.randint(0, 4, (128, 128)), "case_id": "a"}] * 2
    for _ in range(6):
        out = collate(multi)
        assert out["mask"].dtype == torch.long and out["mask"].max() <= 3


# --- training ----------------------------------------------------------------------------------
class Killed(Exception):
    pass


def stopped_after_first_epoch(cfg: TrainConfig) -> None:
    """Train ``cfg`` until its first epoch's checkpoints are written, then stop as a crash would."""
    from m2snet.training.trainer import train

    def kill_after_first_epoch(info):
        if info.epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, callbacks=[kill_after_first_epoch])


@pytest.mark.parametrize("n, batch_size, sizes", [(5, 4, [5]), (9, 4, [4, 5]), (8, 4, [4, 4]), (7, 4, [4, 3]),
                                                   (3, 4, [3]), (1, 4, [1])])
def test_training_batches_never_hold_one_case_when_the_epoch_has_more(n, batch_size, sizes):
    """A leftover single case joins the previous batch (BatchNorm in training needs more than one value per
    channel: a batch of one at a 1x1 feature map is an error); every case is seen once per epoch; the
    seeded order is torch's own shuffle, so other batchings are those of torch's BatchSampler."""
    from torch.utils.data import BatchSampler, RandomSampler

    from m2snet.training.batches import TrainBatches

    batches = list(TrainBatches(n, batch_size, torch.Generator().manual_seed(3)))
    assert [len(b) for b in batches] == sizes and len(TrainBatches(n, batch_size, torch.Generator())) == len(sizes)
    assert sorted(i for b in batches for i in b) == list(range(n))
    reference = list(BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(3)), batch_size,
                                  drop_last=False))
    if n % batch_size != 1 or n < batch_size:
        assert batches == reference
    else:
        assert batches == [*reference[:-2], reference[-2] + reference[-1]]


def test_a_last_batch_of_one_at_a_1x1_feature_map_trains(tiny_data, tmp_path):
    """`train --size 32 --batch-size 2` on 3 cases: the last batch would hold one image whose deepest feature
    map is 1x1, which BatchNorm refuses in training ("Expected more than 1 value per channel")."""
    from m2snet.training.trainer import train

    res = train(tiny_config(*tiny_data, tmp_path / "run", size=32, batch_size=2, max_train_cases=3, epochs=1))
    assert len(res.train_cases) == 3 and res.checkpoint.is_file()


@pytest.mark.parametrize("change", [{"max_train_cases": 1}, {"batch_size": 1}])
def test_a_batch_of_one_at_a_1x1_feature_map_is_refused_naming_the_limit(tiny_data, tmp_path, change):
    """Where a batch of one cannot be avoided (one training case, or batch size 1) at size 32, refuse
    before training instead of BatchNorm's ValueError at the first step."""
    from m2snet.training.trainer import train

    cfg = tiny_config(*tiny_data, tmp_path / "run", size=32, max_train_cases=3, epochs=1).override(**change)
    with pytest.raises(M2SNetError, match=r"a training batch of one image at size 32, .*1x1.*BatchNorm"):
        train(cfg)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_resume_reproduces_uninterrupted_run_exactly(tiny_data, tmp_path):
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.training.trainer import train

    data, split = tiny_data
    straight = train(tiny_config(data, split, tmp_path / "straight"))
    assert [h["epoch"] for h in straight.history] == [1, 2]

    cfg = tiny_config(data, split, tmp_path / "resumed")
    stopped_after_first_epoch(cfg)
    assert Checkpoint.load(tmp_path / "resumed" / "last.pt").epoch == 1
    with pytest.raises(M2SNetError, match="use --resume"):
        train(cfg)
    resumed = train(cfg, resume=True)

    for path in (straight.last_checkpoint, straight.checkpoint):  # tensors and plain data: read weights-only
        assert torch.load(path, weights_only=True)["model_name"] == "m2snet"
    a = Checkpoint.load(straight.last_checkpoint)
    b = Checkpoint.load(resumed.last_checkpoint)
    assert a.resumable and b.resumable
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    for sa, sb in zip(a.resume.optimizer["state"].values(), b.resume.optimizer["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in h]  # noqa: E731
    assert strip(a.resume.history) == strip(b.resume.history)
    assert a.resume.scheduler == b.resume.scheduler


def test_a_seeded_deterministic_run_is_repeatable(tiny_data, tmp_path):
    """The same config twice (the trainer's phases rebuilt from scratch each time): the same weights,
    optimizer state, losses, learning rates and selection. With resume == uninterrupted above, what a
    refactor of the loop must keep."""
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.training.trainer import train

    data, split = tiny_data
    runs = [train(tiny_config(data, split, tmp_path / name, model="msnet", schedule_unit="step", lossnet_weight=0.1))
            for name in ("a", "b")]
    a, b = (Checkpoint.load(r.last_checkpoint) for r in runs)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    for sa, sb in zip(a.resume.optimizer["state"].values(), b.resume.optimizer["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    timeless = [[{k: v for k, v in row.items() if "seconds" not in k and "per_s" not in k} for row in r.history]
                for r in runs]
    assert timeless[0] == timeless[1] and timeless[0][-1]["train_loss"] > 0
    assert timeless[0][0]["lr_head"] != timeless[0][1]["lr_head"]  # the schedule moved: the rates are compared
    assert (runs[0].selected_epoch, runs[0].selection_score) == (runs[1].selected_epoch, runs[1].selection_score)


def test_resume_without_checkpoint_is_a_clear_error(tiny_data, tmp_path):
    from m2snet.training.trainer import train

    data, split = tiny_data
    with pytest.raises(M2SNetError, match=r"last.pt: nothing to resume"):
        train(tiny_config(data, split, tmp_path / "none"), resume=True)


def test_non_finite_loss_stops_with_epoch_and_step(tiny_data, tmp_path):
    from m2snet.training.trainer import train

    data, split = tiny_data
    cfg = tiny_config(data, split, tmp_path / "nan", backbone_lr=1e30, head_lr=1e30, schedule="constant",
                      epochs=3, max_train_cases=3)
    with pytest.raises(M2SNetError, match=r"loss became (nan|inf|-inf) at epoch \d+ step \d+ \(lr_backbone=.+lr_head="):
        train(cfg)


def test_checkpoint_loads_back_and_records_the_run(tiny_data, tmp_path):
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.models.preprocessing import DEFAULT_NORMALIZATION
    from m2snet.training.trainer import train

    data, split = tiny_data
    res = train(tiny_config(data, split, tmp_path / "run", epochs=1, model="msnet"))
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["model"] == "msnet" and saved["epochs"] == 1
    assert (tmp_path / "run" / "learning_curves.png").stat().st_size > 0
    ckpt = Checkpoint.load(res.checkpoint)
    model = ckpt.build_model(device="cpu")
    assert ckpt.model_name == "msnet" and ckpt.image_size == 64 and ckpt.n_classes == 1
    assert ckpt.epoch == 1 and "val_dice" in ckpt.metrics and not ckpt.resumable
    assert ckpt.normalization == DEFAULT_NORMALIZATION and not model.training
    assert list(ckpt.normalization.mean) == pytest.approx([124.55, 118.90, 102.94])
    meta = ckpt.meta()  # the plain form the Predictor / ONNX metadata use
    assert meta["normalization"]["mean"] == pytest.approx([124.55, 118.90, 102.94]) and "optimizer" not in meta
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 1, 64, 64)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(M2SNetError, match="junk.pt: not a readable torch checkpoint"):
        Checkpoint.load(tmp_path / "junk.pt")
    torch.save({"format_version": 1, "state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(M2SNetError, match="foreign.pt: not an m2snet checkpoint .no model_name"):
        Checkpoint.load(tmp_path / "foreign.pt")


def test_baseline_unet_trains_through_the_same_loop(tiny_data, tmp_path):
    from m2snet.training.trainer import train

    data, split = tiny_data
    res = train(tiny_config(data, split, tmp_path / "unet", epochs=1, model="unet", max_train_cases=2))
    assert res.history[0]["train_loss"] > 0 and res.checkpoint.is_file()


def test_callbacks_get_start_epochs_end_and_last_checkpoint_can_go(tiny_data, tmp_path):
    """TrainCallback objects and plain functions see every event in order; with
    keep_last_checkpoint off the resumable last.pt exists during the run, not after it."""
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.training.callbacks import Callback, as_callbacks
    from m2snet.training.trainer import train

    events = []

    class Recorder(Callback):
        def on_train_start(self, event):
            events.append(("start", event.start_epoch, len(event.train_cases), event.n_params > 0))

        def on_epoch_end(self, event):
            assert Checkpoint.load(event.checkpoint).resumable  # written before the callbacks run
            events.append(("epoch", event.epoch, "val_dice" in event.val_metrics, event.train_loss > 0,
                           sorted(event.learning_rates)))

        def on_train_end(self, event):
            events.append(("end", event.selected_epoch, event.checkpoint.is_file()))

    seen = []
    assert as_callbacks(None) == [] and len(as_callbacks(seen.append)) == 1
    data, split = tiny_data
    cfg = tiny_config(data, split, tmp_path / "run", keep_last_checkpoint=False)
    res = train(cfg, callbacks=[Recorder(), lambda end: seen.append(end.epoch)])
    assert events == [("start", 0, 2, True),
                      ("epoch", 1, True, True, ["lr_backbone", "lr_head"]),
                      ("epoch", 2, True, True, ["lr_backbone", "lr_head"]),
                      ("end", 2, True)]
    assert seen == [1, 2]
    assert res.last_checkpoint is None and not (tmp_path / "run" / "last.pt").exists()
    assert Checkpoint.load(res.checkpoint).selected_epoch == 2


def test_validation_builds_no_autograd_graph():
    """validate() runs under no_grad: a graph per validation batch would hold every activation."""
    from m2snet.training.validate import validate

    seen_grad_mode = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)

        def forward(self, x):
            seen_grad_mode.append(torch.is_grad_enabled())
            return self.conv(x)

    def loss_fn(logits, y):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        assert not loss.requires_grad
        return {"loss": loss}

    batch = {"image": torch.randn(2, 3, 8, 8), "mask": (torch.rand(2, 1, 8, 8) > 0.5).float()}
    row = validate(Probe(), [batch], loss_fn, "cpu", n_classes=1, amp=False)
    assert seen_grad_mode == [False] and set(row) >= {"val_dice", "val_loss"}


def test_a_cv_fold_killed_mid_way_and_resumed_by_a_new_process_ends_bitwise_as_an_uninterrupted_one(tiny_data,
                                                                                                    tmp_path):
    """`m2snet cv --resume` (bench/busi_cpu_cv.sh's sittings): SIGKILL once the fold has a last.pt, then a new
    process continues it; the final weights equal an uninterrupted run's, with the machine's default precision
    (bf16 + channels_last on a CPU with native bf16, fp32 elsewhere)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from m2snet.models.checkpoint import Checkpoint

    data, split = tiny_data
    env = {**os.environ, "OMP_NUM_THREADS": "1", "M2SNET_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def cv(out: Path, *extra: str) -> subprocess.Popen:
        args = ["cv", "--data", data, "--split", split, "--folds", "0", "--out", out, "--epochs", "6", "--size", "64",
                "--batch-size", "2", "--device", "cpu", "--no-track", "--no-log-model",
                *[a for kv in ("pretrained=false", "lossnet_weight=0", "lossnet_pretrained=false", "deterministic=true",
                               "max_train_cases=2", "max_val_cases=1", "progress=false",
                               f"cache_dir={tmp_path / 'cache'}") for a in ("--set", kv)], *extra]
        log = open(tmp_path / f"{out.name}{len(extra)}.log", "w")  # a file: a full pipe would stall the run
        return subprocess.Popen([sys.executable, "-m", "m2snet.cli", *map(str, args)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    straight = cv(tmp_path / "straight")
    killed = cv(tmp_path / "killed")
    last = tmp_path / "killed" / "fold0" / "last.pt"
    deadline = time.monotonic() + 600
    while not last.is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stopped_at = Checkpoint.load(last).epoch
    assert 1 <= stopped_at < 6, stopped_at  # killed mid-way, not after the end
    resumed = cv(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "killed1.log").read_text()[-2000:]
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight0.log").read_text()[-2000:]
    a = Checkpoint.load(tmp_path / "straight" / "fold0" / "last.pt")
    b = Checkpoint.load(last)
    assert a.epoch == b.epoch == 6
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert (tmp_path / "killed" / "fold0" / "eval" / "per_case.csv").read_text() == \
        (tmp_path / "straight" / "fold0" / "eval" / "per_case.csv").read_text()


def test_a_run_resumes_across_a_code_update_that_added_a_config_field_and_with_the_split_named_another_way(
        tiny_data, tmp_path, monkeypatch):
    """A last.pt written before a TrainConfig field existed ran with that field's default: resuming it with the
    default is the same config (it was refused with 'config differs ... in []'); so is the same split file named
    relatively instead of absolutely. A real change is still refused."""
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.training.trainer import train

    data, split = tiny_data

    cfg = tiny_config(data, split, tmp_path / "run")
    stopped_after_first_epoch(cfg)
    last = tmp_path / "run" / "last.pt"
    old = Checkpoint.load(last)
    del old.train_config["accept_split_version"]  # as written before the field existed
    old.save(last)
    monkeypatch.chdir(Path(split).parent)
    relative = cfg.override(split=Path(split).name)
    with pytest.raises(M2SNetError, match=r"config differs from the checkpoint's in \['epochs'\]"):
        train(relative.override(epochs=3), resume=True)
    assert [h["epoch"] for h in train(relative, resume=True).history] == [1, 2]
