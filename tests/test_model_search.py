"""The search network (SPEC section 1 and the dropout part of section 2)."""
import pytest
import torch
import torch.nn as nn

from derivation import NUM_EDGES, all_on_switches, ops_on, prune_switches
from genotypes import PRIMITIVES
from model_search import MixedOp, Network, SkipDropout
from operations import DilConv, FactorizedReduce, Identity, SepConv, Zero


def _random_probs(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, cols, generator=g), dim=-1)


def stage_switches(ops_per_edge, seed=0):
    """Switches with 8, 5 or 3 ops per edge, pruned the way the search prunes them (random
    weights, so different edges keep different ops)."""
    sw = all_on_switches()
    if ops_per_edge <= 5:
        sw = prune_switches(sw, _random_probs(NUM_EDGES, 8, seed), 3)
    if ops_per_edge <= 3:
        sw = prune_switches(sw, _random_probs(NUM_EDGES, 5, seed + 1), 2)
    assert all(sum(r) == ops_per_edge for r in sw)
    return sw


def tiny_net(sw_normal=None, sw_reduce=None, **kw):
    sw_normal = sw_normal or all_on_switches()
    sw_reduce = sw_reduce or all_on_switches()
    # layers=3: cell 0 normal, cells 1 and 2 reduction, so both alpha matrices are used.
    return Network(4, 10, 3, sw_normal, sw_reduce, **kw)


def test_stage1_network_weight_count():
    net = Network(16, 10, 5, all_on_switches(), all_on_switches())
    assert sum(p.numel() for p in net.weight_parameters()) == 1_275_834
    assert net.alphas_normal.shape == (14, 8) and net.alphas_reduce.shape == (14, 8)


def test_reduction_positions_and_channels():
    net = Network(4, 10, 5, all_on_switches(), all_on_switches())
    assert [c.reduction for c in net.cells] == [False, True, False, True, False]
    assert net.classifier.in_features == 4 * 4 * 4  # multiplier * (C doubled twice)


def test_alphas_initialisation_scale():
    torch.manual_seed(0)
    net = Network(16, 10, 5, all_on_switches(), all_on_switches())
    for a in net.arch_parameters():
        assert 0 < a.detach().abs().max() < 0.01  # 1e-3 * N(0, 1)
        assert a.detach().std() == pytest.approx(1e-3, rel=0.5)


def _expected_type(k, stride):
    name = PRIMITIVES[k]
    if name == "none":
        return Zero
    if "pool" in name:
        return nn.Sequential
    if name == "skip_connect":
        return nn.Sequential if stride == 1 else FactorizedReduce
    if name.startswith("sep_conv"):
        return SepConv
    return DilConv


@pytest.mark.parametrize("n_ops", [8, 5, 3])
def test_mixed_ops_hold_exactly_the_switched_on_ops(n_ops):
    sw_normal = stage_switches(n_ops, seed=1)
    sw_reduce = stage_switches(n_ops, seed=7)
    if n_ops < 8:
        assert len({tuple(r) for r in sw_normal}) > 1  # edges differ
        assert sw_normal != sw_reduce
    net = tiny_net(sw_normal, sw_reduce, batched=False)   # the release's per-edge modules
    assert net.alphas_normal.shape == (14, n_ops)
    assert net.alphas_reduce.shape == (14, n_ops)
    for cell in net.cells:
        switches = sw_reduce if cell.reduction else sw_normal
        assert len(cell.cell_ops) == 14
        edge = 0
        for i in range(4):
            for j in range(2 + i):
                mixed = cell.cell_ops[edge]
                stride = 2 if cell.reduction and j < 2 else 1
                assert mixed.op_indices == ops_on(switches[edge])
                assert len(mixed.m_ops) == n_ops
                for k, op in zip(mixed.op_indices, mixed.m_ops, strict=True):
                    assert type(op) is _expected_type(k, stride), (edge, PRIMITIVES[k])
                edge += 1
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_network_rejects_ragged_switches():
    sw = all_on_switches()
    sw[3][0] = False  # one edge with 7 ops, the rest 8
    with pytest.raises(ValueError):
        tiny_net(sw, all_on_switches())
    with pytest.raises(ValueError):
        tiny_net(all_on_switches()[:13], all_on_switches())


def test_mixed_op_is_weighted_sum():
    torch.manual_seed(0)
    switch = [False, True, False, True, True, False, False, False]  # max_pool, skip, sep_conv_3x3
    mixed = MixedOp(4, 1, switch)
    x = torch.randn(2, 4, 8, 8)
    w = torch.tensor([0.2, 0.5, 0.3])
    expected = sum(wk * op(x) for wk, op in zip(w, mixed.m_ops, strict=True))
    assert torch.allclose(mixed(x, w), expected, atol=1e-6)


def test_mixed_op_with_only_none_gives_zeros():
    mixed = MixedOp(4, 2, [True] + [False] * 7)
    y = mixed(torch.randn(2, 4, 8, 8), torch.ones(1))
    assert y.shape == (2, 4, 4, 4) and torch.count_nonzero(y) == 0


def test_gradients_reach_every_weight_and_both_alphas():
    torch.manual_seed(0)
    net = tiny_net(stage_switches(5, 3), stage_switches(5, 4))
    net.train()
    logits = net(torch.randn(2, 3, 8, 8))
    nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for a in net.arch_parameters():
        assert a.grad.abs().sum() > 0


def test_arch_and_weight_parameters_partition_all_parameters():
    net = tiny_net()
    arch = {id(p) for p in net.arch_parameters()}
    weights = [id(p) for p in net.weight_parameters()]
    assert len(arch) == 2
    assert arch.isdisjoint(weights)
    assert len(weights) == len(set(weights))
    assert arch | set(weights) == {id(p) for p in net.parameters()}
    assert {id(net.alphas_normal), id(net.alphas_reduce)} == arch


def test_arch_probs_are_softmax_of_alphas():
    net = tiny_net(stage_switches(3), stage_switches(3, 5))
    with torch.no_grad():
        net.alphas_normal.copy_(torch.randn(14, 3))
    pn, pr = net.arch_probs()
    assert pn.shape == (14, 3) and pr.shape == (14, 3)
    assert torch.allclose(pn, torch.softmax(net.alphas_normal.detach(), -1))
    assert torch.allclose(pr.sum(-1), torch.ones(14))


def _skip_dropouts(net):
    return [m for m in net.modules() if isinstance(m, SkipDropout)]


def test_dropout_follows_every_stride1_skip_and_no_stride2_skip():
    net = tiny_net(batched=False)
    # cell 0 normal: 14 stride-1 edges; cells 1 and 2 reduction: 14 - 8 = 6 stride-1 edges.
    assert len(_skip_dropouts(net)) == 14 + 6 + 6
    for cell in net.cells:
        for e, mixed in enumerate(cell.cell_ops):
            skip = mixed.m_ops[mixed.op_indices.index(3)]
            strided = cell.reduction and e in (0, 1, 2, 3, 5, 6, 9, 10)
            if strided:
                assert isinstance(skip, FactorizedReduce)
                assert not any(isinstance(m, SkipDropout) for m in skip.modules())
            else:
                assert isinstance(skip[0], Identity) and isinstance(skip[1], SkipDropout)


def test_set_drop_rate_changes_dropout_without_rebuild():
    torch.manual_seed(0)
    # Only skip_connect and sep_conv_3x3 on, so the skips matter.
    sw = [[k in (3, 4) for k in range(8)] for _ in range(14)]
    net = tiny_net(sw, sw, drop_rate=0.0)
    dropouts = _skip_dropouts(net)
    # Batched: one per level whose skips are stride 1 (4 in the normal cell, 3 in each
    # reduction cell, whose level 0 skips are FactorizedReduce).
    assert len(dropouts) == 4 + 3 + 3
    x = torch.randn(2, 3, 8, 8)
    net.train()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))  # rate 0: deterministic in train mode
        net.set_drop_rate(0.9)
        assert _skip_dropouts(net) == dropouts  # the same modules, not rebuilt
        assert all(d.p == 0.9 for d in dropouts)
        a, b = net(x), net(x)
        assert not torch.allclose(a, b)
        net.eval()
        assert torch.equal(net(x), net(x))  # dropout is off in eval mode
        net.train()
        net.set_drop_rate(0.0)
        assert all(d.p == 0.0 for d in dropouts)
        assert torch.equal(net(x), net(x))


def test_drop_rate_given_at_construction():
    net = tiny_net(drop_rate=0.3)
    assert all(d.p == 0.3 for d in _skip_dropouts(net))


@pytest.mark.parametrize("n_ops", [8, 3])
def test_skip_zero_changes_nothing(n_ops):
    sw_n, sw_r = stage_switches(n_ops, 11), stage_switches(n_ops, 12)
    if n_ops == 3:  # make sure `none` is still on somewhere
        sw_n[0] = [True, False, False, True, True, False, False, False]
    nets = []
    for skip_zero in (True, False):
        torch.manual_seed(123)
        nets.append(tiny_net(sw_n, sw_r, skip_zero=skip_zero, batched=False))
    fast, full = nets
    for (na, pa), (nb, pb) in zip(fast.named_parameters(), full.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    with torch.no_grad():
        for net in nets:  # give `none` a large weight so skipping it would show if wrong
            net.alphas_normal[:, 0] += 2.0
            net.alphas_reduce[:, 0] += 2.0
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([3, 4])
    outs = []
    for net in nets:
        net.train()
        out = net(x)
        nn.functional.cross_entropy(out, target).backward()
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(fast.alphas_normal.grad, full.alphas_normal.grad, atol=1e-7)
    assert torch.allclose(fast.alphas_reduce.grad, full.alphas_reduce.grad, atol=1e-7)
    assert fast.alphas_normal.grad.abs().sum() > 0


def test_skip_dropout_matches_nn_dropout_in_distribution():
    torch.manual_seed(0)
    drop = SkipDropout(0.4).train()
    y = drop(torch.ones(20000))
    zero = y == 0
    assert 0.38 < zero.float().mean().item() < 0.42
    assert torch.allclose(y[~zero], torch.full_like(y[~zero], 1 / 0.6))
    drop.p = 0.0
    x = torch.randn(5)
    assert torch.equal(drop(x), x) and drop.rate.item() == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop.p = 1.0


@pytest.mark.parametrize("n_ops", [8, 5, 3])
def test_batched_network_has_the_release_state_dict_and_initial_weights(n_ops):
    """Same seed, same switches: the batched network's state dict has the plain (release)
    network's keys, in its order, shapes and values; it loads back in either network."""
    sw_n, sw_r = stage_switches(n_ops, 21), stage_switches(n_ops, 22)
    nets = []
    for batched in (False, True):
        torch.manual_seed(5)
        nets.append(tiny_net(sw_n, sw_r, batched=batched))
    plain, fast = nets
    sp, sf = plain.state_dict(), fast.state_dict()
    assert list(sp) == list(sf)
    assert "cells.0.cell_ops.13.m_ops.4.op.1.weight" in sf or n_ops < 8   # sep_conv_3x3
    for name in sp:
        assert torch.equal(sp[name], sf[name]), name
    # Stored stacked: fewer parameter tensors, the same number of weights.
    assert len(list(fast.parameters())) < len(list(plain.parameters()))
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in plain.parameters())
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p))
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8)
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_batched_network_batch_norm_statistics_and_counters_match_the_plain_network():
    """The batched cell's batch norms (StackedBatchNorm) leave their counters to the cell:
    after training forwards, and after the buffers get new tensors (as .to(device) gives
    them), every running statistic and every num_batches_tracked equals the plain
    network's; eval forwards count nothing."""
    sw_n, sw_r = stage_switches(5, 23), stage_switches(5, 24)
    nets = []
    for batched in (False, True):
        torch.manual_seed(6)
        nets.append(tiny_net(sw_n, sw_r, batched=batched))
    plain, fast = nets
    fast._apply(lambda t: t.clone())   # new tensors for every buffer, as .cuda() makes
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        plain(x), fast(x)
    plain.eval(), fast.eval()
    plain(x), fast(x)
    sp, sf = plain.state_dict(), fast.state_dict()
    counters = [k for k in sp if k.endswith("num_batches_tracked")]
    assert len(counters) > 20 and all(sp[k].item() == 3 for k in counters)
    for name in counters + [k for k in sp if k.endswith(("running_mean", "running_var"))]:
        torch.testing.assert_close(sf[name], sp[name], rtol=1e-5, atol=1e-6, msg=name)


def test_batched_network_load_reports_wrong_shapes_and_missing_keys():
    net = tiny_net()
    state = net.state_dict()
    key = "cells.0.cell_ops.4.m_ops.5.op.2.weight"
    bad = dict(state, **{key: torch.zeros(3, 3, 1, 1)})
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        net.load_state_dict(bad)
    del state["cells.1.cell_ops.0.m_ops.3.conv_1.weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict(state)
