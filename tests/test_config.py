"""The run configuration (config.py) and the one resume rule (checkpoint.resume_config):
which flags a command line gave, what a resume may change, older runs' settings, and the
learning-rate schedule mark a resumed run keeps."""
import logging
import os

import pytest
import torch

import train_cifar
import train_search as ts
from checkpoint import resume_search, resume_training, save_atomic, training_state
from config import CifarConfig, SearchConfig
from engine import build_network, network_info
from errors import UserError
from genotypes import PDARTS


def _training_run(folder, **settings) -> str:
    """A training run folder whose checkpoint.pt was written with ``settings``."""
    os.makedirs(folder, exist_ok=True)
    cfg = CifarConfig(**settings)
    network = network_info("cifar", "cifar10", 4, 2, 10, False)
    model = build_network(network, PDARTS)
    optimizer = torch.optim.SGD(model.parameters(), cfg.learning_rate)
    save_atomic(training_state(model, optimizer, 1, cfg, PDARTS, network, {"acc": 10.0, "epoch": 0},
                               {"top1": 10.0}), os.path.join(folder, "checkpoint.pt"))
    return str(folder)


def test_a_flag_given_with_its_default_value_is_given():
    cfg = train_cifar.parse_args(["--learning_rate", "0.025", "--workers", "0"])
    assert cfg.learning_rate == CifarConfig().learning_rate == 0.025
    assert cfg.given == {"learning_rate", "workers"}
    assert ts.parse_args(["--note", "try"]).given == {"note"}
    assert ts.parse_args([]).given == frozenset()


def test_training_resume_refuses_a_recipe_flag_given_with_its_default_value(tmp_path):
    """The defect: the run's 0.05 was kept silently when --learning_rate 0.025 (the default)
    was given, as if not given."""
    run = _training_run(tmp_path / "run", learning_rate=0.05, workers=0)
    with pytest.raises(UserError, match=r"--learning_rate 0.025 \(the run's: 0.05\)"):
        resume_training(train_cifar.parse_args(["--resume", run, "--learning_rate", "0.025"]))
    cfg, _ = resume_training(train_cifar.parse_args(["--resume", run]))
    assert cfg.learning_rate == 0.05 and cfg.resume == os.path.join(run, "checkpoint.pt")


def test_training_resume_takes_run_time_flags_given_with_their_default_value(tmp_path):
    """The defect's other half: --workers 2, --report_freq 50 and --tmp_data_dir ../data
    (the defaults) were ignored on a run started with other values."""
    run = _training_run(tmp_path / "run", workers=0, report_freq=5, tmp_data_dir="/elsewhere")
    cfg, _ = resume_training(train_cifar.parse_args(["--resume", run]))
    assert (cfg.workers, cfg.report_freq, cfg.tmp_data_dir) == (0, 5, "/elsewhere")
    cfg, _ = resume_training(train_cifar.parse_args(
        ["--resume", run, "--workers", "2", "--report_freq", "50", "--tmp_data_dir", "../data"]))
    assert (cfg.workers, cfg.report_freq, cfg.tmp_data_dir) == (2, 50, "../data")
    # --save and --note only name a new run: accepted, and the run keeps its own.
    cfg, _ = resume_training(train_cifar.parse_args(["--resume", run, "--note", "other"]))
    assert cfg.note == "try"


def test_the_search_and_training_share_one_resume_rule(tmp_path, caplog):
    """The same flags may change on a resumed search as on a resumed training run; a new
    --workers is taken and said to change the augmentation draws."""
    folder = tmp_path / "search"
    os.makedirs(folder)
    saved = SearchConfig(workers=0, epochs=2).to_dict()
    torch.save({"kind": "pdarts-search", "version": 1, "args": saved, "stage": 0, "epoch": 1,
                "world_size": 1, "switches_normal": [], "switches_reduce": [], "model": {},
                "w_opt": {}, "a_opt": {}, "rng": [], "stages_done": [],
                "lr_schedule": "stepped-before-epoch"}, folder / "checkpoint.pt")
    with caplog.at_level(logging.WARNING, logger="pdarts"):
        cfg, _ = resume_search(ts.parse_args(["--resume", str(folder), "--workers", "2",
                                              "--deterministic", "--skip_bad_images"]))
    assert (cfg.workers, cfg.deterministic, cfg.skip_bad_images, cfg.epochs) == (2, True, True, 2)
    assert "the augmentation draws depend on the number of loader processes" in caplog.text
    with pytest.raises(UserError, match=r"--epochs 25 \(the run's: 2\)"):
        resume_search(ts.parse_args(["--resume", str(folder), "--epochs", "25"]))


def test_older_runs_settings_are_filled_in_one_place():
    old = {"epochs": 3, "stem": "auto", "cifar100": False, "stem_reason": "x",
           "resume_overrides": ["resume"], "stop_after_epochs": 2, "add_layers": [0, 1, 2]}
    cfg = SearchConfig.from_dict(old)
    assert (cfg.epochs, cfg.stem, cfg.cutout, cfg.subset_per_class, cfg.checkpoint_cells) == \
        (3, "cifar", False, None, False)
    assert cfg.add_layers == (0, 1, 2) and [s.layers for s in cfg.stages] == [5, 6, 7]
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    assert CifarConfig.from_dict({"dataset": "cifar100", "cifar100": True}).dataset == "cifar100"


def test_a_config_is_frozen_and_its_stages_are_derived_once():
    cfg = ts.parse_args(["--add_layers", "6", "--add_layers", "12", "--add_width", "0",
                         "--add_width", "8"])
    assert [(s.layers, s.init_channels, s.ops, s.keep) for s in cfg.stages] == \
        [(5, 16, 8, 5), (11, 16, 5, 3), (17, 24, 3, 1)]
    with pytest.raises(AttributeError):
        cfg.epochs = 3
    assert "stages" not in cfg.to_dict() and "given" not in cfg.to_dict()
