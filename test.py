"""Evaluate a trained network: CIFAR-10 / CIFAR-100 test set or ImageNet validation set.
Replaces the release's test.py and test_imagenet.py. Reports loss, top-1 and top-5, then
one JSON line for machines::

    python test.py --auxiliary --model_path MODEL --data DATA [--arch PDARTS]
        # the authors' CIFAR-10 checkpoint: 97.58%
    python test.py --dataset imagenet --auxiliary --model_path MODEL --data DATA
        # the authors' ImageNet checkpoint (DATA/imagenet/val or DATA/val): 75.6% / 92.6%
    python test.py --model_path RUN_DIR --data DATA
        # this project's checkpoint.pt: genotype and sizes come from it; flags still override

``--model_path`` may be a plain state dict (the authors' CIFAR checkpoints, our
weights.pt), one whose keys start with ``module.``, one wrapped as ``{'state_dict': ...}``
(the authors' ImageNet checkpoint), or this project's checkpoint.pt (or its run folder).
Without a checkpoint that says otherwise the network is the release's: PDARTS, C = 36 and
20 cells on CIFAR, C = 48 and 14 cells on ImageNet.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch.nn as nn

from checkpoint import CheckpointError, describe_checkpoint, extract_state_dict, load_file, load_weights
from data import (
    DataError,
    cifar_transforms,
    get_dataset,
    get_image_folder,
    imagenet_transforms,
    num_classes_of,
)
from engine import (
    build_network,
    check_training_checkpoint,
    checkpoint_genotype,
    evaluate,
    is_training_checkpoint,
    make_loader,
    network_info,
    per_process_batch,
    resume_path,
)
from genotypes import format_genotype, get_genotype
from model import format_summary, model_summary
from utils import UserError, add_dist_timeout_arg, init_distributed, logger, run_main, setup_logging

# The release's test.py / test_imagenet.py defaults: channels, cells, batch size.
RELEASE_DEFAULTS = {"cifar": (36, 20, 96), "imagenet": (48, 14, 128)}
DEFAULT_DATA = "../data"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=str, default=None,
                   help=f"data directory (default: --tmp_data_dir, else {DEFAULT_DATA})")
    p.add_argument("--tmp_data_dir", type=str, default=None, help="same as --data")
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "demo", "imagenet"], default=None,
                   help="default: the checkpoint's, else cifar100 with --cifar100, else cifar10")
    p.add_argument("--cifar100", action="store_true", help="the release's --dataset cifar100")
    p.add_argument("--model_path", type=str, default=None, help="checkpoint file or run folder")
    p.add_argument("--auxiliary", action="store_true", default=None,
                   help="the network has an auxiliary head (the authors' checkpoints do)")
    p.add_argument("--arch", type=str, default=None,
                   help="cell name or genotype JSON file (default: the checkpoint's, else PDARTS)")
    p.add_argument("--init_channels", type=int, default=None,
                   help="C (default: the checkpoint's, else 36 on CIFAR, 48 on ImageNet)")
    p.add_argument("--layers", type=int, default=None,
                   help="cells (default: the checkpoint's, else 20 on CIFAR, 14 on ImageNet)")
    p.add_argument("--batch_size", type=int, default=None, help="default 96 on CIFAR, 128 on ImageNet")
    p.add_argument("--workers", type=int, default=4, help="data-loading worker processes")
    p.add_argument("--report_freq", type=int, default=50)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_dist_timeout_arg(p)
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


def main(args: argparse.Namespace) -> int:
    env = init_distributed(args.device, args.dist_timeout)
    setup_logging(None, env.is_main)
    if not args.model_path:
        raise UserError("--model_path is required (a checkpoint file or a run folder)")
    path = resume_path(args.model_path)
    obj = load_file(path)
    ours = is_training_checkpoint(obj)
    if ours:
        check_training_checkpoint(obj, path)
    elif isinstance(obj, dict) and obj.get("kind") == "pdarts-search":
        raise CheckpointError(
            f"{path} is {describe_checkpoint(obj)}; test.py evaluates a trained network: train "
            "the searched cell first (train_cifar.py --arch SEARCH_RUN/genotype.json) and give "
            "that run's folder or checkpoint.pt")
    extract_state_dict(obj)  # weights in it? Say so before reading any data
    saved = obj["network"] if ours else {}

    dataset = args.dataset or ("cifar100" if args.cifar100 else None) or saved.get("dataset", "cifar10")
    if args.cifar100 and dataset != "cifar100":
        raise UserError(f"--cifar100 contradicts --dataset {dataset}")
    kind = "imagenet" if dataset == "imagenet" else "cifar"
    C_default, layers_default, batch_default = RELEASE_DEFAULTS[kind]
    if kind == "imagenet":
        num_classes = saved.get("num_classes", 1000) if saved.get("kind") == "imagenet" else 1000
    else:
        num_classes = num_classes_of(dataset)
    genotype = (get_genotype(args.arch) if args.arch else
                checkpoint_genotype(obj, path) if ours else get_genotype("PDARTS"))
    info = network_info(
        kind, dataset,
        args.init_channels if args.init_channels is not None else saved.get("C", C_default),
        args.layers if args.layers is not None else saved.get("layers", layers_default),
        num_classes,
        args.auxiliary if args.auxiliary is not None else saved.get("auxiliary", False))
    batch = per_process_batch(args.batch_size or batch_default, env.world_size)

    root = args.data or args.tmp_data_dir or DEFAULT_DATA
    if kind == "imagenet":
        test_set = imagenet_val(root)
        if len(test_set.classes) > num_classes:
            raise DataError(f"the validation folder has {len(test_set.classes)} classes but the "
                            f"network only {num_classes} outputs")
    else:
        test_set = get_dataset(dataset, root, False, cifar_transforms(dataset, False))

    model = build_network(info, genotype)
    load_weights(model, obj, source=path)
    model.to(env.device)

    logger.info("model %s (%s): %s", path, "this project's checkpoint" if ours else "state dict",
                json.dumps(info))
    logger.info("genotype = %s", format_genotype(genotype))
    logger.info(format_summary(model_summary(model, (1, 3, 224, 224) if kind == "imagenet"
                                             else (1, 3, 32, 32))))
    loader = make_loader(test_set, batch, env, train=False, workers=args.workers)
    stats = evaluate(model, loader, nn.CrossEntropyLoss(), env.device,
                     report_freq=args.report_freq, show=env.is_main)
    logger.info("test_loss %.6f test_acc %.2f%% test_top5 %.2f%% (%d images of %s)",
                stats["loss"], stats["top1"], stats["top5"], stats["count"], dataset)
    if env.is_main:
        print(json.dumps({"model_path": path, "dataset": dataset, "images": stats["count"],
                          "loss": stats["loss"], "top1": stats["top1"], "top5": stats["top5"]}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
