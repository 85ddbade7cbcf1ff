"""memory.py: --checkpoint_cells changes no number (search and training steps, with
bf16, channels_last and a compiled forward), the saved-activation count and the memory
estimate, the fit decision on CUDA (free memory faked), and out-of-memory errors as one
line after the last good checkpoint."""
import glob
import json
import os

import pytest
import torch
import torch.nn as nn
from helpers import SEARCH_TINY, TRAIN_TINY, run_script, tiny

import engine
import memory
import model_search
import train_cifar
import train_search as ts
from genotypes import PDARTS
from model import NetworkCIFAR, NetworkImageNet
from model_search import Network
from runs import close_logging, run_main
from speed import prepare_model

# Stage 3: skip_connect, sep_conv_3x3, dil_conv_3x3; "tiny": skip_connect, sep_conv_3x3.
STAGE_OPS = {1: range(8), 3: (3, 4, 6), "tiny": (3, 4)}
RTOL = 1e-6


def _search_net(stage, checkpointed, layers=3, C=4):
    sw = [[k in STAGE_OPS[stage] for k in range(8)] for _ in range(14)]
    torch.manual_seed(0)
    net = Network(C, 10, layers, sw, sw, drop_rate=0.3)   # skip dropout on
    net.checkpoint_cells = checkpointed
    return net


def _search_opts(net):
    w = torch.optim.SGD(net.weight_parameters(), 0.05, momentum=0.9, weight_decay=3e-4, foreach=True)
    a = torch.optim.Adam(net.arch_parameters(), lr=6e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    return w, a


def _assert_same_state(a: nn.Module, b: nn.Module, opts_a=(), opts_b=()):
    """Weights, alphas, batch-norm statistics and optimizer state agree to RTOL."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=1e-9, msg=name)
    for oa, ob in zip(opts_a, opts_b, strict=True):
        for sa, sb in zip(oa.state.values(), ob.state.values(), strict=True):
            for key in sa:
                torch.testing.assert_close(sa[key], sb[key], rtol=RTOL, atol=1e-9, msg=key)


def _run_search_steps(net, amp="none", channels_last=False, forward=None, steps=3):
    """Warm-up and full search steps from one seed (the masks of later steps depend on
    the random state the earlier steps leave)."""
    w, a = _search_opts(net)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(11)
    losses = []
    for step in range(steps):
        x_w, x_a = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
        if channels_last:
            x_w, x_a = (x.contiguous(memory_format=torch.channels_last) for x in (x_w, x_a))
        y_w, y_a = torch.randint(0, 10, (4,), generator=g), torch.randint(0, 10, (4,), generator=g)
        _, loss_w, loss_a = ts.search_step(net, (x_w, y_w), (x_a, y_a), w, a, 0.5, step > 0,
                                           forward=forward, amp=amp)
        losses.append((loss_w.item(), None if loss_a is None else loss_a.item()))
    return losses, (w, a), torch.get_rng_state()


@pytest.mark.parametrize("stage,amp,channels_last", [
    (1, "none", False), (3, "none", False), (3, "bf16", True)])
def test_search_steps_identical_with_checkpoint_cells(stage, amp, channels_last):
    nets = [_search_net(stage, on) for on in (False, True)]
    results = []
    for net in nets:
        prepare_model(net, channels_last=channels_last)
        results.append(_run_search_steps(net, amp, channels_last))
    (plain, opts_p, rng_p), (ckpt, opts_c, rng_c) = results
    for (lw, la), (cw, ca) in zip(plain, ckpt, strict=True):
        assert cw == pytest.approx(lw, rel=RTOL)
        assert (ca is None and la is None) or ca == pytest.approx(la, rel=RTOL)
    assert not torch.equal(nets[1].alphas_normal, _search_net(stage, False).alphas_normal)
    _assert_same_state(*nets, opts_p, opts_c)
    # The random state after the steps is the same: the recomputation drew nothing new.
    assert torch.equal(rng_p, rng_c)


def test_training_steps_identical_through_a_compiled_forward():
    """With torch.compile (aot_eager: AOTAutograd plans the recomputation as the default
    inductor backend does, without code generation) and drop path on. The search network
    takes the same path (memory.run_cell); compiling it here took over a minute."""
    import torch._dynamo as dynamo

    nets, losses = [], []
    for on in (False, True):
        dynamo.reset()
        torch.manual_seed(0)
        net = NetworkCIFAR(4, 10, 2, False, PDARTS)
        net.drop_path_prob, net.checkpoint_cells = 0.3, on
        opt = torch.optim.SGD(net.parameters(), 0.05, momentum=0.9, foreach=True)
        compiled = torch.compile(net, backend="aot_eager")
        g = torch.Generator().manual_seed(2)
        torch.manual_seed(12)
        for _ in range(2):
            x, y = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)
            losses.append(engine.train_step(compiled, x, y, opt, nn.CrossEntropyLoss(), 0.0, 5.0)[0].item())
        nets.append((net, opt))
    dynamo.reset()
    assert losses[2:] == pytest.approx(losses[:2], rel=RTOL)
    _assert_same_state(nets[0][0], nets[1][0], [nets[0][1]], [nets[1][1]])


@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_training_steps_identical_with_checkpoint_cells(kind):
    """Drop path and the auxiliary head on; several train_step calls from one seed."""
    nets, losses = [], []
    for on in (False, True):
        torch.manual_seed(0)
        if kind == "cifar":
            net, size = NetworkCIFAR(4, 10, 5, True, PDARTS), 32
        else:
            net, size = NetworkImageNet(4, 10, 5, True, PDARTS), 224
        net.drop_path_prob = 0.3
        net.checkpoint_cells = on
        opt = torch.optim.SGD(net.parameters(), 0.05, momentum=0.9, weight_decay=3e-4, foreach=True)
        g = torch.Generator().manual_seed(2)
        torch.manual_seed(12)
        run = []
        for _ in range(3):
            x, y = torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)
            loss, _ = engine.train_step(net.train(), x, y, opt, nn.CrossEntropyLoss(), 0.4, 5.0)
            run.append(loss.item())
        nets.append((net, opt))
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], rel=RTOL)
    _assert_same_state(nets[0][0], nets[1][0], [nets[0][1]], [nets[1][1]])


# ---------------------------------------------------------------------------------------
# Counting and estimating
# ---------------------------------------------------------------------------------------

def test_saved_activations_scale_with_the_batch_and_shrink_with_checkpointing():
    net = _search_net(3, False, layers=5, C=4)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    small = memory.measure_saved_activations(net, (2, 3, 16, 16))
    large = memory.measure_saved_activations(net, (8, 3, 16, 16))
    assert large["plain"] == pytest.approx(4 * small["plain"], rel=0.01)      # linear in the batch
    # With checkpointing each cell also keeps its inputs' mixing weights, which do not grow
    # with the batch: nearly linear, and linear scaling from batch 2 slightly overestimates.
    assert large["checkpointed"] == pytest.approx(4 * small["checkpointed"], rel=0.03)
    assert large["checkpointed"] <= 4 * small["checkpointed"]
    assert small["checkpointed"] < small["plain"] / 5
    assert 0 < small["largest_cell"] < small["plain"] / 2
    # The measurement leaves the network and the random state alone.
    assert not net.checkpoint_cells and torch.equal(rng, torch.get_rng_state())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_saved_activation_count_matches_autograd():
    """One conv saves its input (the weight is a parameter, not counted)."""
    conv = nn.Conv2d(3, 5, 3, bias=False)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with memory.SavedTensors(conv) as counter:
        conv(x)
    assert counter.bytes == x.numel() * 4


def test_estimate_counts_parameters_gradients_and_optimizer_state():
    net = _search_net(1, False, layers=3)
    w, a = _search_opts(net)
    est = memory.estimate_memory(net, [w, a], (3, 8, 8), batch=96)
    n_weights = sum(p.numel() for p in net.weight_parameters())
    n_alphas = sum(p.numel() for p in net.arch_parameters())
    assert est.params == est.grads == 4 * (n_weights + n_alphas)
    assert est.optimizer == 4 * (n_weights + 2 * n_alphas)   # SGD momentum, Adam's two moments
    saved = memory.measure_saved_activations(net, (2, 3, 8, 8))
    assert est.activations == pytest.approx(saved["plain"] * 48, rel=1e-6)
    assert est.activations_checkpointed < est.activations
    assert est.needed(False) == int(memory.SAFETY * (est.static + est.activations))
    assert "--checkpoint_cells" in est.describe(False)


def _plan(checkpointed=False, world_size=1):
    est = memory.MemoryEstimate(batch=96 // world_size, params=GiB // 4, grads=GiB // 4,
                                optimizer=GiB // 4, activations=12 * GiB,
                                activations_checkpointed=3 * GiB)
    return memory.MemoryPlan(est, checkpointed, 96, world_size, {"--learning_rate": 0.025})


GiB = memory.GiB


def test_fits_or_one_line_with_what_to_do():
    cuda = torch.device("cuda")
    assert memory.check_fits(_plan(), cuda, lambda d: 40 * GiB)             # fits
    assert memory.check_fits(_plan(), torch.device("cpu"), lambda d: None)  # CPU: no check
    # 12.75 GiB without the x1.2 headroom, 15.3 GiB with it: tight, a warning only.
    assert not memory.check_fits(_plan(), cuda, lambda d: 14 * GiB)
    with pytest.raises(memory.OutOfMemory) as e:
        memory.check_fits(_plan(), cuda, lambda d: 8 * GiB)
    text = str(e.value)
    assert "\n" not in text and "needs about 12.8 GiB" in text and "8.0 GiB are free" in text
    # With checkpointing 96 images fit (4.5 GiB): no smaller batch, no more GPUs suggested.
    assert "--checkpoint_cells (same results" in text and "fits)" in text
    assert "--batch_size" not in text and "torchrun" not in text
    with pytest.raises(memory.OutOfMemory) as e:
        memory.check_fits(_plan(checkpointed=True), cuda, lambda d: 2 * GiB)
    text = str(e.value)
    # (2 / 1.2 - 0.75) GiB / (3 GiB / 96) = 29.3 images -> batch 24 at lr 0.025 * 24 / 96.
    assert "--batch_size 24 --learning_rate 0.00625" in text
    assert "torchrun --nproc_per_node 4" in text and "same results" not in text
    with pytest.raises(memory.OutOfMemory, match="not even one image"):
        memory.check_fits(_plan(checkpointed=True), cuda, lambda d: GiB // 2)


# ---------------------------------------------------------------------------------------
# The scripts
# ---------------------------------------------------------------------------------------

TINY_SEARCH = SEARCH_TINY
TINY_TRAIN = [*tiny(TRAIN_TINY, epochs=1, layers=3), "--auxiliary", "--cutout"]


def _search(argv):
    rc = run_main(ts.main, ts.parse_args(argv))
    close_logging()
    return rc


def only_run_dir(save, kind="search"):
    dirs = glob.glob(os.path.join(save, f"{kind}-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_metrics_if_any(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def test_search_with_checkpoint_cells(cifar10_dir, tmp_path, capsys, monkeypatch):
    """The flag reaches every stage's network (the step-level tests above show that the
    numbers do not change); the estimate is logged at the start of every stage."""
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(memory, "checkpoint", counting_checkpoint)
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    assert _search(["--tmp_data_dir", cifar10_dir, "--save", save, *TINY_SEARCH, "--epochs", "1",
                    "--arch_warmup_epochs", "0", "--batch_size", "25", "--checkpoint_cells"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("Genotype(normal=[")
    log = open(os.path.join(only_run_dir(save), "log.txt")).read()
    assert log.count("memory estimate at batch 25 per process") == 3
    assert log.count("checkpointing on)") == 3
    # Stages of 3, 4 and 5 cells, in the estimate and in every training forward pass.
    assert all(isinstance(c, model_search.BatchedCell) for c in calls) and len(calls) > 3 * (3 + 4 + 5)


def test_search_stops_before_training_when_it_will_not_fit(cifar10_dir, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 2 ** 20)   # 1 MiB "free"
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    assert _search(["--tmp_data_dir", cifar10_dir, "--save", save, *TINY_SEARCH]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: one step at batch 10 per process needs about")
    assert "--checkpoint_cells" in err and "Traceback" not in err and len(err.splitlines()) == 1
    run_dir = only_run_dir(save)
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.pt")) and not read_metrics_if_any(run_dir)


def test_search_out_of_memory_is_one_line_after_the_last_checkpoint(cifar10_dir, tmp_path,
                                                                   capsys, monkeypatch):
    real_step, calls = ts.search_step, []

    def step_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:          # the weight half is 5 batches: epoch 1 runs out
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ts, "search_step", step_out_of_memory)
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    assert _search(["--tmp_data_dir", cifar10_dir, "--save", save, *TINY_SEARCH]) == 2
    err = capsys.readouterr().err
    run_dir = only_run_dir(save)
    assert err.startswith("error: CUDA out of memory in stage 1 epoch 1")
    assert f"--resume {os.path.abspath(run_dir)} --checkpoint_cells" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == (0, 1)


def test_training_estimate_and_out_of_memory(cifar10_dir, tmp_path, capsys, monkeypatch):
    real_step, steps = engine.train_step, []

    def step_out_of_memory(*args, **kwargs):
        steps.append(1)
        if len(steps) > 13:       # 13 steps per epoch: the second epoch runs out
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", step_out_of_memory)
    save = str(tmp_path) + os.sep
    capsys.readouterr()
    rc = run_script(train_cifar, ["--tmp_data_dir", cifar10_dir, "--save", save, *TINY_TRAIN,
                                  "--epochs", "2", "--checkpoint_cells"])
    close_logging()
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: CUDA out of memory in epoch 1") and "Traceback" not in err
    run_dir = only_run_dir(save, "eval")
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "memory estimate at batch 8 per process" in log and "checkpointing on)" in log
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["epoch"] == 1
