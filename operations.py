"""Candidate operations of the P-DARTS search space (SPEC section 1).

``OPS[name](C, stride, affine)`` builds an operation with C channels in and out.
The search network builds its ops with ``affine=False``; the evaluation networks with
``affine=True``. Every op is device-agnostic.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "OPS",
    "ReLUConvBN",
    "DilConv",
    "SepConv",
    "Identity",
    "Zero",
    "FactorizedReduce",
]


def _after_first(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers`` without its first module (the ReLU) on ``x``."""
    rest = iter(layers)
    next(rest)
    for layer in rest:
        x = layer(x)
    return x


class ReLUConvBN(nn.Module):
    """ReLU, conv (no bias), BN."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = True) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU, dilated depthwise conv, pointwise conv, BN.

    ``stack`` > 1 runs the op of that many edges at once on their inputs stacked on
    channels (the batched search cell): the depthwise conv is grouped per channel, the
    pointwise conv per edge, BN is per channel anyway; parameter ``i`` of edge ``e`` is
    rows ``e*C..(e+1)*C`` of the stacked one. ``relu=False`` leaves the first ReLU to the
    caller, which shares it between ops (an ``nn.Identity`` keeps the module indices)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 dilation: int, affine: bool = True, stack: int = 1, relu: bool = True) -> None:
        super().__init__()
        C_in, C_out = stack * C_in, stack * C_out
        self.op = nn.Sequential(
            nn.ReLU(inplace=False) if relu else nn.Identity(),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, groups=stack, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def after_relu(self, x: torch.Tensor) -> torch.Tensor:
        """The op on an input its first ReLU has already been applied to (the per-edge
        search cell computes that ReLU once for every op reading the same input)."""
        return _after_first(self.op, x)


class SepConv(nn.Module):
    """Two stacked (ReLU, depthwise conv, pointwise conv, BN); only the first is strided.
    ``stack`` and ``relu`` as in ``DilConv``."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int,
                 affine: bool = True, stack: int = 1, relu: bool = True) -> None:
        super().__init__()
        C_in, C_out = stack * C_in, stack * C_out
        self.op = nn.Sequential(
            nn.ReLU(inplace=False) if relu else nn.Identity(),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, groups=C_in,
                      bias=False),
            nn.Conv2d(C_in, C_in, 1, groups=stack, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=1, padding=padding, groups=C_in,
                      bias=False),
            nn.Conv2d(C_in, C_out, 1, groups=stack, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def after_relu(self, x: torch.Tensor) -> torch.Tensor:
        """As ``DilConv.after_relu``."""
        return _after_first(self.op, x)


class Identity(nn.Module):
    """The stride-1 ``skip_connect``. A class of its own so cells can recognise it
    (drop path skips it, the search network puts skip-connect dropout after it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The ``none`` op: zeros of the output shape (spatially strided when stride 2)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


# oneDNN, behind PyTorch's CPU convolutions, computes the weight gradient of a 1x1 stride-2
# convolution on a channels_last input with fewer input channels per group than its
# channel block (16 with AVX-512, 8 with AVX2) through a workspace it overruns (the
# "reduce to unit stride" path; uxlfoundation/oneDNN#6035, open). With torch 2.14.1 on
# this project's AVX-512 CPU that crashed the process (segmentation fault) from 48x48 inputs
# with 4, 8 or 12 channels, and the report measured wrong gradients with AVX2. Sixteen
# channels and more, NCHW and CUDA take other paths.
_ONEDNN_CHANNEL_BLOCK = 16


def _rtus_bug(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``conv`` (1x1, stride 2) on ``x`` would take oneDNN's faulty path."""
    return (x.device.type == "cpu" and x.dim() == 4
            and conv.in_channels // conv.groups < _ONEDNN_CHANNEL_BLOCK
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convs, the second on the input shifted
    by one pixel, concatenated on channels. ``stack`` and ``relu`` as in ``DilConv``
    (stacked: each edge's output is its own two halves, side by side)."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True, stack: int = 1,
                 relu: bool = True) -> None:
        super().__init__()
        if C_out % 2 != 0:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.stack = stack
        self.relu = nn.ReLU(inplace=False) if relu else nn.Identity()
        self.conv_1 = nn.Conv2d(stack * C_in, stack * C_out // 2, 1, stride=2, padding=0,
                                groups=stack, bias=False)
        self.conv_2 = nn.Conv2d(stack * C_in, stack * C_out // 2, 1, stride=2, padding=0,
                                groups=stack, bias=False)
        self.bn = nn.BatchNorm2d(stack * C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_relu(self.relu(x))

    def after_relu(self, x: torch.Tensor) -> torch.Tensor:
        """The op on an input its first ReLU has already been applied to (the per-edge
        search cell computes that ReLU once for every op reading the same input)."""
        # For odd sizes the shifted branch would be one pixel smaller; pad it back so
        # both branches agree (never happens at the paper's 32/224 input sizes).
        if _rtus_bug(x, self.conv_1):
            # The same 1x1 convolutions at stride 1 on every other pixel: the same products
            # and sums, without oneDNN's strided 1x1 path (see _rtus_bug).
            a = F.conv2d(x[:, :, ::2, ::2], self.conv_1.weight, groups=self.stack)
            b = F.conv2d(x[:, :, 1::2, 1::2], self.conv_2.weight, groups=self.stack)
        else:
            a = self.conv_1(x)
            b = self.conv_2(x[:, :, 1:, 1:])
        if b.shape[-2:] != a.shape[-2:]:
            b = nn.functional.pad(b, (0, a.shape[-1] - b.shape[-1], 0, a.shape[-2] - b.shape[-2]))
        if self.stack == 1:
            return self.bn(torch.cat([a, b], dim=1))
        halves = [t.unflatten(1, (self.stack, -1)) for t in (a, b)]   # (N, edges, C/2, H, W)
        return self.bn(torch.cat(halves, dim=2).flatten(1, 2))


def _conv_7x1_1x7(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        nn.BatchNorm2d(C, affine=affine),
    )


OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(
        3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: (
        Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
    "conv_7x1_1x7": _conv_7x1_1x7,
}
