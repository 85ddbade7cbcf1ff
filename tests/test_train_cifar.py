"""train_cifar.py and the shared loop in engine.py: the recipe's schedules, one epoch end to
end (CIFAR-10 and CIFAR-100 pickle folders) followed by test.py, exact resume, the
non-finite-loss stop, bad input, and a 2-process gloo torchrun run."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, load, only_run_dir, read_metrics, run_script, run_test_script

import checkpoint
import engine
import train_cifar
from distributed import DistInfo
from genotypes import DARTS_V2, PDARTS, genotype_from_dict, genotype_to_dict, save_genotype
from model import NetworkCIFAR

TINY = ["--epochs", "1", "--layers", "2", "--init_channels", "4", "--batch_size", "8",
        "--workers", "0", "--report_freq", "5", "--auxiliary", "--cutout", "--device", "cpu"]


def train(argv):
    return run_script(train_cifar, argv)


# ---------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------

def test_cosine_lr_per_epoch_matches_spec():
    """SPEC section 5: epoch e uses 0.025 * (1 + cos(pi * (e + 1) / 600)) / 2."""
    assert engine.cosine_lr(0.025, 299, 600) == pytest.approx(0.0125)
    assert engine.cosine_lr(0.025, 599, 600) == pytest.approx(0.0, abs=1e-15)
    for e in (0, 1, 17, 450, 598):
        assert engine.cosine_lr(0.025, e, 600) == \
            pytest.approx(0.025 * (1 + math.cos(math.pi * (e + 1) / 600)) / 2)
    assert engine.cosine_lr(0.1, 49, 100, lr_min=0.01) == pytest.approx(0.055)


def test_drop_path_grows_linearly():
    assert engine.drop_path_at(0.3, 0, 600) == 0.0
    assert engine.drop_path_at(0.3, 300, 600) == pytest.approx(0.15)
    assert engine.drop_path_at(0.3, 599, 600) == pytest.approx(0.3 * 599 / 600)


def test_paper_defaults():
    args = train_cifar.parse_args([])
    assert (args.epochs, args.batch_size, args.learning_rate, args.momentum) == (600, 128, 0.025, 0.9)
    assert (args.grad_clip, args.cutout_length) == (5, 16)
    assert (args.drop_path_prob, args.auxiliary_weight) == (0.3, 0.4)
    assert (args.layers, args.init_channels, args.arch) == (20, 36, "PDARTS")
    assert not args.auxiliary and not args.cutout  # switched on by the release's command line
    assert (args.dataset, args.weight_decay) == ("cifar10", 3e-4)
    args = train_cifar.parse_args(["--cifar100"])
    assert (args.dataset, args.weight_decay) == ("cifar100", 5e-4)
    assert args.given == {"dataset"}        # --cifar100 is --dataset cifar100
    assert train_cifar.parse_args(["--cifar100", "--weight_decay", "3e-4"]).weight_decay == 3e-4


def test_cifar100_contradicting_dataset_is_a_parse_error(capsys):
    with pytest.raises(SystemExit) as stop:
        train_cifar.parse_args(["--cifar100", "--dataset", "cifar10"])
    assert stop.value.code == 2
    assert "--cifar100 contradicts --dataset cifar10" in capsys.readouterr().err


def test_training_sampler_reshuffles_each_epoch_and_test_shards_cover_everything():
    data = list(range(40))
    loader = engine.make_loader(data, 40, DistInfo(), train=True, workers=0, seed=0)
    loader.sampler.set_epoch(0)
    first = next(iter(loader)).tolist()
    loader.sampler.set_epoch(1)
    second = next(iter(loader)).tolist()
    assert sorted(first) == sorted(second) == data and first != second
    shards = [list(engine.ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def test_global_batch_must_divide_over_processes():
    assert engine.per_process_batch(1024, 8) == 128
    with pytest.raises(engine.UserError, match="divide evenly"):
        engine.per_process_batch(100, 8)


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [10, 100])
def test_one_epoch_then_test_py(classes, cifar10_dir, cifar100_dir, tmp_path, capsys):
    data = cifar10_dir if classes == 10 else cifar100_dir
    save = str(tmp_path / "runs") + os.sep
    extra = ["--cifar100"] if classes == 100 else []
    if classes == 100:  # a genotype JSON file, as a search run writes it
        arch = str(tmp_path / "genotype.json")
        save_genotype(DARTS_V2, arch)
        extra += ["--arch", arch]
    assert train(["--tmp_data_dir", data, "--save", save, "--note", "t", *TINY, *extra]) == 0
    run_dir = only_run_dir(save)
    assert os.path.basename(run_dir).startswith("eval-t-")
    assert {"log.txt", "metrics.jsonl", "weights.pt", "checkpoint.pt"} <= set(os.listdir(run_dir))

    (record,) = read_metrics(run_dir)
    # One epoch of one: the release's scheduler, stepped before the epoch, is at its end.
    assert record["epoch"] == 0 and record["lr"] == pytest.approx(0.0, abs=1e-18)
    assert record["drop_path_prob"] == 0.0
    assert record["train_images"] == (100 if classes == 10 else 20) and record["test_images"] == 20
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_top5", "epoch_time",
                "images_per_sec", "best_acc_on_test"):
        assert math.isfinite(record[key])

    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    assert ckpt["epoch"] == 1 and ckpt["last_acc"] == record["test_acc"]
    assert ckpt["network"] == {"kind": "cifar", "dataset": "cifar10" if classes == 10 else "cifar100",
                               "C": 4, "layers": 2, "num_classes": classes, "auxiliary": True}
    assert genotype_from_dict(ckpt["genotype"]) == (PDARTS if classes == 10 else DARTS_V2)
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == (3e-4 if classes == 10 else 5e-4)
    weights = load(os.path.join(run_dir, "weights.pt"))
    NetworkCIFAR(4, classes, 2, True, genotype_from_dict(ckpt["genotype"])).load_state_dict(weights)
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "param size" in log and "chosen on the test set" in log
    assert "final test accuracy (last epoch" in log

    # test.py rebuilds the network from checkpoint.pt alone, or takes flags for weights.pt.
    rc, result, _ = run_test_script(["--model_path", run_dir, "--data", data, "--workers", "0"], capsys)
    assert rc == 0
    assert result["images"] == 20 and result["top1"] == pytest.approx(record["test_acc"], abs=1e-3)
    assert result["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
    flags = ["--model_path", os.path.join(run_dir, "weights.pt"), "--tmp_data_dir", data, "--auxiliary",
             "--init_channels", "4", "--layers", "2", "--workers", "0", *extra]
    rc, result, _ = run_test_script(flags, capsys)
    assert rc == 0 and result["top1"] == pytest.approx(record["test_acc"], abs=1e-3)


def test_demo_dataset_runs(tmp_path):
    save = str(tmp_path) + os.sep
    argv = ["--dataset", "demo", "--save", save, *TINY, "--batch_size", "100"]
    assert train(argv) == 0
    (record,) = read_metrics(only_run_dir(save))
    assert record["train_images"] == 1000 and record["test_images"] == 500


def test_resume_continues_exactly(cifar10_dir, tmp_path, monkeypatch, capsys):
    common = ["--tmp_data_dir", cifar10_dir, *TINY, "--epochs", "2"]
    straight = str(tmp_path / "a") + os.sep
    assert train([*common, "--save", straight]) == 0

    # Interrupt the second run while it saves epoch 1: metrics.jsonl already has that
    # epoch, checkpoint.pt still holds epoch 0.
    interrupted = str(tmp_path / "b") + os.sep
    real_save, calls = checkpoint.save_atomic, []

    def crash_on_third_save(obj, path, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(obj, path, **kwargs)

    monkeypatch.setattr(checkpoint, "save_atomic", crash_on_third_save)
    capsys.readouterr()
    assert train([*common, "--save", interrupted]) == 130
    monkeypatch.undo()
    run_dir = only_run_dir(interrupted)
    hint = capsys.readouterr().err      # the real folder, not a placeholder
    assert f"--resume {os.path.abspath(run_dir)}" in hint and "RUN_DIR" not in hint
    assert load(os.path.join(run_dir, "checkpoint.pt"))["epoch"] == 1
    assert len(read_metrics(run_dir)) == 2

    # A changed recipe flag is refused.
    capsys.readouterr()
    assert train([*common, "--save", interrupted, "--resume", run_dir, "--learning_rate", "0.1"]) == 2
    assert "--learning_rate 0.1 (the run's: 0.025)" in capsys.readouterr().err
    # The printed command alone, from a folder without ../data: the run's own data folder
    # and settings are used (it looked in ../data).
    monkeypatch.chdir(tmp_path)
    assert train(["--resume", run_dir]) == 0

    a, b = (load(os.path.join(only_run_dir(p), "checkpoint.pt")) for p in (straight, interrupted))
    assert b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    ma, mb = read_metrics(only_run_dir(straight)), read_metrics(run_dir)
    assert [m["epoch"] for m in mb] == [0, 1]
    assert [(m["lr"], m["train_loss"], m["test_acc"]) for m in ma] == \
           [(m["lr"], m["train_loss"], m["test_acc"]) for m in mb]
    assert "resumed from" in open(os.path.join(run_dir, "log.txt")).read()

    # weights.pt holds weights only: not resumable, and the message says what is.
    assert train([*common, "--resume", os.path.join(run_dir, "weights.pt")]) == 2
    assert "is a plain state dict (network weights only); expected the checkpoint.pt" in \
        capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cifar10_dir, tmp_path, monkeypatch,
                                                                  capsys):
    save = str(tmp_path) + os.sep
    real_step, steps = engine.train_step, []

    def nan_in_second_epoch(*args, **kwargs):
        loss, logits = real_step(*args, **kwargs)
        steps.append(1)
        return (loss * float("nan") if len(steps) > 13 else loss), logits  # 13 steps per epoch

    monkeypatch.setattr(engine, "train_step", nan_in_second_epoch)
    capsys.readouterr()
    assert train(["--tmp_data_dir", cifar10_dir, "--save", save, *TINY, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "training loss became nan" in err and "Traceback" not in err
    run_dir = only_run_dir(save)
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    assert ckpt["epoch"] == 1 and len(read_metrics(run_dir)) == 1
    weights = load(os.path.join(run_dir, "weights.pt"))
    assert all(torch.equal(weights[k], v) for k, v in ckpt["model"].items())
    assert "error: the training loss became nan" in open(os.path.join(run_dir, "log.txt")).read()
    assert "keeps the checkpoint of the last good epoch" in err


def test_non_finite_loss_in_the_first_epoch_says_nothing_was_saved(cifar10_dir, tmp_path, monkeypatch,
                                                                   capsys):
    """No epoch was saved: the line must not promise a checkpoint (issue 23, item 8)."""
    save = str(tmp_path) + os.sep
    real_step = engine.train_step

    def nan_at_once(*args, **kwargs):
        loss, logits = real_step(*args, **kwargs)
        return loss * float("nan"), logits

    monkeypatch.setattr(engine, "train_step", nan_at_once)
    capsys.readouterr()
    assert train(["--tmp_data_dir", cifar10_dir, "--save", save, *TINY]) == 2
    err = capsys.readouterr().err
    run_dir = os.path.abspath(only_run_dir(save))
    assert err.startswith("error: the training loss became nan") and len(err.splitlines()) == 1
    assert f"no epoch was saved yet ({run_dir} holds no checkpoint): start a new run" in err
    assert "keeps the checkpoint" not in err and "--resume" not in err
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.pt"))


@pytest.mark.parametrize("argv,message", [
    (["--tmp_data_dir", "{missing}"], "cifar10 not found"),
    (["--arch", "NO_SUCH_CELL"], "unknown genotype 'NO_SUCH_CELL'"),
    (["--arch", "{bad_json}"], "is not valid JSON"),
    (["--arch", "{dead_node}"], "normal node(s) 6 (pairs 8-9) reach neither"),
    (["--resume", "{missing}"], "checkpoint not found"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
    # It ran silently (one short batch per epoch), logging a memory estimate of 2e9 GiB.
    (["--batch_size", "1000000000000"], "larger than the training set (100 images); use "
                                        "--batch_size 100 or less"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, cifar10_dir, tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    dead_node = tmp_path / "dead.json"     # 10 pairs, concat [2, 3, 4, 5]: node 6 unused
    cell = genotype_to_dict(PDARTS)
    cell["normal"] += [["sep_conv_3x3", 0], ["skip_connect", 1]]
    dead_node.write_text(json.dumps(cell))
    argv = [a.format(missing=str(tmp_path / "nowhere"), bad_json=bad_json, dead_node=dead_node)
            for a in argv]
    save = str(tmp_path / "runs") + os.sep
    capsys.readouterr()
    assert train(["--tmp_data_dir", cifar10_dir, *TINY, "--save", save, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not glob.glob(save + "*"), "no run folder is left behind by bad input"


def test_torchrun_two_processes_gloo(cifar10_dir, tmp_path, capsys):
    save = str(tmp_path) + os.sep
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_cifar.py"), "--tmp_data_dir", cifar10_dir, "--save", save,
           "--note", "ddp", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = only_run_dir(save)
    (record,) = read_metrics(run_dir)
    assert record["world_size"] == 2
    assert record["train_images"] == 100 and record["test_images"] == 20  # each image once
    assert "2 process(es), 4 images per process per step" in open(os.path.join(run_dir, "log.txt")).read()
    # The sharded, all-reduced test figures equal a single-process evaluation of the saved model.
    rc, result, _ = run_test_script(["--model_path", run_dir, "--data", cifar10_dir, "--workers", "0"],
                                 capsys)
    assert rc == 0 and result["top1"] == pytest.approx(record["test_acc"], abs=1e-3)
    assert result["loss"] == pytest.approx(record["test_loss"], rel=1e-5)
