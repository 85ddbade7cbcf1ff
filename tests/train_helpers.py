"""Helpers for the tests of train_cifar.py, train_imagenet.py and test.py: run a script's
main() in this process as its command line would, and read what a run left behind."""
import glob
import importlib.util
import json
import os

import pytest
import torch
from conftest import ROOT

from runs import run_main


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and one thread does not stall when other
    processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(module, argv: list[str]) -> int:
    """``python <script> argv``: the exit status (2 for bad input, with one line on stderr)."""
    return run_main(module.main, module.parse_args(argv))


def load_test_script():
    """test.py as a module (the name ``test`` would clash with the standard library's)."""
    spec = importlib.util.spec_from_file_location("pdarts_test_script", os.path.join(ROOT, "test.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_test_script(argv: list[str], capsys):
    """Run test.py; return (exit status, its JSON summary line or None, its stderr)."""
    capsys.readouterr()
    rc = run_script(load_test_script(), argv)
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    return rc, (json.loads(out[-1]) if rc == 0 else None), captured.err


def only_run_dir(save_prefix: str) -> str:
    dirs = glob.glob(save_prefix + "eval-*")
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)
