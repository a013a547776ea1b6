"""Structure loss, LossNet and TotalLoss: known values on tiny tensors, gradients, frozen VGG."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m2snet.training.losses import LossNet, TotalLoss, boundary_weight, multiclass_structure_loss, structure_loss


def test_structure_loss_known_values() -> None:
    # logits 0 -> p = 0.5 and bce = ln 2 in every pixel, whatever the weights.
    logits = torch.zeros(1, 1, 4, 4)
    empty = torch.zeros(1, 1, 4, 4)
    # empty mask: w = 1; wIoU = 1 - 1 / (16 * 0.5 + 1)
    assert structure_loss(logits, empty).item() == pytest.approx(math.log(2) + 1 - 1 / 9, rel=1e-6)
    # one lesion pixel in a 3x3 image: the 31x31 window (zero padded) averages to 1/961 everywhere
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 1, 1] = 1
    w_c, w_o = 1 + 5 * (1 - 1 / 961), 1 + 5 / 961
    torch.testing.assert_close(boundary_weight(mask)[0, 0, 1, 1], torch.tensor(w_c))
    inter = w_c * 0.5
    union = (w_c + 8 * w_o) * 0.5 + w_c
    expected = math.log(2) + 1 - (inter + 1) / (union - inter + 1)
    assert structure_loss(torch.zeros(1, 1, 3, 3), mask).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_differs_from_reference_bug() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16) * 3
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 5:12] = 1
    fixed, bug = structure_loss(logits, mask), structure_loss(logits, mask, weighted_bce=False)
    assert not torch.isclose(fixed, bug)
    # the bug: the reference's wBCE is the plain BCE mean (its weights cancel out)
    weight = boundary_weight(mask)
    p = torch.sigmoid(logits)
    inter = (weight * p * mask).sum(dim=(2, 3))
    union = (weight * (p + mask)).sum(dim=(2, 3))
    wiou = (1 - (inter + 1) / (union - inter + 1)).mean()
    torch.testing.assert_close(bug, F.binary_cross_entropy_with_logits(logits, mask) + wiou)


def test_two_class_loss_is_the_binary_loss() -> None:
    torch.manual_seed(0)
    logit = torch.randn(2, 1, 20, 20)
    target = (torch.rand(2, 20, 20) > 0.7).long()
    two = torch.cat([torch.zeros_like(logit), logit], dim=1)
    torch.testing.assert_close(multiclass_structure_loss(two, target),
                               structure_loss(logit, target.unsqueeze(1).float()))


@pytest.fixture(scope="module")
def lossnet_loss():
    return TotalLoss(n_classes=1, lossnet_size=64)  # offline in tests: random VGG, source None


def test_total_loss_keys_gradients_and_frozen_vgg(lossnet_loss) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    lossnet_loss.train()
    out = lossnet_loss(logits, mask)
    assert set(out) == {"loss", "structure", "lossnet"}
    torch.testing.assert_close(out["loss"], out["structure"] + 0.1 * out["lossnet"])
    assert out["lossnet"] > 0
    out["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    vgg = lossnet_loss.lossnet.features
    assert all(not p.requires_grad and p.grad is None for p in vgg.parameters())
    assert not vgg.training  # frozen network stays in eval mode under .train()
    assert lossnet_loss.pretrained_source is None


def test_lossnet_gradient_alone_reaches_prediction(lossnet_loss) -> None:
    pred = torch.full((1, 1, 16, 16), 0.3, requires_grad=True)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    value = lossnet_loss.lossnet(pred, mask)
    value.backward()
    assert value > 0 and pred.grad.abs().sum() > 0
    assert lossnet_loss.lossnet(mask, mask).item() == pytest.approx(0.0, abs=1e-8)


def test_no_lossnet_builds_no_vgg() -> None:
    loss = TotalLoss(lossnet_weight=0)
    assert loss.lossnet is None and not list(loss.parameters())
    out = loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    assert out["lossnet"].item() == 0 and out["loss"] == out["structure"]


@pytest.mark.parametrize("lossnet_on", ["per_class", "foreground"])
def test_multiclass_total_loss(lossnet_on: str) -> None:
    torch.manual_seed(0)
    loss = TotalLoss(n_classes=3, lossnet_on=lossnet_on, lossnet_size=64)
    logits = torch.randn(2, 3, 24, 24, requires_grad=True)
    target = torch.randint(0, 3, (2, 24, 24))
    out = loss(logits, target)
    out["loss"].backward()
    assert out["lossnet"] > 0 and torch.isfinite(out["loss"])
    assert logits.grad[:, 0].abs().sum() > 0 and logits.grad[:, 2].abs().sum() > 0
    with pytest.raises(ValueError, match="channels"):
        loss(torch.randn(2, 1, 24, 24), target)


def test_lossnet_loads_vgg_file(tmp_path) -> None:
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"])  # the whole torchvision VGG-16 features block
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a classifier in the file is dropped
    torch.save(state, tmp_path / "vgg16.pth")
    net = LossNet(pretrained=str(tmp_path / "vgg16.pth"))
    assert net.pretrained_source.startswith("file:")
    torch.testing.assert_close(net.features[21].weight, features[21].weight)
