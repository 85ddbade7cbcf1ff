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

from checkpoint import checkpoint_genotype, resume_training
from config import CIFAR_DEMO, CIFAR_DEMO_DATASET, CifarConfig, default_of
from data import (
    cifar_transforms,
    get_dataset,
    normalization,
    num_classes_of,
)
from distributed import barrier, init_distributed
from engine import RunSpec, check_sizes, fit, folder_data, network_info
from errors import UserError
from flags import (
    ArgumentParser,
    HelpFormatter,
    add_no_effect_flags,
    add_presets,
    nonneg_float,
    nonneg_int,
    positive_int,
)
from genotypes import get_genotype
from runs import run_main
from train_flags import add_folder_args, add_training_args, parse_training
from utils import cosine_lr

IMAGE_SIZE = 32          # CIFAR's, and the default for an image folder
MIN_IMAGE_SIZE = 8
AUX_POOL, AUX_STRIDE = 5, 3   # the CIFAR auxiliary head's average pool


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0] + " First try: python train_cifar.py --demo",
                       formatter_class=HelpFormatter)
    add_training_args(p, CifarConfig,
                      weight_decay_help="SGD weight decay (default 3e-4, 5e-4 on CIFAR-100)")
    p.add_argument("--learning_rate_min", type=nonneg_float, default=paper("learning_rate_min"),
                   help="final learning rate of the cosine schedule")
    p.add_argument("--cutout", action="store_true", default=False,
                   help="use cutout (off by default; the release's command line turns it on)")
    p.add_argument("--cutout_length", type=positive_int, default=paper("cutout_length"),
                   help="cutout square side")
    p.add_argument("--cifar100", action="store_true", default=False, help="train on CIFAR-100")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "demo", "folder"], default=None,
                   help="cifar10 unless --cifar100 (demo with --demo); demo: generated data, no "
                        "download; folder: your own images in --tmp_data_dir (train/ and val/ or "
                        "test/ class folders, or class folders at the top with --val_portion "
                        "held out)")
    add_folder_args(p, CifarConfig, min_image_size=MIN_IMAGE_SIZE,
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
    add_presets(p, {k: paper(k) for k in CIFAR_DEMO}, CIFAR_DEMO)
    return p


def paper(name: str):
    """The paper's default of a flag (CifarConfig's)."""
    return default_of(CifarConfig, name)


def parse_args(argv: list[str] | None = None) -> CifarConfig:
    parser = build_parser()

    def resolve(values: dict, given: frozenset[str]) -> frozenset[str]:
        """--demo's presets for the flags not given; --dataset wins; --cifar100 is the
        release's spelling of --dataset cifar100. The weight decay is the paper's for the
        dataset: 3e-4, 5e-4 on CIFAR-100."""
        if values["demo"] and values["dataset"] is None and not values["cifar100"]:
            values["dataset"] = CIFAR_DEMO_DATASET
        for key in CIFAR_DEMO:
            if values[key] is None:
                values[key] = CIFAR_DEMO[key] if values["demo"] else paper(key)
        if values["dataset"] is None:
            values["dataset"] = "cifar100" if values["cifar100"] else paper("dataset")
        elif values["cifar100"] and values["dataset"] != "cifar100":
            parser.error(f"--cifar100 contradicts --dataset {values['dataset']}")
        if values["cifar100"]:
            given = given - {"cifar100"} | {"dataset"}
        if "weight_decay" not in given and values["dataset"] == "cifar100":
            values["weight_decay"] = CifarConfig.CIFAR100_WEIGHT_DECAY
        return given

    return parse_training(parser, CifarConfig, argv, resolve)


def check_config(cfg: CifarConfig) -> None:
    """What the flags cannot say alone: the image size and the auxiliary head fit the
    dataset, --download is for CIFAR."""
    if cfg.dataset == "folder" and cfg.download:
        raise UserError("--download fetches CIFAR; --dataset folder reads --tmp_data_dir as it is")
    if cfg.dataset != "folder" and cfg.image_size != IMAGE_SIZE:
        raise UserError(f"--image_size is for --dataset folder (CIFAR and demo images are "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE})")
    if cfg.auxiliary and not auxiliary_fits(cfg.image_size):
        raise UserError(f"--auxiliary does not fit --image_size {cfg.image_size}: the CIFAR "
                        "auxiliary head needs the 8x8 to 10x10 maps of 29- to 40-pixel images; "
                        "drop --auxiliary or use an --image_size in 29..40")


def auxiliary_fits(image_size: int) -> bool:
    """The CIFAR auxiliary head (average pool 5 stride 3, then a 2x2 convolution) needs a
    2x2 pooled map: its input, after two stride-2 reductions, must be 8 to 10 pixels."""
    side = math.ceil(math.ceil(image_size / 2) / 2)
    return side >= AUX_POOL and (side - AUX_POOL) // AUX_STRIDE + 1 == 2


def set_threads(threads: int) -> None:
    """--threads: PyTorch's CPU threads (0: its default, all cores)."""
    if threads:
        torch.set_num_threads(threads)


def main(cfg: CifarConfig) -> int:
    env = init_distributed(cfg.device, cfg.dist_timeout)
    cfg, resume = resume_training(cfg)
    set_threads(cfg.threads)     # after the resume: a resumed --demo run keeps its one thread
    check_config(cfg)
    genotype = checkpoint_genotype(resume, cfg.resume) if resume else get_genotype(cfg.arch)
    check_sizes(cfg.init_channels, cfg.layers, "cifar")

    if cfg.download and env.is_main:  # one process downloads, the others wait
        get_dataset(cfg.dataset, cfg.tmp_data_dir, True, None, download=True)
        get_dataset(cfg.dataset, cfg.tmp_data_dir, False, None, download=True)
    barrier()
    cutout = cfg.cutout_length if cfg.cutout else 0
    if cfg.dataset == "folder":
        train_set, test_set, data_info, run_files, data_lines = folder_data(cfg, cutout, resume)
        num_classes, device_augment = len(data_info["classes"]), None
    else:
        train_set = get_dataset(cfg.dataset, cfg.tmp_data_dir, True,
                                cifar_transforms(cfg.dataset, True, cutout))
        test_set = get_dataset(cfg.dataset, cfg.tmp_data_dir, False,
                               cifar_transforms(cfg.dataset, False))
        num_classes, data_info, run_files, data_lines = num_classes_of(cfg.dataset), None, {}, []
        mean, std = normalization(cfg.dataset)
        device_augment = {"mean": mean, "std": std, "cutout_length": cutout}

    spec = RunSpec(
        genotype=genotype,
        network=network_info("cifar", cfg.dataset, cfg.init_channels, cfg.layers,
                             num_classes, cfg.auxiliary),
        train_set=train_set, test_set=test_set,
        lr_at=partial(cosine_lr, cfg.learning_rate, epochs=cfg.epochs, lr_min=cfg.learning_rate_min),
        train_criterion=nn.CrossEntropyLoss(), eval_criterion=nn.CrossEntropyLoss(),
        input_size=(1, 3, cfg.image_size, cfg.image_size),
        device_augment=device_augment, data_info=data_info, run_files=run_files,
        data_lines=data_lines,
    )
    return fit(cfg, env, spec, resume)


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
