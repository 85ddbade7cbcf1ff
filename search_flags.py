"""The command line of train_search.py: its flags with the paper's defaults (and the
demo's), how repeated per-stage flags (``--add_layers 6 --add_layers 12``) resolve, and
which flags a ``--resume`` may change. The search itself is in train_search.py.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from distributed import add_dist_timeout_arg
from flags import (
    DEFAULT_DATA_DIR,
    ArgumentParser,
    HelpFormatter,
    add_no_effect_flags,
    count_or_fraction,
    default_workers,
    fraction,
    int_at_least,
    int_between,
    momentum,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    prob,
    report_steps,
    run_note,
    seed_int,
    workers_help,
)
from model_search import NUM_STAGES, STEM_REDUCTION, STEMS
from plots import add_plot_args
from speed import add_speed_args

# Skip-connect dropout rates per stage (paper Sec. 4.1.1); other datasets use CIFAR-10's.
PAPER_DROPOUT_RATES = {"cifar10": (0.0, 0.4, 0.7), "cifar100": (0.1, 0.2, 0.3)}


RELEASE_WORKERS = 2         # the release's loader processes; never more than the CPU cores
MIN_IMAGE_SIZE = 8          # the smallest --image_size the two reduction cells can halve twice
AUTO_IMAGENET_STEM = 64     # --stem auto picks the stride-8 stem from this image size on

# Flags whose default depends on --demo (None on the command line = not given).
PAPER_DEFAULTS = dict(dataset="cifar10", epochs=25, arch_warmup_epochs=10, batch_size=96,
                      learning_rate=0.025, arch_learning_rate=6e-4, init_channels=16, layers=5,
                      add_layers=[0, 6, 12], workers=default_workers(RELEASE_WORKERS),
                      report_freq=50, note="try", image_size=32, threads=0, channels_last=False)
# The demo: the full three-stage algorithm, scaled down to run on a 2-core CPU in a few
# minutes. channels_last: the CPU's depthwise convolutions are much faster in NHWC.
# The rates: a demo stage has 50 weight steps and 30 alpha steps, the paper's ~6,500 and
# ~3,900. At the paper's 0.025 the convolutions learn too little to be preferred over
# pooling, and at its 6e-4 the alphas (Adam moves each by at most about its rate per step)
# end within 2% of uniform, so near-ties pick the cell; the demo's rates let the weights
# learn and the alphas decide. add_layers: 3/5/7 cells (the paper's +6 per stage scaled to
# +2), so that stage 2 has a normal cell between its reductions (4 cells are N R R N).
# Measurements: benchmarks/RESULTS.md (2026-12-05).
DEMO_DEFAULTS = dict(dataset="demo", epochs=5, arch_warmup_epochs=2, batch_size=50,
                     learning_rate=0.1, arch_learning_rate=0.02, init_channels=4, layers=3,
                     add_layers=[0, 2, 4], workers=0, report_freq=5, note="demo",
                     image_size=16, threads=1, channels_last=True)
# On --resume these come from the new command line; everything else from the run itself.
RUNTIME_FLAGS = ("resume", "workers", "report_freq", "device", "gpu", "tmp_data_dir", "download",
                 "stop_after_epochs", "derive", "threads", "host_data", "channels_last", "compile",
                 "dist_timeout", "plot_format", "checkpoint_cells")


def resolve_stem(stem: str, image_size: int) -> tuple[str, str]:
    """The search network's stem for ``--stem`` at ``--image_size`` and why (for the log).
    A ValueError when the stride-8 stem would leave the last cells under 2x2 pixels."""
    if stem == "auto":
        stem = "imagenet" if image_size >= AUTO_IMAGENET_STEM else "cifar"
        reason = (f"--stem auto: {stem} since --image_size {image_size} is "
                  f"{'at least' if stem == 'imagenet' else 'under'} {AUTO_IMAGENET_STEM}")
    else:
        reason = f"--stem {stem}"
    smallest = 2 * 4 * STEM_REDUCTION[stem]     # the stem, then two reduction cells
    if image_size < smallest:
        raise ValueError(f"--stem {stem} shrinks the image by {STEM_REDUCTION[stem]} before the "
                         f"first cell and by {4 * STEM_REDUCTION[stem]} by the last: --image_size "
                         f"{image_size} leaves the last cells under 2x2 pixels; use --image_size "
                         f"{smallest} or more, or --stem cifar")
    return stem, reason


def search_stem(args: argparse.Namespace) -> str:
    """The run's stem; runs saved before --stem existed used the release's."""
    stem = getattr(args, "stem", "cifar")
    return "cifar" if stem == "auto" else stem


def stage_values(given: Sequence | None, flag: str, default: Sequence,
                 implicit_first: bool) -> list:
    """The three per-stage values of a repeated flag.

    ``implicit_first``: the release's ``--add_layers``/``--add_width`` lists start with an
    implicit 0 for stage 1, so two flags (``--add_layers 6 --add_layers 12``) mean 0, 6, 12;
    three flags are taken as given.
    """
    if given is None:
        return list(default)
    values = list(given)
    if implicit_first and len(values) == NUM_STAGES - 1:
        return [type(values[0])(0)] + values
    if len(values) == NUM_STAGES:
        return values
    # Deviation: the release silently falls back to its defaults here.
    forms = "2 (stage 1 is then 0) or 3" if implicit_first else "3"
    raise ValueError(f"{flag} was given {len(values)} time(s); give it {forms} times, one "
                     f"value per stage (got {values})")



def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="P-DARTS progressive architecture search (3 stages of 5/11/17 cells). "
                    "First try: python train_search.py --demo",
        formatter_class=HelpFormatter)
    d = DEMO_DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--tmp_data_dir", "--data", default=DEFAULT_DATA_DIR,
                   help="folder holding cifar-10-batches-py / cifar-100-python; for "
                        "--dataset folder, the ImageFolder tree itself (class subfolders)")
    g.add_argument("--dataset", choices=["cifar10", "cifar100", "folder", "demo"], default=None,
                   help="cifar10 (default), cifar100, folder (your own ImageFolder tree, "
                        "normalised with its own mean/std), demo (built-in generated "
                        "10-class task; the default with --demo)")
    g.add_argument("--cifar100", action="store_true", help="same as --dataset cifar100")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR into --tmp_data_dir if it is missing")
    g.add_argument("--image_size", type=int_at_least(MIN_IMAGE_SIZE), default=None,
                   help="image side; --dataset folder: resized and centre-cropped to it; "
                        "CIFAR/demo: resized to it when not 32 (default 32, demo 16)")
    g.add_argument("--train_portion", type=fraction, default=0.5,
                   help="part of the training split that trains the weights, the rest trains "
                        "the alphas: the first part for CIFAR and demo (the release's rule), a "
                        "stratified draw seeded with --seed for an image folder")
    g.add_argument("--subset_per_class", nargs=2, type=count_or_fraction, default=None,
                   metavar=("W", "A"),
                   help="search on a sample: from every class, a seeded draw of W images for "
                        "the weight half and A others for the alpha half (counts, or fractions "
                        "of the class such as 0.1 0.025); --train_portion is then not used")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="--dataset folder: decode every image once at the start and leave out "
                        "the unreadable ones (counted in the log) instead of stopping at the "
                        "first with its path")
    g.add_argument("--workers", type=nonneg_int, default=None,
                   help=workers_help(RELEASE_WORKERS) + f"; demo {d['workers']}")
    # Faithful to the release: its search takes --cutout/--cutout_length (Cutout on the
    # images of both halves, off by default) and --drop_path_prob (parsed, never used).
    g.add_argument("--cutout", action="store_true",
                   help="Cutout (after normalisation) on the images of both halves, as the "
                        "release's --cutout (off by default)")
    g.add_argument("--cutout_length", type=positive_int, default=16, help="Cutout square side")
    g.add_argument("--drop_path_prob", type=prob, default=0.3,
                   help="accepted for the release's command lines; the search network has no "
                        "drop path, so the value is not used (default 0.3, the release's)")

    g = p.add_argument_group("search")
    g.add_argument("--epochs", type=positive_int, default=None,
                   help=f"epochs per stage (default {PAPER_DEFAULTS['epochs']}, demo {d['epochs']})")
    g.add_argument("--arch_warmup_epochs", type=nonneg_int, default=None,
                   help="epochs per stage that train only the weights "
                        f"(default {PAPER_DEFAULTS['arch_warmup_epochs']}, demo {d['arch_warmup_epochs']})")
    g.add_argument("--batch_size", type=positive_int, default=None,
                   help="batch of each half per step, over all processes together "
                        f"(default {PAPER_DEFAULTS['batch_size']}, demo {d['batch_size']})")
    g.add_argument("--learning_rate", type=positive_float, default=None,
                   help=f"initial weight learning rate (default {PAPER_DEFAULTS['learning_rate']}, "
                        f"demo {d['learning_rate']})")
    g.add_argument("--learning_rate_min", type=nonneg_float, default=0.0, help="cosine schedule floor")
    g.add_argument("--momentum", type=momentum, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=nonneg_float, default=3e-4, help="SGD weight decay")
    g.add_argument("--grad_clip", type=positive_float, default=5.0,
                   help="gradient norm clip for the weights and for the alphas")
    g.add_argument("--arch_learning_rate", type=positive_float, default=None,
                   help=f"Adam lr of the alphas (default {PAPER_DEFAULTS['arch_learning_rate']}, "
                        f"demo {d['arch_learning_rate']})")
    g.add_argument("--arch_weight_decay", type=nonneg_float, default=1e-3,
                   help="Adam weight decay of the alphas")
    g.add_argument("--init_channels", type=positive_int, default=None,
                   help=f"C of stage 1 (default {PAPER_DEFAULTS['init_channels']}, "
                        f"demo {d['init_channels']})")
    g.add_argument("--stem", choices=("auto",) + STEMS, default="auto",
                   help="the search network's stem: cifar (the release's, full resolution) or "
                        "imagenet (the mobile network's stride-8 stem: a 224-pixel search costs "
                        f"about what a 28-pixel one does); auto = imagenet when --image_size is "
                        f"{AUTO_IMAGENET_STEM} or more, else cifar")
    g.add_argument("--layers", type=positive_int, default=None,
                   help=f"cells in stage 1 (default {PAPER_DEFAULTS['layers']}, demo {d['layers']})")
    g.add_argument("--add_layers", type=nonneg_int, action="append", default=None,
                   help="cells added per stage; repeat: twice means 0, A, B (the release's "
                        "form), three times gives all three (default 0, 6, 12 -> 5/11/17 cells; "
                        "demo 0, 2, 4 -> 3/5/7 cells)")
    g.add_argument("--add_width", type=nonneg_int, action="append", default=None,
                   help="channels added to C per stage; repeat like --add_layers (default 0, 0, 0)")
    g.add_argument("--dropout_rate", type=prob, action="append", default=None,
                   help="skip-connect dropout rate per stage; give it 3 times. Default: the "
                        "paper's rates, CIFAR-10 (and demo/folder) 0.0 0.4 0.7, CIFAR-100 0.1 0.2 0.3 "
                        "(the authors' README example: 0.1 0.4 0.7)")
    # Deviation: the budget M is a flag (the paper's M = 2 is the default).
    g.add_argument("--max_skip", type=int_between(-1, 8), default=2,
                   help="at most this many skip-connects in the final normal cell (paper: 2); "
                        "-1 = no restriction")

    g = p.add_argument_group("run")
    # Deviation: the default folder is runs/ (ignored by git).
    g.add_argument("--save", default="runs/",
                   help="run folder prefix: the run goes to {save}search-{note}-{timestamp}")
    g.add_argument("--note", type=run_note, default=None,
                   help="name part of the run folder (default try, demo demo)")
    g.add_argument("--seed", type=seed_int, default=2, help="seeds everything (the release's default)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (slower); with it a resumed CPU run equals "
                        "an uninterrupted one")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = CUDA when available")
    add_dist_timeout_arg(g)
    add_no_effect_flags(g)      # the release's --gpu
    g.add_argument("--threads", type=nonneg_int, default=None,
                   help="CPU threads for PyTorch; 0 = PyTorch's default (all cores). The demo "
                        "uses 1: its tensors are too small to gain from more, and on a busy "
                        "machine several threads per tiny op slow it down many times")
    g.add_argument("--report_freq", type=report_steps, default=None,
                   help=f"steps between progress lines (default {PAPER_DEFAULTS['report_freq']}, "
                        f"demo {d['report_freq']})")
    g.add_argument("--demo", action="store_true",
                   help="run the whole algorithm on the built-in demo data at a tiny size "
                        "(flags given with it override its presets)")
    g.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last completed epoch")
    g.add_argument("--derive", metavar="FILE", default=None,
                   help="no training: re-derive the final cell from saved alphas (arch_state.json) "
                        "at --max_skip and print it")
    g.add_argument("--host_data", action="store_true",
                   help="on CUDA, keep the CIFAR/demo augmentation in DataLoader workers on the "
                        "CPU instead of the default GPU pipeline (same distribution, other draws)")
    add_speed_args(p, channels_last_default=None)   # the demo turns it on
    add_plot_args(g)
    # For tests of resume: stop (as if killed) after this many epochs of this process.
    g.add_argument("--stop_after_epochs", type=positive_int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    given: list[str] = []
    if args.resume:
        # A resumed run keeps its own settings; only run-time flags given here change.
        probe = build_parser()
        for action in probe._actions:
            action.default = argparse.SUPPRESS
        given = sorted(vars(probe.parse_args(argv)))
        args.resume_overrides = [k for k in given if k in RUNTIME_FLAGS]
    if args.cifar100:
        if args.dataset not in (None, "cifar100"):
            parser.error(f"--cifar100 contradicts --dataset {args.dataset}")
        args.dataset = "cifar100"
    presets = DEMO_DEFAULTS if args.demo else PAPER_DEFAULTS
    for key, value in presets.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    try:
        args.add_layers = stage_values(args.add_layers, "--add_layers", presets["add_layers"], True)
        args.add_width = stage_values(args.add_width, "--add_width", [0, 0, 0], True)
        # Deviation: no --dropout_rate means the paper's rates, not the release's fallback.
        rates = PAPER_DROPOUT_RATES.get(args.dataset, PAPER_DROPOUT_RATES["cifar10"])
        args.dropout_rate = stage_values(args.dropout_rate, "--dropout_rate", rates, False)
    except ValueError as e:
        parser.error(str(e))
    if args.resume and args.stem == "auto":
        given = [k for k in given if k != "stem"]   # the run keeps the stem it chose
    if not args.resume:
        try:
            args.stem, args.stem_reason = resolve_stem(args.stem, args.image_size)
        except ValueError as e:
            parser.error(str(e))
    if args.resume:
        # The other flags given, as resolved here (--add_layers 6 --add_layers 12 is
        # [0, 6, 12], --cifar100 is --dataset cifar100), to compare with the run's own.
        keys = {"dataset" if k == "cifar100" else k for k in given}
        args.resume_given = {k: getattr(args, k) for k in sorted(keys)
                             if k not in RUNTIME_FLAGS}
    elif args.arch_warmup_epochs >= args.epochs:
        parser.error(f"--arch_warmup_epochs {args.arch_warmup_epochs} >= --epochs {args.epochs}: "
                     "no alpha would ever be updated and the cell would come from the random "
                     "initial alphas; use fewer warm-up epochs or more epochs")
    return args
