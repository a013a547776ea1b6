"""The fast MSU filter equals the dense all-ones convolution it replaces (outputs, BN running
statistics, gradients), in train and eval mode, and the whole M2SNet agrees in both forms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m2snet.models import create_model
from m2snet.models.units import MultiScaleSubtraction, OnesFilterBN


class DenseOnesReference(nn.Module):
    """The reference's F_k written out independently: a real all-ones Conv2d, BatchNorm2d, ReLU."""

    def __init__(self, k: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, k, padding=k // 2)
        nn.init.ones_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.conv.requires_grad_(False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x)))


def _randomise_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    # Per-channel affine and running stats that differ by channel: the broadcast must respect them.
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 10)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 50 + 1)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("train", [True, False])
def test_fast_filter_equals_dense_conv(k: int, train: bool) -> None:
    gen = torch.Generator().manual_seed(k)
    channels = 8
    ref = DenseOnesReference(k, channels)
    _randomise_bn(ref.norm, gen)
    outs = {}
    for impl in ("fast", "dense"):
        f = OnesFilterBN(k, channels, impl=impl)
        f.norm.load_state_dict(ref.norm.state_dict())
        outs[impl] = f
    ref.train(train)
    for f in outs.values():
        f.train(train)

    x = torch.randn(3, channels, 9, 11, generator=gen)
    upstream = torch.randn(3, channels, 9, 11, generator=gen)  # a non-uniform dL/dy
    results = {}
    for name, module in {"reference": ref, **outs}.items():
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        (y * upstream).sum().backward()
        results[name] = (y.detach(), xi.grad, module.norm.weight.grad, module.norm.bias.grad,
                         module.norm.running_mean.clone(), module.norm.running_var.clone())
    names = ("output", "input grad", "BN weight grad", "BN bias grad", "running_mean", "running_var")
    for impl in ("fast", "dense"):
        for name, got, want in zip(names, results[impl], results["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{impl} {name} (train={train})")
    # the output is NOT the same in every channel (per-channel affine after the broadcast)
    assert not torch.allclose(results["fast"][0][:, 0], results["fast"][0][:, 1])
    if train:  # running stats really moved, in the same way
        assert not torch.allclose(results["fast"][4], ref.norm.running_mean.new_zeros(channels))


@pytest.mark.parametrize("train", [True, False])
def test_multiscale_subtraction_batches_filters_exactly(train: bool) -> None:
    """The MSU's joint computation (both filters, both inputs in one batch of kernels) equals
    calling F3 and F5 on a then on b: outputs, gradients and the order of running-stat updates."""
    gen = torch.Generator().manual_seed(3)
    joint = [OnesFilterBN(3, 4), OnesFilterBN(5, 4)]
    for f in joint:
        _randomise_bn(f.norm, gen)
        f.train(train)
    single = copy.deepcopy(joint)
    a0, b0 = torch.randn(2, 4, 6, 7, generator=gen), torch.randn(2, 4, 6, 7, generator=gen)
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    d = MultiScaleSubtraction(joint)(a, b)
    d.square().sum().backward()
    a2, b2 = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    want = (a2 - b2).abs() + sum((f(a2) - f(b2)).abs() for f in single)
    want.square().sum().backward()
    torch.testing.assert_close(d, want)
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    for fj, fs in zip(joint, single):
        torch.testing.assert_close(fj.norm.weight.grad, fs.norm.weight.grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(fj.norm, name), getattr(fs.norm, name))
    with torch.no_grad():  # the in-place inference path (train mode: batch stats, same output)
        torch.testing.assert_close(MultiScaleSubtraction(joint)(a0, b0), want.detach())
    assert (d >= (a0 - b0).abs() - 1e-6).all()


def test_fixed_filter_checkpoint_keys_validated() -> None:
    f = OnesFilterBN(3, 4)
    state = {**f.state_dict(), "weight": torch.ones(4, 4, 3, 3), "bias": torch.zeros(4)}
    f.load_state_dict(state)  # the reference's fixed tensors are accepted when they are fixed
    state["weight"] = torch.full((4, 4, 3, 3), 2.0)
    with pytest.raises(RuntimeError, match="weight: the fixed filter must be all 1"):
        f.load_state_dict(state)


@pytest.mark.parametrize("msu_norm", ["shared", "per_site"])
@pytest.mark.parametrize("train", [True, False])
def test_m2snet_fast_equals_dense(train: bool, msu_norm: str) -> None:
    """The whole network: fast float32 against the dense form run in float64 (shared and per-site
    filter statistics; per site, every site's running statistics are compared).

    float64 is the referee because the dense float32 form is itself the less exact one (its box
    sums add 64 x k x k large terms). How far float32 lands from float64 depends on the CPU's
    kernels, so the dense float32 form is run too and sets the bar: the fast form must be within a
    fixed tolerance of float64 or no further than 1.5x the dense float32 form's distance. Measured
    (train mode, input gradients, relative to their scale): AVX-512 fast 5e-6, dense32 4e-3;
    AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) fast 1.4e-3, dense32 3.5e-3.
    """
    torch.manual_seed(0)
    fast = create_model("m2snet", pretrained=False, msu_impl="fast", msu_norm=msu_norm)
    dense = create_model("m2snet", pretrained=False, msu_impl="dense", msu_norm=msu_norm)
    x = torch.randn(2, 3, 64, 64)
    if not train:
        # Calibrate the running statistics first (momentum None = plain average of the batches),
        # otherwise a random network's eval outputs reach 1e10 and only relative checks mean much.
        for m in fast.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        with torch.no_grad():
            fast.train()(x)
    dense.load_state_dict(fast.state_dict())
    # the dense form also holds the fixed all-ones filters (as fixed parameters), nothing else
    assert set(dense.state_dict()) - set(fast.state_dict()) == {
        "conv_3.weight", "conv_3.bias", "conv_5.weight", "conv_5.bias"}
    fast.load_state_dict(dense.state_dict())  # and the two load each other's checkpoints
    dense32 = copy.deepcopy(dense)
    dense.double()
    fast.train(train), dense.train(train), dense32.train(train)
    results = []
    for model in (fast, dense, dense32):
        xi = x.clone().to(next(model.parameters()).dtype).requires_grad_(True)
        y = model(xi)
        y.square().mean().backward()
        stats = ((model.conv_5.site_running_var, model.conv_3.site_running_mean) if msu_norm == "per_site"
                 else (model.conv_5.norm.running_var, model.conv_3.norm.running_mean))
        results.append([t.float() for t in (y.detach(), xi.grad, model.conv_3.norm.weight.grad,
                                            model.conv_5.norm.bias.grad, *stats)])
    names = ("output", "input grad", "conv_3 BN weight grad", "conv_5 BN bias grad",
             "conv_5 running_var", "conv_3 running_mean")
    if msu_norm == "per_site":  # [20 sites, 64]: every site has its own row, and they differ
        assert results[0][-1].shape == (20, 64)
        assert results[0][-1][:, 0].unique().numel() > 10
    for name, got, want, dense_float32 in zip(names, *results):
        # measured on AVX-512: <= 6e-6 of the tensor's scale in train mode, 1.2e-4 for eval input
        # grads; the per-site eval BN grads are small sums with cancellation, 1.06e-3 off float64 in
        # float32, where the dense float32 form is just as far (1.06e-3): float32's limit
        floor = 3e-3 if "BN" in name else 5e-4
        scale = want.abs().amax(dim=-1, keepdim=True) if want.dim() == 2 else want.abs().max()  # per site
        fast_error = ((got - want) / scale).abs().max().item()
        dense_float32_error = ((dense_float32 - want) / scale).abs().max().item()
        assert fast_error <= max(floor, 1.5 * dense_float32_error), (
            f"{name}: fast float32 is {fast_error:.2e} off float64 (relative to scale), "
            f"dense float32 {dense_float32_error:.2e}, floor {floor:.0e}")
    if not train:  # inference without autograd takes the in-place path: same numbers
        with torch.no_grad():
            torch.testing.assert_close(fast(x), results[0][0], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_m2snet_fast_equals_dense_cuda() -> None:
    """On CUDA, a training step: fast float32 (TF32 off) against dense float64, and under
    bfloat16 autocast the fast form no further from float64 than the dense form is."""
    torch.manual_seed(0)
    fast = create_model("m2snet", pretrained=False, msu_impl="fast").cuda()
    dense = create_model("m2snet", pretrained=False, msu_impl="dense").cuda()
    dense.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 128, 128, device="cuda")

    def step(model: nn.Module, dtype: torch.dtype, amp: bool) -> list[torch.Tensor]:
        model = copy.deepcopy(model).to(dtype)
        xi = x.to(dtype).requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            y = model(xi)
        y.float().square().mean().backward()
        return [t.double() for t in (y.detach(), xi.grad, model.conv_5.norm.weight.grad)]

    def rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
        return [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]

    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref = step(dense, torch.float64, amp=False)
        fast32 = rel(step(fast, torch.float32, amp=False), ref)
        fast16 = rel(step(fast, torch.float32, amp=True), ref)
        dense16 = rel(step(dense, torch.float32, amp=True), ref)
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    # cuDNN's float32 algorithms (shared encoder) dominate here: 7e-6 (output), 1.3e-3 (input
    # grad), 8e-4 (BN grad) were measured on an H200
    assert max(fast32) < 5e-3, fast32
    assert all(f <= 2 * d + 1e-3 for f, d in zip(fast16, dense16)), (fast16, dense16)


# --- msu_norm="per_site": one running statistic per call site, the same shared affine ----------
@pytest.mark.parametrize("impl", ["fast", "dense"])
@pytest.mark.parametrize("train", [True, False])
def test_per_site_filter_equals_one_batchnorm_per_site(impl: str, train: bool) -> None:
    """A per-site filter called at sites 0..S-1 equals S independent reference filters (all-ones
    conv + its own BatchNorm2d) whose affine weight and bias are one shared tensor: outputs, input
    gradients, the shared affine's gradient (summed over sites), and each site's running stats."""
    gen = torch.Generator().manual_seed(11)
    channels, sites, k = 6, 4, 3
    refs = [DenseOnesReference(k, channels) for _ in range(sites)]
    for ref in refs:
        _randomise_bn(ref.norm, gen)  # per-site running statistics differ
    weight = nn.Parameter(torch.rand(channels, generator=gen) + 0.5)
    bias = nn.Parameter(torch.randn(channels, generator=gen))
    for ref in refs:  # one shared affine, as the per-site filter has
        ref.norm.weight, ref.norm.bias = weight, bias
        ref.train(train)
    f = OnesFilterBN(k, channels, impl=impl, norm="per_site", sites=sites)
    with torch.no_grad():
        f.norm.weight.copy_(weight)
        f.norm.bias.copy_(bias)
        for i, ref in enumerate(refs):
            f.site_running_mean[i] = ref.norm.running_mean
            f.site_running_var[i] = ref.norm.running_var
    f.train(train)
    xs = [torch.randn(2, channels, 7, 9, generator=gen) * (i + 1) for i in range(sites)]  # scales differ
    ups = [torch.randn(2, channels, 7, 9, generator=gen) for _ in range(sites)]

    def run(call):
        grads, outs = [], []
        loss = 0
        for i, (x, up) in enumerate(zip(xs, ups)):
            xi = x.clone().requires_grad_(True)
            y = call(i, xi)
            loss = loss + (y * up).sum()
            outs.append(y.detach())
            grads.append(xi)
        loss.backward()
        return outs, [g.grad for g in grads]

    want_out, want_grad = run(lambda i, x: refs[i](x))
    got_out, got_grad = run(lambda i, x: f(x, site=i))
    for i in range(sites):
        torch.testing.assert_close(got_out[i], want_out[i], rtol=1e-4, atol=1e-4, msg=f"output site {i}")
        torch.testing.assert_close(got_grad[i], want_grad[i], rtol=1e-4, atol=1e-4, msg=f"input grad site {i}")
        torch.testing.assert_close(f.site_running_mean[i], refs[i].norm.running_mean, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(f.site_running_var[i], refs[i].norm.running_var, rtol=1e-5, atol=1e-4)
        assert int(f.site_num_batches_tracked[i]) == int(refs[i].norm.num_batches_tracked)
    torch.testing.assert_close(f.norm.weight.grad, weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.norm.bias.grad, bias.grad, rtol=1e-4, atol=1e-4)
    # the shared statistics are not used per site, and stay as they were
    assert f.norm.running_mean.eq(0).all() and int(f.norm.num_batches_tracked) == 0
    if not train:  # eval really reads a different row per site
        assert not torch.allclose(f.site_running_mean[0], f.site_running_mean[1])
    with pytest.raises(ValueError, match="site index"):
        f(xs[0])


@pytest.mark.parametrize("train", [True, False])
def test_multiscale_subtraction_per_site_batches_exactly(train: bool) -> None:
    """Per site, the joint fast MSU (rows 2u and 2u+1 in one step) equals calling the per-site
    filters on a at site 2u then on b at site 2u+1, and the dense MSU: outputs, gradients and each
    site's running statistics; other units' rows are untouched."""
    gen = torch.Generator().manual_seed(5)
    sites, unit = 6, 1

    def filters(impl: str) -> list[OnesFilterBN]:
        return [OnesFilterBN(k, 4, impl=impl, norm="per_site", sites=sites) for k in (3, 5)]

    joint, single, dense = filters("fast"), filters("fast"), filters("dense")
    for fj, fs, fd in zip(joint, single, dense):
        _randomise_bn(fj.norm, gen)
        with torch.no_grad():
            fj.site_running_mean.normal_(generator=gen).mul_(10)
            fj.site_running_var.uniform_(1, 50, generator=gen)
        fs.load_state_dict(fj.state_dict())
        fd.load_state_dict(fj.state_dict())
        for f in (fj, fs, fd):
            f.train(train)
    before = copy.deepcopy(joint)
    a0, b0 = torch.randn(2, 4, 6, 7, generator=gen) * 3, torch.randn(2, 4, 6, 7, generator=gen)
    results = []
    for kind, fs_ in (("joint", joint), ("single", single), ("dense", dense)):
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        if kind == "single":
            d = (a - b).abs() + sum((f(a, 2 * unit) - f(b, 2 * unit + 1)).abs() for f in fs_)
        else:
            d = MultiScaleSubtraction(fs_, unit=unit)(a, b)
        d.square().sum().backward()
        results.append((d.detach(), a.grad, b.grad, fs_[0].norm.weight.grad, fs_[1].norm.bias.grad))
    for other in results[1:]:
        for got, want in zip(results[0], other):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    rows = [2 * unit, 2 * unit + 1]
    untouched = [s for s in range(sites) if s not in rows]
    for fj, fs, fd, fb in zip(joint, single, dense, before):
        for name in ("site_running_mean", "site_running_var", "site_num_batches_tracked"):
            for f in (fs, fd):
                torch.testing.assert_close(getattr(fj, name), getattr(f, name), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(getattr(fj, name)[untouched], getattr(fb, name)[untouched])
            if train:
                assert not torch.equal(getattr(fj, name)[rows], getattr(fb, name)[rows]), name
    with torch.no_grad():  # the in-place inference path gives the same numbers
        torch.testing.assert_close(MultiScaleSubtraction(copy.deepcopy(before), unit=unit)(a0, b0),
                                   results[0][0])


def test_the_fast_msu_trains_after_an_inference_mode_forward_in_the_same_process():
    """The fast unit caches its box kernels per shape: built first under inference_mode (an evaluation), they
    must still serve a training step later (it failed with 'Inference tensors cannot be saved for backward')."""
    from m2snet.models import units
    from m2snet.models.units import OnesFilterBN, ones_filter_differences

    units._BOX_CACHE.clear()
    filters = [OnesFilterBN(k, 4, "fast", "shared") for k in (3, 5)]
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        ones_filter_differences(filters, a, b)
    x = a.clone().requires_grad_(True)
    ones_filter_differences(filters, x, b).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
