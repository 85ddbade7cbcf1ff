"""Your own images end to end (issue 11): search -> genotype.json -> train_cifar.py ->
test.py on a generated folder of class folders (odd sizes, a grayscale and an RGBA file);
the held-out split stored and reused; train/val trees; classes that differ; unreadable
images reported by path or left out with --skip_bad_images."""
import glob
import json
import os

import pytest
import torch
from helpers import load, only_run_dir, read_metrics, run_script, run_test_script, write_colour_folder

import train_cifar
import train_imagenet
import train_search as ts
from runs import close_logging, run_main

# 2/3/3 cells of C=4 on 8x8 images, 2 epochs per stage.
SEARCH = ["--dataset", "folder", "--init_channels", "4", "--layers", "2", "--add_layers", "1",
          "--add_layers", "1", "--epochs", "2", "--arch_warmup_epochs", "1", "--batch_size", "12",
          "--image_size", "8", "--workers", "0", "--report_freq", "50", "--seed", "1",
          "--device", "cpu"]
TRAIN = ["--dataset", "folder", "--epochs", "1", "--layers", "2", "--init_channels", "4",
         "--batch_size", "8", "--image_size", "12", "--workers", "0", "--report_freq", "5",
         "--cutout", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    close_logging()


def train(argv):
    return run_script(train_cifar, argv)


def test_search_train_test_chain(tmp_path, capsys):
    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=10, modes=True)
    from PIL import Image

    from data import scan_folder
    images = scan_folder(tree)
    assert [Image.open(images.samples[k][0]).mode for k in (0, 10)] == ["L", "RGBA"]
    assert images[0][0].mode == images[10][0].mode == "RGB"
    assert run_script(ts, ["--tmp_data_dir", tree, "--save", str(tmp_path / "s-"), *SEARCH]) == 0
    search_dir, = glob.glob(str(tmp_path / "s-search-*"))
    genotype = os.path.join(search_dir, "genotype.json")
    search_ckpt = load(os.path.join(search_dir, "checkpoint.pt"))
    assert len(search_ckpt["data_stats"]["mean"]) == 3 and search_ckpt["data_stats"]["images"] == 30

    save = str(tmp_path / "t-")
    assert train(["--tmp_data_dir", tree, "--save", save, "--arch", genotype, *TRAIN]) == 0
    run_dir = only_run_dir(save)
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    data = ckpt["data"]
    assert data["classes"] == ["class_0", "class_1", "class_2"] and data["image_size"] == 12
    assert ckpt["network"]["num_classes"] == 3 and data["eval"] == "held-out"
    split = json.load(open(os.path.join(run_dir, "split.json")))
    # 10% of 10 per class: one image of each class held out, chosen with the seed.
    assert sorted(n.split("/")[0] for n in split["held_out"]) == ["class_0", "class_1", "class_2"]
    metrics = read_metrics(run_dir)
    assert metrics[0]["train_images"] == 27 and metrics[0]["test_images"] == 3
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "27 training images, 3 held out" in log and "sampled training images" in log

    # test.py from the run folder alone: the stored split, classes, size and normalisation.
    rc, summary, _ = run_test_script(["--model_path", run_dir, "--workers", "0"], capsys)
    assert rc == 0 and summary["dataset"] == "folder" and summary["images"] == 3
    assert summary["top1"] == pytest.approx(metrics[-1]["test_acc"])


def test_train_val_tree_and_mismatched_classes(tmp_path, capsys):
    root = tmp_path / "tree"
    write_colour_folder(str(root / "train"), num_classes=3, per_class=6, modes=True)
    write_colour_folder(str(root / "val"), num_classes=3, per_class=2, seed=1)
    save = str(tmp_path / "t-")
    assert train(["--tmp_data_dir", str(root), "--save", save, *TRAIN]) == 0
    run_dir = only_run_dir(save)
    assert read_metrics(run_dir)[0]["test_images"] == 6
    assert not os.path.exists(os.path.join(run_dir, "split.json"))
    # Without test/, test.py evaluates val/.
    rc, summary, _ = run_test_script(["--model_path", run_dir, "--workers", "0"], capsys)
    assert rc == 0 and summary["images"] == 6

    other = tmp_path / "other"
    write_colour_folder(str(other), num_classes=4, per_class=2)
    os.rename(other / "class_0", other / "cat")
    rc, _, err = run_test_script(["--model_path", run_dir, "--data", str(other)], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1
    assert "missing from" in lines[0] and "class_0" in lines[0]
    assert "only in" in lines[0] and "cat" in lines[0] and "class_3" in lines[0]

    os.rename(root / "val" / "class_2", root / "val" / "dog")    # training refuses it too
    capsys.readouterr()
    assert train(["--tmp_data_dir", str(root), "--save", str(tmp_path / "u-"), *TRAIN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class_2" in err[0] and "dog" in err[0]
    assert not glob.glob(str(tmp_path / "u-*"))


def test_search_reads_a_train_val_tree_as_training_does(tmp_path, capsys):
    """A tree with train/ and val/ is searched on train/'s classes (it was searched as two
    classes, "train" vs "val"); val/ with other classes is refused as training refuses it."""
    from data import build_search_data, search_split

    root = tmp_path / "tree"
    write_colour_folder(str(root / "train"), num_classes=3, per_class=6)
    write_colour_folder(str(root / "val"), num_classes=3, per_class=2, seed=1)
    args = ts.parse_args(["--tmp_data_dir", str(root), *SEARCH])
    data, num_classes, text = build_search_data(args)
    assert num_classes == 3 and data.classes == ["class_0", "class_1", "class_2"]
    assert len(data) == 18 and "18 training images, 3 classes" in text
    assert "both halves from train/; val/ is not used by the search" in text
    split = search_split(data, args)
    assert len(split.first) == len(split.second) == 9

    os.rename(root / "val" / "class_2", root / "val" / "dog")
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    rc = run_main(ts.main, ts.parse_args(["--tmp_data_dir", str(root), "--save", save, *SEARCH]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "class_2" in err[0] and "dog" in err[0]
    assert os.listdir(save) == []


def test_resume_reuses_the_stored_split(tmp_path, capsys):
    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=10)
    save = str(tmp_path / "t-")
    assert train(["--tmp_data_dir", tree, "--save", save, *TRAIN, "--epochs", "2",
                  "--seed", "5"]) == 0
    run_dir = only_run_dir(save)
    first = json.load(open(os.path.join(run_dir, "split.json")))
    ckpt = load(os.path.join(run_dir, "checkpoint.pt"))
    ckpt["epoch"] = 1                                   # as if stopped after epoch 0
    torch.save(ckpt, os.path.join(run_dir, "checkpoint.pt"))
    assert train(["--resume", run_dir, "--tmp_data_dir", tree]) == 0
    assert json.load(open(os.path.join(run_dir, "split.json"))) == first
    other = train_cifar.parse_args(["--tmp_data_dir", tree, *TRAIN, "--seed", "6"])
    assert train_cifar.folder_data(other, 0, None)[3]["split.json"]["held_out"] != first["held_out"]

    os.remove(os.path.join(tree, first["held_out"][0]))     # the data changed
    capsys.readouterr()
    assert train(["--resume", run_dir, "--tmp_data_dir", tree]) == 2
    assert "divided differently" in capsys.readouterr().err


def _corrupt(tree):
    bad = os.path.join(tree, "class_1", "003.png")
    with open(bad, "rb") as f:
        head = f.read(60)
    with open(bad, "wb") as f:                          # a truncated PNG
        f.write(head)
    with open(os.path.join(tree, "class_2", "zz.jpg"), "wb") as f:
        f.write(b"not an image at all")
    return bad


@pytest.mark.parametrize("script", ["search", "train"])
def test_bad_image_reported_by_path_or_skipped(tmp_path, capsys, script):
    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=10)
    bad = _corrupt(tree)
    module, argv = (ts, SEARCH) if script == "search" else (train_cifar, TRAIN)
    save = str(tmp_path / "r-")
    capsys.readouterr()
    assert run_script(module, ["--tmp_data_dir", tree, "--save", save, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read image ")
    assert ("003.png" in err[0] or "zz.jpg" in err[0]) and "--skip_bad_images" in err[0]
    assert not glob.glob(save + "*")

    assert run_script(module, ["--tmp_data_dir", tree, "--save", save, *argv,
                               "--skip_bad_images"]) == 0
    run_dir, = glob.glob(save + "*")
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "2 unreadable image(s) left out" in log and bad in log


def test_bad_image_read_in_a_worker_is_one_line(tmp_path):
    """Past the statistics sample, a bad file is met by a DataLoader worker: the error that
    comes back still names the file in one line."""
    from torch.utils.data import DataLoader

    from data import DataError, folder_transforms, scan_folder

    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=4)
    bad = _corrupt(tree)
    data = scan_folder(tree)
    data.transform = folder_transforms(False, 8)
    with pytest.raises(DataError) as info:
        for _ in DataLoader(data, batch_size=2, num_workers=1):
            pass
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot read image ")
    assert bad in message or "zz.jpg" in message


def test_imagenet_style_folders_name_a_bad_file(tmp_path):
    from data import BadImageError, get_image_folder, imagenet_transforms

    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=4)
    bad = _corrupt(tree)
    data = get_image_folder(tree, imagenet_transforms(False))
    index = [p for p, _ in data.samples].index(bad)
    with pytest.raises(BadImageError, match="cannot read image .*003.png"):
        data[index]


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "folder", "--image_size", "64", "--auxiliary"], "does not fit --image_size 64"),
    (["--dataset", "folder", "--image_size", "12", "--auxiliary"], "does not fit --image_size 12"),
    (["--image_size", "64"], "--image_size is for --dataset folder"),
])
def test_folder_flags_are_checked(argv, message):
    from errors import UserError

    with pytest.raises(UserError, match=message):
        train_cifar.check_config(train_cifar.parse_args(argv))


@pytest.mark.parametrize("script", [train_cifar, train_imagenet])
@pytest.mark.parametrize("flag, value", [("--image_size", "4"), ("--val_portion", "1.0")])
def test_folder_flags_are_checked_when_parsed(script, flag, value, capsys):
    """Both training scripts share the folder flags: too small an --image_size or a
    --val_portion outside (0, 1) stops at parse time with one line (and the --help hint)."""
    with pytest.raises(SystemExit) as info:
        script.parse_args(["--dataset", "folder", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and flag in err[0] and value in err[0] and len(err) == 2


def test_auxiliary_sizes_are_those_that_build():
    from genotypes import PDARTS
    from model import NetworkCIFAR

    for size in (28, 29, 36, 40, 41):
        net = NetworkCIFAR(4, 3, 5, True, PDARTS).train()
        try:
            net(torch.randn(2, 3, size, size))
            builds = True
        except RuntimeError:
            builds = False
        assert builds == train_cifar.auxiliary_fits(size), size
