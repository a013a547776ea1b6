"""Building blocks of the M2SNet family: CBR, the fixed all-ones filters, and the fusion units.

A fusion unit combines a deeper map A (bilinearly upsampled to B's size) with a shallower map B
and passes the result through its own CBR:  U(A, B) = CBR(combine(up(A), B)).
The ``combine`` operation is what distinguishes the family:

==================  ======================================================  ================
unit                combine(a, b)                                           model name
==================  ======================================================  ================
SU                  |a - b|                                                 ``msnet``
MSU                 |a - b| + |F3(a) - F3(b)| + |F5(a) - F5(b)|             ``m2snet``
AU                  a + b                                                   ``m2snet_au``
ASPP-MSU            |a - b| + sum_r |B_r(a) - B_r(b)|, parallel dilated     ``m2snet_aspp``
DenseASPP-MSU       |a - b| + sum_r |D_r(a) - D_r(b)|, densely chained      ``m2snet_denseaspp``
==================  ======================================================  ================
"""

from __future__ import annotations

import logging
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("m2snet.models")

MSUImpl = Literal["fast", "dense"]
MSUNorm = Literal["shared", "per_site"]
MSU_NORMS = ("shared", "per_site")
# Buffers of a per-site filter; a checkpoint without them (the reference's, or a shared model's) is
# loaded by copying the shared statistics to every site (see OnesFilterBN._load_from_state_dict).
SITE_BUFFERS = ("site_running_mean", "site_running_var", "site_num_batches_tracked", "site_stats_from_shared")


def upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to ``ref``'s spatial size (no-op when it already matches)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """conv3x3 (with bias, as the reference) -> BatchNorm -> ReLU; keys ``.0.*`` and ``.1.*``."""

    def __init__(self, in_channels: int, out_channels: int = 64, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class OnesFilterBN(nn.Module):
    """F_k(X) = ReLU(BN(conv2d(X, ones[C, C, k, k], bias 0, padding k // 2))), the MSU's fixed filter.

    The reference registers one ``conv_3`` and one ``conv_5`` in the whole network; their
    BatchNorm (``norm``, key ``conv_k.norm.*``) is the only trainable part.

    ``impl="dense"`` runs the convolution as written (C*C*k*k MACs a pixel). ``impl="fast"`` uses
    the fact that an all-ones kernel gives every output channel the same map s = boxsum_k(sum_c X):
    it computes s once on ONE channel (C + k*k MACs a pixel). A BatchNorm over C identical channels
    sees the same batch statistics in every channel, so they are computed once from s; the
    per-channel affine (and per-channel running statistics, which may differ after loading a
    checkpoint) then broadcast s to C channels in one fused multiply-add. Outputs, running
    statistics and gradients equal the dense form to float rounding (tests/test_msu.py).

    ``norm="shared"`` is the reference: one running mean / variance for every call, although the
    20 calls of a forward pass (10 units x 2 inputs) see box sums whose scale differs by pyramid
    level, so in eval mode each call is normalised with a statistic of the others' mixture.
    ``norm="per_site"`` keeps the shared affine weight and bias (same parameters, same training
    in train mode, same reference keys) but holds one running mean / variance per call site in
    ``site_running_mean`` / ``site_running_var`` [sites, C]: a call passes its ``site`` (row) and
    reads and updates only that row; ``norm.running_*`` are then unused and left as loaded.
    """

    def __init__(self, kernel_size: int, channels: int = 64, impl: MSUImpl = "fast",
                 norm: MSUNorm = "shared", sites: int = 0, momentum: float | None = 0.1) -> None:
        super().__init__()
        if impl not in ("fast", "dense"):
            raise ValueError(f"msu_impl must be 'fast' or 'dense', got {impl!r}")
        if norm not in MSU_NORMS:
            raise ValueError(f"msu_norm must be 'shared' or 'per_site', got {norm!r}")
        if norm == "per_site" and sites < 1:
            raise ValueError(f"msu_norm='per_site' needs the number of call sites, got sites={sites}")
        self.kernel_size, self.channels, self.impl = kernel_size, channels, impl
        self.norm_mode, self.sites = norm, sites if norm == "per_site" else 0
        # ``momentum``: BatchNorm2d's (0.1; None = cumulative average); it drives the per-site rows too.
        self.norm = nn.BatchNorm2d(channels, momentum=momentum)
        if impl == "dense":
            # Fixed (requires_grad=False) parameters, as the reference's CPU checkpoints hold them:
            # they count as the reference's 0.14 M "fixed" parameters (29.88 M in all).
            self.weight = nn.Parameter(torch.ones(channels, channels, kernel_size, kernel_size),
                                       requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False)
        else:
            # The 1-channel box kernel is a real conv2d so that FlopCounterMode sees the fast cost.
            self.register_buffer("box", torch.ones(1, 1, kernel_size, kernel_size), persistent=False)
        if self.per_site:
            self.register_buffer("site_running_mean", torch.zeros(sites, channels))
            self.register_buffer("site_running_var", torch.ones(sites, channels))
            self.register_buffer("site_num_batches_tracked", torch.zeros(sites, dtype=torch.long))
            # True while the site rows are copies of a shared statistic (a reference checkpoint was
            # loaded): eval outputs are then the reference's until recalibrate_bn estimates them.
            self.register_buffer("site_stats_from_shared", torch.tensor(False))

    @property
    def per_site(self) -> bool:
        return self.norm_mode == "per_site"

    def reset_running_stats(self) -> None:
        """Reset the shared and the per-site running statistics (BatchNorm2d's reset, per row)."""
        self.norm.reset_running_stats()
        if self.per_site:
            self.site_running_mean.zero_()
            self.site_running_var.fill_(1)
            self.site_num_batches_tracked.zero_()
            self.site_stats_from_shared.fill_(False)

    def extra_repr(self) -> str:
        sites = f", norm='per_site', sites={self.sites}" if self.per_site else ""
        return f"kernel_size={self.kernel_size}, channels={self.channels}, impl={self.impl!r}{sites}"

    # The fixed tensors conv_k.weight / conv_k.bias may or may not be in a checkpoint (reference:
    # plain tensors on GPU, parameters on CPU; ours: only in the dense form). Either way is
    # accepted, but only with the fixed values; they are never loaded, since they never change.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name, fill in (("weight", 1.0), ("bias", 0.0)):
            value = state_dict.pop(prefix + name, None)
            if value is None:
                continue
            if value.shape[0] != self.channels:
                error_msgs.append(f"{prefix}{name}: shape {tuple(value.shape)} does not fit "
                                  f"{self.channels} channels")
            elif not torch.all(value == fill):
                error_msgs.append(f"{prefix}{name}: the fixed filter must be all {fill:g}, got other values")
        if self.per_site and prefix + "site_running_mean" not in state_dict:
            self._sites_from_shared(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name in ("weight", "bias"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def _sites_from_shared(self, state_dict, prefix: str) -> None:
        # A checkpoint without per-site statistics (the reference's, or msu_norm="shared"): every
        # site starts from the shared statistic, so eval outputs equal the shared model's; flagged
        # so that recalibration (m2snet.training.bn_recalibration) is known to be due.
        shared = {name: state_dict.get(f"{prefix}norm.{name}")
                  for name in ("running_mean", "running_var", "num_batches_tracked")}
        if shared["running_mean"] is None or shared["running_var"] is None:
            return  # nothing to copy: the missing keys are reported as such
        rows = (self.sites, self.channels)
        state_dict[prefix + "site_running_mean"] = shared["running_mean"].expand(rows).clone()
        state_dict[prefix + "site_running_var"] = shared["running_var"].expand(rows).clone()
        count = shared["num_batches_tracked"]
        state_dict[prefix + "site_num_batches_tracked"] = (
            count.expand(self.sites).clone() if count is not None else torch.zeros(self.sites, dtype=torch.long))
        state_dict[prefix + "site_stats_from_shared"] = torch.tensor(True)
        log.warning("%snorm: no per-site statistics in the checkpoint; copied the shared running "
                    "statistics to all %d sites (eval outputs as with msu_norm='shared'); "
                    "`m2snet recalibrate-bn` estimates them per site", prefix, self.sites)

    def forward(self, x: torch.Tensor, site: int | None = None) -> torch.Tensor:
        """F_k(x); ``site``: the call site's row of the per-site statistics (per_site only)."""
        if self.impl == "dense":
            y = F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2)
            return F.relu(self._dense_norm(y, site), inplace=True)
        s = F.conv2d(x.sum(dim=1, keepdim=True), self.box.to(x.dtype), padding=self.kernel_size // 2)
        mean, var = self.statistics(s.unsqueeze(0), dims=(1, 2, 3, 4), site=site)  # one group: [1]
        scale, shift = self.affine(mean, var)  # [1, C]
        c = self.channels
        return F.relu(torch.addcmul(shift.view(1, c, 1, 1).to(s.dtype), s,
                                    scale.view(1, c, 1, 1).to(s.dtype)), inplace=True)

    # The fast form's BatchNorm, split in two so that several inputs (groups) and several filters
    # can share kernels (see ones_filter_differences).
    def _dense_norm(self, y: torch.Tensor, site: int | None) -> torch.Tensor:
        """The dense form's BatchNorm: ``self.norm``, or per site the same affine on one row."""
        if not self.per_site:
            return self.norm(y)
        bn, row = self.norm, self._rows(site, 1)
        momentum, track = 0.0, bn.track_running_stats
        if bn.training and track:
            count = self.site_num_batches_tracked[row]
            count.add_(1)
            momentum = 1.0 / float(count) if bn.momentum is None else bn.momentum
        # F.batch_norm updates the row views in place, i.e. the site's rows of the buffers.
        mean, var = (self.site_running_mean[row][0], self.site_running_var[row][0]) if track else (None, None)
        return F.batch_norm(y, mean, var, bn.weight, bn.bias, bn.training or not track, momentum, bn.eps)

    def _rows(self, site: int | None, groups: int) -> slice:
        if site is None:
            raise ValueError("msu_norm='per_site': the filter must be called with its site index")
        if not 0 <= site <= self.sites - groups:
            raise ValueError(f"site {site} (+{groups - 1}) out of range for {self.sites} sites")
        return slice(site, site + groups)

    def statistics(self, s: torch.Tensor, dims: tuple[int, ...],
                   site: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) the BatchNorm normalises with, for each group along ``s``'s dim 0.

        Training: the batch statistics of each group (BatchNorm2d over C identical channels has
        these in every channel), and the running statistics updated once per group, in group
        order, exactly as separate BatchNorm2d calls would. Eval: the running statistics [C].
        Statistics are in float32 even under autocast: box sums are large and their variance
        overflows float16 (BatchNorm2d also keeps its statistics in float32).

        Per site, group g is site ``site + g``: training updates rows site.. of the per-site
        statistics in one step (distinct rows, so order does not matter); eval returns those rows
        [groups, C]: an indexed view, no extra compute.
        """
        bn = self.norm
        rows = self._rows(site, s.shape[0]) if self.per_site else None
        if not bn.training and bn.track_running_stats:
            if rows is not None:
                return self.site_running_mean[rows], self.site_running_var[rows]
            return bn.running_mean, bn.running_var
        var, mean = torch.var_mean(s.float(), dim=dims, unbiased=False)  # [groups]
        if bn.training and bn.track_running_stats:
            n = s[0].numel()
            if rows is not None:
                self._update_site_stats(rows, mean, var, n)
            else:
                for g in range(s.shape[0]):
                    self._update_running_stats(mean[g], var[g], n)
        return mean.unsqueeze(-1), var.unsqueeze(-1)  # [groups, 1]

    def affine(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BN(s) = s * scale + shift per channel; mean / var [groups, 1] or [C] -> [groups | 1, C]."""
        bn = self.norm
        scale = torch.rsqrt(var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
            shift = bn.bias - mean * scale
        else:
            shift = -mean * scale
        c = self.channels
        if scale.dim() == 1:  # per-channel (running statistics): one row for every group
            return scale.view(1, c), shift.view(1, c)
        return scale.expand(-1, c), shift.expand(-1, c)

    @torch.no_grad()
    def _update_site_stats(self, rows: slice, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        # BatchNorm2d's update, on each site's row (its own count for momentum=None averaging).
        bn = self.norm
        count = self.site_num_batches_tracked[rows]
        count.add_(1)
        unbiased = var * (n / max(n - 1, 1))
        for buf, value in ((self.site_running_mean, mean), (self.site_running_var, unbiased)):
            row = buf[rows]
            weight = (1.0 / count.to(buf.dtype)).unsqueeze(-1) if bn.momentum is None else bn.momentum
            row.lerp_(value.to(buf.dtype).unsqueeze(-1).expand_as(row), weight)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        # Same update as BatchNorm2d: running var uses the unbiased batch variance.
        bn = self.norm
        bn.num_batches_tracked.add_(1)
        momentum = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
        unbiased = var * (n / max(n - 1, 1))
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype).expand_as(bn.running_mean), momentum)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype).expand_as(bn.running_var), momentum)


_BOX_CACHE: dict[tuple, torch.Tensor] = {}  # constant kernels, built once per device and dtype


def _stacked_box(sizes: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """[len(sizes), 1, kmax, kmax]: each k x k box of ones centred in a kmax x kmax kernel."""
    key, cache = (sizes, like.device, like.dtype), _BOX_CACHE
    if key not in cache:
        kmax = max(sizes)
        # A normal tensor even when first built under inference_mode (an evaluation before training in one
        # process): an inference tensor would make every later training step fail in backward.
        with torch.inference_mode(False):
            box = torch.zeros(len(sizes), 1, kmax, kmax, dtype=like.dtype)
            for i, k in enumerate(sizes):
                lo = (kmax - k) // 2
                box[i, :, lo:lo + k, lo:lo + k] = 1
            cache[key] = box.to(like.device)
    return cache[key]


def ones_filter_differences(filters: Sequence[OnesFilterBN], a: torch.Tensor,
                            b: torch.Tensor, site: int | None = None) -> torch.Tensor:
    """sum_k |F_k(a) - F_k(b)| for fast-form filters, all filters and both inputs at once.

    Equal to calling each filter on a then on b (same outputs, running-statistics updates in
    the same order), but in a handful of kernels instead of a dozen per filter call: on a GPU
    these small elementwise launches, not arithmetic, are the MSU's cost. Shapes inside:
    s [2 inputs, B, K filters, H, W] -> y [2, B, K, C, H, W] -> sum over K of |y_a - y_b|.
    ``site``: per-site filters use rows ``site`` (for a) and ``site + 1`` (for b).
    """
    batch, channels, height, width = b.shape
    sums = torch.cat([a.sum(dim=1, keepdim=True), b.sum(dim=1, keepdim=True)])  # [2B, 1, H, W]
    # One conv for every box size (FlopCounterMode counts it: the fast form's real cost).
    box = _stacked_box(tuple(f.kernel_size for f in filters), sums)
    # reshape, not view: under channels_last the conv output may not be contiguous
    s = F.conv2d(sums, box, padding=box.shape[-1] // 2).reshape(2, batch, len(filters), height, width)
    scales, shifts = [], []
    for i, f in enumerate(filters):
        mean, var = f.statistics(s[:, :, i], dims=(1, 2, 3), site=site)
        scale, shift = f.affine(mean, var)  # [2 | 1, C]
        scales.append(scale.expand(2, channels))
        shifts.append(shift.expand(2, channels))
    shape = (2, 1, len(filters), channels, 1, 1)
    scale = torch.stack(scales, dim=1).view(shape).to(s.dtype)
    shift = torch.stack(shifts, dim=1).view(shape).to(s.dtype)
    y = torch.addcmul(shift, s.unsqueeze(3), scale).relu_()  # [2, B, K, C, H, W]
    if torch.is_grad_enabled() and y.requires_grad:
        return torch.abs(y[0] - y[1]).sum(dim=1)
    return torch.sub(y[0], y[1], out=y[1]).abs_().sum(dim=1)


# ---- combine operations ------------------------------------------------------------------------
# Parameter-free ones are plain callables: the shared F3/F5 they use are registered once on the
# network (reference keys ``conv_3.*`` / ``conv_5.*``), not under every unit.

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def subtraction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SU: the absolute difference."""
    return torch.abs(a - b)


def addition(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AU (Tab. 7 ablation): element-wise addition in place of subtraction."""
    return a + b


class MultiScaleSubtraction:
    """MSU: |a - b| + sum_k |F_k(a) - F_k(b)| with the network's shared fixed filters F_k.

    ``unit``: this unit's index in the pyramid; its two inputs are the call sites ``2 * unit``
    (a, the deeper map) and ``2 * unit + 1`` (b) of per-site filters (ignored by shared ones).
    """

    def __init__(self, filters: Sequence[nn.Module], unit: int | None = None) -> None:
        self.filters = tuple(filters)
        self.site = None if unit is None else 2 * unit

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        site = self.site
        if all(f.impl == "fast" for f in self.filters):
            return torch.abs(a - b) + ones_filter_differences(self.filters, a, b, site)
        d = torch.abs(a - b)
        for f in self.filters:  # dense: the reference's computation, filter by filter
            d = d + torch.abs(f(a, site) - f(b, None if site is None else site + 1))
        return d


class ASPPSubtraction(nn.Module):
    """Tab. 8 / Fig. 7 "M2SNet (ASPP)": the MSU's fixed all-ones filters replaced by ASPP branches.

    Our reading of Fig. 7: each unit gets its own ASPP (parallel 3x3 conv-BN-ReLU branches at
    dilation rates 1, 6, 12, 18, learnable, shared between the two inputs of the unit like F_k
    is), and the unit sums the pixel difference and the per-branch differences. With ten units
    this adds 10 x 4 x 37 k = 1.48 M parameters, in line with the paper's +1.5 M (29.2 vs 27.7 M).
    """

    def __init__(self, channels: int = 64, rates: Sequence[int] = (1, 6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(ConvBNReLU(channels, channels, dilation=r) for r in rates)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = torch.abs(a - b)
        for branch in self.branches:
            d = d + torch.abs(branch(a) - branch(b))
        return d


class DenseASPPSubtraction(nn.Module):
    """Tab. 8 / Fig. 7 "M2SNet (DenseASPP)": DenseASPP branches instead of the fixed filters.

    Our reading of Fig. 7: each unit gets its own DenseASPP (dilation rates 3, 6, 12; branch i sees
    the concatenation of the input and the outputs of branches < i, as in DenseASPP), applied to
    both inputs with shared weights; the unit sums the pixel difference and the per-branch
    differences. Ten units add 10 x (64+128+192) x 64 x 9 = 2.2 M parameters (paper: +1.9 M).
    """

    def __init__(self, channels: int = 64, rates: Sequence[int] = (3, 6, 12)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            ConvBNReLU(channels * (i + 1), channels, dilation=r) for i, r in enumerate(rates))

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, outs = [x], []
        for branch in self.branches:
            y = branch(torch.cat(feats, dim=1))
            feats.append(y)
            outs.append(y)
        return outs

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = torch.abs(a - b)
        for fa, fb in zip(self._features(a), self._features(b)):
            d = d + torch.abs(fa - fb)
        return d


class FusionUnit(ConvBNReLU):
    """U(A, B) = CBR(combine(up(A), B)): one unit of the pyramid.

    Subclassing the CBR keeps the reference keys (``x5_x4.0.weight``, ``x5_x4.1.running_mean``).
    A ``combine`` with its own parameters (ASPP variants) is registered under ``.combine``; a
    parameter-free one (SU, AU, MSU with shared filters) is kept as a plain attribute.
    """

    def __init__(self, combine: Combine, channels: int = 64) -> None:
        super().__init__(channels, channels)
        self.combine = combine

    def forward(self, deeper: torch.Tensor,  # type: ignore[override]
                shallower: torch.Tensor) -> torch.Tensor:
        x = self.combine(upsample_to(deeper, shallower), shallower)
        return self[2](self[1](self[0](x)))
