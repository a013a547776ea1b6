"""The model registry: every name builds, runs on a tiny input and honours the contract
(logits at the input size, n_classes, pretrained_source, backbone / head parameter split)."""

from __future__ import annotations

import logging
import time

import pytest
import timm
import torch

from m2snet.errors import M2SNetError
from m2snet.models import create_model, list_models
from m2snet.models.info import count_macs, model_info
from m2snet.processes import free_port

ALL = ["m2snet", "msnet", "m2snet_au", "m2snet_aspp", "m2snet_denseaspp", "fpn", "unet", "unetplusplus"]


def test_registry_lists_every_model() -> None:
    assert list_models() == ALL


@pytest.mark.parametrize("name", ALL)
def test_every_model_runs(name: str, caplog) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for n_classes in (1, 3):
        with caplog.at_level(logging.WARNING, logger="m2snet.models"):
            model = create_model(name, n_classes=n_classes)  # pretrained=True, offline in tests
        assert model.pretrained_source is None
        assert "RANDOM weights" in caplog.text  # never silently random
        y = model(x)
        assert y.shape == (2, n_classes, 64, 64)
        assert torch.isfinite(y).all()
    backbone = list(model.backbone_parameters())
    head = list(model.head_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(backbone) + len(head) == len(trainable) and backbone and head
    assert {id(p) for p in backbone}.isdisjoint(id(p) for p in head)


def test_non_square_input_and_gradients_reach_encoder() -> None:
    model = create_model("m2snet", pretrained=False)
    y = model(torch.randn(2, 3, 64, 96))
    assert y.shape == (2, 1, 64, 96)
    y.mean().backward()
    assert model.resnet.conv1[0].weight.grad.abs().sum() > 0
    assert model.conv_3.norm.weight.grad.abs().sum() > 0  # the shared MSU BatchNorm trains


@pytest.mark.parametrize("msu_norm", ["shared", "per_site"])
def test_msu_filters_are_shared_once(msu_norm: str) -> None:
    model = create_model("m2snet", pretrained=False, msu_norm=msu_norm)
    keys = [k for k in model.state_dict() if "conv_3" in k or "conv_5" in k]
    norm_keys = [k for k in keys if k.startswith(("conv_3.norm.", "conv_5.norm."))]
    assert len(norm_keys) == 10  # the reference's keys, in both modes
    site_keys = sorted(set(keys) - set(norm_keys))  # per_site: the per-site statistics, no parameter
    assert len(site_keys) == (8 if msu_norm == "per_site" else 0), site_keys
    assert not any(k in dict(model.named_parameters()) for k in site_keys)
    assert model.x5_x4.combine.filters == (model.conv_3, model.conv_5)
    assert model.x2_x1.combine.filters[0] is model.x4_x3_x2.combine.filters[0]


def test_bad_names_and_options() -> None:
    with pytest.raises(M2SNetError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(M2SNetError, match="bad configuration"):
        create_model("m2snet", pretrained=False, colour="red")
    with pytest.raises(ValueError, match="n_classes"):
        create_model("msnet", pretrained=False, n_classes=0)
    with pytest.raises(ValueError, match="msu_impl"):
        create_model("msnet", pretrained=False, msu_impl="dense")
    with pytest.raises(ValueError, match="msu_norm='shared' only applies to unit='msu'"):
        create_model("msnet", pretrained=False, msu_norm="shared")
    with pytest.raises(ValueError, match="msu_norm must be 'shared' or 'per_site', got 'both'"):
        create_model("m2snet", pretrained=False, msu_norm="both")


def test_pretrained_from_local_file(tmp_path) -> None:
    torch.manual_seed(1)
    timm_net = timm.create_model("res2net50d", pretrained=False)
    state = timm_net.state_dict()
    torch.save(state, tmp_path / "timm.pth")
    model = create_model("msnet", pretrained=str(tmp_path / "timm.pth"))
    assert model.pretrained_source.startswith("file:")
    assert torch.equal(model.resnet.layer3[1].convs[0].weight, state["layer3.1.convs.0.weight"])
    # reference key names (resnet.*, module.) load too; smp's encoder takes the same file
    torch.save({"state_dict": {f"module.resnet.{k}": v for k, v in state.items()}}, tmp_path / "ref.pth")
    assert create_model("unet", pretrained=str(tmp_path / "ref.pth")).pretrained_source.startswith("file:")
    # a wrong file is an error naming the file and the keys, never a silent random init
    torch.save({"conv1.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(M2SNetError, match=r"bad\.pth.*(missing keys|wrong shapes)"):
        create_model("m2snet", pretrained=str(tmp_path / "bad.pth"))
    with pytest.raises(M2SNetError, match="not found"):
        create_model("m2snet", pretrained=str(tmp_path / "absent.pth"))


def test_unreachable_hub_fails_fast(monkeypatch, caplog, tmp_path) -> None:
    # Not offline, but the hub endpoint is a closed local port: the probe must give up at once.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("M2SNET_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: no cached weights either
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="m2snet.models"):
        model = create_model("fpn", pretrained=True)
    assert time.monotonic() - start < 10
    assert model.pretrained_source is None and "hub not reachable" in caplog.text


def test_model_info_m2snet_costs_what_msnet_costs() -> None:
    m2 = model_info("m2snet", size=64)
    ms = model_info("msnet", size=64)
    dense = model_info("m2snet", size=64, msu_impl="dense")
    assert abs(m2.trainable_params - 29.74e6) < 0.01e6 and m2.fixed_params == 0
    assert m2.trainable_params - ms.trainable_params == 256  # the two MSU BatchNorms
    assert dense.fixed_params == 64 * 64 * (9 + 25) + 128  # the reference's fixed filters
    assert ms.gmacs < m2.gmacs < 1.05 * ms.gmacs  # the fast MSU is counted, and it is cheap
    assert dense.gmacs > 1.5 * m2.gmacs  # the dense all-ones convolutions are not
    # MACs scale with the pixels: check the counter against the 352 reference at a 2x ratio
    assert count_macs(create_model("msnet", pretrained=False), 128) == pytest.approx(4 * ms.gmacs * 1e9, rel=0.05)


def test_offline_uses_local_hub_cache(monkeypatch, tmp_path) -> None:
    from safetensors.torch import save_file

    # A hub cache laid out as huggingface_hub writes it, holding (random) res2net50d weights.
    state = timm.create_model("res2net50d", pretrained=False).state_dict()
    repo = tmp_path / "models--timm--res2net50d.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("M2SNET_OFFLINE", "1")
    model = create_model("msnet", pretrained=True)
    assert model.pretrained_source == "hf-cache:timm/res2net50d.in1k"
    assert torch.equal(model.resnet.bn1.running_var, state["bn1.running_var"])


def test_channels_last_gives_the_same_logits() -> None:
    # The trainer may switch to channels_last on CUDA; the fast MSU must not depend on layout.
    torch.manual_seed(0)
    model = create_model("m2snet", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
