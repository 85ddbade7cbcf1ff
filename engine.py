"""The training and evaluation loop shared by train_cifar.py, train_imagenet.py and test.py.

- ``train_step`` / ``train_one_epoch`` / ``evaluate``: one SGD step, one epoch, one pass
  over a test set; each epoch function returns a dict of averages. Metrics stay on the
  device; the host reads them only at report points and at the end of an epoch.
- ``fit``: the whole evaluation-network training run (SPEC section 5): per-epoch learning
  rate and drop-path rate, DistributedDataParallel under torchrun, per-epoch checkpoints
  (``weights.pt`` + ``checkpoint.pt``, written atomically), ``metrics.jsonl``, resume.
- The command-line flags both training scripts share, the checkpoint format and the
  helpers that rebuild a network from a checkpoint.

Scale: one process on CPU or one GPU, or ``torchrun`` on many GPUs and nodes. Under
torchrun ``--batch_size`` and ``--learning_rate`` stay global (the paper's 1024 at lr 0.5
is 8 x 128): each process takes ``batch_size / world_size`` images per step and the
learning rate is not rescaled. Evaluation is sharded over the processes (each takes every
world_size-th test image, nothing padded or repeated) and the sums are all-reduced, so
every process reports the exact test-set figures.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from checkpoint import (
    CheckpointError,
    describe_checkpoint,
    extract_state_dict,
    infer_network,
    load_file,
    load_weights,
    save_atomic,
)
from data import (
    ArrayDataset,
    DataError,
    DeviceLoader,
    check_split,
    compare_classes,
    describe_counts,
    describe_stats,
    drop_unreadable,
    folder_tree,
    normalization,
    num_classes_of,
    open_training_folder,
    own_transforms,
    sample_names,
    scaled_cutout,
    scan_folder,
    split_indices,
)
from distributed import DistInfo, add_dist_timeout_arg, barrier, sync_buffers
from errors import UserError, write_json_atomic
from flags import (
    DEFAULT_DATA_DIR,
    default_workers,
    fraction,
    int_at_least,
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
from genotypes import (
    GENOTYPE_FILE,
    Genotype,
    format_genotype,
    genotype_from_dict,
    genotype_to_dict,
    get_genotype,
)
from memory import plan_memory, report_out_of_memory
from model import NetworkCIFAR, NetworkImageNet, format_summary, model_summary
from model_search import batch_norm_updates, validation_warning
from plots import add_plot_args, plot_run_safely
from runs import (
    MetricsWriter,
    log_run_start,
    open_run_dir,
    refuse_changed_flags,
    register_run,
    release_run_locks,
    setup_logging,
    truncate_metrics,
)
from speed import (
    add_speed_args,
    autocast,
    check_amp,
    grad_scaler,
    loss_precision,
    prepare_input,
    prepare_model,
)
from utils import (
    LR_SCHEDULE,
    AverageMeter,
    Progress,
    accuracy,
    check_finite,
    check_finite_state,
    cosine_lr,  # noqa: F401  (the training scripts take it from here)
    logger,
    peak_memory_mb,
    reset_peak_memory,
    schedule_of_checkpoint,
    seed_everything,
)

WEIGHTS_NAME = "weights.pt"        # the release's name: a plain state dict
CHECKPOINT_NAME = "checkpoint.pt"  # everything needed to resume or rebuild
METRICS_NAME = "metrics.jsonl"
SPLIT_NAME = "split.json"          # an image folder's held-out images (test.py, --resume)
CHECKPOINT_FORMAT = "pdarts-eval-checkpoint/1"
TOPK = (1, 5)


def topk_for(num_classes: int) -> tuple[int, ...]:
    """Top-5 is reported only with more than 5 classes (with 5 or fewer it is always 100%);
    without it, metrics, checkpoints and test.py's JSON hold top5 as null."""
    return TOPK if num_classes > max(TOPK) else (1,)


def top5_text(stats: dict) -> str:
    """' (top-5 X%)' for a log line, or nothing when top-5 is not reported."""
    return "" if stats.get("top5") is None else f" (top-5 {stats['top5']:.2f}%)"

# Flags that may differ from the saved run on --resume: they change where things are
# read and how often they are reported, not what is computed.
RESUME_FREE_FLAGS = {"resume", "tmp_data_dir", "data", "workers", "report_freq", "device",
                     "gpu", "threads", "save", "note", "download", "deterministic", "host_data",
                     "channels_last", "compile", "dist_timeout", "plot_format", "skip_bad_images",
                     "checkpoint_cells"}
# What load_resume and test.py need in a training checkpoint.
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "args", "genotype", "network",
                   "best_acc_on_test", "best_epoch_on_test", "last_acc", "last_top5", "last_loss")


# ---------------------------------------------------------------------------------------
# Schedules (pure functions of the epoch)
# ---------------------------------------------------------------------------------------

def drop_path_at(drop_path_prob: float, epoch: int, epochs: int) -> float:
    """Drop-path rate grows linearly from 0: ``drop_path_prob * epoch / epochs``."""
    return drop_path_prob * epoch / epochs


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------
# Flags both training scripts share
# ---------------------------------------------------------------------------------------

def add_folder_args(parser: argparse.ArgumentParser, *, image_size: int, min_image_size: int,
                    image_help: str) -> None:
    """The flags of ``--dataset folder`` both training scripts share."""
    parser.add_argument("--image_size", type=int_at_least(min_image_size), default=image_size,
                        help=image_help)
    parser.add_argument("--val_portion", type=fraction, default=0.1,
                        help="--dataset folder with class folders at the top: part held out for "
                             "evaluation (stratified, seeded with --seed, saved in split.json)")
    parser.add_argument("--skip_bad_images", action="store_true",
                        help="--dataset folder: decode every image once at the start and leave "
                             "out the unreadable ones (counted in the log) instead of stopping at "
                             "the first with its path")


def add_training_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int,
                      learning_rate: float, weight_decay: float | None, init_channels: int,
                      layers: int, drop_path_prob: float, report_freq: int, workers: int) -> None:
    """The release's flags common to train_cifar.py and train_imagenet.py, with each
    script's paper defaults."""
    p = parser
    p.add_argument("--tmp_data_dir", type=str, default=DEFAULT_DATA_DIR, help="data directory")
    p.add_argument("--workers", type=nonneg_int, default=default_workers(workers),
                   help=workers_help(workers, per_process=True))
    p.add_argument("--batch_size", type=positive_int, default=batch_size,
                   help="GLOBAL batch size: under torchrun each process takes batch_size / world_size")
    p.add_argument("--learning_rate", "--lr", type=positive_float, default=learning_rate,
                   help="GLOBAL initial learning rate (not rescaled with the number of processes)")
    p.add_argument("--momentum", type=momentum, default=0.9, help="SGD momentum")
    wd_help = ("SGD weight decay" if weight_decay is not None else
               "SGD weight decay (default 3e-4, 5e-4 on CIFAR-100)")
    p.add_argument("--weight_decay", type=nonneg_float, default=weight_decay, help=wd_help)
    p.add_argument("--report_freq", type=report_steps, default=report_freq,
                   help="steps between progress lines")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs")
    p.add_argument("--init_channels", type=int_at_least(2), default=init_channels,
                   help="C of the network")
    p.add_argument("--layers", type=int_at_least(2), default=layers, help="number of cells")
    p.add_argument("--auxiliary", action="store_true", default=False,
                   help="use the auxiliary tower (off by default; the release's command line "
                        "turns it on)")
    p.add_argument("--auxiliary_weight", type=nonneg_float, default=0.4,
                   help="weight of the auxiliary loss")
    p.add_argument("--drop_path_prob", type=prob, default=drop_path_prob,
                   help="final drop-path rate (grows linearly from 0)")
    # Deviation: runs/ by default, where the search puts its runs (one place for report.py).
    p.add_argument("--save", type=str, default="runs/",
                   help="prefix of the run folder: {save}eval-{note}-{YYYYmmdd-HHMMSS}")
    p.add_argument("--note", type=run_note, default="try", help="note in the run folder name")
    p.add_argument("--seed", type=seed_int, default=0, help="seeds everything")
    p.add_argument("--arch", type=str, default="PDARTS",
                   help="a cell name from genotypes.py (any case), a genotype JSON file, or a "
                        "search run folder (its genotype.json)")
    p.add_argument("--grad_clip", type=nonneg_float, default=5.0,
                   help="gradient norm clipping (0: off)")
    p.add_argument("--resume", type=str, default=None, metavar="RUN_DIR_OR_CHECKPOINT",
                   help="continue a run from its folder (or its checkpoint.pt) at the next epoch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
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
    add_speed_args(p)
    add_plot_args(p)


def check_sizes(C: int, layers: int, kind: str) -> None:
    if layers < 2:
        raise UserError(f"--layers must be at least 2 (got {layers})")
    if C < 2 or (kind == "imagenet" and C % 2):
        raise UserError(f"--init_channels must be {'an even number ' if kind == 'imagenet' else ''}"
                        f"of at least 2 (got {C})")


def per_process_batch(global_batch: int, world_size: int, flag: str = "--batch_size") -> int:
    if global_batch < 1:
        raise UserError(f"{flag} must be positive (got {global_batch})")
    if global_batch % world_size:
        raise UserError(f"{flag} {global_batch} is global and must divide evenly over the "
                        f"{world_size} processes")
    return global_batch // world_size


# ---------------------------------------------------------------------------------------
# Networks described by plain dicts (stored in checkpoints)
# ---------------------------------------------------------------------------------------

def network_info(kind: str, dataset: str, C: int, layers: int, num_classes: int,
                 auxiliary: bool) -> dict[str, Any]:
    """What test.py needs to rebuild the network without flags."""
    return {"kind": kind, "dataset": dataset, "C": int(C), "layers": int(layers),
            "num_classes": int(num_classes), "auxiliary": bool(auxiliary)}


def build_network(info: dict[str, Any], genotype: Genotype) -> nn.Module:
    check_sizes(info["C"], info["layers"], info["kind"])
    cls = NetworkImageNet if info["kind"] == "imagenet" else NetworkCIFAR
    return cls(info["C"], info["num_classes"], info["layers"], info["auxiliary"], genotype)


# ---------------------------------------------------------------------------------------
# Data loaders
# ---------------------------------------------------------------------------------------

class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order: an evaluation shard with no
    padding, so the all-reduced sums cover each test image exactly once."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------
# A user's image folder (train_cifar.py and train_imagenet.py --dataset folder)
# ---------------------------------------------------------------------------------------

def folder_data(args: argparse.Namespace, cutout: int, resume: dict | None, augment: str = "cifar"):
    """Training and evaluation sets of an image folder, the checkpoint's "data" entry, the
    run-folder files (split.json for a held-out split) and lines for the log.

    Classes come from the training folder; the evaluation folder (val/, else test/) must
    have the same ones. Without one, ``--val_portion`` is held out by the shared seeded,
    stratified split. The mean and std come from the training images (kept by a resume).
    ``augment``: the training scripts' transforms, 'cifar' (train_cifar.py) or 'imagenet'
    (train_imagenet.py), kept in the "data" entry for test.py."""
    size = args.image_size
    saved = (resume or {}).get("data") or {}
    train_dir, val_dir, test_dir = folder_tree(args.tmp_data_dir)
    data, stats = open_training_folder(train_dir, size, args.seed, args.skip_bad_images,
                                       args.workers, saved.get("stats"), "training image folder")
    if len(data.classes) < 2:
        raise DataError(f"{train_dir} has {len(data.classes)} class folder(s); 2 or more are needed")
    if saved:
        compare_classes(saved["classes"], data.classes, "the run being resumed", train_dir)
    info = {"dataset": "folder", "root": os.path.abspath(args.tmp_data_dir), "classes": data.classes,
            "image_size": size, "stats": stats, "split_digest": None, "eval": None,
            "augment": augment}
    lines = [f"{len(data.classes)} classes from {train_dir}, images resized and centre-cropped "
             f"to {size}x{size}, normalised with {describe_stats(stats)}"]
    files = {}
    eval_dir = val_dir or test_dir
    if eval_dir:
        eval_set = scan_folder(eval_dir, "validation image folder")
        compare_classes(data.classes, eval_set.classes, train_dir, eval_dir)
        if args.skip_bad_images:
            eval_set, bad = drop_unreadable(eval_set, args.workers)
            data.skipped += bad
        train_set, info["eval"] = data, os.path.basename(eval_dir)
        lines.append(f"{len(train_set)} training images, {len(eval_set)} evaluation images in "
                     f"{eval_dir}")
    else:
        split = split_indices(data.targets, 1 - args.val_portion, args.seed, "stratified")
        split.names = sample_names(data)
        train_counts, eval_counts = check_split(
            split, data.targets, data.classes, ("training part", "held-out part"),
            "add images to them or change --val_portion")
        if saved and saved.get("split_digest") != split.digest:
            raise DataError(f"the images in {train_dir} are divided differently from the run "
                            "being resumed: images were added, removed or renamed since it "
                            "started; resume with the same data")
        train_set, eval_set = data.subset(split.first), data.subset(split.second)
        info["split_digest"], info["eval"] = split.digest, "held-out"
        files[SPLIT_NAME] = {"root": os.path.abspath(train_dir), "seed": args.seed,
                             "val_portion": args.val_portion, "classes": data.classes,
                             "digest": split.digest, "held_out": [split.names[i] for i in split.second]}
        lines.append(f"{len(train_set)} training images, {len(eval_set)} held out for evaluation "
                     f"(--val_portion {args.val_portion}, stratified, seed {args.seed}; "
                     f"{SPLIT_NAME}); images per class training/held-out: "
                     + describe_counts(data.classes, train_counts, eval_counts))
    lines += [f"left out: {reason}" for reason in data.skipped]
    if data.skipped:
        lines.append(f"{len(data.skipped)} unreadable image(s) left out (--skip_bad_images)")
    train_set.transform = own_transforms(augment, True, size, stats["mean"], stats["std"],
                                         scaled_cutout(cutout, size) if cutout else 0)
    eval_set.transform = own_transforms(augment, False, size, stats["mean"], stats["std"])
    return train_set, eval_set, info, files, lines


def make_loader(dataset: Dataset, batch_size: int, env: DistInfo, *, train: bool,
                workers: int, seed: int = 0, device_augment: dict | None = None):
    """Training: reshuffled every epoch by ``sampler.set_epoch`` (DistributedSampler, also
    for a single process, so one code path serves both). Evaluation: a ShardSampler.

    With ``device_augment`` (mean, std, cutout_length) and an in-memory ArrayDataset on
    CUDA, the images stay on the GPU and are augmented there in batches (DeviceLoader):
    the same batches in the same order, augmentations of the same distribution."""
    if train:
        # Deviation: the release shuffles with DataLoader(shuffle=True), drawing from the
        # global RNG; here the order is a function of (seed, epoch), the same for every
        # process count and for a resumed run. Same distribution over orders.
        sampler: Sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                              shuffle=True, seed=seed)
        # Deviation: a last batch of one image would stop training with a batch-norm error
        # in the auxiliary head (1x1 maps); only that batch is dropped.
        drop_last = len(sampler) % batch_size == 1
    else:
        sampler = ShardSampler(len(dataset), env.rank, env.world_size)
        drop_last = False
    if device_augment is not None and env.device.type == "cuda" and isinstance(dataset, ArrayDataset):
        return DeviceLoader(dataset, batch_size, sampler, env.device, train=train,
                            mean=device_augment["mean"], std=device_augment["std"],
                            cutout_length=device_augment.get("cutout_length", 0) if train else 0,
                            drop_last=drop_last, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=env.device.type == "cuda", drop_last=drop_last)


# ---------------------------------------------------------------------------------------
# One step, one epoch, one evaluation
# ---------------------------------------------------------------------------------------

def train_step(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
               optimizer: torch.optim.Optimizer, criterion: nn.Module,
               auxiliary_weight: float = 0.0, grad_clip: float = 0.0, amp: str = "none",
               scaler=None):
    """One SGD step; returns (loss, logits), both detached, on the device (no sync)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, amp):
        logits, logits_aux = model(images)
        loss = criterion(loss_precision(logits), target)
        if logits_aux is not None:
            # Faithful to the release: the reported training loss includes the weighted
            # auxiliary loss.
            loss = loss + auxiliary_weight * criterion(loss_precision(logits_aux), target)
    if scaler is not None:  # fp16 only
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:  # over all parameters, the auxiliary head's included, as the release
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach(), logits.detach()


def reference_train_step(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
                         optimizer: torch.optim.Optimizer, criterion: nn.Module,
                         auxiliary_weight: float = 0.0, grad_clip: float = 0.0) -> float:
    """The plain path: the straightforward step with per-parameter clipping and the loss
    read back every step (the release's meters). Benchmarks and equivalence tests compare
    ``train_step`` with it; build its optimizer with ``foreach=False``."""
    optimizer.zero_grad()
    logits, logits_aux = model(images)
    loss = criterion(logits, target)
    if logits_aux is not None:
        loss = loss + auxiliary_weight * criterion(logits_aux, target)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=False)
    optimizer.step()
    return loss.item()


def _stop_if_nonfinite(meter: AverageMeter, what: str, device: torch.device) -> None:
    """Raise NonFiniteLossError if the running loss is not finite on any process (all of
    them stop together under torchrun)."""
    value = meter.avg
    bad = not math.isfinite(value)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if bad:
        check_finite(value if not math.isfinite(value) else float("nan"), what)


def _meters(topk: Sequence[int]) -> dict[str, AverageMeter]:
    return {"loss": AverageMeter(), **{f"top{k}": AverageMeter() for k in topk}}


def _update(meters: dict[str, AverageMeter], loss: torch.Tensor, logits: torch.Tensor,
            target: torch.Tensor, topk: Sequence[int]) -> None:
    n = target.size(0)
    meters["loss"].update(loss, n)
    for k, acc in zip(topk, accuracy(logits, target, topk)):
        meters[f"top{k}"].update(acc, n)


def _averages(meters: dict[str, AverageMeter]) -> dict[str, float]:
    for m in meters.values():
        m.all_reduce()
    stats = {k: m.avg for k, m in meters.items()}
    stats["count"] = meters["loss"].count
    return stats


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    criterion: nn.Module, device: torch.device, *, auxiliary_weight: float = 0.0,
                    grad_clip: float = 0.0, topk: Sequence[int] = TOPK, report_freq: int = 50,
                    desc: str = "train", show: bool = True, amp: str = "none",
                    channels_last: bool = False, scaler=None) -> dict[str, float]:
    """One pass over ``loader``; returns the averages over all processes:
    {'loss', 'top1', 'top5', 'count'}. Stops with NonFiniteLossError at a report point or
    at the end if the loss is not finite."""
    model.train()
    meters = _meters(topk)
    progress = Progress(len(loader), desc, report_freq, enabled=show)
    for step, (images, target) in enumerate(loader, 1):
        images = prepare_input(images.to(device, non_blocking=True), channels_last)
        target = target.to(device, non_blocking=True)
        loss, logits = train_step(model, images, target, optimizer, criterion,
                                  auxiliary_weight, grad_clip, amp, scaler)
        _update(meters, loss, logits, target, topk)
        progress.update(step, meters)
        if step % report_freq == 0:
            _stop_if_nonfinite(meters["loss"], "training loss", device)
    stats = _averages(meters)
    check_finite(stats["loss"], "training loss")
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: nn.Module, device: torch.device, *,
             topk: Sequence[int] = TOPK, report_freq: int = 50, desc: str = "test",
             show: bool = True, amp: str = "none", channels_last: bool = False) -> dict[str, float]:
    """Loss and top-k accuracy (percent) over ``loader`` in eval mode, summed over all
    processes: {'loss', 'top1', 'top5', 'count'}. Pass the bare model, not the DDP
    wrapper: shards may differ in length, so no collective may run per batch."""
    model.eval()
    meters = _meters(topk)
    progress = Progress(len(loader), desc, report_freq, enabled=show)
    for step, (images, target) in enumerate(loader, 1):
        images = prepare_input(images.to(device, non_blocking=True), channels_last)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits, _ = model(images)
        logits = loss_precision(logits)
        _update(meters, criterion(logits, target), logits, target, topk)
        progress.update(step, meters)
    return _averages(meters)


# ---------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------

def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                     args: argparse.Namespace, genotype: Genotype, network: dict,
                     best: dict, last: dict, data: dict | None = None) -> dict[str, Any]:
    """The full checkpoint: plain types and tensors only, so ``torch.load(...,
    weights_only=True)`` reads it. ``epoch`` counts the epochs completed. ``data``: what
    an image folder run needs to be tested or resumed (classes, size, normalisation)."""
    return {
        "data": data,
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
        "genotype": genotype_to_dict(genotype),
        "network": network,
        "best_acc_on_test": best["acc"],        # chosen on the test set: optimistic
        "best_epoch_on_test": best["epoch"],
        "last_acc": last.get("top1"),            # the headline: the final epoch's
        "last_top5": last.get("top5"),
        "last_loss": last.get("loss"),
        "lr_schedule": LR_SCHEDULE,
    }


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def check_training_checkpoint(obj: Any, path: str) -> None:
    """A CheckpointError unless ``obj`` is a complete checkpoint.pt of a training run."""
    if not is_training_checkpoint(obj):
        raise CheckpointError(
            f"{path} is {describe_checkpoint(obj)}; expected the {CHECKPOINT_NAME} of a "
            f"train_cifar.py / train_imagenet.py run: give its run folder or its {CHECKPOINT_NAME}")
    missing = [k for k in CHECKPOINT_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is a training checkpoint without {', '.join(missing)} "
                              "(damaged or written by another version); expected all of "
                              f"{', '.join(CHECKPOINT_KEYS)}")


def checkpoint_genotype(obj: dict, source: str) -> Genotype:
    return genotype_from_dict(obj.get("genotype"), source=f"{source} (genotype)")


def resume_path(path: str) -> str:
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def load_resume(args: argparse.Namespace,
                defaults: dict[str, Any]) -> tuple[argparse.Namespace, dict | None]:
    """For ``--resume``: read the run's checkpoint and return its saved arguments (plus
    the flags in RESUME_FREE_FLAGS from this command line) and the checkpoint. A recipe
    flag given with a value other than the saved one is an error, so a resumed run
    continues exactly the run it resumes. Without ``--resume``: (args, None)."""
    if not args.resume:
        return args, None
    path = resume_path(args.resume)
    ckpt = load_file(path)
    check_training_checkpoint(ckpt, path)
    saved = ckpt["args"]
    # A flag whose value is not its default was given on the command line.
    given = {k: v for k, v in vars(args).items() if v != defaults.get(k)}
    refuse_changed_flags(given, saved, RESUME_FREE_FLAGS)
    merged = {**vars(args), **saved}
    # As the search's resume: a free flag given again replaces the run's own; one not
    # given keeps it (a run started with --tmp_data_dir D resumes on D, not on ../data).
    merged.update({k: v for k, v in given.items() if k in RESUME_FREE_FLAGS})
    merged["resume"] = path
    return argparse.Namespace(**merged), ckpt


def _resumed_schedule(lr_at: Callable[..., float], ckpt: dict, start_epoch: int,
                      epochs: int) -> Callable[[int], float]:
    """The learning-rate schedule a resumed run continues on: the one it began with. A
    checkpoint written before the schedule was corrected to the release's (it lacks
    ``lr_schedule``) continues on the old one, and the log says so."""
    if schedule_of_checkpoint(ckpt):
        return lr_at
    old = partial(lr_at, stepped_before_epoch=False)
    if all(old(e) == lr_at(e) for e in range(start_epoch, epochs)):
        return lr_at        # the schedule did not change (the ImageNet linear decay)
    logger.warning("this run began before the learning-rate schedule was corrected to the "
                   "release's (epoch e at cos(pi*(e+1)/E)); it continues on the schedule it "
                   "began with (cos(pi*e/E))")
    return old


# ---------------------------------------------------------------------------------------
# Rebuilding a trained network from a checkpoint (test.py, export.py)
# ---------------------------------------------------------------------------------------

# The release's test.py / test_imagenet.py defaults: channels, cells, batch size.
RELEASE_DEFAULTS = {"cifar": (36, 20, 128), "imagenet": (48, 14, 128)}


@dataclass
class TrainedNetwork:
    """Everything a checkpoint (and the flags that override it) says about a trained
    network, before it is built: ``load_trained_network`` builds it and loads the weights."""
    path: str                    # the checkpoint file read
    checkpoint: Any              # the loaded object
    ours: bool                   # this project's checkpoint.pt (else a bare state dict)
    found: dict | None           # sizes read from a bare state dict's tensors
    dataset: str
    info: dict[str, Any]         # network_info(...)
    genotype: Genotype
    arch: str                    # how the cell was named, for messages
    data_info: dict | None       # an image-folder run's classes, size and normalisation
    image_size: int              # the training input size (square)
    mean: tuple[float, ...]      # the normalisation the network expects
    std: tuple[float, ...]


def _describe(info: dict) -> str:
    return (f"C {info['C']}, {info['layers']} cells, "
            f"{'an' if info['auxiliary'] else 'no'} auxiliary head, {info['num_classes']} classes")


def _flags_for(info: dict, dataset: str) -> str:
    """The command-line flags that build the network ``info`` describes."""
    flags = [f"--init_channels {info['C']}", f"--layers {info['layers']}"]
    if info["auxiliary"]:
        flags.append("--auxiliary")
    if info["kind"] == "imagenet":
        flags.append("--dataset imagenet")
    elif info["num_classes"] in (10, 100):
        flags.append(f"--dataset {'cifar100' if info['num_classes'] == 100 else dataset}")
    return " ".join(flags)


def _default_dataset(found: dict | None) -> str:
    """The dataset a bare state dict was trained on, as far as its shapes tell."""
    if found is None:
        return "cifar10"
    if found["kind"] == "imagenet":
        return "imagenet"
    return "cifar100" if found["num_classes"] == 100 else "cifar10"


def explain_mismatch(error: CheckpointError, built: dict, found: dict | None, arch: str,
                     dataset: str, path: str) -> CheckpointError:
    """One message naming every flag at once: the values read from the checkpoint that
    differ from the network built, or --arch when only the cells' operations can differ."""
    if found is None:
        return error
    differs = [(k, found[k], built[k]) for k in ("kind", "C", "layers", "auxiliary", "num_classes")
               if found[k] is not None and found[k] != built[k]]
    if not differs:
        return CheckpointError(
            f"{path} has the network's sizes ({_describe(found)}) but other cell operations than "
            f"--arch {arch}: pass --arch with the cell it was trained with (a name, a genotype JSON "
            "file or the search run folder), or pass the training run folder as --model_path "
            "(its checkpoint.pt records the cell)")
    return CheckpointError(
        f"{path} does not fit the network built ({_describe(built)}, {built['kind']}): the "
        f"checkpoint has {_describe(found)}, {found['kind']}. Pass {_flags_for(found, dataset)} "
        "(or drop the flags that say otherwise), or pass the training run folder as "
        "--model_path so that everything comes from its checkpoint.pt")


def _refuse_untrained(model_path: str, path: str, purpose: str) -> None:
    """A search run folder without its checkpoint given as the trained network: one line
    saying what it is and what to give instead (a genotype file and other files that are
    no checkpoint are named by ``load_file``)."""
    if os.path.isdir(model_path) and not os.path.exists(path) and os.path.isfile(
            os.path.join(model_path, GENOTYPE_FILE)):
        raise CheckpointError(f"{model_path} is a search run folder; {purpose} a trained network: "
                              f"train the searched cell first (train_cifar.py --arch {model_path}) "
                              f"and give that run's folder or {CHECKPOINT_NAME}")


def resolve_trained_network(model_path: str, *, dataset: str | None = None, cifar100: bool = False,
                            arch: str | None = None, init_channels: int | None = None,
                            layers: int | None = None, auxiliary: bool | None = None,
                            purpose: str = "this needs") -> TrainedNetwork:
    """Read a trained network's checkpoint (a run folder, this project's checkpoint.pt, or a
    bare state dict in any of the authors' layouts) and decide what to build: the sizes
    come from the flags, else the checkpoint, else the release's defaults. ``purpose``
    starts the refusal of a search checkpoint ("test.py evaluates")."""
    path = resume_path(model_path)
    _refuse_untrained(model_path, path, purpose)
    obj = load_file(path, genotype_hint=(
        f"{purpose} a trained network: train the cell first (python train_cifar.py --arch {path}) "
        f"and give that run's folder or {CHECKPOINT_NAME}, or give the cell as --arch with a "
        "trained checkpoint"))
    ours = is_training_checkpoint(obj)
    if ours:
        check_training_checkpoint(obj, path)
    elif isinstance(obj, dict) and obj.get("kind") == "pdarts-search":
        raise CheckpointError(
            f"{path} is {describe_checkpoint(obj)}; {purpose} a trained network: train the "
            f"searched cell first (train_cifar.py --arch {os.path.dirname(path) or '.'}) and "
            f"give that run's folder or {CHECKPOINT_NAME}")
    state = extract_state_dict(obj)  # weights in it? Say so before reading any data
    saved = obj["network"] if ours else {}
    # Bare state dicts (the authors', our weights.pt): read the sizes from the tensors.
    found = None if ours else infer_network(state)
    if found is not None:
        logger.info("read from %s: %s network, %s", path, found["kind"], _describe(found))
    known = saved or found or {}

    dataset = dataset or ("cifar100" if cifar100 else None) or saved.get("dataset") or _default_dataset(found)
    if cifar100 and dataset != "cifar100":
        raise UserError(f"--cifar100 contradicts --dataset {dataset}")
    kind = "imagenet" if dataset == "imagenet" else "cifar"
    if dataset == "folder" and saved.get("kind") == "imagenet":   # train_imagenet.py's run
        kind = "imagenet"
    C_default, layers_default, _ = RELEASE_DEFAULTS[kind]
    data_info = obj.get("data") if ours else None
    if kind == "imagenet":
        num_classes = known.get("num_classes") if known.get("kind") == "imagenet" else None
        num_classes = num_classes or num_classes_of("imagenet")
    elif dataset == "folder":
        if not data_info or data_info.get("dataset") != "folder":
            raise UserError("--dataset folder needs a checkpoint of train_cifar.py or "
                            "train_imagenet.py --dataset folder (it holds the classes, image "
                            "size and normalisation)")
        num_classes = len(data_info["classes"])
    else:
        num_classes = num_classes_of(dataset)
    genotype = (get_genotype(arch) if arch else
                checkpoint_genotype(obj, path) if ours else get_genotype("PDARTS"))
    info = network_info(
        kind, dataset,
        init_channels if init_channels is not None else known.get("C", C_default),
        layers if layers is not None else known.get("layers", layers_default),
        num_classes,
        auxiliary if auxiliary is not None else known.get("auxiliary", False))
    if dataset == "folder":
        image_size, mean, std = (data_info["image_size"], tuple(data_info["stats"]["mean"]),
                                 tuple(data_info["stats"]["std"]))
    else:
        image_size = 224 if kind == "imagenet" else 32
        mean, std = normalization(dataset)
    return TrainedNetwork(path=path, checkpoint=obj, ours=ours, found=found, dataset=dataset,
                          info=info, genotype=genotype,
                          arch=arch or ("the checkpoint's" if ours else "PDARTS"),
                          data_info=data_info, image_size=int(image_size),
                          mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


def load_trained_network(trained: TrainedNetwork) -> nn.Module:
    """Build the network ``trained`` describes (on the CPU) and load its weights; a
    mismatch names the flags to pass."""
    model = build_network(trained.info, trained.genotype)
    try:
        load_weights(model, trained.checkpoint, source=trained.path)
    except CheckpointError as e:
        raise explain_mismatch(e, trained.info, trained.found, trained.arch, trained.dataset,
                               trained.path) from None
    return model


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed per (run seed, epoch, process): every epoch starts from a known random
    state, so a resumed run draws the same augmentation and drop-path masks as an
    uninterrupted one, whatever happened before."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ---------------------------------------------------------------------------------------
# The training run
# ---------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    """What differs between the CIFAR and ImageNet recipes."""
    genotype: Genotype
    network: dict[str, Any]            # network_info(...)
    train_set: Dataset
    test_set: Dataset
    lr_at: Callable[[int], float]      # learning rate of an epoch
    train_criterion: nn.Module
    eval_criterion: nn.Module
    input_size: tuple[int, int, int, int]
    device_augment: dict | None = None  # mean, std, cutout_length: GPU pipeline for arrays
    data_info: dict | None = None       # kept in the checkpoint as "data" (image folders)
    run_files: dict[str, Any] = field(default_factory=dict)  # JSON files for the run folder
    data_lines: list[str] = field(default_factory=list)      # logged at the start


def fit(args: argparse.Namespace, env: DistInfo, spec: RunSpec, resume: dict | None = None) -> int:
    """Train ``spec``'s network for ``args.epochs`` epochs (from the resumed epoch), test
    after each epoch, save ``weights.pt`` and ``checkpoint.pt`` after each epoch. The
    run folder is locked while this runs."""
    try:
        return _fit(args, env, spec, resume)
    finally:
        release_run_locks()


def _fit(args: argparse.Namespace, env: DistInfo, spec: RunSpec, resume: dict | None) -> int:
    device = env.device
    check_amp(device, args.amp)
    batch = per_process_batch(args.batch_size, env.world_size)
    # Deviation: the release runs such a batch as one short batch per epoch, silently.
    if args.batch_size > len(spec.train_set):
        raise UserError(f"--batch_size {args.batch_size} is larger than the training set "
                        f"({len(spec.train_set)} images); use --batch_size "
                        f"{len(spec.train_set)} or less")
    seed_everything(args.seed, args.deterministic)
    model = build_network(spec.network, spec.genotype).to(device)
    topk = topk_for(spec.network["num_classes"])
    summary = model_summary(model, spec.input_size)

    # {save}eval-{note}-{time}; a resumed run goes on in its own folder.
    resumed_dir = os.path.dirname(os.path.abspath(args.resume)) if resume is not None else None
    run_dir = open_run_dir(args.save, "eval", args.note, env.is_main, resumed_dir)
    setup_logging(run_dir, env.is_main)
    script = os.path.basename(sys.argv[0])
    register_run(run_dir, CHECKPOINT_NAME, script if script.endswith(".py") else "SCRIPT.py")
    metrics_path = os.path.join(run_dir, METRICS_NAME) if env.is_main else None
    metrics = MetricsWriter(metrics_path)
    log_run_start(args, device)
    logger.info("run folder %s; %d process(es), %d images per process per step",
                os.path.abspath(run_dir), env.world_size, batch)
    logger.info("genotype = %s", format_genotype(spec.genotype))
    logger.info(format_summary(summary))
    for line in spec.data_lines:
        logger.info("data: %s", line)
    if env.is_main:
        for name, obj in spec.run_files.items():
            write_json_atomic(obj, os.path.join(run_dir, name))

    optimizer = torch.optim.SGD(model.parameters(), args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay, foreach=True)
    scaler = grad_scaler(device, args.amp)
    model.checkpoint_cells = args.checkpoint_cells
    memory_plan = plan_memory(model, [optimizer], spec.input_size[1:], batch, args.batch_size,
                              env.world_size, {"--learning_rate": args.learning_rate},
                              args.checkpoint_cells, device, args.amp)
    start_epoch, best, last = 0, {"acc": None, "epoch": None}, {}
    lr_at = spec.lr_at
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        start_epoch = resume["epoch"]
        best = {"acc": resume["best_acc_on_test"], "epoch": resume["best_epoch_on_test"]}
        last = {"top1": resume["last_acc"], "top5": resume["last_top5"], "loss": resume["last_loss"]}
        if env.is_main:
            truncate_metrics(metrics_path, start_epoch)
        logger.info("resumed from %s at epoch %d of %d", args.resume, start_epoch, args.epochs)
        lr_at = _resumed_schedule(spec.lr_at, resume, start_epoch, args.epochs)

    # Deviation: DistributedDataParallel, one process per GPU, instead of the release's
    # DataParallel. Faithful to the release: batch-norm statistics stay per GPU (no
    # SyncBatchNorm unless --sync_bn), and the batch and learning rate are global.
    prepare_model(model, channels_last=args.channels_last)
    train_model: nn.Module = model
    if env.distributed:
        if args.sync_bn:
            if device.type != "cuda":
                raise UserError("--sync_bn needs GPUs (batch-norm synchronisation is CUDA-only)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    device_augment = None if args.host_data else spec.device_augment

    train_loader = make_loader(spec.train_set, batch, env, train=True, workers=args.workers,
                               seed=args.seed, device_augment=device_augment)
    test_loader = make_loader(spec.test_set, batch, env, train=False, workers=args.workers,
                              device_augment=device_augment)
    if isinstance(train_loader, DeviceLoader):
        logger.info("input pipeline: images on the GPU as uint8, augmented there in batches")

    for epoch in range(start_epoch, args.epochs):
        # Deviation: reseeded every epoch (the release seeds once) so --resume is exact.
        seed_everything(epoch_seed(args.seed, epoch, env.rank), args.deterministic)
        if isinstance(train_loader, DeviceLoader):
            train_loader.generator.manual_seed(epoch_seed(args.seed, epoch, env.rank))
        lr = lr_at(epoch)
        set_lr(optimizer, lr)
        model.drop_path_prob = drop_path_at(args.drop_path_prob, epoch, args.epochs)
        train_loader.sampler.set_epoch(epoch)
        logger.info("epoch %d/%d lr %e drop_path_prob %f", epoch, args.epochs, lr, model.drop_path_prob)
        reset_peak_memory(device)

        start = time.time()
        with report_out_of_memory(memory_plan, f"epoch {epoch}",
                                  os.path.join(run_dir, CHECKPOINT_NAME)):
            train = train_one_epoch(train_model, train_loader, optimizer, spec.train_criterion,
                                    device, auxiliary_weight=args.auxiliary_weight,
                                    grad_clip=args.grad_clip, report_freq=args.report_freq,
                                    topk=topk, desc=f"train {epoch}", show=env.is_main, amp=args.amp,
                                    channels_last=args.channels_last, scaler=scaler)
            train_time = time.time() - start
            # DDP broadcasts the buffers before each forward; each process then updates its
            # own copy with its own last batch.
            sync_buffers(model)
            test = evaluate(model, test_loader, spec.eval_criterion, device,
                            topk=topk, report_freq=args.report_freq, desc=f"test {epoch}",
                            show=env.is_main,
                            amp=args.amp, channels_last=args.channels_last)
        check_finite(test["loss"], "test loss")
        check_finite_state(model)   # batch-norm statistics too: nothing non-finite is saved
        epoch_time = time.time() - start

        last = test
        if best["acc"] is None or test["top1"] > best["acc"]:
            best = {"acc": test["top1"], "epoch": epoch}
        images_per_sec = train["count"] / max(train_time, 1e-9)
        logger.info("train_loss %.4f train_acc %.2f%%%s", train["loss"], train["top1"],
                    top5_text(train))
        logger.info("test_loss %.4f test_acc %.2f%%%s; best epoch chosen on the test set: "
                    "%.2f%% (epoch %d)", test["loss"], test["top1"], top5_text(test),
                    best["acc"], best["epoch"])
        logger.info("epoch time %.1fs (train %.1fs, %.0f images/s)", epoch_time, train_time,
                    images_per_sec)
        warning = validation_warning(None, epoch, epoch == args.epochs - 1, test["top1"], train["top1"],
                                     spec.network["num_classes"], *batch_norm_updates(model),
                                     training=True)   # the search's rule, at the last epoch
        if warning:
            logger.warning(warning)
        metrics.write({
            "epoch": epoch, "lr": lr, "drop_path_prob": model.drop_path_prob,
            "train_loss": train["loss"], "train_acc": train["top1"], "train_top5": train.get("top5"),
            "test_loss": test["loss"], "test_acc": test["top1"], "test_top5": test.get("top5"),
            "best_acc_on_test": best["acc"], "best_epoch_on_test": best["epoch"],
            "train_images": train["count"], "test_images": test["count"],
            "epoch_time": epoch_time, "train_time": train_time, "images_per_sec": images_per_sec,
            "peak_memory_mb": peak_memory_mb(device), "world_size": env.world_size,
        })
        if env.is_main:
            # Faithful to the release: weights.pt, a plain state dict without a 'module.'
            # prefix, every epoch (the release's train_cifar.py saves model.module's; its
            # train_imagenet.py writes none, this one does). checkpoint.pt is new.
            save_atomic(checkpoint_state(model, optimizer, epoch + 1, args, spec.genotype,
                                         spec.network, best, last, spec.data_info),
                        os.path.join(run_dir, CHECKPOINT_NAME), resume_hint=run_dir)
            save_atomic(model.state_dict(), os.path.join(run_dir, WEIGHTS_NAME), resume_hint=run_dir,
                        resume_from=os.path.join(run_dir, CHECKPOINT_NAME))
        barrier()

    if last.get("top1") is not None:
        logger.info("final test accuracy (last epoch, the result to report): %.2f%% top-1%s",
                    last["top1"], "" if last.get("top5") is None else f", {last['top5']:.2f}% top-5")
        logger.info("best epoch, chosen on the test set (optimistic, not a result): %.2f%% at "
                    "epoch %d", best["acc"], best["epoch"])
    if env.is_main:
        plot_run_safely(run_dir, getattr(args, "plot_format", "png"))  # older runs lack the flag
    return 0
