"""The learning-rate schedule is the release's: its CosineAnnealingLR is stepped at the
start of every epoch (the PyTorch < 1.1 order), so epoch e trains at the rate of step
e + 1 (SPEC sections 2 and 5). Checked against PyTorch's own scheduler driven that way,
in the schedule functions, in the metrics of a short search and a short training run,
and on resume of a checkpoint written before the correction."""
import glob
import math
import os
import warnings

import pytest
import torch
from helpers import (
    SEARCH_TINY,
    TRAIN_TINY,
    load,
    only_run_dir,
    read_metrics,
    run_script,
    stopped_after_epochs,
    tiny,
)

import train_cifar
import train_search as ts
from runs import close_logging, run_main
from train_imagenet import imagenet_lr
from utils import cosine_lr


def release_rates(lr0: float, epochs: int, lr_min: float) -> list[float]:
    """The rate of every epoch as the release gets it: the scheduler is built, then
    stepped at the start of each epoch, and the epoch trains at the rate after the step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs), eta_min=lr_min)
    rates = []
    with warnings.catch_warnings():      # "scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore")
        for _ in range(epochs):
            scheduler.step()
            rates.append(opt.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("epochs", [3, 25, 600])
@pytest.mark.parametrize("lr0,lr_min", [(0.025, 0.0), (0.025, 0.001), (0.1, 0.01)])
def test_schedules_match_the_release_scheduler(epochs, lr0, lr_min):
    want = release_rates(lr0, epochs, lr_min)
    search = [ts.learning_rate(e, epochs, lr0, lr_min) for e in range(epochs)]
    train = [cosine_lr(lr0, e, epochs, lr_min) for e in range(epochs)]
    assert search == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert train == pytest.approx(want, rel=1e-9, abs=1e-15)
    if lr_min == 0.0:     # train_imagenet.py --lr_scheduler cosine (no warm-up at batch 256)
        imagenet = [imagenet_lr(lr0, e, epochs, "cosine", 256) for e in range(epochs)]
        assert imagenet == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_search_stage_figures():
    """SPEC section 2: epochs 0 / 12 / 23 / 24 of a 25-epoch stage."""
    lr = [ts.learning_rate(e, 25, 0.025, 0.0) for e in range(25)]
    assert lr[0] == pytest.approx(0.024901, abs=5e-7)
    assert lr[12] == pytest.approx(0.011715, abs=5e-7)
    assert lr[23] == pytest.approx(9.86e-5, abs=5e-8)
    assert lr[24] == pytest.approx(0.0, abs=1e-18)    # the weights stand still
    assert ts.learning_rate(24, 25, 0.025, 0.001) == pytest.approx(0.001)


def test_the_old_schedule_is_one_epoch_behind():
    for e in range(25):
        assert cosine_lr(0.025, e, 25, stepped_before_epoch=False) == \
            pytest.approx(0.025 * (1 + math.cos(math.pi * e / 25)) / 2)
        assert cosine_lr(0.025, e + 1, 25, stepped_before_epoch=False) == \
            pytest.approx(cosine_lr(0.025, e, 25))


# 1-2 cell networks at 8 px, 3 epochs per stage.
TINY_SEARCH = tiny(SEARCH_TINY, layers=1, add_layers=[1, 1], epochs=3, image_size=8)


def _search(argv):
    rc = run_main(ts.main, ts.parse_args(argv))
    close_logging()
    return rc


def _search_dir(save):
    (run_dir,) = glob.glob(save + "search-*")
    return run_dir


def test_search_logs_the_release_rate_of_every_epoch_and_resumes_old_runs(cifar10_dir, tmp_path):
    save = str(tmp_path / "runs") + os.sep
    common = ["--tmp_data_dir", cifar10_dir, "--save", save, *TINY_SEARCH]
    # Stopped after stage 1's first epoch, resumed to the end.
    with stopped_after_epochs(1):
        assert _search(common) == 130
    run_dir = _search_dir(save)
    path = os.path.join(run_dir, "checkpoint.pt")
    ckpt = load(path)
    assert ckpt["lr_schedule"] == "stepped-before-epoch"
    assert _search(["--resume", run_dir, *common]) == 0
    want = release_rates(0.025, 3, 0.0)         # 0.01875, 0.00625, 0
    records = read_metrics(run_dir)
    assert [(r["stage"], r["epoch"]) for r in records] == [(s, e) for s in (1, 2, 3) for e in range(3)]
    assert [r["lr"] for r in records] == pytest.approx(want * 3, abs=1e-15)
    assert abs(records[-1]["lr"]) < 1e-18       # the last epoch of a stage: weights still

    # A checkpoint written before the correction (no lr_schedule) continues on the
    # schedule it began with, and the log says so.
    save_old = str(tmp_path / "old") + os.sep
    common_old = ["--tmp_data_dir", cifar10_dir, "--save", save_old, *TINY_SEARCH]
    with stopped_after_epochs(1):
        assert _search(common_old) == 130
    old_dir = _search_dir(save_old)
    ckpt = load(os.path.join(old_dir, "checkpoint.pt"))
    del ckpt["lr_schedule"]
    torch.save(ckpt, os.path.join(old_dir, "checkpoint.pt"))
    with stopped_after_epochs(2):
        assert _search(["--resume", old_dir, *common_old]) == 130
    lrs = [r["lr"] for r in read_metrics(old_dir)]
    assert lrs[1:] == pytest.approx([cosine_lr(0.025, e, 3, stepped_before_epoch=False)
                                     for e in (1, 2)])
    assert "continues on the schedule it began with" in open(os.path.join(old_dir, "log.txt")).read()
    # ... and its next checkpoint keeps saying so.
    assert load(os.path.join(old_dir, "checkpoint.pt"))["lr_schedule"] is None


TINY_TRAIN = tiny(TRAIN_TINY, epochs=3)


def test_training_logs_the_release_rate_of_every_epoch_and_resumes_old_runs(cifar10_dir, tmp_path):
    save = str(tmp_path / "runs") + os.sep
    common = ["--tmp_data_dir", cifar10_dir, "--save", save, *TINY_TRAIN]
    assert run_script(train_cifar, common) == 0
    run_dir = only_run_dir(save)
    want = release_rates(0.025, 3, 0.0)
    assert [r["lr"] for r in read_metrics(run_dir)] == pytest.approx(want, abs=1e-15)
    assert load(os.path.join(run_dir, "checkpoint.pt"))["lr_schedule"] == "stepped-before-epoch"

    # An old checkpoint after epoch 0: epochs 1 and 2 at cos(pi*e/E), with a warning.
    save_old = str(tmp_path / "old") + os.sep
    cut = ["--tmp_data_dir", cifar10_dir, "--save", save_old, *TINY_TRAIN]
    cut[cut.index("--epochs") + 1] = "1"
    assert run_script(train_cifar, cut) == 0
    old_dir = only_run_dir(save_old)
    path = os.path.join(old_dir, "checkpoint.pt")
    ckpt = load(path)
    del ckpt["lr_schedule"]
    ckpt["args"]["epochs"] = 3
    torch.save(ckpt, path)
    # Resumed for one epoch, stopped, resumed again: the checkpoint of the first resume
    # keeps the old run's mark, so the second resume stays on the old schedule too (it
    # switched to the release's before: epoch 2 trained at 0 instead of 0.00625).
    with stopped_after_epochs(1):
        assert run_script(train_cifar, ["--resume", old_dir, "--tmp_data_dir", cifar10_dir]) == 130
    assert load(path)["lr_schedule"] is None and load(path)["epoch"] == 2
    assert run_script(train_cifar, ["--resume", old_dir, "--tmp_data_dir", cifar10_dir]) == 0
    lrs = [r["lr"] for r in read_metrics(old_dir)]
    assert lrs[1:] == pytest.approx([cosine_lr(0.025, e, 3, stepped_before_epoch=False)
                                     for e in (1, 2)])
    assert lrs[2] == pytest.approx(0.00625) and lrs[2] != cosine_lr(0.025, 2, 3)
    log = open(os.path.join(old_dir, "log.txt")).read()
    assert log.count("continues on the schedule it began with") == 2
