"""Train a P-DARTS evaluation network on CIFAR-10 or CIFAR-100 with the paper's recipe.

The recipe (SPEC section 5) is the default: 600 epochs, global batch 128, SGD lr 0.025 cosine to 0
(set once per epoch), momentum 0.9, weight decay 3e-4 (5e-4 on CIFAR-100), gradient clip 5,
drop path 0.3 growing linearly, 20 cells, C = 36; ``--auxiliary`` (weight 0.4) and
``--cutout`` (length 16) as in the release's command line::

    python train_cifar.py --tmp_data_dir DATA --auxiliary --cutout --save LOG --note NOTE [--cifar100]
    python train_cifar.py --arch search-run/genotype.json ...      # a searched cell
    python train_cifar.py --init_channels 64 ...                    # the paper's large setting
    python train_cifar.py --dataset demo --epochs 5 --layers 8 --init_channels 16   # a quick try
    torchrun --nproc_per_node 8 train_cifar.py ...                  # global batch and lr unchanged
    python train_cifar.py --tmp_data_dir DATA --resume LOG/eval-NOTE-20190101-120000

Writes ``{save}eval-{note}-{time}/`` with log.txt, metrics.jsonl, weights.pt (plain state
dict) and checkpoint.pt (for --resume and test.py).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial

import torch.nn as nn

from data import cifar_transforms, get_dataset, normalization, num_classes_of
from engine import (
    RunSpec,
    add_training_args,
    check_sizes,
    checkpoint_genotype,
    cosine_lr,
    fit,
    load_resume,
    network_info,
)
from flags import HelpFormatter, nonneg_float, positive_int
from genotypes import get_genotype
from utils import UserError, barrier, init_distributed, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_training_args(p, epochs=600, batch_size=128, learning_rate=0.025, weight_decay=None,
                      init_channels=36, layers=20, drop_path_prob=0.3, report_freq=50, workers=4)
    p.add_argument("--learning_rate_min", type=nonneg_float, default=0.0,
                   help="final learning rate of the cosine schedule")
    p.add_argument("--cutout", action="store_true", default=False,
                   help="use cutout (off by default; the release's command line turns it on)")
    p.add_argument("--cutout_length", type=positive_int, default=16, help="cutout square side")
    p.add_argument("--cifar100", action="store_true", default=False, help="train on CIFAR-100")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "demo"], default=None,
                   help="cifar10 unless --cifar100; demo: generated data, no download")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR into --tmp_data_dir if it is not there")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resolve_dataset(args: argparse.Namespace) -> None:
    """--dataset wins; --cifar100 is the release's spelling of --dataset cifar100."""
    if args.dataset is None:
        args.dataset = "cifar100" if args.cifar100 else "cifar10"
    elif args.cifar100 and args.dataset != "cifar100":
        raise UserError(f"--cifar100 contradicts --dataset {args.dataset}")
    if args.weight_decay is None:  # the paper: 3e-4 on CIFAR-10, 5e-4 on CIFAR-100
        args.weight_decay = 5e-4 if args.dataset == "cifar100" else 3e-4


def main(args: argparse.Namespace) -> int:
    env = init_distributed(args.device, args.dist_timeout)
    args, resume = load_resume(args, vars(parse_args([])))
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
    train_set = get_dataset(args.dataset, args.tmp_data_dir, True,
                            cifar_transforms(args.dataset, True, cutout))
    test_set = get_dataset(args.dataset, args.tmp_data_dir, False,
                           cifar_transforms(args.dataset, False))

    spec = RunSpec(
        genotype=genotype,
        network=network_info("cifar", args.dataset, args.init_channels, args.layers,
                             num_classes_of(args.dataset), args.auxiliary),
        train_set=train_set, test_set=test_set,
        lr_at=partial(cosine_lr, args.learning_rate, epochs=args.epochs, lr_min=args.learning_rate_min),
        train_criterion=nn.CrossEntropyLoss(), eval_criterion=nn.CrossEntropyLoss(),
        input_size=(1, 3, 32, 32),
        device_augment={"mean": normalization(args.dataset)[0], "std": normalization(args.dataset)[1],
                        "cutout_length": cutout},
    )
    return fit(args, env, spec, resume)


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
