"""The command lines of train_cifar.py and train_imagenet.py: the release's flags both
share, with each recipe's defaults (config.py: CifarConfig, ImageNetConfig), the flags of
``--dataset folder``, and the parse into the run's config.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import fields

from config import TrainConfig, default_of
from distributed import add_dist_timeout_arg
from flags import (
    add_plot_args,
    fraction,
    int_at_least,
    momentum,
    no_effect_lines,
    nonneg_float,
    nonneg_int,
    parse_given,
    positive_float,
    positive_int,
    prob,
    report_steps,
    run_note,
    seed_int,
    workers_help,
)
from speed import add_speed_args


def add_folder_args(parser: argparse.ArgumentParser, recipe: type[TrainConfig], *,
                    min_image_size: int, image_help: str) -> None:
    """The flags of ``--dataset folder`` both training scripts share."""
    parser.add_argument("--image_size", type=int_at_least(min_image_size),
                        default=default_of(recipe, "image_size"), help=image_help)
    parser.add_argument("--val_portion", type=fraction, default=default_of(recipe, "val_portion"),
                        help="--dataset folder with class folders at the top: part held out for "
                             "evaluation (stratified, seeded with --seed, saved in split.json)")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="--dataset folder: decode every image once at the start and leave "
                             "out the unreadable ones (counted in the log) instead of stopping at "
                             "the first with its path")


def add_training_args(parser: argparse.ArgumentParser, recipe: type[TrainConfig], *,
                      weight_decay_help: str = "SGD weight decay") -> None:
    """The release's flags common to train_cifar.py and train_imagenet.py, with the
    defaults of ``recipe`` (the script's paper recipe)."""
    p = parser

    def paper(name: str):
        return default_of(recipe, name)

    p.add_argument("--tmp_data_dir", type=str, default=paper("tmp_data_dir"), help="data directory")
    p.add_argument("--workers", type=nonneg_int, default=paper("workers"),
                   help=workers_help(recipe.RELEASE_WORKERS, per_process=True))
    p.add_argument("--batch_size", type=positive_int, default=paper("batch_size"),
                   help="GLOBAL batch size: under torchrun each process takes batch_size / world_size")
    p.add_argument("--learning_rate", "--lr", type=positive_float, default=paper("learning_rate"),
                   help="GLOBAL initial learning rate (not rescaled with the number of processes)")
    p.add_argument("--momentum", type=momentum, default=paper("momentum"), help="SGD momentum")
    p.add_argument("--weight_decay", type=nonneg_float, default=paper("weight_decay"),
                   help=weight_decay_help)
    p.add_argument("--report_freq", type=report_steps, default=paper("report_freq"),
                   help="steps between progress lines")
    p.add_argument("--epochs", type=positive_int, default=paper("epochs"), help="training epochs")
    p.add_argument("--init_channels", type=int_at_least(2), default=paper("init_channels"),
                   help="C of the network")
    p.add_argument("--layers", type=int_at_least(2), default=paper("layers"), help="number of cells")
    p.add_argument("--auxiliary", action="store_true", default=False,
                   help="use the auxiliary tower (off by default; the release's command line "
                        "turns it on)")
    p.add_argument("--auxiliary_weight", type=nonneg_float, default=paper("auxiliary_weight"),
                   help="weight of the auxiliary loss")
    p.add_argument("--drop_path_prob", type=prob, default=paper("drop_path_prob"),
                   help="final drop-path rate (grows linearly from 0)")
    # Deviation: runs/ by default, where the search puts its runs (one place for report.py).
    p.add_argument("--save", type=str, default=paper("save"),
                   help="prefix of the run folder: {save}eval-{note}-{YYYYmmdd-HHMMSS}")
    p.add_argument("--note", type=run_note, default=paper("note"), help="note in the run folder name")
    p.add_argument("--seed", type=seed_int, default=paper("seed"), help="seeds everything")
    p.add_argument("--arch", type=str, default=paper("arch"),
                   help="a cell name from genotypes.py (any case), a genotype JSON file, or a "
                        "search run folder (its genotype.json)")
    p.add_argument("--grad_clip", type=nonneg_float, default=paper("grad_clip"),
                   help="gradient norm clipping (0: off)")
    p.add_argument("--resume", type=str, default=None, metavar="RUN_DIR_OR_CHECKPOINT",
                   help="continue a run from its folder (or its checkpoint.pt) at the next epoch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=paper("device"),
                   help="auto = CUDA when available")
    add_dist_timeout_arg(p)
    p.add_argument("--sync_bn", action="store_true",
                   help="synchronise batch-norm statistics across GPUs under torchrun "
                        "(off by default, matching the release's DataParallel statistics)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (slower; for tests and debugging)")
    p.add_argument("--host_data", action="store_true",
                   help="on CUDA, keep CIFAR augmentation in DataLoader workers on the CPU "
                        "instead of the default GPU pipeline (same distribution, other draws)")
    add_speed_args(p, " (default: on for the CPU, where it is faster; off on CUDA)")
    add_plot_args(p)


def parse_training(parser: argparse.ArgumentParser, recipe: type[TrainConfig],
                   argv: Sequence[str] | None,
                   resolve: Callable[[dict, frozenset[str]], frozenset[str] | None] | None = None
                   ) -> TrainConfig:
    """The command line as the run's config. ``resolve(values, given)`` fills in what
    depends on other flags (the dataset, CIFAR-100's weight decay) and may stop the parse
    with ``parser.error``."""
    args, given = parse_given(parser, argv)
    values = vars(args)
    if resolve is not None:
        given = resolve(values, given) or given
    if values.get("channels_last") is None:   # not given: the device decides (engine)
        values["channels_last"] = default_of(recipe, "channels_last")
    names = {f.name for f in fields(recipe)}
    return recipe(given=given, no_effect=tuple(no_effect_lines(args)),
                  **{k: v for k, v in values.items() if k in names})
