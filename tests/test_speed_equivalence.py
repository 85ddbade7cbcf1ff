"""The default (fast) paths compute what the plain paths compute: same losses, weights
and optimizer state after N steps from the same seed, within float rounding."""
import pytest
import torch
import torch.nn as nn

from engine import reference_train_step, train_step
from genotypes import PDARTS
from model import NetworkCIFAR


def _cifar_net():
    torch.manual_seed(0)
    net = NetworkCIFAR(8, 10, 5, True, PDARTS)
    net.drop_path_prob = 0.2
    return net


def test_train_step_default_equals_plain():
    nets = [_cifar_net(), _cifar_net()]
    opts = [torch.optim.SGD(nets[0].parameters(), 0.05, momentum=0.9, weight_decay=3e-4, foreach=False),
            torch.optim.SGD(nets[1].parameters(), 0.05, momentum=0.9, weight_decay=3e-4, foreach=True)]
    g = torch.Generator().manual_seed(1)
    criterion = nn.CrossEntropyLoss()
    for step in range(4):
        x = torch.randn(6, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (6,), generator=g)
        torch.manual_seed(100 + step)  # the same drop-path masks on both paths
        plain = reference_train_step(nets[0], x, y, opts[0], criterion, 0.4, 0.5)
        torch.manual_seed(100 + step)
        fast, _ = train_step(nets[1], x, y, opts[1], criterion, 0.4, 0.5)
        assert abs(plain - fast.item()) <= 1e-5 * abs(plain)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


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


def _search_pair(n_ops):
    from model_search import Network

    # Stage-like switches: the first n_ops ops of PRIMITIVES (`none` included) on every edge.
    sw = [[k < n_ops for k in range(8)] for _ in range(14)]
    nets = []
    for skip_zero in (False, True):     # plain computes `none`, default skips it
        torch.manual_seed(0)
        nets.append(Network(4, 10, 3, sw, sw, drop_rate=0.3, skip_zero=skip_zero))
    return nets


def _search_opts(net, foreach):
    w = torch.optim.SGD(net.weight_parameters(), 0.05, momentum=0.9, weight_decay=3e-4, foreach=foreach)
    a = torch.optim.Adam(net.arch_parameters(), lr=6e-3, betas=(0.5, 0.999), weight_decay=1e-3,
                         foreach=foreach)
    return w, a


@pytest.mark.parametrize("n_ops", [8, 5])
def test_search_step_default_equals_plain(n_ops):
    from train_search import reference_search_step, search_step

    plain, fast = _search_pair(n_ops)
    (pw, pa), (fw, fa) = _search_opts(plain, False), _search_opts(fast, True)
    alphas_before = fast.alphas_normal.detach().clone()
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x_w, x_a = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
        y_w, y_a = torch.randint(0, 10, (6,), generator=g), torch.randint(0, 10, (6,), generator=g)
        update_arch = step > 0      # a weight-only (warm-up) step, then full steps
        torch.manual_seed(100 + step)  # the same skip-dropout masks on both paths
        loss_w, loss_a = reference_search_step(plain, (x_w, y_w), (x_a, y_a), pw, pa, 0.5, update_arch)
        torch.manual_seed(100 + step)
        _, fast_w, fast_a = search_step(fast, (x_w, y_w), (x_a, y_a), fw, fa, 0.5, update_arch)
        assert fast_w.item() == pytest.approx(loss_w, rel=1e-5)
        if update_arch:
            assert fast_a.item() == pytest.approx(loss_a, rel=1e-5)
        else:
            assert fast_a is None and loss_a is None
    assert not torch.allclose(fast.alphas_normal, alphas_before)   # the alpha steps moved them
    for (name, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    for opt_p, opt_f in ((pw, fw), (pa, fa)):
        for sp, sf in zip(opt_p.state.values(), opt_f.state.values()):
            for key in sp:
                torch.testing.assert_close(sp[key], sf[key], rtol=1e-5, atol=1e-7, msg=key)


def test_search_step_through_a_compiled_forward():
    """search_step with a torch.compile'd forward (dynamo with the eager backend: the
    graph capture of --compile without code generation, quick on CPU) computes what the
    uncompiled step computes, over warm-up and full steps and a dropout-rate change."""
    import torch._dynamo as dynamo

    from train_search import search_step

    nets = _search_pair(5)[1], _search_pair(5)[1]
    opts = [_search_opts(n, True) for n in nets]
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
    opts = [_search_opts(n, True) for n in nets]
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
