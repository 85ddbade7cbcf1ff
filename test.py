"""Evaluate a trained network: CIFAR-10 / CIFAR-100 test set or ImageNet validation set.
Replaces the release's test.py and test_imagenet.py. Reports loss, top-1 and top-5, then
one JSON line for machines:

    python test.py --auxiliary --model_path MODEL --data DATA [--arch PDARTS]
        # the authors' CIFAR-10 checkpoint: 97.58%
    python test.py --dataset imagenet --auxiliary --model_path MODEL --data DATA
        # the authors' ImageNet checkpoint (DATA/imagenet/val or DATA/val): 75.6% / 92.6%
    python test.py --model_path RUN_DIR --data DATA
        # this project's checkpoint.pt: genotype and sizes come from it; flags still override
    python test.py --model_path RUN_DIR [--data TREE]
        # a run of train_cifar.py or train_imagenet.py --dataset folder: its classes, image
        # size, normalisation and held-out split (split.json) come from the run; TREE/test
        # (else TREE/val), the stored held-out images, or every image of a folder of class
        # folders

``--model_path`` may be a plain state dict (the authors' CIFAR checkpoints, our
weights.pt), one whose keys start with ``module.``, one wrapped as ``{'state_dict': ...}``
(the authors' ImageNet checkpoint), or this project's checkpoint.pt (or its run folder).
A bare state dict tells the stem width C, the number of cells, the auxiliary head and the
number of classes: they are read from it (and logged); only the cells' operations cannot
be, so ``--arch`` names the cell when it is not PDARTS. Flags override what is read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch.nn as nn

from checkpoint import checkpoint_genotype
from data import (
    DataError,
    cifar_transforms,
    compare_classes,
    drop_unreadable,
    files_dataset,
    get_dataset,
    get_image_folder,
    imagenet_transforms,
    own_transforms,
    scan_folder,
)
from distributed import add_dist_timeout_arg, init_distributed
from engine import (
    RELEASE_DEFAULTS,
    load_trained_network,
    make_loader,
    per_process_batch,
    resolve_trained_network,
    top5_text,
    topk_for,
)
from errors import UserError, load_json
from flags import (
    DEFAULT_DATA_DIR,
    NO_EFFECT,
    ArgumentParser,
    HelpFormatter,
    add_no_effect_flags,
    default_workers,
    int_at_least,
    no_effect_lines,
    nonneg_int,
    positive_int,
    report_steps,
    workers_help,
)
from genotypes import check_same_cell, format_genotype
from loop import evaluate
from model import format_summary, model_summary
from run_files import CHECKPOINT, SPLIT
from runs import run_main, setup_logging
from utils import logger

RELEASE_WORKERS = 4
# The release's test.py defines these; they change nothing here (the log says so).
NO_EFFECT_HERE = {
    **NO_EFFECT,
    "cutout": "evaluation takes the images as they are (no augmentation)",
    "cutout_length": "evaluation takes the images as they are (no augmentation)",
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Evaluate a trained network on the CIFAR-10 / CIFAR-100 test set or the "
                    "ImageNet validation set; reports loss, top-1 and top-5, then one JSON line.",
        formatter_class=HelpFormatter)
    p.add_argument("--data", type=str, default=None,
                   help=f"data directory (default: --tmp_data_dir, else an image-folder run's "
                        f"own folder, else {DEFAULT_DATA_DIR})")
    p.add_argument("--tmp_data_dir", type=str, default=None, help="same as --data")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "demo", "imagenet", "folder"],
                   default=None,
                   help="default: the checkpoint's (ImageNet for an ImageNet network, CIFAR-100 "
                        "for 100 classes), else cifar100 with --cifar100, else cifar10; folder "
                        "needs a checkpoint of train_cifar.py or train_imagenet.py --dataset "
                        "folder")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="--dataset folder: leave out unreadable images (counted) instead of "
                        "stopping at the first with its path")
    p.add_argument("--cifar100", action="store_true", help="the release's --dataset cifar100")
    p.add_argument("--model_path", type=str, default=None, help="checkpoint file or run folder")
    p.add_argument("--auxiliary", action="store_true", default=None,
                   help="the network has an auxiliary head (default: read from the checkpoint)")
    p.add_argument("--arch", type=str, default=None,
                   help="cell name (any case), genotype JSON file or search run folder (default: "
                        "the checkpoint's, else PDARTS)")
    p.add_argument("--init_channels", type=int_at_least(2), default=None,
                   help="C (default: read from the checkpoint, else 36 on CIFAR, 48 on ImageNet)")
    p.add_argument("--layers", type=int_at_least(2), default=None,
                   help="cells (default: read from the checkpoint, else 20 on CIFAR, 14 on ImageNet)")
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="default 128 on CIFAR and ImageNet, as the release's test scripts")
    p.add_argument("--workers", type=nonneg_int, default=default_workers(RELEASE_WORKERS),
                   help=workers_help(RELEASE_WORKERS))
    p.add_argument("--report_freq", type=report_steps, default=50, help="steps between progress lines")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = CUDA when available")
    add_dist_timeout_arg(p)
    add_no_effect_flags(p, NO_EFFECT_HERE, switches=("cutout",))
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def imagenet_val(root: str):
    """``root/imagenet/val`` (the training scripts' layout) or ``root/val`` (the release's
    test_imagenet.py layout)."""
    candidates = [os.path.join(root, "imagenet", "val"), os.path.join(root, "val")]
    for path in candidates:
        if os.path.isdir(path):
            return get_image_folder(path, imagenet_transforms(False), "the ImageNet validation folder")
    raise DataError(f"ImageNet validation folder not found: expected {' or '.join(candidates)} "
                    "(class subfolders); set --data or --tmp_data_dir")


def folder_test_set(data_info: dict | None, root: str | None, checkpoint_path: str,
                    skip_bad_images: bool = False, workers: int = 0):
    """The evaluation images of an image-folder run, and a line saying which they are:
    ``root/test`` (else ``root/val``) of a train/val tree; the held-out images of the run's
    split.json when ``root`` is the folder it was trained on; otherwise every image of
    ``root`` (a separate folder of class folders). Classes must equal the run's."""
    if not data_info or data_info.get("dataset") != "folder":
        raise UserError("--dataset folder needs a checkpoint of train_cifar.py or train_imagenet.py "
                        "--dataset folder "
                        "(it holds the classes, image size and normalisation)")
    root = root or data_info["root"]
    classes, size, stats = data_info["classes"], data_info["image_size"], data_info["stats"]
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root} (set --data)")
    split_path = os.path.join(os.path.dirname(checkpoint_path), SPLIT)
    names = [n for n in ("test", "val") if os.path.isdir(os.path.join(root, n))]
    if os.path.isdir(os.path.join(root, "train")) and names:
        folder = os.path.join(root, names[0])
        test_set, what = scan_folder(folder, "test image folder"), f"{folder}"
        compare_classes(classes, test_set.classes, "the checkpoint", folder)
    elif (data_info.get("eval") == "held-out"
          and os.path.realpath(root) == os.path.realpath(data_info["root"])):
        stored = _read_split(split_path)
        if stored.get("digest") != data_info.get("split_digest"):
            raise DataError(f"{split_path} is not the split of {checkpoint_path}")
        test_set = files_dataset(root, stored["held_out"], classes, split_path)
        what = f"the {len(test_set)} images held out in {split_path}"
    else:
        test_set, what = scan_folder(root, "test image folder"), f"every image in {root}"
        compare_classes(classes, test_set.classes, "the checkpoint", root)
    if skip_bad_images:
        test_set, bad = drop_unreadable(test_set, workers)
        for reason in bad:
            logger.warning("left out: %s", reason)
        what += f", {len(bad)} unreadable image(s) left out"
    for note in test_set.notes:   # files not read
        logger.warning("warning: %s", note)
    test_set.transform = own_transforms(data_info.get("augment", "cifar"), False, size,
                                        stats["mean"], stats["std"])
    return test_set, what


def run_folder_hint(path: str, ours: bool) -> str:
    """For a bare state dict with a training run's checkpoint.pt beside it (``RUN/weights.pt``):
    the dataset was guessed from the weights alone, while the run folder says what it is."""
    folder = os.path.dirname(os.path.abspath(path))
    if ours or not os.path.isfile(os.path.join(folder, CHECKPOINT)):
        return ""
    return (f". {path} holds the weights only, so the dataset was guessed from their shapes "
            f"(CIFAR): give the run folder instead (--model_path {folder}), whose "
            f"{CHECKPOINT} records its dataset, classes and image size")


def _read_split(path: str) -> dict:
    try:
        with open(path) as f:
            stored = load_json(f)
    except OSError as e:
        raise DataError(f"cannot read the run's held-out split {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not a split file of train_cifar.py") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("held_out"), list):
        raise DataError(f"{path} is not a split file of train_cifar.py (no 'held_out' list)")
    return stored


def main(args: argparse.Namespace) -> int:
    env = init_distributed(args.device, args.dist_timeout)
    setup_logging(None, env.is_main)
    for line in no_effect_lines(args, NO_EFFECT_HERE):
        logger.info(line)
    if not args.model_path:
        raise UserError("--model_path is required (a checkpoint file or a run folder)")
    trained = resolve_trained_network(
        args.model_path, dataset=args.dataset, cifar100=args.cifar100, arch=args.arch,
        init_channels=args.init_channels, layers=args.layers, auxiliary=args.auxiliary,
        purpose="test.py evaluates")
    path, ours, dataset, info = trained.path, trained.ours, trained.dataset, trained.info
    if args.arch and ours:   # the run records its cell: another wiring loads, and is wrong
        check_same_cell(trained.genotype, checkpoint_genotype(trained.checkpoint, path), args.arch, path)
    kind, num_classes, data_info = info["kind"], info["num_classes"], trained.data_info
    genotype, batch_default = trained.genotype, RELEASE_DEFAULTS[kind][2]
    batch = per_process_batch(args.batch_size or batch_default, env.world_size)

    root = args.data or args.tmp_data_dir   # an image-folder run knows its own
    image_size = trained.image_size
    if dataset == "folder":
        test_set, what = folder_test_set(data_info, root, path, args.skip_bad_images, args.workers)
    elif kind == "imagenet":
        test_set = imagenet_val(root or DEFAULT_DATA_DIR)
        if len(test_set.classes) > num_classes:
            raise DataError(f"the validation folder has {len(test_set.classes)} classes but the "
                            f"network only {num_classes} outputs")
    else:
        try:
            test_set = get_dataset(dataset, root or DEFAULT_DATA_DIR, False,
                                   cifar_transforms(dataset, False), offer_download=False)
        except DataError as e:
            raise DataError(f"{str(e).rstrip('.')}{run_folder_hint(path, ours)}") from None

    model = load_trained_network(trained).to(env.device)

    logger.info("model %s (%s): %s", path, "this project's checkpoint" if ours else "state dict",
                json.dumps(info))
    logger.info("genotype = %s", format_genotype(genotype))
    logger.info(format_summary(model_summary(model, (1, 3, image_size, image_size))))
    if dataset == "folder":
        logger.info("data: %s, %d classes, %dx%d", what, num_classes, image_size, image_size)
    loader = make_loader(test_set, batch, env, train=False, workers=args.workers)
    stats = evaluate(model, loader, nn.CrossEntropyLoss(), env.device, topk=topk_for(num_classes),
                     report_freq=args.report_freq, show=env.is_main)
    logger.info("test_loss %.6f test_acc %.2f%%%s (%d images of %s)", stats["loss"], stats["top1"],
                top5_text(stats), stats["count"], dataset)
    if env.is_main:
        print(json.dumps({"model_path": path, "dataset": dataset, "images": stats["count"],
                          "loss": stats["loss"], "top1": stats["top1"], "top5": stats.get("top5")}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
