"""train_imagenet.py: both learning-rate schedules and the warm-up against SPEC section 5,
label smoothing against a hand computation, one epoch on a tiny generated ImageFolder
followed by test.py, and bad input."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import load, only_run_dir, read_metrics, run_script, run_test_script, write_image_folder

import train_imagenet
from train_imagenet import imagenet_lr


def test_linear_schedule_with_warmup_matches_spec():
    lr = [imagenet_lr(0.5, e, 250, "linear", 1024) for e in range(250)]
    # Warm-up over the first 5 epochs (global batch 1024 > 256): lr(e) * (e + 1) / 5.
    for e in range(5):
        assert lr[e] == pytest.approx(0.5 * (245 - e) / 245 * (e + 1) / 5)
    assert lr[0] == pytest.approx(0.1)
    assert lr[5] == pytest.approx(0.5 * 240 / 245)
    assert lr[244] == pytest.approx(0.5 * 1 / 245)          # E - e = 6 > 5
    assert lr[245] == pytest.approx(0.5 * 5 / (245 * 5))    # the last 5 epochs
    assert lr[249] == pytest.approx(0.5 * 1 / (245 * 5))
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))      # never rises after warm-up
    # No warm-up at batch 256 or below.
    assert imagenet_lr(0.5, 0, 250, "linear", 256) == 0.5
    assert imagenet_lr(0.5, 3, 250, "linear", 256) == pytest.approx(0.5 * 242 / 245)


def test_cosine_schedule_with_warmup():
    # The release's cosine scheduler is stepped before each epoch: epoch e at step e + 1.
    cos = [0.5 * (1 + math.cos(math.pi * (e + 1) / 250)) / 2 for e in range(250)]
    assert imagenet_lr(0.5, 0, 250, "cosine", 1024) == pytest.approx(cos[0] / 5)
    assert imagenet_lr(0.5, 2, 250, "cosine", 1024) == pytest.approx(cos[2] * 3 / 5)
    assert imagenet_lr(0.5, 124, 250, "cosine", 1024) == pytest.approx(0.25)
    assert imagenet_lr(0.5, 249, 250, "cosine", 1024) == pytest.approx(0.0, abs=1e-15)
    assert imagenet_lr(0.5, 0, 250, "cosine", 128) == pytest.approx(cos[0])   # no warm-up


def test_paper_defaults():
    args = train_imagenet.parse_args([])
    assert (args.epochs, args.batch_size, args.learning_rate, args.momentum) == (250, 1024, 0.5, 0.9)
    assert (args.weight_decay, args.label_smooth, args.grad_clip, args.drop_path_prob) == (3e-5, 0.1, 5, 0)
    assert (args.layers, args.init_channels, args.auxiliary_weight) == (14, 48, 0.4)
    assert args.lr_scheduler == "linear"


def test_label_smoothing_matches_the_release_target():
    eps = 0.1
    # By hand: two classes, softmax (0.25, 0.75), true class 1, target (0.05, 0.95).
    logits = torch.tensor([[0.0, math.log(3.0)]])
    expected = -(0.05 * math.log(0.25) + 0.95 * math.log(0.75))
    assert nn.CrossEntropyLoss(label_smoothing=eps)(logits, torch.tensor([1])).item() == \
        pytest.approx(expected, rel=1e-6)
    # And the release's formula, (1 - eps) * one_hot + eps / K, on a random batch.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, generator=g)
    target = torch.randint(7, (6,), generator=g)
    smoothed = (1 - eps) * F.one_hot(target, 7).float() + eps / 7
    release = (-smoothed * F.log_softmax(logits, dim=1)).mean(0).sum()
    assert nn.CrossEntropyLoss(label_smoothing=eps)(logits, target).item() == pytest.approx(release.item())


@pytest.fixture
def imagenet_dir(tmp_path):
    root = tmp_path / "data"
    write_image_folder(str(root / "imagenet" / "train"), num_classes=3, per_class=4, size=64)
    write_image_folder(str(root / "imagenet" / "val"), num_classes=3, per_class=2, size=64)
    return str(root)


TINY = ["--epochs", "1", "--layers", "3", "--init_channels", "8", "--batch_size", "4", "--workers", "0",
        "--auxiliary", "--lr_scheduler", "cosine", "--device", "cpu"]


def test_one_epoch_on_an_image_folder_then_test_py(imagenet_dir, tmp_path, capsys):
    save = str(tmp_path / "runs") + os.sep
    assert run_script(train_imagenet, ["--tmp_data_dir", imagenet_dir, "--save", save, *TINY]) == 0
    run_dir = only_run_dir(save)
    (record,) = read_metrics(run_dir)
    assert record["train_images"] == 12 and record["test_images"] == 6
    assert record["lr"] == pytest.approx(0.0, abs=1e-15)  # cosine, the only epoch: its end
    # 3 classes: top-5 would always be 100%, so it is not reported (the keys stay, null)
    assert record["test_top5"] is None and record["train_top5"] is None
    assert math.isfinite(record["train_loss"])
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "top-5" not in log and "final test accuracy" in log
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    assert ckpt["network"] == {"kind": "imagenet", "dataset": "imagenet", "C": 8, "layers": 3,
                               "num_classes": 3, "auxiliary": True}
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 3e-5

    rc, result, _ = run_test_script(["--model_path", run_dir, "--tmp_data_dir", imagenet_dir,
                                  "--workers", "0"], capsys)
    assert rc == 0 and result["dataset"] == "imagenet" and result["images"] == 6
    assert result["top1"] == pytest.approx(record["test_acc"], abs=1e-3)
    assert "top5" in result and result["top5"] is None      # test.py's JSON keeps its keys


def test_top5_is_reported_only_with_more_than_5_classes():
    from engine import top5_text, topk_for
    assert topk_for(4) == (1,) and topk_for(5) == (1,) and topk_for(6) == (1, 5)
    assert topk_for(10) == (1, 5) and topk_for(1000) == (1, 5)
    assert top5_text({"top1": 50.0}) == "" and top5_text({"top5": None}) == ""
    assert top5_text({"top5": 87.5}) == " (top-5 87.50%)"


@pytest.mark.parametrize("argv,message", [
    (["--tmp_data_dir", "{missing}"], "imagenet/train"),
    (["--lr_scheduler", "linear", "--epochs", "3"], "linear schedule needs --epochs > 5"),
    (["--init_channels", "7"], "--init_channels must be an even number"),
    (["--arch", "NOPE"], "unknown genotype 'NOPE'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, imagenet_dir, tmp_path, capsys):
    argv = [a.format(missing=str(tmp_path / "nowhere")) for a in argv]
    capsys.readouterr()
    rc = run_script(train_imagenet, ["--tmp_data_dir", imagenet_dir, "--save", str(tmp_path) + os.sep,
                                     *TINY, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
