"""test.py: the authors' checkpoint layouts (the fixtures' key -> shape lists, with a
``module.`` prefix and a ``{'state_dict': ...}`` wrapper), this project's checkpoint with
flags overriding it, and every kind of bad input ending in one line and exit status 2."""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run_test_script, write_cifar_folder, write_image_folder

import engine
from checkpoint import save_atomic, training_state
from config import CifarConfig
from genotypes import DARTS_V2, PDARTS
from model import NetworkCIFAR


def state_dict_from_layout(fixtures_dir, name, prefix=""):
    """A state dict with the authors' keys and shapes (values random; variances positive)."""
    with open(os.path.join(fixtures_dir, name)) as f:
        layout = json.load(f)
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(100)
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        else:
            value = torch.randn(shape, generator=g) * 0.05
        state[prefix + key] = value
    return state


@pytest.fixture
def authors_cifar(fixtures_dir, tmp_path):
    """The authors' CIFAR-10 checkpoint layout as DataParallel saved it (``module.``)."""
    path = str(tmp_path / "cifar10_model.pt")
    torch.save(state_dict_from_layout(fixtures_dir, "statedict_cifar_pdarts.json", "module."), path)
    return path


def test_authors_cifar_layout_with_module_prefix(authors_cifar, cifar10_dir, capsys):
    rc, result, _ = run_test_script(["--auxiliary", "--model_path", authors_cifar, "--data", cifar10_dir,
                                  "--workers", "0"], capsys)
    assert rc == 0
    assert result["dataset"] == "cifar10" and result["images"] == 20
    assert 0 <= result["top1"] <= result["top5"] <= 100 and result["loss"] > 0


def test_authors_imagenet_layout_wrapped_in_state_dict(fixtures_dir, tmp_path, capsys):
    path = str(tmp_path / "imagenet_model.pth.tar")
    state = state_dict_from_layout(fixtures_dir, "statedict_imagenet_pdarts.json", "module.")
    torch.save({"epoch": 250, "state_dict": state, "best_acc_top1": 75.6}, path)
    data = tmp_path / "data"
    write_image_folder(str(data / "imagenet" / "val"), num_classes=3, per_class=1, size=64)
    rc, result, _ = run_test_script(["--dataset", "imagenet", "--auxiliary", "--model_path", path,
                                  "--tmp_data_dir", str(data), "--workers", "0"], capsys)
    assert rc == 0 and result["dataset"] == "imagenet" and result["images"] == 3


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """This project's checkpoint.pt of a tiny CIFAR-10 network (untrained)."""
    model = NetworkCIFAR(4, 10, 2, True, PDARTS)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    cfg = CifarConfig(learning_rate=0.1)
    network = engine.network_info("cifar", "cifar10", 4, 2, 10, True)
    path = str(tmp_path / "checkpoint.pt")
    save_atomic(training_state(model, optimizer, 1, cfg, PDARTS, network,
                               {"acc": 10.0, "epoch": 0}, {"top1": 10.0}), path)
    return path


def test_own_checkpoint_rebuilds_the_network_and_flags_override_it(tiny_checkpoint, cifar10_dir, capsys):
    argv = ["--model_path", tiny_checkpoint, "--data", cifar10_dir, "--workers", "0"]
    rc, result, _ = run_test_script(argv, capsys)
    assert rc == 0 and result["images"] == 20
    rc, _, err = run_test_script([*argv, "--layers", "3"], capsys)
    assert rc == 2 and "Check --layers" in err


def write_corrupt(tmp_path, authors_cifar):
    path = tmp_path / "truncated.pt"
    path.write_bytes(open(authors_cifar, "rb").read()[:5000])
    return str(path)


READ = "the checkpoint has C 36, 20 cells, an auxiliary head, 10 classes, cifar"
FLAGS = "Pass --init_channels 36 --layers 20 --auxiliary --dataset cifar10"


@pytest.mark.parametrize("extra,message", [
    (["--auxiliary", "--layers", "14"], f"{READ}. {FLAGS}"),
    (["--init_channels", "16"], f"{READ}. {FLAGS}"),
    (["--cifar100"], "(C 36, 20 cells, an auxiliary head, 100 classes, cifar): " + READ),
    (["--auxiliary", "--arch", "DARTS_V2"], "other cell operations than --arch DARTS_V2: pass --arch"),
    (["--auxiliary", "--arch", "NOPE"], "unknown genotype 'NOPE'"),
    (["--auxiliary", "--data", "{missing}"], "cifar10 not found"),
    (["--auxiliary", "--model_path", "{missing}"], "checkpoint not found"),
    (["--auxiliary", "--model_path", "{corrupt}"], "corrupt"),
    (["--auxiliary", "--dataset", "imagenet", "--data", "{missing}"], "ImageNet validation folder not found"),
])
def test_bad_input_is_one_line_and_exit_2(extra, message, authors_cifar, cifar10_dir, tmp_path, capsys):
    write_cifar_folder(cifar10_dir, 100)  # for --cifar100
    fill = {"missing": str(tmp_path / "nowhere"), "corrupt": write_corrupt(tmp_path, authors_cifar)}
    argv = ["--model_path", authors_cifar, "--data", cifar10_dir, "--workers", "0"]
    rc, _, err = run_test_script(argv + [a.format(**fill) for a in extra], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "--download" not in err          # test.py has no --download to suggest


def test_a_genotype_file_as_model_path_is_told_to_use_arch(tmp_path, capsys):
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps({"normal": [["sep_conv_3x3", 0]], "normal_concat": [2],
                                "reduce": [["max_pool_3x3", 1]], "reduce_concat": [2]}))
    rc, _, err = run_test_script(["--model_path", str(path), "--workers", "0"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "is a genotype JSON file" in err and "--arch" in err and "train_cifar.py --arch" in err
    assert "weights_only" not in err


def test_a_bare_state_dict_tells_its_sizes(tmp_path, capsys):
    """weights.pt of a non-default network (C 8, 5 cells, auxiliary head, 100 classes):
    test.py reads the sizes and the dataset from the tensors and asks only for the cell,
    which a state dict cannot tell; a wrong size flag is answered with every flag at once."""
    data = write_cifar_folder(str(tmp_path / "data"), 100)
    path = str(tmp_path / "weights.pt")
    torch.save(NetworkCIFAR(8, 100, 5, True, DARTS_V2).state_dict(), path)
    argv = ["--model_path", path, "--data", data, "--workers", "0"]
    rc, _, err = run_test_script(argv, capsys)            # PDARTS by default: other ops
    assert rc == 2 and "has the network's sizes (C 8, 5 cells, an auxiliary head, 100 classes)" in err
    assert "pass --arch" in err
    rc, result, _ = run_test_script([*argv, "--arch", "darts_v2"], capsys)
    assert rc == 0 and result["dataset"] == "cifar100" and result["images"] == 20
    rc, _, err = run_test_script([*argv, "--arch", "DARTS_V2", "--layers", "8"], capsys)
    assert rc == 2 and "Pass --init_channels 8 --layers 5 --auxiliary --dataset cifar100" in err


def test_the_command_line_prints_no_traceback(tmp_path):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "test.py"), "--model_path", str(garbage)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot read checkpoint") and "Traceback" not in proc.stderr
