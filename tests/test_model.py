"""The evaluation networks (SPEC section 4): sizes, forward contract, drop path."""
import pytest
import torch
import torch.nn as nn

from genotypes import DARTS_V2, PDARTS, AmoebaNet, Genotype, NASNet
from model import (
    Cell,
    NetworkCIFAR,
    NetworkImageNet,
    count_multiply_adds,
    count_parameters,
    drop_path,
    format_summary,
    model_summary,
)
from operations import Identity


@pytest.mark.parametrize("C,classes,auxiliary,expected,expected_aux", [
    (36, 10, True, 3_433_798, 3_910_224),
    (36, 100, False, 3_485_728, 3_485_728),
    (64, 10, False, 10_521_802, 10_521_802),
])
def test_cifar_parameter_counts(C, classes, auxiliary, expected, expected_aux):
    net = NetworkCIFAR(C, classes, 20, auxiliary, PDARTS)
    assert count_parameters(net) == expected
    assert count_parameters(net, include_auxiliary=True) == expected_aux


def test_cifar_aux_head_only_adds_its_own_parameters():
    with_aux = NetworkCIFAR(36, 10, 20, True, PDARTS)
    without = NetworkCIFAR(36, 10, 20, False, PDARTS)
    assert sum(p.numel() for p in without.parameters()) == 3_433_798
    assert sum(p.numel() for p in with_aux.parameters()) == 3_910_224


def test_darts_v2_cifar_size():
    assert round(count_parameters(NetworkCIFAR(36, 10, 20, False, DARTS_V2)) / 1e6, 2) == 3.35


def test_imagenet_parameter_count_and_multiply_adds():
    net = NetworkImageNet(48, 1000, 14, True, PDARTS)
    assert count_parameters(net) == 4_944_352
    assert count_parameters(net, include_auxiliary=True) == 6_206_664
    net.train()
    madds = count_multiply_adds(net, (1, 3, 224, 224))
    assert round(madds / 1e6, 1) == 542.8
    assert net.training  # mode restored
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed
    summary = model_summary(net, (1, 3, 224, 224))
    assert summary == {"params": 4_944_352, "params_with_aux": 6_206_664,
                       "multiply_adds": madds}
    assert "542.8M" in format_summary(summary)


def test_multiply_adds_of_a_tiny_conv_net():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 5))
    # conv: 8*4*4 outputs * 3*3*3 ; linear: 5 outputs * 128 inputs; per image.
    assert count_multiply_adds(net, (2, 3, 4, 4)) == 8 * 16 * 27 + 5 * 128


def test_cifar_forward_contract():
    torch.manual_seed(0)
    net = NetworkCIFAR(4, 10, 5, True, PDARTS)
    x = torch.randn(2, 3, 32, 32)
    net.train()
    logits, aux = net(x)
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    assert torch.isfinite(logits).all() and torch.isfinite(aux).all()
    (logits.sum() + aux.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    with torch.no_grad():
        logits, aux = net(x)
    assert logits.shape == (2, 10) and aux is None


def test_cifar_without_auxiliary_returns_none_in_training():
    net = NetworkCIFAR(4, 10, 5, False, PDARTS).train()
    logits, aux = net(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and aux is None
    assert not hasattr(net, "auxiliary_head")


def test_imagenet_forward_contract():
    torch.manual_seed(0)
    net = NetworkImageNet(8, 7, 3, True, PDARTS)
    x = torch.randn(2, 3, 224, 224)
    net.train()
    logits, aux = net(x)
    assert logits.shape == (2, 7) and aux.shape == (2, 7)
    net.eval()
    with torch.no_grad():
        logits, aux = net(x)
    assert logits.shape == (2, 7) and aux is None


def test_reduction_cells_and_strides():
    net = NetworkCIFAR(4, 10, 8, False, PDARTS)
    assert [c.reduction for c in net.cells] == [i in (2, 5) for i in range(8)]
    red = net.cells[2]
    for op, index in zip(red._ops, red._indices, strict=True):
        strides = [m.stride for m in op.modules()
                   if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
        # Ops reading the cell inputs are strided, ops reading intermediate nodes are not.
        assert any(s in (2, (2, 2)) for s in strides) == (index < 2)


@pytest.mark.parametrize("genotype", [NASNet, AmoebaNet], ids=["NASNet", "AmoebaNet"])
def test_other_papers_cells_build_and_run(genotype):
    torch.manual_seed(0)
    net = NetworkCIFAR(4, 10, 5, False, genotype)
    logits, _ = net(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    normal = net.cells[0]
    reduce = net.cells[1]
    assert reduce.reduction and not normal.reduction
    assert normal.multiplier == len(genotype.normal_concat)
    assert reduce.multiplier == len(genotype.reduce_concat)
    assert normal._steps == 5


# ---------------------------------------------------------------------------------------
# Drop path
# ---------------------------------------------------------------------------------------

def test_drop_path_masks_whole_samples_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(2000, 3, 2, 2)
    y = drop_path(x, 0.3)
    per_sample = y.flatten(1)
    kept = per_sample[:, 0] != 0
    # every sample is either all zeros or all 1 / (1 - p)
    assert torch.all(per_sample[~kept] == 0)
    assert torch.allclose(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.7))
    assert 0.25 < (~kept).float().mean().item() < 0.35
    assert torch.equal(x, torch.ones_like(x))  # input untouched


def test_drop_path_zero_is_a_no_op():
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(drop_path(x, 0.0), x)


def _all_skip_genotype():
    pairs = [("skip_connect", 0), ("skip_connect", 1)] * 4
    return Genotype(pairs, [2, 3, 4, 5], pairs, [2, 3, 4, 5])


def test_drop_path_skips_identity_ops():
    cell = Cell(_all_skip_genotype(), 4, 4, 4, reduction=False, reduction_prev=False).train()
    assert all(isinstance(op, Identity) for op in cell._ops)
    s0, s1 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.manual_seed(1)
        a = cell(s0, s1, 0.9)
        torch.manual_seed(2)
        b = cell(s0, s1, 0.9)
    assert torch.equal(a, b)


def test_drop_path_applies_to_other_ops():
    cell = Cell(PDARTS, 4, 4, 4, reduction=False, reduction_prev=False).train()
    s0, s1 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.manual_seed(1)
        a = cell(s0, s1, 0.5)
        torch.manual_seed(2)
        b = cell(s0, s1, 0.5)
        c = cell(s0, s1, 0.0)
        d = cell(s0, s1, 0.0)
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)


def test_drop_path_in_network_train_and_eval():
    torch.manual_seed(0)
    net = NetworkCIFAR(4, 10, 5, False, PDARTS)
    net.drop_path_prob = 0.5
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x)[0], net(x)[0])
        net.train()
        torch.manual_seed(1)
        a = net(x)[0]
        torch.manual_seed(2)
        b = net(x)[0]
        assert not torch.allclose(a, b)
        net.drop_path_prob = 0.0
        assert torch.equal(net(x)[0], net(x)[0])
