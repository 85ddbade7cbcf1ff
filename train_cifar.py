"""Train a P-DARTS evaluation network on CIFAR-10, CIFAR-100 or an image folder with the paper's recipe.

The recipe (SPEC section 5) is the default: 600 epochs, global batch 128, SGD lr 0.025 cosine to 0
(set once per epoch), momentum 0.9, weight decay 3e-4 (5e-4 on CIFAR-100), gradient clip 5,
drop path 0.3 growing linearly, 20 cells, C = 36; ``--auxiliary`` (weight 0.4) and
``--cutout`` (length 16) as in the release's command line::

    python train_cifar.py --tmp_data_dir DATA --auxiliary --cutout --save LOG --note NOTE [--cifar100]
    python train_cifar.py --arch search-run/genotype.json ...      # a searched cell
    python train_cifar.py --init_channels 64 ...                    # the paper's large setting
    python train_cifar.py --demo                                    # a first try: ~1 min on a CPU
    torchrun --nproc_per_node 8 train_cifar.py ...                  # global batch and lr unchanged
    python train_cifar.py --tmp_data_dir DATA --resume LOG/eval-NOTE-20190101-120000
    python train_cifar.py --dataset folder --tmp_data_dir TREE --image_size 64 --arch RUN/genotype.json
        # your own images: TREE/train + TREE/val (or test), or class folders (10% held out)

Writes ``{save}eval-{note}-{time}/`` with log.txt, metrics.jsonl, weights.pt (plain state
dict) and checkpoint.pt (for --resume and test.py).
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import partial

import torch
import torch.nn as nn

from data import (
    cifar_transforms,
    get_dataset,
    normalization,
    num_classes_of,
)
from distributed import barrier, init_distributed
from engine import (
    RunSpec,
    add_folder_args,
    add_training_args,
    check_sizes,
    checkpoint_genotype,
    cosine_lr,
    fit,
    folder_data,
    load_resume,
    network_info,
)
from errors import UserError
from flags import (
    ArgumentParser,
    HelpFormatter,
    add_no_effect_flags,
    add_presets,
    default_workers,
    nonneg_float,
    nonneg_int,
    positive_int,
    resolve_presets,
)
from genotypes import get_genotype
from runs import run_main

RELEASE_WORKERS = 4      # the release's loader processes; never more than the CPU cores
IMAGE_SIZE = 32          # CIFAR's, and the default for an image folder
MIN_IMAGE_SIZE = 8
AUX_POOL, AUX_STRIDE = 5, 3   # the CIFAR auxiliary head's average pool


# Flags whose default depends on --demo (None on the command line = not given); the
# paper's recipe (SPEC section 5) is the other column. The demo trains a small network of
# the same cells on the built-in generated data (data.py) in a few minutes on a 2-core CPU.
PAPER_DEFAULTS = dict(epochs=600, batch_size=128, learning_rate=0.025, init_channels=36,
                      layers=20, report_freq=50, workers=default_workers(RELEASE_WORKERS),
                      note="try", threads=0, channels_last=False)
# 5 cells of C = 8 (N R N R N: each kind of cell, one normal cell at every resolution) for
# 10 epochs; batch 50 gives 20 steps an epoch on the 1,000 demo images, 200 in all (the
# paper: ~235,000). At the paper's rate 0.025 those steps reached 93% on the demo data and
# 27% on a small image folder, at 0.1 99% and 53% (93% in 30 epochs). channels_last: the
# CPU's depthwise convolutions are much faster in NHWC. One thread: tensors this small
# gain little from more, and on a busy machine several threads per tiny op slow it down
# many times. Measurements: benchmarks/RESULTS.md (2026-12-07).
DEMO_DEFAULTS = dict(epochs=10, batch_size=50, learning_rate=0.1, init_channels=8, layers=5,
                     report_freq=5, workers=0, note="demo", threads=1, channels_last=True)
DEMO_DATASET = "demo"     # with --demo, unless --dataset or --cifar100 says otherwise


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0] + " First try: python train_cifar.py --demo",
                       formatter_class=HelpFormatter)
    add_training_args(p, epochs=600, batch_size=128, learning_rate=0.025, weight_decay=None,
                      init_channels=36, layers=20, drop_path_prob=0.3, report_freq=50,
                      workers=RELEASE_WORKERS)
    p.add_argument("--learning_rate_min", type=nonneg_float, default=0.0,
                   help="final learning rate of the cosine schedule")
    p.add_argument("--cutout", action="store_true", default=False,
                   help="use cutout (off by default; the release's command line turns it on)")
    p.add_argument("--cutout_length", type=positive_int, default=16, help="cutout square side")
    p.add_argument("--cifar100", action="store_true", default=False, help="train on CIFAR-100")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "demo", "folder"], default=None,
                   help="cifar10 unless --cifar100 (demo with --demo); demo: generated data, no "
                        "download; folder: your own images in --tmp_data_dir (train/ and val/ or "
                        "test/ class folders, or class folders at the top with --val_portion "
                        "held out)")
    add_folder_args(p, image_size=IMAGE_SIZE, min_image_size=MIN_IMAGE_SIZE,
                    image_help="--dataset folder: images are resized (shorter side) and "
                               "centre-cropped to this size")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR into --tmp_data_dir if it is not there")
    p.add_argument("--threads", type=nonneg_int, default=None,
                   help="CPU threads for PyTorch; 0 = PyTorch's default (all cores)")
    p.add_argument("--demo", action="store_true",
                   help="train a small network on the built-in demo data in minutes on a CPU "
                        "(flags given with it override its presets)")
    add_no_effect_flags(p)      # the release's --gpu
    add_presets(p, PAPER_DEFAULTS, DEMO_DEFAULTS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.demo and args.dataset is None and not args.cifar100:
        args.dataset = DEMO_DATASET
    resolve_presets(args, PAPER_DEFAULTS, DEMO_DEFAULTS)
    return args


def resolve_dataset(args: argparse.Namespace) -> None:
    """--dataset wins; --cifar100 is the release's spelling of --dataset cifar100."""
    if args.dataset is None:
        args.dataset = "cifar100" if args.cifar100 else "cifar10"
    elif args.cifar100 and args.dataset != "cifar100":
        raise UserError(f"--cifar100 contradicts --dataset {args.dataset}")
    if args.weight_decay is None:  # the paper: 3e-4 on CIFAR-10, 5e-4 on CIFAR-100
        args.weight_decay = 5e-4 if args.dataset == "cifar100" else 3e-4
    if args.dataset == "folder" and args.download:
        raise UserError("--download fetches CIFAR; --dataset folder reads --tmp_data_dir as it is")
    if args.dataset != "folder" and args.image_size != IMAGE_SIZE:
        raise UserError(f"--image_size is for --dataset folder (CIFAR and demo images are "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE})")
    if args.auxiliary and not auxiliary_fits(args.image_size):
        raise UserError(f"--auxiliary does not fit --image_size {args.image_size}: the CIFAR "
                        "auxiliary head needs the 8x8 to 10x10 maps of 29- to 40-pixel images; "
                        "drop --auxiliary or use an --image_size in 29..40")


def set_threads(threads: int | None) -> None:
    """--threads: PyTorch's CPU threads (0 or None: its default, all cores)."""
    if threads:
        torch.set_num_threads(threads)


def auxiliary_fits(image_size: int) -> bool:
    """The CIFAR auxiliary head (average pool 5 stride 3, then a 2x2 convolution) needs a
    2x2 pooled map: its input, after two stride-2 reductions, must be 8 to 10 pixels."""
    side = math.ceil(math.ceil(image_size / 2) / 2)
    return side >= AUX_POOL and (side - AUX_POOL) // AUX_STRIDE + 1 == 2


def main(args: argparse.Namespace) -> int:
    env = init_distributed(args.device, args.dist_timeout)
    args, resume = load_resume(args, vars(parse_args([])))
    set_threads(args.threads)
    resolve_dataset(args)
    genotype = checkpoint_genotype(resume, args.resume) if resume else get_genotype(args.arch)
    check_sizes(args.init_channels, args.layers, "cifar")
    if args.epochs < 1:
        raise UserError(f"--epochs must be positive (got {args.epochs})")

    if args.download and env.is_main:  # one process downloads, the others wait
        get_dataset(args.dataset, args.tmp_data_dir, True, None, download=True)
        get_dataset(args.dataset, args.tmp_data_dir, False, None, download=True)
    barrier()
    cutout = args.cutout_length if args.cutout else 0
    if args.dataset == "folder":
        train_set, test_set, data_info, run_files, data_lines = folder_data(args, cutout, resume)
        num_classes, device_augment = len(data_info["classes"]), None
    else:
        train_set = get_dataset(args.dataset, args.tmp_data_dir, True,
                                cifar_transforms(args.dataset, True, cutout))
        test_set = get_dataset(args.dataset, args.tmp_data_dir, False,
                               cifar_transforms(args.dataset, False))
        num_classes, data_info, run_files, data_lines = num_classes_of(args.dataset), None, {}, []
        mean, std = normalization(args.dataset)
        device_augment = {"mean": mean, "std": std, "cutout_length": cutout}

    spec = RunSpec(
        genotype=genotype,
        network=network_info("cifar", args.dataset, args.init_channels, args.layers,
                             num_classes, args.auxiliary),
        train_set=train_set, test_set=test_set,
        lr_at=partial(cosine_lr, args.learning_rate, epochs=args.epochs, lr_min=args.learning_rate_min),
        train_criterion=nn.CrossEntropyLoss(), eval_criterion=nn.CrossEntropyLoss(),
        input_size=(1, 3, args.image_size, args.image_size),
        device_augment=device_augment, data_info=data_info, run_files=run_files,
        data_lines=data_lines,
    )
    return fit(args, env, spec, resume)


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
