"""Train a P-DARTS evaluation network on ImageNet (mobile setting) with the paper's recipe.

The recipe (SPEC section 5) is the default: 250 epochs, global batch 1024 (8 GPUs x 128), SGD lr 0.5
with the release's linear decay (``--lr_scheduler cosine`` as an option) and 5 warm-up
epochs when the batch is over 256, momentum 0.9, weight decay 3e-5, label smoothing 0.1,
gradient clip 5, no drop path, 14 cells, C = 48; ``--auxiliary`` (weight 0.4) as in the
release's command line. Data: ``--tmp_data_dir/imagenet/{train,val}`` class folders::

    python train_imagenet.py --tmp_data_dir DATA --save LOG --auxiliary --note NOTE
    python train_imagenet.py --dataset folder --tmp_data_dir TREE --arch RUN/genotype.json
        # your own large images: TREE/train + TREE/val (or test), or class folders (10% held
        # out, split.json); any class count, the folder's own mean/std, --image_size 224
    torchrun --nproc_per_node 8 train_imagenet.py --tmp_data_dir DATA --auxiliary   # the paper's 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train_imagenet.py ...        # --batch_size and --learning_rate stay global

Writes ``{save}eval-{note}-{time}/`` with log.txt, metrics.jsonl, weights.pt and
checkpoint.pt; ``--resume RUN_DIR`` continues a run.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch.nn as nn

from checkpoint import checkpoint_genotype, resume_training
from config import ImageNetConfig, default_of
from data import DataError, get_image_folder, imagenet_transforms
from distributed import init_distributed
from engine import RunSpec, check_sizes, fit, folder_data, network_info
from errors import UserError
from flags import ArgumentParser, HelpFormatter, add_no_effect_flags, prob
from genotypes import get_genotype
from runs import run_main
from train_flags import add_folder_args, add_training_args, parse_training
from utils import cosine_lr

WARMUP_EPOCHS = 5       # warm-up (Goyal et al.) when the global batch is over WARMUP_BATCH
WARMUP_BATCH = 256
LINEAR_TAIL_EPOCHS = 5  # the release's linear schedule changes slope for the last 5 epochs
IMAGE_SIZE = 224        # the mobile setting's
MIN_IMAGE_SIZE = 32     # the network shrinks images by 32: smaller leaves no pixel to pool


def imagenet_lr(lr0: float, epoch: int, epochs: int, scheduler: str = "linear",
                batch_size: int = 1024, stepped_before_epoch: bool = True) -> float:
    """Learning rate of ``epoch`` (set once per epoch), SPEC section 5.

    linear (the release's): lr0 * (E - 5 - e) / (E - 5) while E - e > 5, then
    lr0 * (E - e) / ((E - 5) * 5). cosine: lr0 * (1 + cos(pi (e + 1) / E)) / 2, the
    release's scheduler stepped before each epoch (``cosine_lr``). Either is multiplied by
    (e + 1) / 5 in the first 5 epochs when the global batch is over 256.
    """
    if scheduler == "cosine":
        lr = cosine_lr(lr0, epoch, epochs, stepped_before_epoch=stepped_before_epoch)
    elif scheduler == "linear":
        tail = LINEAR_TAIL_EPOCHS
        if epochs - epoch > tail:
            lr = lr0 * (epochs - tail - epoch) / (epochs - tail)
        else:
            lr = lr0 * (epochs - epoch) / ((epochs - tail) * tail)
    else:
        raise UserError(f"unknown --lr_scheduler {scheduler!r}: use linear or cosine")
    if epoch < WARMUP_EPOCHS and batch_size > WARMUP_BATCH:
        lr = lr * (epoch + 1) / WARMUP_EPOCHS
    return lr


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_training_args(p, ImageNetConfig)
    p.add_argument("--label_smooth", type=prob, default=paper("label_smooth"),
                   help="label smoothing epsilon")
    p.add_argument("--lr_scheduler", choices=["linear", "cosine"], default=paper("lr_scheduler"),
                   help="linear: the release's schedule; cosine: cosine annealing to 0")
    p.add_argument("--dataset", choices=["imagenet", "folder"], default=paper("dataset"),
                   help="imagenet: --tmp_data_dir/imagenet/{train,val}; folder: your own images "
                        "in --tmp_data_dir (train/ and val/ or test/ class folders, or class "
                        "folders at the top with --val_portion held out), any number of "
                        "classes, normalised with their own mean and std")
    add_folder_args(p, ImageNetConfig, min_image_size=MIN_IMAGE_SIZE,
                    image_help="--dataset folder: training crops of this side "
                               "(RandomResizedCrop); evaluation resizes to 256/224 of it and "
                               "centre-crops")
    add_no_effect_flags(p)      # the release's --gpu
    return p


def paper(name: str):
    """The paper's default of a flag (ImageNetConfig's)."""
    return default_of(ImageNetConfig, name)


def parse_args(argv: list[str] | None = None) -> ImageNetConfig:
    return parse_training(build_parser(), ImageNetConfig, argv)


def imagenet_split(root: str, split: str, train: bool):
    return get_image_folder(os.path.join(root, "imagenet", split), imagenet_transforms(train),
                            what=f"the ImageNet {split} folder (--tmp_data_dir/imagenet/{split})")


def main(cfg: ImageNetConfig) -> int:
    env = init_distributed(cfg.device, cfg.dist_timeout)
    cfg, resume = resume_training(cfg)
    genotype = checkpoint_genotype(resume, cfg.resume) if resume else get_genotype(cfg.arch)
    check_sizes(cfg.init_channels, cfg.layers, "imagenet")
    # Deviation: the release's formula divides by (epochs - 5); refuse instead of training
    # with a negative or infinite learning rate.
    if cfg.lr_scheduler == "linear" and cfg.epochs <= LINEAR_TAIL_EPOCHS:
        raise UserError(f"the release's linear schedule needs --epochs > {LINEAR_TAIL_EPOCHS}; "
                        "use --lr_scheduler cosine for shorter runs")

    dataset, image_size = cfg.dataset, cfg.image_size
    data_info, run_files, data_lines = None, {}, []
    if dataset == "folder":
        # The folder path of train_cifar.py, with this script's augmentation.
        train_set, test_set, data_info, run_files, data_lines = folder_data(
            cfg, 0, resume, augment="imagenet")
        classes = data_info["classes"]
    else:
        if image_size != IMAGE_SIZE:
            raise UserError(f"--image_size is for --dataset folder (ImageNet trains at "
                            f"{IMAGE_SIZE}x{IMAGE_SIZE})")
        train_set = imagenet_split(cfg.tmp_data_dir, "train", True)
        test_set = imagenet_split(cfg.tmp_data_dir, "val", False)
        if train_set.classes != test_set.classes:
            raise DataError(f"imagenet/train has {len(train_set.classes)} classes and imagenet/val "
                            f"{len(test_set.classes)}; the class folders must be the same")
        classes = train_set.classes
        data_lines = [f"warning: {note}" for note in train_set.notes + test_set.notes]

    spec = RunSpec(
        genotype=genotype,
        # Deviation: the number of classes comes from the folders (the release fixes 1000),
        # so a subset of ImageNet or a small ImageFolder trains as well.
        network=network_info("imagenet", dataset, cfg.init_channels, cfg.layers,
                             len(classes), cfg.auxiliary),
        train_set=train_set, test_set=test_set,
        lr_at=partial(imagenet_lr, cfg.learning_rate, epochs=cfg.epochs,
                      scheduler=cfg.lr_scheduler, batch_size=cfg.batch_size),
        # Label smoothing: torch's label_smoothing=eps trains against the release's target
        # (1 - eps) * one_hot + eps / K (tests/test_train_imagenet.py checks it by hand).
        # The auxiliary loss uses it too; the test loss does not.
        train_criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smooth),
        eval_criterion=nn.CrossEntropyLoss(),
        input_size=(1, 3, image_size, image_size),
        data_info=data_info, run_files=run_files, data_lines=data_lines,
    )
    return fit(cfg, env, spec, resume)


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
