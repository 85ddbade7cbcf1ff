"""Command lines of every script: numeric flags checked at parse time (one line naming the
flag and its range, exit status 2), help texts with their defaults, the default number of
loader workers, and at least one progress line per epoch in a log."""
import logging
import os
import re

import pytest
from helpers import load_test_script

import flags
import train_cifar
import train_imagenet
import train_search
import utils

SCRIPTS = {"search": train_search, "cifar": train_cifar, "imagenet": train_imagenet}


def _script(name):
    return load_test_script() if name == "test" else SCRIPTS[name]


BAD = [
    # (scripts, flag, value, what the message says)
    (("search",), "--add_width", "-1", "integer >= 0"),
    (("search",), "--add_layers", "-2", "integer >= 0"),
    (("search", "cifar", "imagenet"), "--init_channels", "0", ">="),
    (("search", "cifar", "imagenet", "test"), "--report_freq", "0", "integer >= 1"),
    (("search",), "--threads", "-1", "integer >= 0"),
    (("search", "cifar", "imagenet", "test"), "--workers", "-1", "integer >= 0"),
    (("search", "cifar", "imagenet"), "--learning_rate", "0", "(0, inf)"),
    (("search", "cifar", "imagenet"), "--learning_rate", "nan", "finite"),
    (("search",), "--arch_learning_rate", "-0.001", "(0, inf)"),
    (("search", "cifar", "imagenet"), "--weight_decay", "-1", "[0, inf)"),
    (("search", "cifar", "imagenet"), "--momentum", "1.5", "[0, 1)"),
    (("search",), "--train_portion", "1", "(0, 1)"),
    (("search",), "--train_portion", "0", "(0, 1)"),
    (("search", "cifar", "imagenet"), "--epochs", "0", "integer >= 1"),
    (("search", "cifar", "imagenet", "test"), "--batch_size", "0", "integer >= 1"),
    (("search", "cifar", "imagenet"), "--drop_path_prob", "2.0", "[0, 1)"),
    (("search",), "--dropout_rate", "1.0", "[0, 1)"),
    (("search", "cifar"), "--cutout_length", "0", "integer >= 1"),
    (("search",), "--max_skip", "9", "-1..8"),
    (("search",), "--image_size", "4", "integer >= 8"),
    (("cifar", "imagenet", "test"), "--layers", "1", "integer >= 2"),
    (("imagenet",), "--label_smooth", "1", "[0, 1)"),
    (("cifar",), "--auxiliary_weight", "-0.4", "[0, inf)"),
    (("search", "cifar"), "--epochs", "ten", "expected an integer"),
    # torch.manual_seed died with "ValueError: Overflow" on these.
    (("search", "cifar", "imagenet"), "--seed", "99999999999999999999", "0..9223372036854775807"),
    (("search", "cifar", "imagenet"), "--seed", "-1", "0..9223372036854775807"),
    # A note is part of one folder's name: "a/b" made nested folders.
    (("search", "cifar", "imagenet"), "--note", "a/b", "no path separator"),
    (("search", "cifar", "imagenet"), "--note", "..", "no path separator"),
    (("search", "cifar", "imagenet"), "--note", "a\\b", "no path separator"),
]


@pytest.mark.parametrize("script,flag,value,message",
                         [(s, f, v, m) for names, f, v, m in BAD for s in names])
def test_numbers_out_of_range_are_refused_at_parse_time(script, flag, value, message, capsys):
    with pytest.raises(SystemExit) as info:
        _script(script).parse_args([flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert f"argument {flag}" in err and message in err and value in err


SCRIPT_PARSERS = ["search", "cifar", "imagenet", "test", "plots", "report", "visualize"]


@pytest.mark.parametrize("script", SCRIPT_PARSERS)
def test_a_bad_command_line_is_one_line_and_a_hint_not_the_usage(script, capsys):
    """argparse would print the whole usage (25 lines for the search) before the one line
    that matters; every script prints that line and a hint to --help, exit status 2."""
    import plots
    import report
    import visualize
    module = {"plots": plots, "report": report, "visualize": visualize}.get(script)
    positional = ["RUN"] if module else []      # their required argument, given
    module = module or _script(script)
    with pytest.raises(SystemExit) as info:
        module.parse_args([*positional, "--no_such_flag"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "usage:" not in " ".join(err), err
    assert "error: " in err[0] and "--no_such_flag" in err[0]
    assert err[1].startswith("(python ") and err[1].endswith(" --help lists every flag)")


def test_the_issue_s_two_mistakes_read_as_one_line_each(capsys):
    for argv, says in ((["--dataset", "flder"], "invalid choice: 'flder'"),
                       (["--demo", "--epochs", "2"], "--arch_warmup_epochs 2 >= --epochs 2")):
        with pytest.raises(SystemExit) as info:
            train_search.parse_args(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and says in err[0]
        assert err[1].endswith(" --help lists every flag)")   # prog: sys.argv[0]


def test_warmup_of_all_the_epochs_is_refused(capsys):
    with pytest.raises(SystemExit):
        train_search.parse_args(["--epochs", "10", "--arch_warmup_epochs", "10"])
    err = capsys.readouterr().err
    assert "--arch_warmup_epochs 10 >= --epochs 10" in err and "no alpha" in err
    args = train_search.parse_args(["--epochs", "11", "--arch_warmup_epochs", "10"])
    assert args.epochs == 11


def test_in_range_values_pass():
    args = train_search.parse_args(["--add_width", "0", "--add_width", "1", "--threads", "0",
                                    "--workers", "0", "--dropout_rate", "0", "--dropout_rate", "0.4",
                                    "--dropout_rate", "0.99", "--max_skip", "-1",
                                    "--learning_rate_min", "0", "--momentum", "0"])
    assert args.dropout_rate == (0.0, 0.4, 0.99) and args.max_skip == -1
    args = train_cifar.parse_args(["--grad_clip", "0", "--drop_path_prob", "0"])
    assert args.grad_clip == 0 and args.drop_path_prob == 0


def test_the_largest_seed_seeds_everything():
    """The --seed bound leaves room for every seeding done with it: torch's generators (64
    bits) seeded with seed + epoch by the training's sampler, seed_everything, seed_for."""
    import torch

    top = str(2 ** 63 - 1)
    for script in (train_search, train_cifar, train_imagenet):
        assert script.parse_args(["--seed", top, "--note", "v1.2-b_c"]).seed == 2 ** 63 - 1
    utils.seed_everything(2 ** 63 - 1)
    torch.Generator().manual_seed(2 ** 63 - 1 + 10_000)
    torch.Generator().manual_seed(utils.seed_for(2 ** 63 - 1, 2, 99, 5, 7))
    utils.seed_everything(0)


@pytest.mark.parametrize("cpus,expected", [(1, 0), (2, 2), (3, 3), (64, 4)])
def test_default_workers_never_exceed_the_cores(monkeypatch, cpus, expected):
    monkeypatch.setattr(flags, "available_cpus", lambda: cpus)
    assert flags.default_workers(4) == expected
    assert flags.default_workers(2) == min(expected, 2)


def test_scripts_default_to_at_most_one_worker_per_core():
    cores = flags.available_cpus()
    assert train_cifar.parse_args([]).workers <= max(cores, 1) and train_cifar.parse_args([]).workers <= 4
    assert train_imagenet.parse_args([]).workers <= min(cores, 8)
    assert train_search.parse_args([]).workers == flags.default_workers(2)
    assert load_test_script().parse_args([]).workers == flags.default_workers(4)


@pytest.mark.parametrize("script", ["search", "cifar", "imagenet", "test"])
def test_help_shows_every_default_once(script, capsys):
    with pytest.raises(SystemExit):
        _script(script).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "::" not in text
    assert not re.search(r"\(default[^)]*\) \(default", text)       # said twice
    expected = {
        "search": ["--seed SEED seeds everything (the release's default) (default: 2)",
                   "(default: ../data)", "Cutout square side (default: 16)"],
        "cifar": ["training epochs (default 600, demo 10)", "SGD momentum (default: 0.9)",
                  "number of cells (default 20, demo 5)", f"here {flags.default_workers(4)}; demo 0)",
                  "seeds everything (default: 0)", "(default: auto)", "cutout square side (default: 16)",
                  "SGD weight decay (default 3e-4, 5e-4 on CIFAR-100) --report_freq"],
        "imagenet": ["training epochs (default: 250)", "(default: 1024)", "(default: 0.5)"],
        "test": ["default 128 on CIFAR and ImageNet", f"else {flags.DEFAULT_DATA_DIR}"],
    }[script]
    for piece in expected:
        assert piece in text, piece


def test_every_script_reads_the_same_default_data_folder():
    assert train_search.parse_args([]).tmp_data_dir == flags.DEFAULT_DATA_DIR
    assert train_cifar.parse_args([]).tmp_data_dir == flags.DEFAULT_DATA_DIR
    assert train_imagenet.parse_args([]).tmp_data_dir == flags.DEFAULT_DATA_DIR


@pytest.fixture
def log_records():
    """The project logger's records at INFO and above, while the test runs."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    utils.logger.addHandler(handler)
    old_level = utils.logger.level
    utils.logger.setLevel(logging.INFO)
    yield records
    utils.logger.removeHandler(handler)
    utils.logger.setLevel(old_level)


def test_an_epoch_shorter_than_report_freq_still_prints_a_line(monkeypatch, log_records):
    """Not on a terminal (a log, CI): an epoch of 3 steps with --report_freq 50 prints
    one line at its end; longer epochs print every report_freq steps."""
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    for total, freq in ((3, 50), (120, 50)):
        log_records.clear()
        progress = utils.Progress(total, "train 0", freq)
        progress.tty = False
        for step in range(1, total + 1):
            progress.update(step, {"loss": utils.AverageMeter()})
        lines = [r.getMessage() for r in log_records]
        expected = ["train 0 step 003/3"] if total == 3 else ["step 050/120", "step 100/120"]
        assert len(lines) == len(expected) and all(e in ln for e, ln in zip(expected, lines))


def test_a_slow_epoch_off_a_terminal_prints_at_least_every_30_s(monkeypatch, log_records):
    """An 85 s epoch of 10 steps with --report_freq 50 is not silent until its end: a
    line whenever 30 s have passed since the last one (a fake clock: 8.5 s a step)."""
    import types
    clock = {"now": 1000.0}
    monkeypatch.setattr(utils, "time", types.SimpleNamespace(time=lambda: clock["now"]))
    progress = utils.Progress(10, "train 0", 50)
    progress.tty = False
    for step in range(1, 11):
        clock["now"] += 8.5
        progress.update(step, {"loss": utils.AverageMeter()})
    steps = [r.getMessage().split()[3] for r in log_records]
    assert steps == ["004/10", "008/10", "010/10"]    # 34 s, 34 s, then the epoch's end


def test_every_script_puts_its_run_folders_in_runs(tmp_path, monkeypatch):
    """One place for every run (report.py 'runs/search-*' runs/eval-* finds them all);
    --save stays a prefix, as in the release."""
    from runs import create_run_dir
    monkeypatch.chdir(tmp_path)
    for module, kind in ((train_search, "search"), (train_cifar, "eval"), (train_imagenet, "eval")):
        args = module.parse_args([])
        assert args.save == "runs/"
        run_dir = create_run_dir(args.save, kind, "try")
        assert os.path.isdir(run_dir) and run_dir.startswith(f"runs/{kind}-try-")
    assert create_run_dir("LOG", "eval", "x").startswith("LOGeval-x-")
