"""train_cifar.py --demo (issue 32): its presets and the paper's defaults beside them, a
demo run trained on a demo search's cell, interrupted and resumed with the printed command
alone; and training's warning when its test accuracy says little (the search's rule)."""
import json
import os

import pytest
import torch
from helpers import load, only_run_dir, read_metrics, run_script

import engine
import train_cifar
from config import CIFAR_DEMO, CifarConfig, default_of
from genotypes import PDARTS, genotype_from_dict, genotype_to_dict
from loop import validation_warning
from runs import close_logging


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    close_logging()


def test_the_paper_defaults_stay_and_the_demo_has_its_own():
    paper = train_cifar.parse_args([])
    for key in CIFAR_DEMO:
        assert getattr(paper, key) == default_of(CifarConfig, key), key
    assert (paper.epochs, paper.batch_size, paper.learning_rate, paper.init_channels,
            paper.layers) == (600, 128, 0.025, 36, 20)
    assert paper.channels_last is False and paper.threads == 0 and paper.note == "try"
    assert paper.dataset == "cifar10" and paper.drop_path_prob == 0.3 and paper.report_freq == 50
    demo = train_cifar.parse_args(["--demo"])
    for key, value in CIFAR_DEMO.items():
        assert getattr(demo, key) == value, key
    assert demo.dataset == "demo" and demo.channels_last is True and demo.epochs < 600
    # Flags given with --demo win over its presets, --no-channels_last included.
    given = train_cifar.parse_args(["--demo", "--epochs", "3", "--no-channels_last", "--dataset",
                                    "folder", "--learning_rate", "0.05"])
    assert (given.epochs, given.channels_last, given.dataset, given.learning_rate) == \
        (3, False, "folder", 0.05)
    assert given.batch_size == CIFAR_DEMO["batch_size"]
    # --demo --cifar100: the demo's network on CIFAR-100, not a contradiction.
    both = train_cifar.parse_args(["--demo", "--cifar100"])
    assert both.dataset == "cifar100" and both.weight_decay == 5e-4


def test_help_shows_both_defaults(capsys):
    with pytest.raises(SystemExit):
        train_cifar.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("training epochs (default 600, demo 10)", "(default 128, demo 50)",
                  "(default 0.025, demo 0.1)", "C of the network (default 36, demo 8)",
                  "--channels_last, --no-channels_last NHWC memory layout for network and "
                  "inputs (default: on for the CPU, where it is faster; off on CUDA; demo on)",
                  "First try: python train_cifar.py --demo"):
        assert piece in text, piece


def test_a_demo_run_on_a_demo_search_cell_resumes_with_its_presets(tmp_path, monkeypatch, capsys):
    """A demo search's run folder as --arch (its genotype.json carries the search's
    metadata); stopped by Ctrl-C as epoch 1 starts and resumed with --resume RUN_DIR alone: the
    presets (batch 50, lr 0.1, channels_last, one thread, the demo data) come back with
    the run's own arguments."""
    search = tmp_path / "runs" / "search-demo-20261207-120000"
    search.mkdir(parents=True)
    cell = genotype_to_dict(PDARTS)
    cell["normal"][0] = ["sep_conv_5x5", 0]
    cell["metadata"] = {"stem": "cifar", "image_size": 16, "dataset": "demo"}
    (search / "genotype.json").write_text(json.dumps(cell))

    save = str(tmp_path / "runs") + os.sep
    real_seed, calls = engine.seed_everything, []

    def ctrl_c_as_epoch_1_starts(*args):      # seeded once, then at every epoch's start
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_seed(*args)

    monkeypatch.setattr(engine, "seed_everything", ctrl_c_as_epoch_1_starts)
    argv = ["--demo", "--arch", str(search), "--epochs", "2", "--layers", "2",
            "--init_channels", "4", "--save", save, "--device", "cpu"]
    assert run_script(train_cifar, argv) == 130
    monkeypatch.undo()
    run_dir = only_run_dir(save)
    assert os.path.basename(run_dir).startswith("eval-demo-")
    assert f"--resume {os.path.abspath(run_dir)}" in capsys.readouterr().err

    torch.set_num_threads(2)
    assert run_script(train_cifar, ["--resume", run_dir]) == 0
    assert torch.get_num_threads() == 1                  # the run's --threads 1
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    saved = ckpt["args"]
    assert ckpt["epoch"] == 2 and saved["demo"] and saved["dataset"] == "demo"
    assert (saved["batch_size"], saved["learning_rate"], saved["channels_last"],
            saved["threads"]) == (50, 0.1, True, 1)
    assert genotype_from_dict(ckpt["genotype"]).normal[0] == ("sep_conv_5x5", 0)
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["train_images"] == 1000 and r["test_images"] == 500 for r in records)


def test_training_warns_when_its_test_accuracy_says_little():
    said = validation_warning(None, 9, True, 10.0, 80.0, 10, 20, training=True)
    assert said.startswith("WARNING epoch 9: test accuracy 10.00% is at chance level (10 "
                           "classes) while training accuracy is 80.00%")
    assert "after 20 batch-norm updates in this run" in said and "12% of their initial" in said
    assert "smaller --batch_size" in said and "each training step is one" in said
    assert "stage" not in said and "alpha" not in said and "\n" not in said
    plain = validation_warning(None, 9, True, 10.0, 80.0, 10, 300, training=True)
    assert "fits the training images but not the test images" in plain
    assert validation_warning(None, 9, True, 60.0, 80.0, 10, 300, training=True) is None
    assert validation_warning(None, 8, False, 10.0, 80.0, 10, 20, training=True) is None
    # The search's wording is unchanged.
    assert validation_warning(2, 4, True, 25.0, 76.0, 4, 16).startswith(
        "WARNING stage 2 epoch 4: validation accuracy 25.00% is at chance")


def test_a_short_run_on_few_images_says_so_at_its_last_epoch(cifar10_dir, tmp_path):
    """100 images at batch 16 for 2 epochs: 14 batch-norm updates leave 23% of the initial
    statistics; the last epoch (only) says why its test accuracy says little."""
    save = str(tmp_path / "runs") + os.sep
    argv = ["--tmp_data_dir", cifar10_dir, "--epochs", "2", "--layers", "2", "--init_channels", "4",
            "--batch_size", "16", "--workers", "0", "--save", save, "--device", "cpu"]
    assert run_script(train_cifar, argv) == 0
    log = open(os.path.join(only_run_dir(save), "log.txt")).read()
    assert log.count("WARNING epoch") == 1 and "WARNING epoch 1: test accuracy" in log
    assert "batch-norm updates in this run" in log
