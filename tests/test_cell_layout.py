"""--cell_layout and the CPU's memory format (issue 35): the per-edge cells compute what
the batched cells compute (float64 proofs, in NHWC and NCHW, over search steps), NHWC
training computes what NCHW training does, --cell_layout auto picks by device and size,
a run saves the layout it used and a resume keeps it, and training runs NHWC on the CPU
by default."""
import os

import pytest
import torch
import torch.nn as nn
from helpers import (
    SEARCH_TINY,
    TRAIN_TINY,
    load,
    only_run_dir,
    optimizer_state,
    random_stage_switches,
    run_script,
    search,
    search_optimizers,
    stopped_after_epochs,
    tiny,
)

import train_cifar
import train_search
from config import SearchConfig
from engine import train_step
from genotypes import PDARTS
from model import NetworkCIFAR
from model_search import Network, PerEdgeCell
from search_flags import parse_args, resolve_cell_layout
from speed import PER_EDGE_FROM_ELEMENTS, prepare_input, prepare_model, search_layout

TOL = dict(rtol=1e-10, atol=1e-12)   # float64 equivalence
NHWC = torch.channels_last
CPU, CUDA = torch.device("cpu"), torch.device("cuda")   # a device name; no GPU needed


def _nets(sw_n, sw_r, layouts, drop_rate=0.0, layers=5):
    """One float64 search network per layout ("release": the plain cells, `none`
    skipped), from the same seed."""
    nets = []
    for layout in layouts:
        torch.manual_seed(0)
        kw = {"batched": False} if layout == "release" else {"cell_layout": layout}
        nets.append(Network(4, 10, layers, sw_n, sw_r, drop_rate=drop_rate, **kw).double())
    with torch.no_grad():       # unequal op weights, the same in every network
        g = torch.Generator().manual_seed(7)
        for a in zip(*(net.arch_parameters() for net in nets)):
            values = torch.randn(a[0].shape, generator=g, dtype=torch.float64) * 0.5
            for t in a:
                t.copy_(values)
    return nets


# ---------------------------------------------------------------------------------------
# The per-edge cells: the same network, the same maths
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_ops", [8, 5, 3])
def test_per_edge_network_has_the_release_state_dict_and_initial_weights(n_ops):
    sw_n, sw_r = random_stage_switches(n_ops, 1, "some"), random_stage_switches(n_ops, 2, "all")
    batched, per_edge = _nets(sw_n, sw_r, ["batched", "per_edge"])
    assert all(isinstance(c, PerEdgeCell) for c in per_edge.cells)
    assert per_edge.cell_layout == "per_edge" and batched.cell_layout == "batched"
    sb, sp = batched.state_dict(), per_edge.state_dict()
    assert list(sb) == list(sp)
    for name in sb:
        assert torch.equal(sb[name], sp[name]), name
    with torch.no_grad():
        for p in per_edge.parameters():
            p.add_(torch.randn_like(p))
    batched.load_state_dict(per_edge.state_dict())      # either loads the other's
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(per_edge.eval()(x), batched.eval()(x), **TOL)
    with pytest.raises(ValueError, match="cell_layout must be one of batched, per_edge"):
        Network(4, 10, 3, sw_n, sw_r, cell_layout="auto")


@pytest.mark.parametrize("n_ops", [5, 1])
def test_per_edge_cells_draw_the_release_cells_skip_dropout_masks(n_ops):
    """Edge by edge, op by op, as the release's cells: with skip dropout on, the same
    random state gives the same masks, so outputs and gradients agree (float64). With
    one op per edge, the normal cells' node 0 reads only `none` edges: zeros, as in the
    release."""
    sw_n, sw_r = random_stage_switches(n_ops, 3, "some"), random_stage_switches(n_ops, 4, "off")
    if n_ops == 1:
        sw_n[0] = sw_n[1] = [True] + [False] * 7
        sw_n[2] = [False, False, False, True, False, False, False, False]   # skip_connect
    release, per_edge = _nets(sw_n, sw_r, ["release", "per_edge"], drop_rate=0.3)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    grads = []
    for net in (release, per_edge):
        torch.manual_seed(11)
        out = net.train()(x)
        nn.functional.cross_entropy(out, y).backward()
        grads.append([out.detach()] + [p.grad for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        if a is None:   # an alpha matrix or a parameter no op used
            assert b is None
        else:
            torch.testing.assert_close(b, a, **TOL)
    torch.manual_seed(12)
    assert not torch.allclose(per_edge(x), grads[1][0])    # other masks: the dropout is live


@pytest.mark.parametrize("n_ops,none", [(8, "all"), (5, "some"), (3, "off"), (3, "some")])
@pytest.mark.parametrize("channels_last", [True, False])
def test_per_edge_search_steps_equal_the_batched_ones(n_ops, none, channels_last, test_device):
    """Three search steps (a warm-up step, then two with an alpha step) of the per-edge
    cells, in NHWC as the CPU runs them by default or in NCHW, against the batched cells
    in NCHW (the layout of earlier versions): losses, weights, alphas, BN statistics and
    both optimizers' state agree in float64."""
    sw_n, sw_r = random_stage_switches(n_ops, 5, none), random_stage_switches(n_ops, 6, none)
    batched, per_edge = (net.to(test_device) for net in _nets(sw_n, sw_r, ["batched", "per_edge"]))
    forward = prepare_model(per_edge, channels_last)
    before = {k: v.clone() for k, v in batched.state_dict().items()}
    (bw, ba), (pw, pa) = search_optimizers(batched), search_optimizers(per_edge)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x_w, x_a = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64).to(test_device)
                    for _ in range(2))
        y_w, y_a = (torch.randint(0, 10, (4,), generator=g).to(test_device) for _ in range(2))
        update_arch = step > 0
        _, loss_b, arch_b = train_search.search_step(batched, (x_w, y_w), (x_a, y_a), bw, ba, 5.0,
                                                     update_arch)
        _, loss_p, arch_p = train_search.search_step(
            per_edge, (prepare_input(x_w, channels_last), y_w),
            (prepare_input(x_a, channels_last), y_a), pw, pa, 5.0, update_arch, forward=forward)
        assert loss_p.dtype == torch.float64
        assert loss_p.item() == pytest.approx(loss_b.item(), rel=1e-10)
        if update_arch:
            assert arch_p.item() == pytest.approx(arch_b.item(), rel=1e-10)
    if channels_last:   # the convolutions really ran NHWC
        conv = next(m for m in per_edge.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        assert conv.weight.is_contiguous(memory_format=NHWC)
    sb, sp = batched.state_dict(), per_edge.state_dict()
    assert list(sb) == list(sp)
    for name in sb:
        torch.testing.assert_close(sp[name], sb[name], **TOL, msg=name)
    for name in ("alphas_normal", "alphas_reduce", "classifier.weight"):   # the steps moved them
        assert not torch.equal(sb[name], before[name]), name
    for opt_b, opt_p in ((bw, pw), (ba, pa)):
        ob, op = optimizer_state(batched, opt_b), optimizer_state(per_edge, opt_p)
        assert ob.keys() == op.keys()
        for key in ob:
            assert ob[key].keys() == op[key].keys(), key
            for name in ob[key]:
                torch.testing.assert_close(op[key][name], ob[key][name], **TOL, msg=f"{key} {name}")


def test_nhwc_training_steps_equal_nchw_ones(test_device):
    """Training's CPU default (NHWC) against NCHW: three SGD steps of the 20-cell
    network's cell (PDARTS, auxiliary head, drop path) agree in float64."""
    nets, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        net = NetworkCIFAR(8, 10, 5, True, PDARTS).double().to(test_device)
        net.drop_path_prob = 0.2
        nets.append(net)
        opts.append(torch.optim.SGD(net.parameters(), 0.05, momentum=0.9, weight_decay=3e-4,
                                    foreach=True))
    prepare_model(nets[1], channels_last=True)
    criterion = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64).to(test_device)
        y = torch.randint(0, 10, (6,), generator=g).to(test_device)
        losses = []
        for net, opt, nhwc in zip(nets, opts, (False, True)):
            torch.manual_seed(100 + step)       # the same drop-path masks
            loss, _ = train_step(net, prepare_input(x, nhwc), y, opt, criterion, 0.4, 5.0)
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-10)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        torch.testing.assert_close(b, a, **TOL, msg=name)


# ---------------------------------------------------------------------------------------
# --cell_layout auto
# ---------------------------------------------------------------------------------------

def test_auto_picks_per_edge_nhwc_on_the_cpu_at_the_papers_size_and_batched_elsewhere():
    paper = parse_args([])
    cfg = resolve_cell_layout(paper, CPU)
    assert (cfg.cell_layout, cfg.channels_last) == ("per_edge", True)
    assert f"{paper.batch_size} images x C 16 x 32x32" in cfg.cell_layout_reason
    cfg = resolve_cell_layout(paper, CUDA)          # CUDA: today's default, unchanged
    assert (cfg.cell_layout, cfg.channels_last) == ("batched", False)
    demo = resolve_cell_layout(parse_args(["--demo"]), CPU)   # tiny tensors: fewer operators win
    assert (demo.cell_layout, demo.channels_last) == ("batched", True)
    # The flags given win: the layout, and the memory format.
    old = resolve_cell_layout(parse_args(["--cell_layout", "batched"]), CPU)
    assert (old.cell_layout, old.channels_last) == ("batched", False)
    nchw = resolve_cell_layout(parse_args(["--no-channels_last"]), CPU)
    assert (nchw.cell_layout, nchw.channels_last) == ("per_edge", False)
    # Per process: 8 processes of 8 images each are under the threshold at C 8.
    small = parse_args(["--batch_size", "64", "--init_channels", "8"])
    assert resolve_cell_layout(small, CPU).cell_layout == "per_edge"
    assert resolve_cell_layout(small, CPU, world_size=8).cell_layout == "batched"


def test_the_threshold_is_elements_per_op():
    side = 32
    at = PER_EDGE_FROM_ELEMENTS // (16 * side * side)
    assert search_layout(CPU, at, 16, side)[:2] == ("per_edge", True)
    assert search_layout(CPU, at - 1, 16, side)[:2] == ("batched", None)
    assert search_layout(CUDA, 10 ** 4, 16, side)[0] == "batched"


def test_older_runs_ran_the_batched_cells():
    saved = parse_args(["--cell_layout", "batched"]).to_dict()
    del saved["cell_layout"]
    assert SearchConfig.from_dict(saved).cell_layout == "batched"


# ---------------------------------------------------------------------------------------
# Runs: the layout saved, kept on resume, the batched layout exactly as before
# ---------------------------------------------------------------------------------------

def test_a_run_saves_its_layout_and_a_resume_keeps_it(cifar10_dir, tmp_path, capsys):
    common = ["--tmp_data_dir", cifar10_dir, *tiny(SEARCH_TINY, epochs=2), "--deterministic",
              "--plot_format", "none", "--cell_layout", "per_edge"]
    straight = str(tmp_path / "a") + os.sep
    rc, _ = search([*common, "--save", straight], capsys)
    assert rc == 0
    interrupted = str(tmp_path / "b") + os.sep
    with stopped_after_epochs(3):     # stage 2, after its first epoch
        rc, _ = search([*common, "--save", interrupted], capsys)
    assert rc == 130
    run_dir = only_run_dir(interrupted, "search")
    args = load(os.path.join(run_dir, "checkpoint.pt"))["args"]
    assert (args["cell_layout"], args["channels_last"]) == ("per_edge", True)
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "cell layout: per_edge, channels_last True (--cell_layout per_edge)" in log

    capsys.readouterr()
    assert run_script(train_search, ["--resume", run_dir, "--cell_layout", "batched"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cell_layout batched (the run's: per_edge)" in err[0]
    rc, _ = search(["--resume", run_dir], capsys)       # auto: the run's own
    assert rc == 0
    assert "cell layout: per_edge, channels_last True (the run's)" in \
        open(os.path.join(run_dir, "log.txt")).read()
    a_dir = only_run_dir(straight, "search")
    for name in ("genotype.json", "arch_state.json"):
        with open(os.path.join(a_dir, name)) as a, open(os.path.join(run_dir, name)) as b:
            assert a.read() == b.read(), name


def test_tiny_runs_resolve_to_the_batched_cells(cifar10_dir, tmp_path, capsys):
    """The tests' tiny searches, and so the recorded outputs (test_recorded_search.py),
    run the batched cells: --cell_layout batched reproduces them."""
    save = str(tmp_path / "r") + os.sep
    with stopped_after_epochs(1):
        rc, _ = search(["--tmp_data_dir", cifar10_dir, *SEARCH_TINY, "--save", save], capsys)
    assert rc == 130
    args = load(os.path.join(only_run_dir(save, "search"), "checkpoint.pt"))["args"]
    assert (args["cell_layout"], args["channels_last"]) == ("batched", False)


@pytest.mark.parametrize("flags,nhwc", [([], True), (["--no-channels_last"], False),
                                        (["--channels_last"], True)])
def test_cpu_training_runs_nhwc_by_default(flags, nhwc, cifar10_dir, tmp_path):
    save = str(tmp_path / "t") + os.sep
    argv = ["--tmp_data_dir", cifar10_dir, *tiny(TRAIN_TINY, epochs=2), *flags, "--save", save]
    with stopped_after_epochs(1):
        assert run_script(train_cifar, argv) == 130
    run_dir = only_run_dir(save)
    assert load(os.path.join(run_dir, "checkpoint.pt"))["args"]["channels_last"] is nhwc
    assert f"memory format: {'NHWC' if nhwc else 'NCHW'}" in open(os.path.join(run_dir, "log.txt")).read()
    # A resume keeps the run's memory format.
    assert run_script(train_cifar, ["--resume", run_dir]) == 0
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    assert ckpt["epoch"] == 2 and ckpt["args"]["channels_last"] is nhwc


# ---------------------------------------------------------------------------------------
# oneDNN's strided 1x1 weight gradient (operations._rtus_bug)
# ---------------------------------------------------------------------------------------

CRASHER = """
import torch
from operations import FactorizedReduce
torch.set_num_threads(1)
op = FactorizedReduce(8, 8).to(memory_format=torch.channels_last)
x = torch.randn(4, 8, 56, 56).contiguous(memory_format=torch.channels_last).requires_grad_()
op(x).sum().backward()
print(float(op.conv_1.weight.grad.abs().sum()) > 0)
"""


def test_nhwc_factorized_reduce_with_few_channels_runs_on_the_cpu():
    """Without the workaround this segfaulted (torch 2.14.1, AVX-512; 8 channels at 56 x
    56, as the ImageNet network's first reduction at C 8 sees): in a process of its own."""
    import subprocess
    import sys

    from helpers import ROOT

    done = subprocess.run([sys.executable, "-c", CRASHER], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


@pytest.mark.parametrize("size", [56, 15, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_workaround_computes_the_strided_convolutions(size, dtype):
    """The unit-stride form of FactorizedReduce (taken for NHWC CPU inputs with under 16
    channels per group) against its strided form in NCHW: the same outputs and gradients,
    to float64 precision in float64 (no oneDNN there), to float32 rounding in float32
    (weight gradients of up to ~200 agree to 5e-5); odd sizes too."""
    from operations import FactorizedReduce, _rtus_bug

    torch.manual_seed(0)
    ops = [FactorizedReduce(6, 8, stack=2).to(dtype) for _ in range(2)]
    ops[1].load_state_dict(ops[0].state_dict())
    ops[1].to(memory_format=NHWC)
    x = torch.randn(3, 12, size, size, dtype=dtype)
    inputs = [x.clone().requires_grad_(), x.clone(memory_format=NHWC).requires_grad_()]
    assert not _rtus_bug(inputs[0], ops[0].conv_1) and _rtus_bug(inputs[1], ops[1].conv_1)
    outs = [op(i) for op, i in zip(ops, inputs)]
    g = torch.randn_like(outs[0])
    for out in outs:
        out.backward(g)
    tol = TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-3)   # sums of 2,352 terms
    torch.testing.assert_close(outs[1], outs[0], **tol)
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, **tol)
    for name in ("conv_1", "conv_2"):
        torch.testing.assert_close(getattr(ops[1], name).weight.grad, getattr(ops[0], name).weight.grad,
                                   **tol, msg=name)
