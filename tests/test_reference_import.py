"""Reference checkpoint import: a checkpoint laid out like the official one (key lists from the
shared docs, random values) loads tensor for tensor; anything that does not fit fails by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from m2snet.errors import M2SNetError
from m2snet.models import create_model
from m2snet.models.reference import convert_reference, load_reference_checkpoint

DOCS = Path(os.environ.get("M2SNET_SHARED_DOCS", Path(__file__).resolve().parents[2] / "shared" / "docs"))


def reference_state_dict(model: str, with_fixed: bool, prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    tsv = DOCS / f"official_{model}_state_dict.tsv"
    if not tsv.is_file():
        pytest.skip(f"reference key list {tsv} not found (set M2SNET_SHARED_DOCS)")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for line in tsv.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        if dtype == "int64":
            state[prefix + key] = torch.randint(0, 1000, shape, generator=gen)
        else:
            state[prefix + key] = torch.rand(shape, generator=gen) + 0.1  # >0: valid running_var
    if with_fixed and model == "m2snet":
        for k in (3, 5):
            state[f"{prefix}conv_{k}.weight"] = torch.ones(64, 64, k, k)
            state[f"{prefix}conv_{k}.bias"] = torch.zeros(64)
    return state


@pytest.fixture(scope="module")
def nets():
    return {name: create_model(name, pretrained=False) for name in ("m2snet", "msnet")}


@pytest.mark.parametrize("name,with_fixed,prefix", [
    ("m2snet", False, ""), ("m2snet", True, "module."), ("msnet", False, ""), ("msnet", False, "module."),
])
def test_reference_checkpoint_lands(nets, name, with_fixed, prefix) -> None:
    state = reference_state_dict(name, with_fixed, prefix)
    model = load_reference_checkpoint(nets[name], state)
    own = model.state_dict()
    for key, value in state.items():
        key = key[len(prefix):]
        if key in own:
            assert torch.equal(own[key], value), key
        else:  # only the fixed all-ones filters have no tensor of their own
            assert key in {"conv_3.weight", "conv_3.bias", "conv_5.weight", "conv_5.bias"}, key
    assert own["resnet.layer4.2.bn3.running_var"].equal(state[prefix + "resnet.layer4.2.bn3.running_var"])


def test_wrong_key_is_named(nets) -> None:
    state = reference_state_dict("m2snet", with_fixed=False)
    state["x5_x4.0.weigth"] = state.pop("x5_x4.0.weight")
    with pytest.raises(M2SNetError) as err:
        load_reference_checkpoint(nets["m2snet"], state)
    assert "x5_x4.0.weigth" in str(err.value) and "x5_x4.0.weight" in str(err.value)


def test_wrong_shape_and_wrong_model_fail(nets) -> None:
    state = reference_state_dict("m2snet", with_fixed=False)
    state["level1.0.weight"] = torch.zeros(64, 32, 3, 3)
    with pytest.raises(M2SNetError, match=r"level1\.0\.weight \(64, 32, 3, 3\)"):
        load_reference_checkpoint(nets["m2snet"], state)
    # an M2SNet checkpoint does not fit MSNet: its conv_3 / conv_5 BatchNorms are unknown there
    with pytest.raises(M2SNetError, match=r"conv_3\.norm\.weight"):
        load_reference_checkpoint(nets["msnet"], reference_state_dict("m2snet", with_fixed=False))


def test_fixed_filter_values_are_checked(nets) -> None:
    state = reference_state_dict("m2snet", with_fixed=True)
    state["conv_5.weight"] = state["conv_5.weight"] * 2
    with pytest.raises(M2SNetError, match="conv_5.weight"):
        load_reference_checkpoint(nets["m2snet"], state)


def test_convert_reference_roundtrip(tmp_path) -> None:
    from m2snet.models.checkpoint import Checkpoint

    state = reference_state_dict("msnet", with_fixed=False, prefix="module.")
    src = tmp_path / "MSNet.pth"
    torch.save(state, src)
    out = convert_reference(src, tmp_path / "msnet.pt")  # model detected from the keys
    ckpt = Checkpoint.load(out)
    model = ckpt.build_model()
    assert ckpt.model_name == "msnet" and ckpt.n_classes == 1 and ckpt.train_config is None and not ckpt.resumable
    assert model.state_dict()["output2.1.running_mean"].equal(state["module.output2.1.running_mean"])
    with pytest.raises(M2SNetError, match=r"MSNet\.pth: does not fit .*missing keys .*conv_3\.norm"):
        convert_reference(src, tmp_path / "bad.pt", model="m2snet")
    assert not (tmp_path / "bad.pt").exists()
