"""The default (fast) paths compute what the plain paths compute: same losses, weights
and optimizer state after N steps from the same seed. The equivalence proofs run in
float64 and compare at 1e-10: the two paths sum in different orders, and in float32 a
few steps from a sensitive state can amplify that rounding to 1e-3 relative (measured:
batched vs plain after 3 steps of a 17-cell stage-3 network, 1.7e-3 in float32, 4.1e-15
in float64), which would hide or fake a difference.

The three equivalence tests take the ``test_device`` fixture: on the CPU by default,
on CUDA with PDARTS_TEST_DEVICE=cuda (benchmarks/gpu_check.py runs them so)."""
import pytest
import torch
import torch.nn as nn
from helpers import optimizer_state, random_stage_switches, search_optimizers
from reference import reference_search_step, reference_train_step

from engine import train_step
from genotypes import PDARTS
from model import NetworkCIFAR

TOL = dict(rtol=1e-10, atol=1e-12)   # float64 equivalence


def _cifar_net():
    torch.manual_seed(0)
    net = NetworkCIFAR(8, 10, 5, True, PDARTS).double()
    net.drop_path_prob = 0.2
    return net


def test_train_step_default_equals_plain(test_device):
    nets = [_cifar_net().to(test_device), _cifar_net().to(test_device)]
    opts = [torch.optim.SGD(nets[0].parameters(), 0.05, momentum=0.9, weight_decay=3e-4, foreach=False),
            torch.optim.SGD(nets[1].parameters(), 0.05, momentum=0.9, weight_decay=3e-4, foreach=True)]
    g = torch.Generator().manual_seed(1)
    criterion = nn.CrossEntropyLoss()
    for step in range(4):
        x = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64).to(test_device)
        y = torch.randint(0, 10, (6,), generator=g).to(test_device)
        torch.manual_seed(100 + step)  # the same drop-path masks on both paths
        plain = reference_train_step(nets[0], x, y, opts[0], criterion, 0.4, 0.5)
        torch.manual_seed(100 + step)
        fast, logits = train_step(nets[1], x, y, opts[1], criterion, 0.4, 0.5)
        assert fast.dtype == logits.dtype == torch.float64    # no float32 rounding on the way
        assert fast.item() == pytest.approx(plain, rel=1e-10)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, **TOL, msg=name)


def _compiled_steps(net, model_input, set_rate, rates):
    """Compile ``net`` (dynamo only, no code generation: fast on CPU), run a training
    forward/backward at each rate, and fail if any rate change recompiles."""
    import torch._dynamo as dynamo

    dynamo.reset()
    compiled = torch.compile(net, backend="eager")
    set_rate(rates[0])
    out = compiled(model_input)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    with dynamo.config.patch(error_on_recompile=True):
        for rate in rates[1:]:
            set_rate(rate)
            out = compiled(model_input)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
    dynamo.reset()


def test_changing_skip_dropout_rate_does_not_recompile():
    from model_search import Network

    # One cell with skip_connect and sep_conv_3x3 on every edge: quick to trace.
    sw = [[k in (3, 4) for k in range(8)] for _ in range(14)]
    net = Network(4, 10, 1, sw, sw).train()
    _compiled_steps(net, torch.randn(2, 3, 8, 8), net.set_drop_rate, [0.4, 0.3, 0.1])


def test_changing_drop_path_prob_does_not_recompile():
    net = NetworkCIFAR(4, 10, 3, False, PDARTS).train()

    def set_rate(p):
        net.drop_path_prob = p

    _compiled_steps(net, torch.randn(2, 3, 8, 8), set_rate, [0.1, 0.2, 0.3])
    assert net.drop_path_prob == 0.3


def _search_pair(n_ops, drop_rate=0.3, dtype=torch.float32):
    """The plain and the default (batched) network as train_search.py builds them."""
    from model_search import Network

    # Stage-like switches: the first n_ops ops of PRIMITIVES (`none` included) on every edge.
    sw = [[k < n_ops for k in range(8)] for _ in range(14)]
    nets = []
    for batched in (False, True):     # plain computes `none` edge by edge
        torch.manual_seed(0)
        nets.append(Network(4, 10, 3, sw, sw, drop_rate=drop_rate, skip_zero=batched,
                            batched=batched).to(dtype))
    return nets


@pytest.mark.parametrize("n_ops,none", [(8, "all"), (5, "some"), (5, "off"), (3, "all"),
                                        (3, "some"), (3, "off")])
def test_batched_search_step_equals_plain(n_ops, none, test_device):
    """The batched network with search_step (the default path) against the release's
    per-edge cells with reference_search_step (the plain path), from one state dict:
    losses, alphas, weights, BN running statistics and optimizer state agree over
    warm-up and full steps. 5 cells: normal, reduction, normal after a reduction,
    reduction, normal; normal and reduction cells with different random switches."""
    from model_search import Network
    from train_search import search_step

    sw_n = random_stage_switches(n_ops, 1, "all" if n_ops == 8 else none)
    sw_r = random_stage_switches(n_ops, 2, "all" if n_ops == 8 else none)
    # In float64: with BN over 4 images of 2x2 pixels in the last cells, float32
    # rounding (the two paths sum in different orders) can grow past 1e-5 within a few
    # steps for some initial weights; float64 leaves only the maths to compare.
    torch.manual_seed(0)
    plain = Network(4, 10, 5, sw_n, sw_r, skip_zero=False, batched=False).double()
    fast = Network(4, 10, 5, sw_n, sw_r).double()
    with torch.no_grad():
        for a in plain.arch_parameters():    # unequal weights, `none` included
            a.normal_(0, 0.5)
    fast.load_state_dict(plain.state_dict())
    plain.to(test_device)
    fast.to(test_device)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    (pw, pa), (fw, fa) = search_optimizers(plain, False), search_optimizers(fast, True)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x_w, x_a = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).to(test_device)
                    for _ in range(2))
        y_w, y_a = (torch.randint(0, 10, (4,), generator=g).to(test_device) for _ in range(2))
        update_arch = step > 0      # a weight-only (warm-up) step, then full steps
        loss_w, loss_a = reference_search_step(plain, (x_w, y_w), (x_a, y_a), pw, pa, 0.5, update_arch)
        _, fast_w, fast_a = search_step(fast, (x_w, y_w), (x_a, y_a), fw, fa, 0.5, update_arch)
        assert fast_w.dtype == torch.float64
        assert fast_w.item() == pytest.approx(loss_w, rel=1e-10)
        assert (fast_a is None) == (loss_a is None)
        if update_arch:
            assert fast_a.item() == pytest.approx(loss_a, rel=1e-10)
    plain_state, fast_state = plain.state_dict(), fast.state_dict()
    assert list(plain_state) == list(fast_state)
    assert any("running_mean" in k for k in plain_state) and "alphas_reduce" in plain_state
    for name, a in plain_state.items():
        torch.testing.assert_close(fast_state[name], a, **TOL, msg=name)
    for name in ("alphas_normal", "alphas_reduce", "cells.4.cell_ops.13.m_ops.4.op.1.weight"
                 if n_ops == 8 else "classifier.weight"):   # the steps moved them
        assert not torch.equal(plain_state[name], before[name]), name
    for opt_p, opt_f, net_p, net_f in ((pw, fw, plain, fast), (pa, fa, plain, fast)):
        sp, sf = optimizer_state(net_p, opt_p), optimizer_state(net_f, opt_f)
        assert sp.keys() == sf.keys()
        for key in sp:
            assert sp[key].keys() == sf[key].keys(), key
            for name in sp[key]:
                torch.testing.assert_close(sf[key][name], sp[key][name], **TOL, msg=f"{key} {name}")


def test_batched_skip_dropout_drops_each_element_and_rescales():
    """In the batched cell the skips of a level share one dropout over their stacked
    inputs: each element of each edge is dropped with probability p (independently per
    edge) and the rest scaled by 1/(1-p), as nn.Dropout does edge by edge."""
    from model_search import EdgeGroup, GroupLayout

    p = 0.4
    group = EdgeGroup(GroupLayout(3, (4, 7, 11), (0, 0, 0), (0, 0, 0)), 8, 1, p, 1).train()
    y = group(torch.ones(50, 8, 10, 10), None)
    assert y.shape == (50, 24, 10, 10)
    zero = y == 0
    assert 0.38 < zero.float().mean().item() < 0.42
    torch.testing.assert_close(y[~zero], torch.full_like(y[~zero], 1 / (1 - p)))
    edges = zero.unflatten(1, (3, 8)).float()
    for e in range(3):   # every edge at the right rate, with its own masks
        assert 0.38 < edges[:, e].mean().item() < 0.42
    assert (edges[:, 0] != edges[:, 1]).float().mean() > 0.4
    assert torch.equal(group.eval()(torch.ones(2, 8, 3, 3), None), torch.ones(2, 24, 3, 3))


@pytest.mark.parametrize("n_ops", [8, 5])
def test_search_step_default_equals_plain(n_ops, test_device):
    """The first-n-ops stage patterns, skip dropout 0 (its masks are drawn differently)."""
    from train_search import search_step

    plain, fast = (net.to(test_device)
                   for net in _search_pair(n_ops, drop_rate=0.0, dtype=torch.float64))
    (pw, pa), (fw, fa) = search_optimizers(plain, False), search_optimizers(fast, True)
    alphas_before = fast.alphas_normal.detach().clone()
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x_w, x_a = (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64).to(test_device)
                    for _ in range(2))
        y_w, y_a = (torch.randint(0, 10, (6,), generator=g).to(test_device) for _ in range(2))
        update_arch = step > 0      # a weight-only (warm-up) step, then full steps
        loss_w, loss_a = reference_search_step(plain, (x_w, y_w), (x_a, y_a), pw, pa, 0.5, update_arch)
        _, fast_w, fast_a = search_step(fast, (x_w, y_w), (x_a, y_a), fw, fa, 0.5, update_arch)
        assert fast_w.item() == pytest.approx(loss_w, rel=1e-10)
        if update_arch:
            assert fast_a.item() == pytest.approx(loss_a, rel=1e-10)
        else:
            assert fast_a is None and loss_a is None
    assert not torch.allclose(fast.alphas_normal, alphas_before)   # the alpha steps moved them
    for (name, a), (name_f, b) in zip(plain.state_dict().items(), fast.state_dict().items(), strict=True):
        assert name == name_f
        torch.testing.assert_close(a, b, **TOL, msg=name)
    for opt_p, opt_f in ((pw, fw), (pa, fa)):
        sp, sf = optimizer_state(plain, opt_p), optimizer_state(fast, opt_f)
        for key in sp:
            for name in sp[key]:
                torch.testing.assert_close(sf[key][name], sp[key][name], **TOL, msg=key)


def test_search_step_through_a_compiled_forward():
    """search_step with a torch.compile'd forward (dynamo with the eager backend: the
    graph capture of --compile without code generation, quick on CPU) computes what the
    uncompiled step computes, over warm-up and full steps and a dropout-rate change."""
    import torch._dynamo as dynamo

    from train_search import search_step

    nets = _search_pair(5)[1], _search_pair(5)[1]
    opts = [search_optimizers(n, True) for n in nets]
    graphs = []

    def counting_backend(gm, example_inputs):     # the eager backend, counting captures
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    compiled = torch.compile(nets[1], backend=counting_backend)
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        x_w, x_a = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
        y_w, y_a = torch.randint(0, 10, (4,), generator=g), torch.randint(0, 10, (4,), generator=g)
        for net in nets:
            net.set_drop_rate(0.3 if step < 2 else 0.2)
        losses = []
        for net, (w, a), fwd in zip(nets, opts, (None, compiled)):
            torch.manual_seed(7 + step)
            _, loss_w, loss_a = search_step(net, (x_w, y_w), (x_a, y_a), w, a, 0.5, step > 0, forward=fwd)
            losses.append((loss_w.item(), None if loss_a is None else loss_a.item()))
        (plain_w, plain_a), (compiled_w, compiled_a) = losses
        assert compiled_w == pytest.approx(plain_w, rel=1e-5)
        # No alpha step in the warm-up step: both paths return None there. (pytest >= 9.2
        # refuses None inside approx, so the alpha losses are compared on their own.)
        assert (plain_a is None) == (compiled_a is None) == (step == 0)
        if plain_a is not None:
            assert compiled_a == pytest.approx(plain_a, rel=1e-5)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    # The compiled forward ran: graphs for the weight step (alphas constant) and the alpha
    # step (alphas require grad), and none more for the rate change.
    assert 2 <= len(graphs) <= 4
    dynamo.reset()


def test_search_step_autocasts_with_amp_bf16():
    """--amp bf16 reaches the forward passes of both steps: the losses differ from float32
    by bf16 rounding (not at all without autocast), and stay close."""
    from train_search import search_step

    nets = _search_pair(5)[1], _search_pair(5)[1]
    opts = [search_optimizers(n, True) for n in nets]
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g))
               for _ in range(2)]
    losses = []
    for net, (w, a), amp in zip(nets, opts, ("none", "bf16")):
        torch.manual_seed(5)
        _, loss_w, loss_a = search_step(net, batches[0], batches[1], w, a, 0.5, True, amp=amp)
        assert loss_w.dtype == torch.float32 and net.alphas_normal.dtype == torch.float32
        losses.append((loss_w.item(), loss_a.item()))
    for full, half in zip(*losses):
        assert full != half and half == pytest.approx(full, rel=0.05)


@pytest.mark.parametrize("n_ops,layers", [(8, 5), (5, 11), (3, 17)])
def test_search_step_dispatches_a_third_of_the_plain_operators(n_ops, layers):
    """Issue 9's measure, on a small network: one warm search step (alpha + weight step)
    of the batched cell (the default on CUDA) dispatches at most a third of the aten operators of the plain
    (release) path, with the ops on drawn per edge as pruning leaves them. A regression
    in the batched cell (a per-edge loop, per-call BN counters) shows here."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from model_search import Network
    from train_search import search_step

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    sw_n = random_stage_switches(n_ops, 3, "all")
    sw_r = random_stage_switches(n_ops, 4, "all")
    counts = {}
    for plain in (True, False):
        torch.manual_seed(0)
        net = Network(4, 10, layers, sw_n, sw_r, drop_rate=0.3, skip_zero=not plain,
                      batched=not plain)
        w_opt, a_opt = search_optimizers(net, not plain)
        batch = (torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
        step = reference_search_step if plain else search_step
        step(net, batch, batch, w_opt, a_opt, 5.0, True)   # warm: optimizer state exists
        with Count() as c:
            step(net, batch, batch, w_opt, a_opt, 5.0, True)
        counts[plain] = c.n
    assert counts[True] >= 3 * counts[False], counts
