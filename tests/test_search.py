"""train_search.py without training: schedules against SPEC's formulas, the flag forms,
pruning per stage, the final cell with skip refinement (--derive), and the data paths."""
import json
import math

import pytest
import torch

import train_search as ts
from config import SEARCH_DEMO, SEARCH_DEMO_PLANS
from data import DataError, EpochSampler, build_search_data, folder_transforms
from derivation import NUM_EDGES, all_on_switches, ops_on, prune_after_stage, replay_stages
from genotypes import PRIMITIVES, format_genotype
from runs import run_main

I = {name: k for k, name in enumerate(PRIMITIVES)}  # noqa: E741


# ---------------------------------------------------------------------------------------
# Schedules (SPEC section 2)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("lr_min", [0.0, 0.001])
def test_learning_rate_per_epoch(lr_min):
    """The release steps its scheduler before each epoch: epoch e trains at step e + 1
    (compared with PyTorch's scheduler in test_lr_schedule.py)."""
    E, lr0 = 25, 0.025
    for e in range(E):
        want = lr_min + (lr0 - lr_min) * (1 + math.cos(math.pi * (e + 1) / E)) / 2
        assert ts.learning_rate(e, E, lr0, lr_min) == pytest.approx(want, rel=1e-12)
    assert ts.learning_rate(0, E, lr0, lr_min) < lr0
    assert ts.learning_rate(E - 1, E, lr0, lr_min) == pytest.approx(lr_min, abs=1e-18)


def test_skip_dropout_rate_per_epoch():
    E, W, rate = 25, 10, 0.7
    got = [ts.skip_dropout_rate(e, E, rate, W) for e in range(E)]
    # Warm-up: rate * (E - e - 1) / E.
    assert got[0] == pytest.approx(0.7 * 24 / 25)
    assert got[9] == pytest.approx(0.7 * 15 / 25)
    # From the first alpha epoch: rate * exp(-(e - W) * 0.2); epoch W is back at the rate.
    assert got[10] == pytest.approx(0.7)
    assert got[11] == pytest.approx(0.7 * math.exp(-0.2))
    assert got[24] == pytest.approx(0.7 * math.exp(-14 * 0.2))
    assert all(ts.skip_dropout_rate(e, E, 0.0, W) == 0.0 for e in range(E))


def test_validation_in_the_release_s_last_4_epochs():
    # The release: `epochs - epoch < 5` (SPEC section 2).
    assert [e for e in range(25) if ts.is_validation_epoch(e, 25)] == [21, 22, 23, 24]
    assert all(ts.is_validation_epoch(e, 3) for e in range(3))


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def test_paper_defaults():
    a = ts.parse_args([])
    assert (a.dataset, a.epochs, a.arch_warmup_epochs, a.batch_size) == ("cifar10", 25, 10, 96)
    assert (a.learning_rate, a.learning_rate_min, a.momentum, a.weight_decay) == (0.025, 0.0, 0.9, 3e-4)
    assert (a.arch_learning_rate, a.arch_weight_decay, a.grad_clip) == (6e-4, 1e-3, 5.0)
    assert (a.init_channels, a.layers, a.train_portion, a.max_skip) == (16, 5, 0.5, 2)
    assert a.add_layers == (0, 6, 12) and a.add_width == (0, 0, 0)
    assert a.dropout_rate == (0.0, 0.4, 0.7)                       # paper, CIFAR-10
    assert ts.parse_args(["--cifar100"]).dropout_rate == (0.1, 0.2, 0.3)  # paper, CIFAR-100
    assert ts.parse_args(["--dataset", "cifar100"]).dataset == "cifar100"


def test_release_command_line():
    a = ts.parse_args("--tmp_data_dir D --save L --add_layers 6 --add_layers 12 --dropout_rate 0.1 "
                      "--dropout_rate 0.4 --dropout_rate 0.7 --note N --cifar100".split())
    assert a.add_layers == (0, 6, 12)
    assert a.dropout_rate == (0.1, 0.4, 0.7)
    assert (a.tmp_data_dir, a.save, a.note, a.dataset) == ("D", "L", "N", "cifar100")
    three = ts.parse_args("--add_layers 1 --add_layers 2 --add_layers 3 --add_width 4 --add_width 8".split())
    assert three.add_layers == (1, 2, 3) and three.add_width == (0, 4, 8)


@pytest.mark.parametrize("argv", [
    "--add_layers 6",
    "--add_layers 0 --add_layers 6 --add_layers 12 --add_layers 18",
    "--add_width 2",
    "--dropout_rate 0.1",
    "--dropout_rate 0.1 --dropout_rate 0.4",
    "--dropout_rate 0.1 --dropout_rate 0.4 --dropout_rate 0.7 --dropout_rate 0.7",
    "--cifar100 --dataset demo",
])
def test_bad_flag_counts_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ts.parse_args(argv.split())
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    flag = argv.split()[0] if "--cifar100" not in argv else "--cifar100"
    assert flag in err


def test_demo_presets_and_overrides():
    d = ts.parse_args(["--demo"])
    assert d.dataset == "demo" and d.epochs < 25 and d.add_layers == SEARCH_DEMO_PLANS["paper"]["add_layers"]
    o = ts.parse_args(["--demo", "--epochs", "3", "--add_layers", "1", "--add_layers", "2"])
    assert o.epochs == 3 and o.add_layers == (0, 1, 2) and o.dataset == "demo"
    # The rates: the paper's unless --demo (its stages have ~100x fewer steps).
    paper = ts.parse_args([])
    assert (paper.learning_rate, paper.arch_learning_rate) == (0.025, 6e-4)
    assert d.learning_rate == SEARCH_DEMO["learning_rate"] > 0.025
    assert d.arch_learning_rate == SEARCH_DEMO["arch_learning_rate"] > 6e-4
    o = ts.parse_args(["--demo", "--learning_rate", "0.05", "--arch_learning_rate", "1e-3"])
    assert (o.learning_rate, o.arch_learning_rate) == (0.05, 1e-3)


# ---------------------------------------------------------------------------------------
# Pruning after each stage
# ---------------------------------------------------------------------------------------

def _probs(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_pruning_keeps_5_then_3_then_1_and_forces_none_out_last():
    sw = all_on_switches()
    # none is the strongest op everywhere in every stage.
    p1 = _probs([[0.30, 0.02, 0.05, 0.15, 0.20, 0.10, 0.08, 0.10]] * NUM_EDGES)
    sw2, _ = prune_after_stage(sw, sw, p1, p1, 3, False)
    # The 3 lowest (max_pool .02, avg_pool .05, dil3 .08) go; none stays (not the last stage).
    assert all(ops_on(r) == [I["none"], I["skip_connect"], I["sep_conv_3x3"], I["sep_conv_5x5"],
                             I["dil_conv_5x5"]] for r in sw2)
    p2 = _probs([[0.40, 0.25, 0.20, 0.05, 0.10]] * NUM_EDGES)
    sw3, _ = prune_after_stage(sw2, sw2, p2, p2, 2, False)
    assert all(ops_on(r) == [I["none"], I["skip_connect"], I["sep_conv_3x3"]] for r in sw3)
    # Last stage: none goes first although it is the strongest, then the lowest other.
    p3 = _probs([[0.60, 0.15, 0.25]] * 7 + [[0.60, 0.25, 0.15]] * 7)
    final, _ = prune_after_stage(sw3, sw3, p3, p3, 2, True)
    assert [ops_on(r) for r in final] == [[I["sep_conv_3x3"]]] * 7 + [[I["skip_connect"]]] * 7


def test_replay_recomputes_the_switches_of_every_stage():
    stages = _hand_made_stages()
    (s1n, s1r), (s2n, s2r), (s3n, s3r) = replay_stages(stages)
    assert s1n == all_on_switches() and s1r == all_on_switches()
    assert all(ops_on(r) == [I["none"], I["skip_connect"], I["sep_conv_3x3"], I["sep_conv_5x5"],
                             I["dil_conv_3x3"]] for r in s2n + s2r)
    assert all(ops_on(r) == [I["none"], I["skip_connect"], I["sep_conv_3x3"]] for r in s3n + s3r)


# ---------------------------------------------------------------------------------------
# Final cell and skip-connect refinement through --derive, on hand-made alphas
# ---------------------------------------------------------------------------------------

S, S3 = "skip_connect", "sep_conv_3x3"
# Stage-3 weights over (none, skip_connect, sep_conv_3x3) of the normal cell, per edge.
NORMAL3 = [
    [0.10, 0.60, 0.30],  # e0  node 0 -> skip .60
    [0.50, 0.20, 0.30],  # e1  node 0 -> sep3 .30 (none never counts)
    [0.10, 0.70, 0.20],  # e2  node 1 -> skip .70
    [0.20, 0.35, 0.45],  # e3  node 1 -> sep3 .45
    [0.60, 0.25, 0.15],  # e4  node 1 -> skip .25 (strength .25, not .60)
    [0.05, 0.55, 0.40],  # e5  node 2 -> skip .55
    [0.30, 0.50, 0.20],  # e6  node 2 -> skip .50
    [0.50, 0.10, 0.40],  # e7  node 2 -> sep3 .40
    [0.60, 0.10, 0.30],  # e8  node 2 -> sep3 .30
    [0.10, 0.65, 0.25],  # e9  node 3 -> skip .65
    [0.20, 0.30, 0.50],  # e10 node 3 -> sep3 .50
    [0.30, 0.30, 0.40],  # e11 node 3 -> sep3 .40
    [0.20, 0.45, 0.35],  # e12 node 3 -> skip .45
    [0.80, 0.05, 0.15],  # e13 node 3 -> sep3 .15
]
# Reduction cell: sep3 everywhere, stronger on later edges, so each node keeps its last two.
REDUCE3 = [[0.1, 0.4 - 0.01 * e, 0.5 + 0.01 * e] for e in range(NUM_EDGES)]
REDUCE_CELL = [(S3, 0), (S3, 1), (S3, 1), (S3, 2), (S3, 2), (S3, 3), (S3, 3), (S3, 4)]
NORMAL_BY_BUDGET = {
    # 5 skip-connects: e0, e2, e5, e6, e9.
    None: [(S, 0), (S3, 1), (S, 0), (S3, 1), (S, 0), (S, 1), (S, 0), (S3, 1)],
    # e6 (.50) zeroed: node 2 keeps e5 and e7 (sep3 .40).
    4: [(S, 0), (S3, 1), (S, 0), (S3, 1), (S, 0), (S3, 2), (S, 0), (S3, 1)],
    # e5 (.55) zeroed: e5 turns sep3 .40.
    3: [(S, 0), (S3, 1), (S, 0), (S3, 1), (S3, 0), (S3, 2), (S, 0), (S3, 1)],
    # e0 (.60) zeroed: node 0 keeps both its edges; e0 turns sep3.
    2: [(S3, 0), (S3, 1), (S, 0), (S3, 1), (S3, 0), (S3, 2), (S, 0), (S3, 1)],
    # e9 (.65) zeroed: node 3 keeps e10 and e12, whose skip (.45) comes in; e12 zeroed next.
    1: [(S3, 0), (S3, 1), (S, 0), (S3, 1), (S3, 0), (S3, 2), (S3, 1), (S3, 2)],
    # e2 (.70) zeroed: node 1 takes e4's skip (.25); zeroed too, node 1 keeps e2 and e3.
    0: [(S3, 0), (S3, 1), (S3, 0), (S3, 1), (S3, 0), (S3, 2), (S3, 1), (S3, 2)],
}


def _log(rows):
    return [[math.log(v) for v in r] for r in rows]


def _hand_made_stages():
    # Stage 1 drops max_pool, avg_pool, dil5; stage 2 drops sep5 and dil3.
    s1 = _log([[0.15, 0.05, 0.06, 0.15, 0.20, 0.15, 0.14, 0.10]] * NUM_EDGES)
    s2 = _log([[0.30, 0.25, 0.24, 0.11, 0.10]] * NUM_EDGES)
    return [{"alphas_normal": s1, "alphas_reduce": s1},
            {"alphas_normal": s2, "alphas_reduce": s2},
            {"alphas_normal": _log(NORMAL3), "alphas_reduce": _log(REDUCE3)}]


def _derive(tmp_path, capsys, state, *extra):
    path = tmp_path / "arch_state.json"
    path.write_text(json.dumps(state))
    rc = run_main(ts.main, ts.parse_args(["--derive", str(path), *extra]))
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err


@pytest.mark.parametrize("budget", [None, 4, 3, 2, 1, 0])
def test_derive_restricts_skip_connects(tmp_path, capsys, budget):
    extra = ["--max_skip", "-1" if budget is None else str(budget)]
    rc, lines, _ = _derive(tmp_path, capsys, {"stages": _hand_made_stages()}, *extra)
    assert rc == 0
    want = ts.Genotype(normal=NORMAL_BY_BUDGET[budget], normal_concat=[2, 3, 4, 5],
                       reduce=REDUCE_CELL, reduce_concat=[2, 3, 4, 5])
    assert lines[-1] == format_genotype(want)
    # Every budget below the 5 skip-connects is listed, from 4 down to 0, as the release does.
    listed = [ln.split(":")[0] for ln in lines if ln.startswith("max_skip")]
    assert listed == [f"max_skip {m}" for m in (4, 3, 2, 1, 0)]


def test_derive_default_budget_is_2(tmp_path, capsys):
    rc, lines, _ = _derive(tmp_path, capsys, {"stages": _hand_made_stages()})
    assert rc == 0 and lines[-1] == format_genotype(ts.Genotype(
        NORMAL_BY_BUDGET[2], [2, 3, 4, 5], REDUCE_CELL, [2, 3, 4, 5]))
    assert lines[-1].startswith("Genotype(normal=[('sep_conv_3x3', 0)")


@pytest.mark.parametrize("state", [
    {"stage": []},
    {"stages": []},
    {"stages": [{"alphas_normal": [[0.0] * 8] * 14}] * 3},
    {"stages": [{"alphas_normal": [[0.0] * 5] * 14, "alphas_reduce": [[0.0] * 5] * 14}] * 3},
])
def test_derive_rejects_bad_files(tmp_path, capsys, state):
    rc, _, err = _derive(tmp_path, capsys, state)
    assert rc == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_derive_missing_file(tmp_path, capsys):
    rc = run_main(ts.main, ts.parse_args(["--derive", str(tmp_path / "nope.json")]))
    assert rc == 2 and "nope.json" in capsys.readouterr().err


def test_derive_of_a_binary_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04\x80\xff\xfe binary")
    rc = run_main(ts.main, ts.parse_args(["--derive", str(path)]))
    err = capsys.readouterr().err
    assert rc == 2 and "is not an arch_state.json file" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------

def _data_args(argv):
    return ts.parse_args(argv)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_loader_reads_pickle_folders(tmp_path, num_classes):
    from helpers import write_cifar_folder

    root = write_cifar_folder(str(tmp_path / "data"), num_classes)
    flag = ["--cifar100"] if num_classes == 100 else []
    data, classes, text = build_search_data(_data_args(["--tmp_data_dir", root, *flag]))
    assert classes == num_classes
    assert len(data) == (100 if num_classes == 10 else 20)   # 5 batches / 1 file of 20
    x, y = data[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < num_classes
    assert ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python") in text


def test_missing_cifar_folder_is_one_clear_error(tmp_path, capsys):
    rc = run_main(ts.main, ts.parse_args(["--tmp_data_dir", str(tmp_path / "nowhere"),
                                          "--save", str(tmp_path) + "/"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in err[0] and "--download" in err[0]
    assert not list(tmp_path.glob("search-*"))     # no run folder is left behind


def test_unreadable_cifar_file_is_a_data_error(tmp_path):
    from helpers import write_cifar_folder

    root = write_cifar_folder(str(tmp_path / "data"), 10)
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        build_search_data(_data_args(["--tmp_data_dir", root]))


def test_image_folder_data(image_folder):
    args = _data_args(["--dataset", "folder", "--tmp_data_dir", image_folder, "--image_size", "16"])
    data, classes, text = build_search_data(args)
    assert classes == 3 and len(data) == 12
    assert data[0][0].shape == (3, 16, 16)
    # Normalised with the folder's own statistics, stated and kept for the checkpoint.
    assert "of 12 sampled training images" in text and len(data.stats["mean"]) == 3
    data.transform = folder_transforms(False, 16, data.stats["mean"], data.stats["std"])
    x = torch.stack([data[i][0] for i in range(12)]).transpose(0, 1).flatten(1)
    assert x.mean(1).abs().max() < 1e-4 and (x.std(1) - 1).abs().max() < 1e-2


def test_demo_data_and_resize():
    data, classes, _ = build_search_data(_data_args(["--demo"]))
    assert classes == 10 and len(data) == 1000
    size = SEARCH_DEMO["image_size"]
    assert data[0][0].shape == (3, size, size)


def test_epoch_sampler_order_depends_only_on_seed_stage_epoch():
    a = EpochSampler(range(10, 30), seed=1, stream=0)
    b = EpochSampler(range(10, 30), seed=1, stream=0)
    a.set_epoch(1, 3)
    b.set_epoch(1, 3)
    assert list(a) == list(b) and sorted(a) == list(range(10, 30))   # without replacement
    b.set_epoch(1, 4)
    assert list(a) != list(b)
    # Two ranks split one permutation; together they cover it exactly once (20 = 2 x 10).
    r0 = EpochSampler(range(20), 1, 0, rank=0, world_size=2)
    r1 = EpochSampler(range(20), 1, 0, rank=1, world_size=2)
    assert sorted(list(r0) + list(r1)) == list(range(20)) and len(r0) == len(r1) == 10
    # A longer stream (alpha half matching the weight half) appends further passes.
    longer = EpochSampler(range(5), 1, 1, num_samples=12)
    assert len(list(longer)) == 12


def test_validation_at_chance_with_unsettled_batch_norm_is_warned():
    """A small image folder: few steps per stage leave the eval-mode batch-norm statistics
    near their start, and the alpha half validates at chance while training rises."""
    from loop import batch_norm_updates, validation_warning
    said = validation_warning(2, 4, True, 25.0, 76.0, 4, 16)
    assert said.startswith("WARNING stage 2 epoch 4: validation accuracy 25.00% is at chance")
    assert "after 16 batch-norm updates" in said and "19% of their initial values" in said
    assert "use more images or more epochs" in said and "\n" not in said
    # a stage that ends with its statistics unsettled, even above chance
    assert "is unreliable" in validation_warning(1, 4, True, 40.0, 45.0, 4, 10)
    # settled statistics and validation above chance: nothing to say
    assert validation_warning(1, 4, True, 60.0, 90.0, 4, 200) is None
    # mid-stage, at chance is normal while the statistics settle (the demo's epoch 1: 9.2%)
    assert validation_warning(1, 1, False, 9.2, 63.8, 10, 20) is None
    # at chance with settled statistics: said, without blaming batch norm
    plain = validation_warning(1, 4, True, 25.0, 76.0, 4, 200)
    assert "at chance" in plain and "batch-norm" not in plain
    # the count is read from the network: every training forward updates the statistics
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    for _ in range(3):
        net(torch.randn(2, 3, 8, 8))
    assert batch_norm_updates(net) == (3, 0.1)
