"""train_search.py end to end on tiny settings: every output file, the per-epoch
schedules in metrics.jsonl, --derive on the search's own arch_state.json, exact resume,
the ImageFolder path and a 2-process gloo (DDP) search."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, SEARCH_TINY, only_search_dir, read_metrics, search, stopped_after_epochs

import train_search as ts
from data import build_search_data
from derivation import OPS_PER_STAGE
from genotypes import format_genotype, load_genotype_file
from runs import close_logging, run_main
from visualize import graphviz_available


def test_search_writes_every_output(cifar10_dir, tmp_path, capsys):
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    rc, lines = search(["--tmp_data_dir", cifar10_dir, "--save", save, "--note", "tiny",
                        "--dropout_rate", "0.1", "--dropout_rate", "0.4", "--dropout_rate", "0.7",
                        *SEARCH_TINY], capsys)
    assert rc == 0
    run_dir = only_search_dir(save)
    assert os.path.basename(run_dir).startswith("search-tiny-")   # {save}search-{note}-{time}
    for name in ("log.txt", "metrics.jsonl", "genotype.json", "genotypes_by_skip_budget.json",
                 "arch_state.json", "checkpoint.pt"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    if graphviz_available():
        for name in ("normal", "reduction", "stage1_normal", "stage2_reduction", "stage3_normal"):
            assert os.path.isfile(os.path.join(run_dir, f"{name}.pdf")), name

    # The last stdout line is the pasteable Genotype(...) of genotype.json, at most 2 skips.
    genotype = load_genotype_file(os.path.join(run_dir, "genotype.json"))
    assert lines[-1] == format_genotype(genotype)
    assert sum(op == "skip_connect" for op, _ in genotype.normal) <= 2
    assert all(op != "none" for op, _ in genotype.normal + genotype.reduce)

    # metrics.jsonl: one line per epoch with the schedules of SPEC section 2.
    records = read_metrics(run_dir)
    assert [(r["stage"], r["epoch"]) for r in records] == [(s, e) for s in (1, 2, 3) for e in (0, 1)]
    for r in records:
        rate = [0.1, 0.4, 0.7][r["stage"] - 1]
        assert r["lr"] == pytest.approx([0.0125, 0.0][r["epoch"]], abs=1e-18)   # cos(pi(e+1)/2)
        assert r["skip_dropout"] == pytest.approx(ts.skip_dropout_rate(r["epoch"], 2, rate, 1))
        assert r["valid_acc"] is not None                 # last 4 epochs: all of them here
        assert (r["arch_loss"] is None) == (r["epoch"] < 1)
        for key in ("train_acc", "train_loss", "epoch_time_s", "images_per_s", "peak_memory_mb"):
            assert isinstance(r[key], (int, float)), key
        cols = OPS_PER_STAGE[r["stage"] - 1]
        assert len(r["alphas_normal_softmax"]) == 14 and len(r["alphas_normal_softmax"][0]) == cols
        assert sum(r["alphas_reduce_softmax"][5]) == pytest.approx(1.0, abs=1e-5)

    # arch_state.json: raw alphas and switches of each stage; 8/5/3 columns; cells of 2/3/4.
    with open(os.path.join(run_dir, "arch_state.json")) as f:
        state = json.load(f)
    assert [s["layers"] for s in state["stages"]] == [3, 4, 5]
    for s, stage in enumerate(state["stages"]):
        assert len(stage["alphas_normal"]) == 14 and len(stage["alphas_reduce"][0]) == OPS_PER_STAGE[s]
        assert all(sum(row) == OPS_PER_STAGE[s] for row in stage["switches_normal"])
    assert state["genotype"] == json.load(open(os.path.join(run_dir, "genotype.json")))

    with open(os.path.join(run_dir, "genotypes_by_skip_budget.json")) as f:
        budgets = json.load(f)
    n = budgets["num_skip_connects"]
    assert sorted(map(int, budgets["by_max_skip"]), reverse=True) == [m for m in range(8, -1, -1) if n > m]

    # --derive on the search's own file gives the same cell, for the default budget.
    rc, derived = search(["--derive", os.path.join(run_dir, "arch_state.json")], capsys)
    assert rc == 0 and derived[-1] == lines[-1]
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "restricting skip-connects" in log and "stage 3 peak device memory" in log


def test_resume_gives_the_same_genotype(cifar10_dir, tmp_path, capsys):
    # Alpha steps from epoch 0, so the checkpoint holds Adam's state too.
    common = ["--tmp_data_dir", cifar10_dir, "--deterministic", *SEARCH_TINY, "--arch_warmup_epochs", "0"]
    full, cut = str(tmp_path / "full") + "/", str(tmp_path / "cut") + "/"
    os.makedirs(full)
    os.makedirs(cut)
    rc, full_lines = search(["--save", full, *common], capsys)
    assert rc == 0
    # Killed mid stage 2 (after its epoch 0 of 2), then resumed.
    with stopped_after_epochs(3):
        rc, _ = search(["--save", cut, *common], capsys)
    assert rc == 130
    run_dir = only_search_dir(cut)
    assert not os.path.exists(os.path.join(run_dir, "genotype.json"))
    assert len(read_metrics(run_dir)) == 3
    # A recipe flag that differs from the run's is refused, not silently ignored.
    rc = run_main(ts.main, ts.parse_args(["--resume", run_dir, "--epochs", "5", "--seed", "3"]))
    err = capsys.readouterr().err
    assert rc == 2 and "--epochs 5 (the run's: 2)" in err and "--seed" not in err
    assert len(read_metrics(run_dir)) == 3
    # Repeating the original command line with --resume added is fine.
    rc, resumed_lines = search(["--resume", run_dir, *common], capsys)
    assert rc == 0
    assert resumed_lines[-1] == full_lines[-1]
    # The resume line counts epochs as the epoch lines do (0-based): stage 2's epoch 0 was
    # done, so epoch 1 is next and is the first epoch line after it.
    log = open(os.path.join(run_dir, "log.txt")).read()
    said = log.index("at stage 2, epoch 1 (1 of 2 epochs of this stage done)")
    assert log.index("stage 2 epoch 1/2", said) > said
    assert ts.resume_position(0, 2, 2) == "at the end of stage 1 (all 2 epochs of this stage done)"
    # A finished search: said so, its cell printed, nothing re-derived or appended.
    log_size = os.path.getsize(os.path.join(run_dir, "log.txt"))
    rc, again = search(["--resume", run_dir], capsys)
    assert rc == 0 and "is complete" in again[0] and again[-1] == full_lines[-1]
    assert len(read_metrics(run_dir)) == 6 and os.path.getsize(os.path.join(run_dir, "log.txt")) == log_size
    a = json.load(open(os.path.join(only_search_dir(full), "arch_state.json")))
    b = json.load(open(os.path.join(run_dir, "arch_state.json")))
    for sa, sb in zip(a["stages"], b["stages"]):
        assert sa["alphas_normal"] == sb["alphas_normal"] and sa["alphas_reduce"] == sb["alphas_reduce"]
    ma, mb = read_metrics(only_search_dir(full)), read_metrics(run_dir)
    assert [(r["stage"], r["epoch"], r["train_loss"]) for r in ma] == \
        [(r["stage"], r["epoch"], r["train_loss"]) for r in mb]


def test_demo_resumed_with_the_printed_command_is_the_uninterrupted_run(tmp_path, capsys,
                                                                     monkeypatch):
    """The README's commands: ``--demo --deterministic``, Ctrl-C in stage 2 (epoch 1 after
    step 2), then the printed ``python train_search.py --resume DIR`` in a new process
    (one that would use 2 threads). --demo's presets (--threads 1, channels_last) come from
    the run: the resumed run ran on every core and diverged from step 10 on. 15 + 15 images
    of each class (3 steps of the demo's batch 50 per epoch) keep it short."""
    demo = ["--demo", "--deterministic", "--epochs", "2", "--arch_warmup_epochs", "1",
            "--image_size", "8", "--subset_per_class", "15", "15"]
    full, cut = str(tmp_path / "full") + "/", str(tmp_path / "cut") + "/"
    os.makedirs(full)
    os.makedirs(cut)
    rc, full_lines = search([*demo, "--save", full], capsys)
    assert rc == 0
    real_step, calls = ts.search_step, []

    def ctrl_c_in_stage_2_epoch_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 * 3 + 3:       # 3 steps per epoch: stage 2, epoch 1, step 3
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(ts, "search_step", ctrl_c_in_stage_2_epoch_1)
    rc = run_main(ts.main, ts.parse_args([*demo, "--save", cut]))
    close_logging()
    monkeypatch.undo()
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 130 and "continue with: python train_search.py --resume " in hint
    command = hint.split("continue with: ", 1)[1].split()
    proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_search_dir(cut)
    assert proc.stdout.strip().splitlines()[-1] == full_lines[-1]
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert log.count("CPU threads: 1\n") == 2 and "channels_last True" in log
    keys = ("stage", "epoch", "lr", "train_loss", "train_acc", "arch_loss", "valid_loss",
            "alphas_normal_softmax", "alphas_reduce_softmax", "normal_param_free", "collapse")
    ma, mb = read_metrics(only_search_dir(full)), read_metrics(run_dir)
    assert len(mb) == 6 and [[r[k] for k in keys] for r in ma] == [[r[k] for k in keys] for r in mb]
    a = json.load(open(os.path.join(only_search_dir(full), "arch_state.json")))
    b = json.load(open(os.path.join(run_dir, "arch_state.json")))
    assert a == b


def test_resume_of_a_missing_run_is_an_error(tmp_path, capsys):
    rc = run_main(ts.main, ts.parse_args(["--resume", str(tmp_path / "nowhere")]))
    assert rc == 2 and "no run folder" in capsys.readouterr().err
    rc = run_main(ts.main, ts.parse_args(["--resume", str(tmp_path)]))
    assert rc == 2 and "has no checkpoint.pt" in capsys.readouterr().err


@pytest.mark.parametrize("interrupt_at", [1, 2])
def test_ctrl_c_says_how_to_resume(cifar10_dir, tmp_path, capsys, monkeypatch, interrupt_at):
    """The run folder is printed at the start; after Ctrl-C the hint names the real folder,
    or says that nothing can be resumed when the first epoch did not finish."""
    real_epoch, calls = ts.train_epoch, []

    def epoch_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(ts, "train_epoch", epoch_then_ctrl_c)
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    rc = run_main(ts.main, ts.parse_args(["--tmp_data_dir", cifar10_dir, "--save", save, *SEARCH_TINY]))
    out, err = capsys.readouterr()
    run_dir = os.path.abspath(glob.glob(os.path.join(save, "search-*"))[0]) if interrupt_at > 1 \
        else out.split("run folder ", 1)[1].split()[0]
    assert rc == 130 and f"run folder {run_dir}" in out
    if interrupt_at == 1:   # no epoch saved: the folder it made is removed, and it says so
        assert "interrupted before its first epoch was saved: nothing to resume" in err
        assert f"removed its run folder {run_dir}; start the run again" in err
        assert not os.path.exists(run_dir) and not os.listdir(save)
    else:
        assert f"continue with: python train_search.py --resume {run_dir}" in err


def test_a_batch_larger_than_a_half_is_one_line(cifar10_dir, tmp_path, capsys):
    """It ran silently with one short batch per epoch (100 images, --batch_size 5000)."""
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    rc = run_main(ts.main, ts.parse_args(["--tmp_data_dir", cifar10_dir, "--save", save, *SEARCH_TINY,
                                          "--batch_size", "5000"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and os.listdir(save) == []
    assert "--batch_size 5000 is larger than a half of the search's 100 training images " \
           "(weight half 50, alpha half 50 at --train_portion 0.5); use --batch_size 50" in err[0]


def test_release_search_flags_cutout_and_drop_path_prob(cifar10_dir):
    """The release's --cutout/--cutout_length (Cutout on the images of both halves) and
    --drop_path_prob (unused) are accepted; Cutout is off without --cutout."""
    from data import Cutout

    argv = ["--tmp_data_dir", cifar10_dir, *SEARCH_TINY]
    off, _, _ = build_search_data(ts.parse_args(argv))
    assert not any(isinstance(t, Cutout) for t in off.transform.transforms)
    args = ts.parse_args([*argv, "--cutout", "--cutout_length", "6", "--drop_path_prob", "0.2"])
    data, _, text = build_search_data(args)
    cutouts = [t for t in data.transform.transforms if isinstance(t, Cutout)]
    assert len(cutouts) == 1 and cutouts[0].length == 6 and "cutout 6 on both halves" in text
    # Both halves are the same dataset object, so both get the Cutout: zeroed squares.
    x, _ = data[0]
    assert (x == 0).all(dim=0).sum() >= 9


def test_search_on_an_image_folder(image_folder, tmp_path, capsys):
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    rc, lines = search(["--dataset", "folder", "--tmp_data_dir", image_folder, "--save", save,
                        *SEARCH_TINY, "--batch_size", "3", "--epochs", "1", "--arch_warmup_epochs", "0"],
                       capsys)
    assert rc == 0 and lines[-1].startswith("Genotype(normal=[")
    run_dir = only_search_dir(save)
    assert os.path.isfile(os.path.join(run_dir, "genotype.json"))
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "3 classes" in log and "resized to 16x16" in log


def test_two_process_ddp_search_agrees(cifar10_dir, tmp_path):
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_search.py"), "--tmp_data_dir", cifar10_dir, "--save", save,
           "--threads", "1", *SEARCH_TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = [ln for ln in proc.stdout.splitlines() if ln.startswith("Genotype(")]
    assert len(cells) == 1          # rank 0 prints, after checking that every rank agrees
    run_dir = only_search_dir(save)
    assert format_genotype(load_genotype_file(os.path.join(run_dir, "genotype.json"))) == cells[0]
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "all 2 processes derived this same cell" in log
    # --batch_size is global: 10 = 2 x 5; each rank takes half of every epoch's 50 weight
    # images, 5 steps of 5, as one process takes 5 steps of 10.
    assert "data-parallel over 2 processes: batch 10 = 2 x 5 per process" in log
    assert "step 004/5" in log


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(cifar10_dir, tmp_path, capsys,
                                                             monkeypatch):
    real_step, calls = ts.search_step, []

    def step_going_nan(*args, **kwargs):
        logits, loss_w, loss_a = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) > 5:          # the weight half is 5 batches: epoch 1 goes wrong
            loss_w = loss_w * float("nan")
        return logits, loss_w, loss_a

    monkeypatch.setattr(ts, "search_step", step_going_nan)
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    rc = run_main(ts.main, ts.parse_args(["--tmp_data_dir", cifar10_dir, "--save", save, *SEARCH_TINY]))
    err = capsys.readouterr().err
    assert rc == 2 and "nan" in err and "checkpoint" in err
    run_dir = only_search_dir(save)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == (0, 1)      # the last good epoch
    assert len(read_metrics(run_dir)) == 1


def test_search_with_bf16_and_channels_last(cifar10_dir, tmp_path, capsys):
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    rc, lines = search(["--tmp_data_dir", cifar10_dir, "--save", save, *SEARCH_TINY, "--epochs", "1",
                        "--arch_warmup_epochs", "0", "--amp", "bf16", "--channels_last"], capsys)
    assert rc == 0 and lines[-1].startswith("Genotype(normal=[")
    log = open(os.path.join(only_search_dir(save), "log.txt")).read()
    assert "speed options: amp bf16, channels_last True" in log
    metrics = read_metrics(only_search_dir(save))
    assert all(m["train_loss"] > 0 and m["arch_loss"] > 0 for m in metrics)


def test_fp16_on_cpu_is_refused(cifar10_dir, tmp_path, capsys):
    rc = run_main(ts.main, ts.parse_args(["--tmp_data_dir", cifar10_dir, "--save", str(tmp_path) + "/",
                                          *SEARCH_TINY, "--amp", "fp16"]))
    assert rc == 2 and "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.glob("search-*"))     # refused before the run folder exists


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("extra", [[], ["--amp", "fp16", "--channels_last"], ["--amp", "bf16", "--compile"],
                                   ["--cutout", "--cutout_length", "6"]])
def test_search_on_cuda_with_the_gpu_input_pipeline(cifar10_dir, tmp_path, capsys, extra):
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    argv = [a if a != "cpu" else "cuda" for a in SEARCH_TINY]
    rc, lines = search(["--tmp_data_dir", cifar10_dir, "--save", save, *argv, *extra], capsys)
    assert rc == 0 and lines[-1].startswith("Genotype(normal=[")
    run_dir = only_search_dir(save)
    assert "input pipeline: images on the GPU" in open(os.path.join(run_dir, "log.txt")).read()
    metrics = read_metrics(run_dir)
    assert all(m["peak_memory_mb"] > 0 for m in metrics)
    assert all(m["arch_loss"] is None or m["arch_loss"] > 0 for m in metrics)
