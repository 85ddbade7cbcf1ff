"""Faults and bad input (issue 14): a torn metrics line, a full disk, bad CIFAR pickles,
non-writable folders, checkpoints of another kind, a stopped or killed torchrun process,
non-finite values before a save, two runs racing for a folder or one run folder, and the
temporaries of an interrupted write. Each ends in one ``error:`` line and exit status 2
with nothing valid lost, and a resume continues to the same result as an uninterrupted
run. Disk faults are simulated by making ``os.write`` fail, as a full disk makes it."""
import errno
import glob
import json
import os
import pickle
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import (
    ROOT,
    SEARCH_TINY,
    TRAIN_TINY,
    load,
    only_run_dir,
    only_search_dir,
    read_metrics,
    run_script,
    run_test_script,
    search,
    write_cifar_folder,
)
from helpers import read_metrics as read_search_metrics

import checkpoint
import distributed
import engine
import errors
import loop
import run_files
import runs
import train_cifar
import train_search as ts
import utils
from data import DataError, load_cifar_arrays
from derivation import OPS_PER_STAGE
from genotypes import PDARTS

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")


def fail_writes(monkeypatch, name: str, after: int, err: int = errno.ENOSPC) -> list:
    """Make ``os.write`` to the file ``name`` (or its temporaries) fail with ``err`` after
    ``after`` writes; the failing write first writes half its bytes, as a disk filling up
    does. Returns the list of failures (for asserting that the fault happened)."""
    real_write, count, failed = os.write, [0], []

    def write(fd, data):
        try:
            target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            target = ""
        if target == name or target.startswith(name + errors.TMP_INFIX):
            count[0] += 1
            if count[0] > after:
                real_write(fd, bytes(data[:len(data) // 2]))
                failed.append(target)
                raise OSError(err, os.strerror(err))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return failed


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def temporaries(run_dir: str) -> list[str]:
    return glob.glob(os.path.join(run_dir, f"*{errors.TMP_INFIX}*"))


def hold_lock(run_dir: str) -> subprocess.Popen:
    """Another process that owns ``run_dir`` (as a running search or training would)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import runs; "
            "runs.lock_run_dir(sys.argv[2]); print('locked', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, ROOT, run_dir], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ---------------------------------------------------------------------------------------
# 1, 2, 13, 14: a full disk, a torn line, a locked folder, stale temporaries; then resume
# ---------------------------------------------------------------------------------------

@needs_proc
def test_search_survives_a_full_disk_a_torn_line_and_a_second_owner(cifar10_dir, tmp_path, capsys,
                                                                    monkeypatch):
    # One epoch per stage: the fault falls at a stage boundary (test_search_run's resume
    # test cuts mid-stage).
    common = ["--tmp_data_dir", cifar10_dir, "--deterministic", *SEARCH_TINY,
              "--arch_warmup_epochs", "0", "--epochs", "1"]
    full, cut = str(tmp_path / "full") + "/", str(tmp_path / "cut") + "/"
    rc, full_lines = search(["--save", full, *common], capsys)
    assert rc == 0

    # The disk fills up while the 2nd metrics line (stage 2, epoch 0) is written: half
    # of it reaches the file, the checkpoint still holds the end of stage 1.
    failed = fail_writes(monkeypatch, "metrics.jsonl", after=1)
    rc = runs.run_main(ts.main, ts.parse_args(["--save", cut, *common]))
    monkeypatch.undo()
    assert rc == 2 and failed
    err = one_error_line(capsys.readouterr().err)
    assert "the disk is full" in err and "metrics.jsonl" in err
    run_dir = only_search_dir(cut)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = f.read().split("\n")
    assert len(lines) == 2 and lines[-1] and not lines[-1].endswith("}")   # a torn last line
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == (0, 1)
    assert not temporaries(run_dir) and not os.path.exists(os.path.join(run_dir, run_files.LOCK))

    # A kill during a checkpoint write left a temporary; another process owns the folder.
    stale = os.path.join(run_dir, "checkpoint.pt.tmp.999999")
    open(stale, "wb").write(b"half a checkpoint")
    holder = hold_lock(run_dir)
    try:
        rc = runs.run_main(ts.main, ts.parse_args(["--resume", run_dir, "--workers", "0"]))
        err = one_error_line(capsys.readouterr().err)
        assert rc == 2 and f"in use by process {holder.pid} on host {socket.gethostname()}" in err
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(stale)      # the refused resume touched nothing

    # The holder died without cleaning up: its lock is taken over, the torn line and the
    # temporary are dropped, and the run ends as the uninterrupted one.
    assert os.path.exists(os.path.join(run_dir, run_files.LOCK))
    rc, resumed_lines = search(["--resume", run_dir, "--workers", "0"], capsys)
    assert rc == 0 and resumed_lines[-1] == full_lines[-1]
    assert not os.path.exists(stale) and not os.path.exists(os.path.join(run_dir, run_files.LOCK))
    ma, mb = read_search_metrics(only_search_dir(full)), read_search_metrics(run_dir)
    assert [(r["stage"], r["epoch"], r["train_loss"], r["valid_loss"]) for r in ma] == \
        [(r["stage"], r["epoch"], r["train_loss"], r["valid_loss"]) for r in mb]
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "took over the lock" in log and "checkpoint.pt.tmp.999999" in log


@needs_proc
def test_training_survives_a_full_disk_and_a_torn_line(cifar10_dir, tmp_path, capsys, monkeypatch):
    common = ["--tmp_data_dir", cifar10_dir, *TRAIN_TINY]
    straight, cut = str(tmp_path / "a") + os.sep, str(tmp_path / "b") + os.sep
    assert run_script(train_cifar, [*common, "--save", straight]) == 0

    # The disk is full when epoch 1's checkpoint is written (its metrics line is out).
    failed = fail_writes(monkeypatch, "checkpoint.pt", after=1)
    capsys.readouterr()
    assert run_script(train_cifar, [*common, "--save", cut]) == 2 and failed
    monkeypatch.undo()
    run_dir = only_run_dir(cut)
    err = one_error_line(capsys.readouterr().err)
    assert "the disk is full" in err and "the previous checkpoint.pt is intact" in err
    assert f"--resume {run_dir}" in err
    assert not temporaries(run_dir)
    assert load(os.path.join(run_dir, "checkpoint.pt"))["epoch"] == 1   # still loads
    # A kill while a line was written leaves it torn, here after epoch 1's line.
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 2, "lr": 0.0')

    assert run_script(train_cifar, [*common, "--save", cut, "--resume", run_dir]) == 0
    a, b = (load(os.path.join(only_run_dir(p), "checkpoint.pt")) for p in (straight, cut))
    assert b["epoch"] == 2
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    ma, mb = read_metrics(only_run_dir(straight)), read_metrics(run_dir)
    assert [(m["epoch"], m["train_loss"], m["test_loss"]) for m in ma] == \
           [(m["epoch"], m["train_loss"], m["test_loss"]) for m in mb]


def test_read_metrics_drops_only_a_torn_last_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "lo')
    assert runs.read_metrics_file(path) == [{"epoch": 0}, {"epoch": 1}]
    runs.rewrite_metrics(path, lambda r: r["epoch"] < 1)
    assert open(path).read() == '{"epoch": 0}\n'
    with open(path, "w") as f:
        f.write('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(errors.UserError, match="line 2 is not JSON"):
        runs.read_metrics_file(path)


def test_metrics_lines_are_json_with_null_for_non_finite_numbers(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    writer = runs.MetricsWriter(path)
    writer.write({"epoch": 0, "valid_loss": float("nan"), "alphas": [[1.0, float("inf")]],
                  "t": torch.tensor([float("-inf"), 2.0])})
    writer.write({"epoch": 1, "valid_loss": 0.5})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    lines = open(path).read().splitlines()
    records = [json.loads(ln, parse_constant=refuse) for ln in lines]
    assert records[0] == {"epoch": 0, "valid_loss": None, "alphas": [[1.0, None]], "t": [None, 2.0]}
    assert records[1]["valid_loss"] == 0.5


@needs_proc
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from checkpoint import save_atomic

    path = str(tmp_path / "checkpoint.pt")
    save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    fail_writes(monkeypatch, "checkpoint.pt", after=0)
    with pytest.raises(errors.StorageError, match="the disk is full.*previous checkpoint.pt is "
                                                 "intact; once the cause is fixed, continue with "
                                                 "--resume RUN"):
        save_atomic({"epoch": 2, "w": torch.zeros(3)}, path, resume_hint="RUN")
    monkeypatch.undo()
    assert load(path)["epoch"] == 1 and not temporaries(str(tmp_path))


@needs_proc
def test_disk_full_at_the_first_checkpoint_says_start_again(tmp_path, monkeypatch):
    """With no checkpoint yet, --resume would find nothing: the advice is to start again
    (issue 23, item 7); a weights.pt that fails after its checkpoint was saved can resume."""
    from checkpoint import save_atomic

    path = str(tmp_path / "checkpoint.pt")
    fail_writes(monkeypatch, "checkpoint.pt", after=0)
    with pytest.raises(errors.StorageError) as e:
        save_atomic({"epoch": 1}, path, resume_hint="RUN")
    message = str(e.value)
    assert "checkpoint.pt was not saved" in message and "--resume" not in message
    assert "cannot be resumed: once the cause is fixed, start it again (and delete RUN)" in message
    monkeypatch.undo()
    save_atomic({"epoch": 1}, path)
    fail_writes(monkeypatch, "weights.pt", after=0)
    with pytest.raises(errors.StorageError, match="weights.pt was not saved; once the cause is "
                                                 "fixed, continue with --resume RUN"):
        save_atomic({}, str(tmp_path / "weights.pt"), resume_hint="RUN", resume_from=path)


@needs_proc
def test_training_with_a_full_disk_at_the_first_checkpoint(cifar10_dir, tmp_path, capsys, monkeypatch):
    save = str(tmp_path / "runs") + os.sep
    fail_writes(monkeypatch, "checkpoint.pt", after=0)
    capsys.readouterr()
    rc = run_script(train_cifar, ["--tmp_data_dir", cifar10_dir, "--save", save, *TRAIN_TINY,
                                  "--epochs", "1"])
    monkeypatch.undo()
    err = one_error_line(capsys.readouterr().err)
    run_dir = only_run_dir(save)
    assert rc == 2 and "the disk is full" in err and "start it again" in err
    assert "continue with --resume" not in err and not os.path.exists(os.path.join(run_dir, "checkpoint.pt"))


# ---------------------------------------------------------------------------------------
# 3 and 12: CIFAR pickles checked when loaded
# ---------------------------------------------------------------------------------------

def _rewrite_batch(path: str, change) -> None:
    with open(path, "rb") as f:
        batch = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump(change(batch), f, protocol=2)


@pytest.mark.parametrize("classes,change,message", [
    (10, lambda b: {**b, "labels": [10] * len(b["labels"])}, "label 10 is out of range for 10 classes"),
    (10, lambda b: {**b, "labels": [-1] + b["labels"][1:]}, "label -1 is out of range"),
    (100, lambda b: {**b, "fine_labels": [100] + b["fine_labels"][1:]},
     "label 100 is out of range for 100 classes"),
    (10, lambda b: {**b, "labels": [2.5] + b["labels"][1:]}, "the labels must be integers, found 2.5"),
    (10, lambda b: {**b, "labels": ["cat"] + b["labels"][1:]}, "the labels must be integers, found 'cat'"),
    (10, lambda b: {**b, "labels": np.zeros(len(b["labels"]), np.float32)},
     "the labels must be integers, found 0.0"),
    (10, lambda b: [b["data"], b["labels"]], "holds a list, not a dict"),
    (10, lambda b: {k: v for k, v in b.items() if k != "labels"}, "has no 'labels' entry"),
    (10, lambda b: {**b, "data": b["data"].astype(np.float32)}, "the image data is stored as float32"),
    (10, lambda b: {**b, "data": b["data"].astype(np.int16) * 2}, "image values range from"),
    (10, lambda b: {**b, "data": b["data"][:, :1000]}, "'data' has shape [20, 1000]"),
    (10, lambda b: {**b, "labels": b["labels"][:-1]}, "20 images but 19 labels"),
])
def test_bad_cifar_pickles_are_refused_naming_the_file(classes, change, message, tmp_path):
    root = write_cifar_folder(str(tmp_path / "data"), classes)
    dataset = "cifar10" if classes == 10 else "cifar100"
    name = "data_batch_1" if classes == 10 else "train"
    path = os.path.join(root, "cifar-10-batches-py" if classes == 10 else "cifar-100-python", name)
    _rewrite_batch(path, change)
    with pytest.raises(DataError) as info:
        load_cifar_arrays(root, dataset, train=True)
    assert message in str(info.value) and path in str(info.value)


@pytest.mark.parametrize("script", ["search", "train"])
def test_a_bad_label_stops_a_run_before_it_starts(script, tmp_path, capsys):
    root = write_cifar_folder(str(tmp_path / "data"), 10)
    _rewrite_batch(os.path.join(root, "cifar-10-batches-py", "data_batch_3"),
                   lambda b: {**b, "labels": b["labels"][:-1] + [10]})
    save = str(tmp_path / "runs") + os.sep
    capsys.readouterr()
    if script == "search":
        rc = runs.run_main(ts.main, ts.parse_args(["--tmp_data_dir", root, "--save", save,
                                                    *SEARCH_TINY]))
    else:
        rc = run_script(train_cifar, ["--tmp_data_dir", root, "--save", save, *TRAIN_TINY])
    err = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "data_batch_3: label 10 is out of range" in err
    assert not glob.glob(save + "*"), "nothing is written for bad input"


# ---------------------------------------------------------------------------------------
# 6: folders that cannot be written
# ---------------------------------------------------------------------------------------

def test_a_save_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    save = str(tmp_path / "readonly") + os.sep
    os.makedirs(save)
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):   # as in a folder without write permission
        if str(path).startswith(save):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    capsys.readouterr()
    rc = runs.run_main(ts.main, ts.parse_args(["--demo", "--save", save]))
    err = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "cannot create the run folder" in err and "Permission denied" in err
    assert os.path.abspath(save.rstrip(os.sep)) in err


@needs_proc
def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    real_open = os.open

    def read_only_open(path, flags, *args):
        if str(path).startswith(run_dir) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_open)
    message = re.escape(f"the folder {run_dir} is on a read-only file system")
    with pytest.raises(errors.StorageError, match=message):
        runs.own_run_dir(run_dir)
    with pytest.raises(errors.StorageError, match=message):
        runs.MetricsWriter(os.path.join(run_dir, "metrics.jsonl")).write({"epoch": 0})


# ---------------------------------------------------------------------------------------
# 7: checkpoints of another kind
# ---------------------------------------------------------------------------------------

def _fake_search_run(folder) -> str:
    os.makedirs(folder, exist_ok=True)
    torch.save({"kind": "pdarts-search", "version": 1, "model": {"w": torch.ones(1)}},
               os.path.join(folder, "checkpoint.pt"))
    return str(folder)


def _training_checkpoint(**drop) -> dict:
    model = engine.build_network(engine.network_info("cifar", "cifar10", 4, 2, 10, False), PDARTS)
    args = train_cifar.parse_args(["--layers", "2", "--init_channels", "4"])
    opt = torch.optim.SGD(model.parameters(), 0.1)
    ckpt = checkpoint.training_state(model, opt, 1, args, PDARTS, engine.network_info(
        "cifar", "cifar10", 4, 2, 10, False), {"acc": None, "epoch": None}, {})
    return {k: v for k, v in ckpt.items() if k not in drop}


def test_test_py_refuses_a_search_checkpoint_and_odd_dicts(tmp_path, capsys):
    run = _fake_search_run(tmp_path / "search")
    rc, _, err = run_test_script(["--model_path", run, "--device", "cpu"], capsys)
    assert rc == 2 and "is a train_search.py checkpoint" in one_error_line(err)
    assert "train the searched cell first" in err

    odd = str(tmp_path / "odd.pt")
    torch.save({"foo": 1, "bar": "x"}, odd)
    rc, _, err = run_test_script(["--model_path", odd, "--device", "cpu"], capsys)
    assert rc == 2 and "a dict with the keys bar, foo, with no state dict" in one_error_line(err)

    torn = str(tmp_path / "no_network.pt")
    torch.save(_training_checkpoint(network=True), torn)
    rc, _, err = run_test_script(["--model_path", torn, "--device", "cpu"], capsys)
    assert rc == 2 and "a training checkpoint without network" in one_error_line(err)


def test_resume_refuses_a_checkpoint_of_the_other_script(tmp_path, capsys):
    search_run = _fake_search_run(tmp_path / "search")
    capsys.readouterr()
    assert run_script(train_cifar, ["--resume", search_run, *TRAIN_TINY]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "is a train_search.py checkpoint" in err
    assert "expected the checkpoint.pt of a train_cifar.py" in err

    train_run = str(tmp_path / "train")
    os.makedirs(train_run)
    torch.save(_training_checkpoint(), os.path.join(train_run, "checkpoint.pt"))
    assert runs.run_main(ts.main, ts.parse_args(["--resume", train_run])) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "is a train_cifar.py / train_imagenet.py checkpoint" in err
    assert "--resume of train_search.py expects the folder of a search run" in err

    torch.save({"kind": "pdarts-search", "args": {}}, os.path.join(search_run, "checkpoint.pt"))
    assert runs.run_main(ts.main, ts.parse_args(["--resume", search_run])) == 2
    assert "a search checkpoint without stage, epoch" in one_error_line(capsys.readouterr().err)

    torch.save(_training_checkpoint(args=True), os.path.join(train_run, "checkpoint.pt"))
    assert run_script(train_cifar, ["--resume", train_run, *TRAIN_TINY]) == 2
    assert "a training checkpoint without args" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------
# 9 and 14: a stopped or killed torchrun process ends the job in bounded time
# ---------------------------------------------------------------------------------------

RANK_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
import distributed, runs

def main(_):
    env = distributed.init_distributed("cpu", float(sys.argv[2]))
    if env.rank == 1 or os.environ.get("EVERY_RANK"):
        os.kill(os.getpid(), getattr(signal, sys.argv[3]))
    dist.all_reduce(torch.ones(1))
    return 0

sys.exit(runs.run_main(main, None))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(tmp_path, script_args: list[str], **extra_env: str) -> list[subprocess.Popen]:
    """RANK_SCRIPT as the two processes of a torchrun job (gloo on a free local port)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **extra_env)
        procs.append(subprocess.Popen([sys.executable, str(script), ROOT, *script_args], env=env,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
def test_a_stopped_or_killed_rank_ends_the_others_within_the_timeout(sig, tmp_path):
    procs = _start_ranks(tmp_path, ["3", sig])
    try:
        _, err = procs[0].communicate(timeout=120)    # start-up is slow on a busy machine
        assert procs[0].returncode == 2, err
        assert "error: another process of this torchrun job failed or stopped responding" in err
        assert "Traceback" not in err
        # torchrun's ChildFailedError traceback follows: our line says what explains it.
        assert "[process 0: the cause is the other process's error line (none if it was killed " \
            "or stopped); torchrun's ChildFailedError report that follows is a consequence]" in err
    finally:
        procs[1].kill()
        procs[1].communicate()


TRAIN_RANK_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import engine, runs, train_cifar

real_step, steps = engine.train_step, [0]

def train_step(*args, **kwargs):     # rank 1 stops (SIGSTOP) in the middle of epoch 1
    steps[0] += 1
    if os.environ["RANK"] == "1" and steps[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGSTOP)
    return real_step(*args, **kwargs)

engine.train_step = train_step
sys.exit(runs.run_main(train_cifar.main, train_cifar.parse_args(sys.argv[3:])))
"""


def test_a_stopped_rank_ends_a_training_run_with_the_last_good_checkpoint(cifar10_dir, tmp_path):
    script = tmp_path / "train_rank.py"
    script.write_text(TRAIN_RANK_SCRIPT)
    save = str(tmp_path / "runs") + os.sep
    port = _free_port()
    # 100 images, 4 per process per step: 13 steps per epoch; rank 1 stops at step 3 of epoch 1.
    argv = ["--tmp_data_dir", cifar10_dir, "--save", save, *TRAIN_TINY, "--dist_timeout", "4"]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), ROOT, "16", *argv], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      cwd=str(tmp_path)))
    try:
        _, err = procs[0].communicate(timeout=240)
        assert procs[0].returncode == 2, err[-3000:]
        assert "error: another process of this torchrun job failed or stopped responding" in err
    finally:
        procs[1].kill()
        procs[1].communicate()
    run_dir = only_run_dir(save)
    assert load(os.path.join(run_dir, "checkpoint.pt"))["epoch"] == 1       # the last good epoch
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0]
    assert not temporaries(run_dir)


def test_every_script_sets_the_process_group_timeout(monkeypatch):
    from helpers import load_test_script

    import train_imagenet

    for parse in (ts.parse_args, train_cifar.parse_args, train_imagenet.parse_args,
                  load_test_script().parse_args):
        assert parse([]).dist_timeout == distributed.DIST_TIMEOUT_S
        assert parse(["--dist_timeout", "42"]).dist_timeout == 42
    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.init_distributed("cpu", 42)
    assert seen["timeout"].total_seconds() == 42 and seen["backend"] == "gloo"


# ---------------------------------------------------------------------------------------
# 10 and 12: nothing non-finite is saved or derived
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["validation loss", "batch-norm statistic"])
def test_non_finite_values_stop_the_search_before_the_epoch_is_saved(fault, cifar10_dir, tmp_path,
                                                                     capsys, monkeypatch):
    real_validate, real_step, calls = ts.validate, ts.search_step, []

    def validate(*args, **kwargs):
        out = real_validate(*args, **kwargs)
        calls.append(1)
        return {**out, "valid_loss": float("nan")} if len(calls) == 2 else out

    def step(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:       # in epoch 1 (5 steps per epoch): a statistic breaks
            bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return real_step(model, *args, **kwargs)

    if fault == "validation loss":
        monkeypatch.setattr(ts, "validate", validate)
    else:
        monkeypatch.setattr(ts, "search_step", step)
        monkeypatch.setattr(ts, "validate", lambda *a, **k: {"valid_loss": 1.0, "valid_acc": 10.0})
    save = str(tmp_path / "runs") + "/"
    capsys.readouterr()
    rc = runs.run_main(ts.main, ts.parse_args(["--tmp_data_dir", cifar10_dir, "--save", save,
                                                *SEARCH_TINY]))
    err = one_error_line(capsys.readouterr().err)
    assert rc == 2 and fault in err
    assert "start a new run with a lower --learning_rate" in err   # advice that can work
    run_dir = only_search_dir(save)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == (0, 1)                 # the last good epoch
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert len(read_search_metrics(run_dir)) == 1


def test_check_finite_state_names_the_tensor():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    loop.check_finite_state(net)
    net[1].running_mean[2] = float("nan")
    with pytest.raises(errors.NonFiniteLossError, match="batch-norm statistic 1.running_mean"):
        loop.check_finite_state(net)


def test_derive_refuses_non_finite_alphas(tmp_path, capsys):
    stages = [{"alphas_normal": [[0.1] * k for _ in range(14)],
               "alphas_reduce": [[0.1] * k for _ in range(14)]} for k in OPS_PER_STAGE]
    stages[2]["alphas_normal"][3][1] = float("nan")
    path = tmp_path / "arch_state.json"
    path.write_text(json.dumps({"stages": stages}))   # json writes NaN, as a diverged run would
    capsys.readouterr()
    assert runs.run_main(ts.main, ts.parse_args(["--derive", str(path)])) == 2
    captured = capsys.readouterr()
    assert "stage 3 'alphas_normal' holds non-finite values" in one_error_line(captured.err)
    assert "none" not in captured.out


# ---------------------------------------------------------------------------------------
# 13: two runs starting in the same second; one run folder, one owner
# ---------------------------------------------------------------------------------------

def test_runs_started_in_the_same_second_take_the_next_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "run_dir_name",
                        lambda save, kind, note: f"{save}{kind}-{note}-20260101-000000")
    save = str(tmp_path / "runs") + os.sep
    real_mkdir, raced = os.mkdir, []

    def mkdir(path, *args, **kwargs):   # another run creates the folder first
        if path == save + "search-x-20260101-000000-2" and not raced:
            raced.append(path)
            real_mkdir(path)
        return real_mkdir(path, *args, **kwargs)

    first = runs.create_run_dir(save, "search", "x")
    monkeypatch.setattr(os, "mkdir", mkdir)
    second = runs.create_run_dir(save, "search", "x")
    assert (first, second) == (save + "search-x-20260101-000000", save + "search-x-20260101-000000-3")
    assert raced


@needs_proc
def test_a_second_owner_of_a_training_run_is_refused(cifar10_dir, tmp_path, capsys):
    save = str(tmp_path) + os.sep
    common = ["--tmp_data_dir", cifar10_dir, *TRAIN_TINY, "--epochs", "1"]
    assert run_script(train_cifar, [*common, "--save", save]) == 0
    run_dir = only_run_dir(save)
    lines = len(read_metrics(run_dir))
    holder = hold_lock(run_dir)
    try:
        capsys.readouterr()
        assert run_script(train_cifar, [*common, "--save", save, "--resume", run_dir]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert f"is in use by process {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert len(read_metrics(run_dir)) == lines      # no duplicate lines


def test_stale_temporaries_are_only_ours(tmp_path):
    for name in ("checkpoint.pt.tmp.123", "weights.pt.tmp.9", "arch_state.json.tmp.77",
                 "notes.tmp.txt", "checkpoint.pt"):
        (tmp_path / name).write_text("x")
    removed = errors.remove_stale_temporaries(str(tmp_path))
    assert removed == ["arch_state.json.tmp.77", "checkpoint.pt.tmp.123", "weights.pt.tmp.9"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "notes.tmp.txt"]


def test_a_log_that_cannot_be_written_warns_once(tmp_path, capsys):
    import logging

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

        def close(self):
            pass

    runs.setup_logging(str(tmp_path))
    try:
        handler = next(h for h in utils.logger.handlers if isinstance(h, logging.FileHandler))
        handler.stream = FullDisk()
        utils.logger.info("one")
        utils.logger.info("two")
    finally:
        runs.close_logging()
    captured = capsys.readouterr()
    assert captured.err.count("warning: the disk is full") == 1 and "Traceback" not in captured.err
    assert "two" in captured.out     # the log goes on to stdout


# ---------------------------------------------------------------------------------------
# Issue 23, items 9 and 10: SIGTERM ends a run as Ctrl-C does; an unstarted run folder goes
# ---------------------------------------------------------------------------------------

SIGTERM_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import engine, runs, train_cifar, train_search

script, at, argv = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
sys.argv[0] = script        # as `python train_cifar.py ...` (the resume hint names it)
module, name = (train_search, "train_epoch") if script == "train_search.py" else (engine, "train_step")
real, calls = getattr(module, name), [0]

def stopped_by_the_scheduler(*args, **kwargs):   # a real SIGTERM, mid-run
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

setattr(module, name, stopped_by_the_scheduler)
main = train_search if script == "train_search.py" else train_cifar
sys.exit(runs.run_main(main.main, main.parse_args(argv)))
"""


@pytest.mark.parametrize("script", ["train_search.py", "train_cifar.py"])
def test_sigterm_mid_run_says_how_to_resume_and_releases_the_lock(script, cifar10_dir, tmp_path,
                                                                  capsys):
    driver = tmp_path / "driver.py"
    driver.write_text(SIGTERM_SCRIPT)
    save = str(tmp_path / "runs") + os.sep
    if script == "train_search.py":   # SIGTERM in the 2nd epoch of stage 1 (the 1st is saved)
        argv, at = ["--tmp_data_dir", cifar10_dir, "--save", save, *SEARCH_TINY], 2
    else:                             # 13 steps per epoch: SIGTERM at step 3 of epoch 1
        argv, at = ["--tmp_data_dir", cifar10_dir, "--save", save, *TRAIN_TINY], 16
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(driver), ROOT, script, str(at), *argv], env=env,
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    run_dir = os.path.abspath((only_search_dir if script == "train_search.py" else only_run_dir)(save))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        f"stopped by SIGTERM; continue with: python {script} --resume {run_dir}"
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(run_dir, run_files.LOCK))
    assert "stopped by SIGTERM; continue with" in open(os.path.join(run_dir, "log.txt")).read()
    # The printed command works.
    if script == "train_search.py":
        rc = runs.run_main(ts.main, ts.parse_args(["--resume", run_dir]))
        assert rc == 0 and os.path.isfile(os.path.join(run_dir, "genotype.json"))
    else:
        assert run_script(train_cifar, ["--resume", run_dir, "--tmp_data_dir", cifar10_dir]) == 0
        assert [m["epoch"] for m in read_metrics(run_dir)] == [0, 1]
    assert not os.path.exists(os.path.join(run_dir, run_files.LOCK))


def test_sigterm_ends_every_torchrun_process_with_the_message(tmp_path):
    procs = _start_ranks(tmp_path, ["30", "SIGTERM"], EVERY_RANK="1")
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err
        assert "stopped by SIGTERM before the run folder was created" in err and "Traceback" not in err


def test_early_ctrl_c_in_training_removes_the_folder_it_made(cifar10_dir, tmp_path, capsys,
                                                            monkeypatch):
    """Interrupted after the run folder was made, before any epoch: the folder (lock and log
    only) is removed and the line says so (issue 23, item 10)."""
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "log_run_start", ctrl_c)
    save = str(tmp_path / "runs") + os.sep
    capsys.readouterr()
    assert run_script(train_cifar, ["--tmp_data_dir", cifar10_dir, "--save", save, *TRAIN_TINY]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted before its first epoch was saved: nothing to resume; "
                          f"removed its run folder {os.path.join(os.path.abspath(save), 'eval-')}") and \
        err.endswith("; start the run again")
    assert os.listdir(save) == []


def test_a_failing_torchrun_process_says_its_line_is_the_cause(monkeypatch, capsys):
    """Issue 23, item 16: torchrun's ChildFailedError traceback follows our line."""
    def bad_flag(_):
        raise errors.UserError("--layers must be at least 2 (got 1)")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert runs.run_main(bad_flag, None) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("error: --layers must be at least 2 (got 1) [process 1 of the torchrun "
                          "job: this is the cause; torchrun's ChildFailedError report that "
                          "follows is a consequence]")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runs.run_main(bad_flag, None) == 2
    assert capsys.readouterr().err == "error: --layers must be at least 2 (got 1)\n"
