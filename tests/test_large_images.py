"""Search on large own images (issue 25): the search network's stride-8 stem (batched and
plain cells), the per-class subset of --subset_per_class, a search on a folder of 96-128
pixel images of mixed modes stopped and resumed, the mobile network trained on the same
folder by train_imagenet.py and evaluated by test.py, and the one-line refusals."""
import glob
import json
import os

import pytest
import torch
from helpers import (
    load,
    only_run_dir,
    read_metrics,
    run_script,
    run_test_script,
    stopped_after_epochs,
    write_colour_folder,
)

import train_imagenet
import train_search as ts
from data import DataError, subset_indices
from derivation import all_on_switches
from model_search import Network
from runs import close_logging

# 2/3/3 cells of C=4 on 64-pixel images (8x8 in the first cells), 2 epochs per stage.
SEARCH = ["--dataset", "folder", "--init_channels", "4", "--layers", "2", "--add_layers", "1",
          "--add_layers", "1", "--epochs", "2", "--arch_warmup_epochs", "1", "--batch_size", "6",
          "--image_size", "64", "--workers", "0", "--report_freq", "50", "--seed", "1",
          "--device", "cpu", "--subset_per_class", "3", "0.25"]
# The mobile network at 64 pixels: 3 cells of C=8, auxiliary head, one epoch.
TRAIN = ["--dataset", "folder", "--image_size", "64", "--epochs", "1", "--lr_scheduler",
         "cosine", "--layers", "3", "--init_channels", "8", "--batch_size", "8", "--workers",
         "0", "--report_freq", "5", "--auxiliary", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    close_logging()


def test_reduction_stem_batched_equals_plain_and_shrinks_by_8():
    sw = all_on_switches()
    torch.manual_seed(0)
    batched = Network(4, 3, 3, sw, sw, stem="imagenet").double()
    torch.manual_seed(0)
    plain = Network(4, 3, 3, sw, sw, stem="imagenet", batched=False).double()
    assert list(batched.state_dict()) == list(plain.state_dict())
    assert any(k.startswith("stem0.") for k in plain.state_dict())
    plain.load_state_dict(batched.state_dict())
    seen = []
    batched.cells[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[1].shape[-1]))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    batched.train(), plain.train()
    torch.testing.assert_close(batched(x), plain(x), rtol=0, atol=1e-12)
    assert seen == [8]                                      # 64 / 8 before the first cell
    # The default keeps the release's stem and state-dict layout.
    release = Network(4, 3, 3, sw, sw)
    assert "stem.0.weight" in release.state_dict()
    assert not any(k.startswith("stem0.") for k in release.state_dict())


def test_subset_per_class_counts_fractions_and_seed():
    labels = [0] * 20 + [1] * 12 + [2] * 40
    split = subset_indices(labels, 5, 3, seed=7)
    per_class = [(sum(labels[i] == c for i in split.first), sum(labels[i] == c for i in split.second))
                 for c in range(3)]
    assert per_class == [(5, 3)] * 3
    assert not set(split.first) & set(split.second)
    assert subset_indices(labels, 5, 3, seed=7) == split            # seeded: the same draw
    assert subset_indices(labels, 5, 3, seed=8).first != split.first
    frac = subset_indices(labels, 0.1, 0.025, seed=7)               # PC-DARTS' proportions
    counts = [(sum(labels[i] == c for i in frac.first), sum(labels[i] == c for i in frac.second))
              for c in range(3)]
    assert counts == [(2, 1), (1, 1), (4, 1)]
    with pytest.raises(DataError) as info:
        subset_indices(labels, 10, 3, seed=7, class_names=["a", "b", "c"])
    assert "b (12 images, 10+3 asked)" in str(info.value) and "a (" not in str(info.value)


def test_large_folder_search_resume_train_test(tmp_path, capsys):
    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=8, modes=True,
                               large=True)
    from PIL import Image

    from data import scan_folder
    samples = scan_folder(tree).samples
    assert [Image.open(samples[k][0]).mode for k in (0, 8, 16, 1)] == ["L", "RGBA", "P", "RGB"]
    assert Image.open(samples[3][0]).size == (128, 96)

    # Stopped after 3 epochs (in stage 2), then resumed to the end.
    save = str(tmp_path / "s-")
    with stopped_after_epochs(3):
        assert run_script(ts, ["--tmp_data_dir", tree, "--save", save, *SEARCH]) == 130
    run_dir, = glob.glob(save + "search-*")
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    assert ckpt["model_args"]["stem"] == "imagenet" and ckpt["args"]["stem"] == "imagenet"
    assert any(k.startswith("stem0.") for k in ckpt["model"])
    assert run_script(ts, ["--resume", run_dir]) == 0
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "stem: imagenet (--stem auto: imagenet since --image_size 64 is at least 64)" in log
    assert "first cells see 8x8 maps" in log
    assert "split per-class subset with seed 1" in log and "class_0 3/2, class_1 3/2" in log
    cell = json.load(open(os.path.join(run_dir, "genotype.json")))
    assert cell["metadata"] == {"stem": "imagenet", "image_size": 64, "dataset": "folder"}
    state = json.load(open(os.path.join(run_dir, "arch_state.json")))
    assert state["stem"] == "imagenet" and len(state["stages"]) == 3
    capsys.readouterr()
    assert run_script(ts, ["--derive", os.path.join(run_dir, "arch_state.json")]) == 0
    assert "searched with the imagenet stem" in capsys.readouterr().out

    # The mobile network on the same folder (10% held out), then test.py from its run.
    tsave = str(tmp_path / "t-")
    assert run_script(train_imagenet, ["--tmp_data_dir", tree, "--save", tsave,
                                       "--arch", os.path.join(run_dir, "genotype.json"), *TRAIN]) == 0
    train_dir = only_run_dir(tsave)
    tckpt = load(os.path.join(train_dir, "checkpoint.pt"))
    assert tckpt["network"]["kind"] == "imagenet" and tckpt["network"]["num_classes"] == 3
    assert tckpt["data"]["augment"] == "imagenet" and tckpt["data"]["image_size"] == 64
    assert "stem1.1.weight" in load(os.path.join(train_dir, "weights.pt"))
    metrics = read_metrics(train_dir)
    assert metrics[0]["train_images"] == 21 and metrics[0]["test_images"] == 3
    rc, summary, _ = run_test_script(["--model_path", train_dir, "--workers", "0"], capsys)
    assert rc == 0 and summary["dataset"] == "folder" and summary["images"] == 3
    assert summary["top1"] == pytest.approx(metrics[-1]["test_acc"])


def test_bad_values_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        ts.parse_args(["--stem", "imagenet", "--image_size", "32"])
    assert info.value.code == 2
    err, hint = capsys.readouterr().err.strip().splitlines()   # the error, then a --help hint
    assert "--stem imagenet" in err and "--image_size 32" in err and "64 or more" in err
    assert "--help" in hint
    assert ts.parse_args([]).stem == "cifar"                        # the paper's setting
    assert ts.parse_args(["--image_size", "224"]).stem == "imagenet"

    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=4)
    args = [a if a != "0.25" else "2" for a in SEARCH]               # 3 + 2 > 4 per class
    assert run_script(ts, ["--tmp_data_dir", tree, "--save", str(tmp_path / "s-"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--subset_per_class 3 2" in err[0] and "class_0 (4 images" in err[0]
    assert not glob.glob(str(tmp_path / "s-*"))
    with pytest.raises(SystemExit):
        ts.parse_args(["--subset_per_class", "1.5", "2"])
    assert "count (an integer >= 1) or a fraction" in capsys.readouterr().err
