"""msu_norm="per_site" in the whole model, BatchNorm recalibration (library, trainer, CLI), and
loading shared / reference checkpoints into per-site models."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m2snet.errors import M2SNetError
from m2snet.models import create_model
from m2snet.training.bn_recalibration import (
    filter_batch_statistics,
    recalibrate_bn,
    site_stats_inherited,
)


def _agreement(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Eval-mode output vs train-mode output (every BatchNorm on x's own statistics) on x."""
    with torch.no_grad():
        evaluated = model.eval()(x)
        trained = copy.deepcopy(model).train()(x)  # a copy: its running statistics move
    diff = (evaluated - trained).abs().max().item()
    corr = torch.corrcoef(torch.stack([evaluated.flatten(), trained.flatten()]))[0, 1].item()
    return {"max_diff": diff, "rel_max_diff": diff / trained.abs().max().item(), "corr": corr}


@pytest.fixture(scope="module")
def briefly_trained() -> dict[str, nn.Module]:
    """m2snet trained 3 SGD steps from one random init, once per msu_norm, on the same batches."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 128, 128, generator=gen) for _ in range(3)]
    ys = [(F.avg_pool2d(torch.rand(4, 1, 128, 128, generator=gen), 31, 1, 15) > 0.5).float() for _ in xs]
    torch.manual_seed(0)
    init = create_model("m2snet", pretrained=False, msu_norm="shared").state_dict()
    models = {}
    for norm in ("shared", "per_site"):
        model = create_model("m2snet", pretrained=False, msu_norm=norm)
        model.load_state_dict(init)  # per_site: site statistics start as the shared ones
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
        for x, y in zip(xs, ys):
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models[norm] = model
    models["batch"] = xs[0]
    return models


def test_per_site_trains_exactly_like_shared(briefly_trained) -> None:
    """Train mode is the same computation: after the same steps the parameters are equal."""
    shared, per_site = briefly_trained["shared"].state_dict(), briefly_trained["per_site"].state_dict()
    params = dict(briefly_trained["shared"].named_parameters())
    for name in params:
        torch.testing.assert_close(per_site[name], shared[name], rtol=1e-5, atol=1e-6, msg=name)
    # and the running statistics of every other BatchNorm too
    torch.testing.assert_close(per_site["resnet.layer1.0.bn1.running_var"], shared["resnet.layer1.0.bn1.running_var"])
    assert per_site["conv_3.site_running_mean"].shape == (20, 64)


def test_per_site_eval_matches_train_mode_after_recalibration(briefly_trained) -> None:
    """With statistics estimated on the batch itself, the per-site model's eval output reproduces
    its train-mode output; the shared model's cannot (one statistic for 20 sites of different
    scale), whatever its statistics."""
    x = briefly_trained["batch"]
    report = {}
    for norm in ("shared", "per_site"):
        model = copy.deepcopy(briefly_trained[norm])
        report[f"{norm} ema"] = _agreement(model, x)
        info = recalibrate_bn(model, [x])
        assert info.batches == 1 and info.images == 4 and not model.training
        report[f"{norm} recalibrated"] = _agreement(model, x)
    for key, r in report.items():  # shown with -s; the figures of the report
        print(f"{key:22s} corr {r['corr']:.6f}  max|eval - train| {r['max_diff']:.4g} "
              f"({100 * r['rel_max_diff']:.2f} % of max|train|)")
    # measured (CPU, torch 2.11): per_site corr 0.998, max diff 4.8 % of max|train| (what is left
    # is BatchNorm's unbiased running variance at the 4x4 levels); shared corr 0.20, 668 %
    per_site, shared = report["per_site recalibrated"], report["shared recalibrated"]
    assert per_site["corr"] > 0.99 and per_site["rel_max_diff"] < 0.15, per_site
    assert shared["rel_max_diff"] > 5 * per_site["rel_max_diff"] and shared["corr"] < 0.9, report


def test_filter_batch_statistics_isolates_the_filters(briefly_trained) -> None:
    """Inside the context only the MSU filters use batch statistics; nothing is updated."""
    model = copy.deepcopy(briefly_trained["per_site"]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = briefly_trained["batch"]
    with torch.no_grad(), filter_batch_statistics(model):
        assert model.conv_3.norm.training and not model.resnet.training
        y_batch = model(x)
    assert not model.conv_3.norm.training and model.conv_3.norm.track_running_stats
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert not torch.allclose(model(x), y_batch)


def test_recalibrate_bn_any_model_is_a_cumulative_average() -> None:
    """msnet (no MSU): every BatchNorm's running mean becomes the plain average of the batch means
    it saw; momentum and eval mode are restored."""
    torch.manual_seed(1)
    model = create_model("msnet", pretrained=False)
    bn = model.resnet.stem[1] if hasattr(model.resnet, "stem") else next(
        m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].mean(dim=(0, 2, 3))))
    batches = [torch.randn(2, 3, 64, 64) * (i + 1) for i in range(3)]
    info = recalibrate_bn(model, ({"image": x} for x in batches))
    hook.remove()
    assert (info.batches, info.images, info.size, info.per_site_filters) == (3, 6, 64, 0)
    torch.testing.assert_close(bn.running_mean, torch.stack(seen).mean(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3
    assert bn.momentum == 0.1 and not model.training


def test_reference_checkpoint_into_per_site(tmp_path, caplog) -> None:
    """A reference (shared) checkpoint loads into a per-site model: every site gets the shared
    statistics (eval outputs equal the shared model's), flagged and logged; recalibration
    clears the flag; a per-site checkpoint round-trips with its own statistics."""
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.models.reference import convert_reference, load_reference_checkpoint

    torch.manual_seed(2)
    shared = create_model("m2snet", pretrained=False, msu_norm="shared")
    recalibrate_bn(shared, [torch.randn(2, 3, 64, 64)])  # sensible running statistics
    reference = {f"module.{k}": v for k, v in shared.state_dict().items()}  # as the authors save it
    per_site = create_model("m2snet", pretrained=False, msu_norm="per_site")
    with caplog.at_level(logging.WARNING, logger="m2snet.models"):
        load_reference_checkpoint(per_site, reference)
    assert "copied the shared running statistics to all 20 sites" in caplog.text
    assert site_stats_inherited(per_site)
    for k in (3, 5):
        f = getattr(per_site, f"conv_{k}")
        assert torch.equal(f.site_running_var, getattr(shared, f"conv_{k}").norm.running_var.expand(20, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(per_site.eval()(x), shared.eval()(x))

    # convert-reference keeps the reference's mode; loading builds it as such
    src = tmp_path / "M2SNet.pth"
    torch.save(reference, src)
    ref = Checkpoint.load(convert_reference(src, tmp_path / "ref.pt"))
    converted = ref.build_model()
    assert ref.model_config["msu_norm"] == "shared" and converted.msu_norm == "shared"

    recalibrate_bn(per_site, [torch.randn(2, 3, 64, 64)])
    assert not site_stats_inherited(per_site)
    rows = per_site.conv_3.site_running_mean[:, 0]
    assert rows.unique().numel() > 10  # now one statistic per site
    # a per-site checkpoint of ours round-trips, even without msu_norm in its model_config
    path = Checkpoint(model_name="m2snet", model_config={"n_classes": 1}, n_classes=1, image_size=64,
                      state_dict=per_site.state_dict(), epoch=1).save(tmp_path / "per_site.pt")
    loaded = Checkpoint.load(path).build_model()
    assert loaded.msu_norm == "per_site" and not site_stats_inherited(loaded)
    for key, value in per_site.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), per_site.eval()(x))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """A 6-case demo dataset (64 px) in the m2snet layout, with a 2-fold split."""
    from tests.conftest import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_bn"), n_per_class=(2, 2, 2), size=64)


def test_recalibrate_bn_cli_upgrades_a_reference_checkpoint(tmp_path, tiny_data) -> None:
    """`m2snet convert-reference` then `m2snet recalibrate-bn ... --fold 0`: a per-site checkpoint
    whose statistics come from the fold's 3 training cases; bad input is one line, exit 2."""
    from typer.testing import CliRunner

    from m2snet.cli import app
    from m2snet.data.split import load_split
    from m2snet.models.checkpoint import Checkpoint

    data, split = tiny_data
    torch.manual_seed(3)
    src = tmp_path / "M2SNet.pth"
    torch.save(create_model("m2snet", pretrained=False, msu_norm="shared").state_dict(), src)
    runner = CliRunner()
    res = runner.invoke(app, ["convert-reference", str(src), str(tmp_path / "ref.pt")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "recal.pt"
    res = runner.invoke(app, ["recalibrate-bn", str(tmp_path / "ref.pt"), "--data", str(data), "--split", str(split),
                              "--fold", "0", "--out", str(out), "--size", "64", "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    n_train = len(load_split(split).fold(0).train)
    used = n_train - n_train % 2  # the last partial batch is dropped
    assert f"over {used} of {n_train} training cases" in res.output and "msu_norm per_site" in res.output
    recalibrated = Checkpoint.load(out)
    model = recalibrated.build_model()
    assert model.msu_norm == "per_site" and not site_stats_inherited(model)
    record = recalibrated.bn_recalibration
    assert (record["images"], record["cases"], record["size"], record["fold"], record["msu_norm"]) == (
        used, n_train, 64, 0, "per_site")
    source = Checkpoint.load(tmp_path / "ref.pt").state_dict
    assert not torch.equal(model.state_dict()["resnet.layer1.0.bn1.running_mean"],
                           source["resnet.layer1.0.bn1.running_mean"])
    for key, value in source.items():  # no parameter moved
        if key.endswith(("weight", "bias")):
            assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()

    # user errors are M2SNetError (m2snet.cli.main prints them as one line, exit 2), nothing written
    bad = runner.invoke(app, ["recalibrate-bn", str(tmp_path / "missing.pt"), "--data", str(data), "--out",
                              str(tmp_path / "x.pt")])
    assert isinstance(bad.exception, M2SNetError) and "missing.pt: checkpoint not found" in str(bad.exception)
    bad = runner.invoke(app, ["recalibrate-bn", str(tmp_path / "ref.pt"), "--data", str(data), "--out",
                              str(tmp_path / "x.pt"), "--msu-norm", "both"])
    assert isinstance(bad.exception, M2SNetError)
    assert "msu_norm must be 'shared' or 'per_site'" in str(bad.exception)
    assert not (tmp_path / "x.pt").exists()


def test_trainer_recalibrates_its_checkpoints(tmp_path, tiny_data) -> None:
    from m2snet.models.checkpoint import Checkpoint
    from m2snet.training.config import TrainConfig
    from m2snet.training.trainer import train

    data, split = tiny_data
    cfg = TrainConfig(data=str(data), split=str(split), fold=0, model="m2snet", epochs=1, batch_size=2, size=64,
                      pretrained=False, lossnet_weight=0.0, lossnet_pretrained=False, device="cpu",
                      progress=False, out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                      max_train_cases=2, max_val_cases=1, recalibrate_bn=True)
    result = train(cfg)
    for path in (result.checkpoint, result.last_checkpoint):
        ckpt = Checkpoint.load(path)
        assert ckpt.bn_recalibration["images"] == 2 and ckpt.bn_recalibration["per_site_filters"] == 2
        assert int(ckpt.state_dict["conv_3.site_num_batches_tracked"][0]) == 1  # reset, then 1 batch
    assert Checkpoint.load(result.last_checkpoint).resumable  # still resumable
