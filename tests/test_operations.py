"""The candidate operations (SPEC section 1): shapes, structure, BN affinity, devices."""
import os
import re

import pytest
import torch
import torch.nn as nn

from genotypes import EXTRA_PRIMITIVES, KNOWN_OPS, PRIMITIVES
from model_search import MixedOp
from operations import OPS, DilConv, FactorizedReduce, Identity, ReLUConvBN, SepConv, Zero

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 4


def test_ops_table_covers_search_space_and_extras():
    assert PRIMITIVES == ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                          "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    assert EXTRA_PRIMITIVES == ["sep_conv_7x7", "conv_7x1_1x7"]
    assert set(OPS) == set(KNOWN_OPS)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_output_shape_and_values(name, stride, affine):
    torch.manual_seed(0)
    op = OPS[name](C, stride, affine)
    x = torch.randn(2, C, 8, 8, requires_grad=True)
    y = op(x)
    side = 8 // stride
    assert y.shape == (2, C, side, side)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if name == "none":
        assert torch.count_nonzero(y) == 0
    if name == "skip_connect" and stride == 1:
        assert torch.equal(y, x)
    bns = [m for m in op.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        assert bn.affine is affine
        if affine:
            assert bn.weight is not None and bn.bias is not None
        else:
            assert bn.weight is None and bn.bias is None
    # Convs in cells never have a bias.
    for m in op.modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is None


def test_op_classes():
    assert isinstance(OPS["none"](C, 1, True), Zero)
    assert isinstance(OPS["skip_connect"](C, 1, True), Identity)
    assert isinstance(OPS["skip_connect"](C, 2, True), FactorizedReduce)
    assert isinstance(OPS["max_pool_3x3"](C, 1, True), nn.MaxPool2d)
    assert isinstance(OPS["avg_pool_3x3"](C, 1, True), nn.AvgPool2d)
    for name in ("sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7"):
        assert isinstance(OPS[name](C, 1, True), SepConv)
    for name in ("dil_conv_3x3", "dil_conv_5x5"):
        assert isinstance(OPS[name](C, 1, True), DilConv)


def _convs(op):
    return [m for m in op.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name,k,pad", [("sep_conv_3x3", 3, 1), ("sep_conv_5x5", 5, 2),
                                        ("sep_conv_7x7", 7, 3)])
def test_sep_conv_structure(name, k, pad):
    op = OPS[name](C, 2, True)
    convs = _convs(op)
    assert len(convs) == 4
    dw1, pw1, dw2, pw2 = convs
    for dw in (dw1, dw2):
        assert dw.kernel_size == (k, k) and dw.groups == C and dw.padding == (pad, pad)
    for pw in (pw1, pw2):
        assert pw.kernel_size == (1, 1) and pw.stride == (1, 1)
    # Only the first depthwise conv is strided.
    assert dw1.stride == (2, 2) and dw2.stride == (1, 1)
    assert sum(isinstance(m, nn.ReLU) for m in op.modules()) == 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in op.modules()) == 2


@pytest.mark.parametrize("name,k,pad", [("dil_conv_3x3", 3, 2), ("dil_conv_5x5", 5, 4)])
def test_dil_conv_structure(name, k, pad):
    op = OPS[name](C, 2, True)
    dw, pw = _convs(op)
    assert dw.kernel_size == (k, k) and dw.dilation == (2, 2) and dw.padding == (pad, pad)
    assert dw.groups == C and dw.stride == (2, 2)
    assert pw.kernel_size == (1, 1)
    assert isinstance(op.op[0], nn.ReLU) and isinstance(op.op[-1], nn.BatchNorm2d)


def test_conv_7x1_1x7_structure():
    op = OPS["conv_7x1_1x7"](C, 2, True)
    a, b = _convs(op)
    assert a.kernel_size == (1, 7) and b.kernel_size == (7, 1)
    assert isinstance(op[0], nn.ReLU) and isinstance(op[-1], nn.BatchNorm2d)


def test_avg_pool_does_not_count_padding():
    y = OPS["avg_pool_3x3"](1, 1, True)(torch.ones(1, 1, 4, 4))
    # With padding counted, the corner would average to 4/9.
    assert torch.allclose(y, torch.ones_like(y))


def test_max_pool_values():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = OPS["max_pool_3x3"](1, 2, True)(x)
    assert y.flatten().tolist() == [5.0, 7.0, 13.0, 15.0]


def test_zero_strided_shape():
    y = Zero(2)(torch.randn(2, 3, 7, 7))
    assert y.shape == (2, 3, 4, 4) and torch.count_nonzero(y) == 0


def test_factorized_reduce_shifts_second_branch():
    fr = FactorizedReduce(1, 2, affine=False).eval()
    with torch.no_grad():
        fr.conv_1.weight.fill_(1.0)
        fr.conv_2.weight.fill_(1.0)
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)  # positive: the ReLU changes nothing
    y = fr(x) * (1 + fr.bn.eps) ** 0.5  # undo the eval-mode BN (mean 0, var 1)
    assert torch.allclose(y[0, 0], x[0, 0, ::2, ::2])
    assert torch.allclose(y[0, 1], x[0, 0, 1::2, 1::2])


def test_factorized_reduce_needs_even_channels():
    with pytest.raises(ValueError):
        FactorizedReduce(4, 3)


def test_relu_conv_bn_structure():
    op = ReLUConvBN(6, 4, 1, 1, 0, affine=False)
    relu, conv, bn = op.op
    assert isinstance(relu, nn.ReLU) and conv.bias is None and bn.affine is False
    assert op(torch.randn(2, 6, 5, 5)).shape == (2, 4, 5, 5)


@pytest.mark.parametrize("stride", [1, 2])
def test_search_mixed_op_uses_non_affine_bn_after_pooling(stride):
    mixed = MixedOp(C, stride, [True] * len(PRIMITIVES))
    for k, op in zip(mixed.op_indices, mixed.m_ops, strict=True):
        name = PRIMITIVES[k]
        if "pool" in name:
            assert isinstance(op, nn.Sequential) and len(op) == 2
            assert isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d))
            assert isinstance(op[1], nn.BatchNorm2d) and op[1].affine is False
            assert op[1].num_features == C
    bns = [m for m in mixed.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) >= 2
    assert all(bn.affine is False and bn.weight is None for bn in bns)
    assert mixed(torch.randn(2, C, 8, 8), torch.full((8,), 1 / 8)).shape == (2, C, 8 // stride,
                                                                             8 // stride)


def _source_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in (
            "__pycache__", "venv", "data", "node_modules")]
        for f in filenames:
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def test_no_hard_coded_cuda_tensor_types():
    pattern = re.compile(r"torch\.cuda\.\w*Tensor")
    files = list(_source_files())
    assert any(f.endswith("operations.py") for f in files)
    offenders = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if pattern.search(line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_run_on_cuda(name):
    dev = torch.device("cuda")
    for stride in (1, 2):
        for affine in (True, False):
            op = OPS[name](C, stride, affine).to(dev)
            x = torch.randn(2, C, 8, 8, device=dev, requires_grad=True)
            y = op(x)
            assert y.device.type == "cuda"
            assert y.shape == (2, C, 8 // stride, 8 // stride)
            assert torch.isfinite(y).all()
            y.float().sum().backward()
            assert x.grad is not None and x.grad.device.type == "cuda"
    mixed = MixedOp(C, 2, [True] * len(PRIMITIVES)).to(dev)
    w = torch.softmax(torch.randn(len(PRIMITIVES), device=dev), 0)
    assert mixed(torch.randn(2, C, 8, 8, device=dev), w).shape == (2, C, 4, 4)
