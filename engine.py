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

import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from checkpoint import (
    CheckpointError,
    check_training_checkpoint,
    checkpoint_genotype,
    describe_checkpoint,
    extract_state_dict,
    infer_network,
    is_training_checkpoint,
    load_file,
    load_weights,
    restore_training,
    save_training,
    training_path,
    training_state,
    warn_old_schedule,
)
from config import TrainConfig
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
from distributed import DistInfo, barrier, sync_buffers
from divergence import DivergenceMonitor
from errors import UserError, write_json_atomic
from genotypes import (
    Genotype,
    format_genotype,
    get_genotype,
)
from loop import (
    averages,
    batch_norm_updates,
    check_finite,
    check_finite_state,
    evaluate,
    new_meters,
    stop_if_nonfinite,
    to_device,
    update_meters,
    validation_warning,
)
from memory import plan_memory, report_out_of_memory
from model import NetworkCIFAR, NetworkImageNet, format_summary, model_summary
from plots import plot_run_safely
from run_files import CHECKPOINT, GENOTYPE, METRICS, SPLIT, TRAIN_PREFIX
from runs import (
    MetricsWriter,
    log_run_start,
    open_run_dir,
    register_run,
    release_run_locks,
    setup_logging,
    truncate_metrics,
)
from speed import (
    autocast,
    check_amp,
    default_channels_last,
    grad_scaler,
    loss_precision,
    prepare_model,
)
from utils import (
    Progress,
    cosine_lr,  # noqa: F401  (the training scripts take it from here)
    logger,
    peak_memory_mb,
    reset_peak_memory,
    seed_everything,
)

TOPK = (1, 5)


def topk_for(num_classes: int) -> tuple[int, ...]:
    """Top-5 is reported only with more than 5 classes (with 5 or fewer it is always 100%);
    without it, metrics, checkpoints and test.py's JSON hold top5 as null."""
    return TOPK if num_classes > max(TOPK) else (1,)


def top5_text(stats: dict) -> str:
    """' (top-5 X%)' for a log line, or nothing when top-5 is not reported."""
    return "" if stats.get("top5") is None else f" (top-5 {stats['top5']:.2f}%)"

# ---------------------------------------------------------------------------------------
# Schedules (pure functions of the epoch)
# ---------------------------------------------------------------------------------------

def drop_path_at(drop_path_prob: float, epoch: int, epochs: int) -> float:
    """Drop-path rate grows linearly from 0: ``drop_path_prob * epoch / epochs``."""
    return drop_path_prob * epoch / epochs


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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

def folder_data(cfg: TrainConfig, cutout: int, resume: dict | None, augment: str = "cifar"):
    """Training and evaluation sets of an image folder, the checkpoint's "data" entry, the
    run-folder files (split.json for a held-out split) and lines for the log.

    Classes come from the training folder; the evaluation folder (val/, else test/) must
    have the same ones. Without one, ``--val_portion`` is held out by the shared seeded,
    stratified split. The mean and std come from the training images (kept by a resume).
    ``augment``: the training scripts' transforms, 'cifar' (train_cifar.py) or 'imagenet'
    (train_imagenet.py), kept in the "data" entry for test.py."""
    size = cfg.image_size
    saved = (resume or {}).get("data") or {}
    train_dir, val_dir, test_dir = folder_tree(cfg.tmp_data_dir)
    data, stats = open_training_folder(train_dir, size, cfg.seed, cfg.skip_bad_images,
                                       cfg.workers, saved.get("stats"), "training image folder")
    if len(data.classes) < 2:
        raise DataError(f"{train_dir} has {len(data.classes)} class folder(s); 2 or more are needed")
    if saved:
        compare_classes(saved["classes"], data.classes, "the run being resumed", train_dir)
    info = {"dataset": "folder", "root": os.path.abspath(cfg.tmp_data_dir), "classes": data.classes,
            "image_size": size, "stats": stats, "split_digest": None, "eval": None,
            "augment": augment}
    lines = [f"{len(data.classes)} classes from {train_dir}, images resized and centre-cropped "
             f"to {size}x{size}, normalised with {describe_stats(stats)}"]
    files = {}
    eval_dir = val_dir or test_dir
    if eval_dir:
        eval_set = scan_folder(eval_dir, "validation image folder")
        compare_classes(data.classes, eval_set.classes, train_dir, eval_dir)
        if cfg.skip_bad_images:
            eval_set, bad = drop_unreadable(eval_set, cfg.workers)
            data.skipped += bad
        train_set, info["eval"] = data, os.path.basename(eval_dir)
        lines.append(f"{len(train_set)} training images, {len(eval_set)} evaluation images in "
                     f"{eval_dir}")
    else:
        split = split_indices(data.targets, 1 - cfg.val_portion, cfg.seed, "stratified")
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
        files[SPLIT] = {"root": os.path.abspath(train_dir), "seed": cfg.seed,
                             "val_portion": cfg.val_portion, "classes": data.classes,
                             "digest": split.digest, "held_out": [split.names[i] for i in split.second]}
        lines.append(f"{len(train_set)} training images, {len(eval_set)} held out for evaluation "
                     f"(--val_portion {cfg.val_portion}, stratified, seed {cfg.seed}; "
                     f"{SPLIT}); images per class training/held-out: "
                     + describe_counts(data.classes, train_counts, eval_counts))
    lines += [f"left out: {reason}" for reason in data.skipped]
    lines += [f"warning: {note}" for note in data.notes + (eval_set.notes if eval_dir else [])]
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


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    criterion: nn.Module, device: torch.device, *, auxiliary_weight: float = 0.0,
                    grad_clip: float = 0.0, topk: Sequence[int] = TOPK, report_freq: int = 50,
                    desc: str = "train", show: bool = True, amp: str = "none",
                    channels_last: bool = False, scaler=None) -> dict[str, float]:
    """One pass over ``loader``; returns the averages over all processes:
    {'loss', 'top1', 'top5', 'count'}. Stops with NonFiniteLossError at a report point or
    at the end if the loss is not finite."""
    model.train()
    meters = new_meters(topk)
    progress = Progress(len(loader), desc, report_freq, enabled=show)
    for step, batch in enumerate(loader, 1):
        images, target = to_device(batch, device, channels_last)
        loss, logits = train_step(model, images, target, optimizer, criterion,
                                  auxiliary_weight, grad_clip, amp, scaler)
        update_meters(meters, loss, logits, target, topk)
        progress.update(step, meters)
        if step % report_freq == 0:
            stop_if_nonfinite(meters["loss"], "training loss")
    stats = averages(meters)
    check_finite(stats["loss"], "training loss")
    return stats


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
            os.path.join(model_path, GENOTYPE)):
        raise CheckpointError(f"{model_path} is a search run folder; {purpose} a trained network: "
                              f"train the searched cell first (train_cifar.py --arch {model_path}) "
                              f"and give that run's folder or {CHECKPOINT}")


def resolve_trained_network(model_path: str, *, dataset: str | None = None, cifar100: bool = False,
                            arch: str | None = None, init_channels: int | None = None,
                            layers: int | None = None, auxiliary: bool | None = None,
                            purpose: str = "this needs") -> TrainedNetwork:
    """Read a trained network's checkpoint (a run folder, this project's checkpoint.pt, or a
    bare state dict in any of the authors' layouts) and decide what to build: the sizes
    come from the flags, else the checkpoint, else the release's defaults. ``purpose``
    starts the refusal of a search checkpoint ("test.py evaluates")."""
    path = training_path(model_path)
    _refuse_untrained(model_path, path, purpose)
    obj = load_file(path, genotype_hint=(
        f"{purpose} a trained network: train the cell first (python train_cifar.py --arch {path}) "
        f"and give that run's folder or {CHECKPOINT}, or give the cell as --arch with a "
        "trained checkpoint"))
    ours = is_training_checkpoint(obj)
    if ours:
        check_training_checkpoint(obj, path)
    elif isinstance(obj, dict) and obj.get("kind") == "pdarts-search":
        raise CheckpointError(
            f"{path} is {describe_checkpoint(obj)}; {purpose} a trained network: train the "
            f"searched cell first (train_cifar.py --arch {os.path.dirname(path) or '.'}) and "
            f"give that run's folder or {CHECKPOINT}")
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
    lr_at: Callable[..., float]        # learning rate of an epoch: lr_at(epoch, stepped_before_epoch=)
    train_criterion: nn.Module
    eval_criterion: nn.Module
    input_size: tuple[int, int, int, int]
    device_augment: dict | None = None  # mean, std, cutout_length: GPU pipeline for arrays
    data_info: dict | None = None       # kept in the checkpoint as "data" (image folders)
    run_files: dict[str, Any] = field(default_factory=dict)  # JSON files for the run folder
    data_lines: list[str] = field(default_factory=list)      # logged at the start


def fit(cfg: TrainConfig, env: DistInfo, spec: RunSpec, resume: dict | None = None) -> int:
    """Train ``spec``'s network for ``cfg.epochs`` epochs (from the resumed epoch), test
    after each epoch, save ``weights.pt`` and ``checkpoint.pt`` after each epoch. The
    run folder is locked while this runs."""
    try:
        return _fit(cfg, env, spec, resume)
    finally:
        release_run_locks()


def _fit(cfg: TrainConfig, env: DistInfo, spec: RunSpec, resume: dict | None) -> int:
    device = env.device
    if resume is None and "channels_last" not in cfg.given:   # a resumed run keeps its own
        cfg = cfg.replace(channels_last=cfg.channels_last or default_channels_last(device))
    check_amp(device, cfg.amp)
    batch = per_process_batch(cfg.batch_size, env.world_size)
    # Deviation: the release runs such a batch as one short batch per epoch, silently.
    if cfg.batch_size > len(spec.train_set):
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the training set "
                        f"({len(spec.train_set)} images); use --batch_size "
                        f"{len(spec.train_set)} or less")
    seed_everything(cfg.seed, cfg.deterministic)
    model = build_network(spec.network, spec.genotype).to(device)
    topk = topk_for(spec.network["num_classes"])
    summary = model_summary(model, spec.input_size)

    # {save}eval-{note}-{time}; a resumed run goes on in its own folder.
    resumed_dir = os.path.dirname(os.path.abspath(cfg.resume)) if resume is not None else None
    run_dir = open_run_dir(cfg.save, TRAIN_PREFIX, cfg.note, env.is_main, resumed_dir)
    setup_logging(run_dir, env.is_main)
    script = os.path.basename(sys.argv[0])
    register_run(run_dir, CHECKPOINT, script if script.endswith(".py") else "SCRIPT.py")
    metrics_path = os.path.join(run_dir, METRICS) if env.is_main else None
    metrics = MetricsWriter(metrics_path)
    log_run_start(cfg, device)
    logger.info("run folder %s; %d process(es), %d images per process per step",
                os.path.abspath(run_dir), env.world_size, batch)
    logger.info("genotype = %s", format_genotype(spec.genotype))
    logger.info(format_summary(summary))
    for line in spec.data_lines:
        logger.info("data: %s", line)
    if env.is_main:
        for name, obj in spec.run_files.items():
            write_json_atomic(obj, os.path.join(run_dir, name))

    optimizer = torch.optim.SGD(model.parameters(), cfg.learning_rate, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, foreach=True)
    scaler = grad_scaler(device, cfg.amp)
    model.checkpoint_cells = cfg.checkpoint_cells
    memory_plan = plan_memory(model, [optimizer], spec.input_size[1:], batch, cfg.batch_size,
                              env.world_size, {"--learning_rate": cfg.learning_rate},
                              cfg.checkpoint_cells, device, cfg.amp)
    start_epoch, best, last = 0, {"acc": None, "epoch": None}, {}
    if resume is not None:
        start_epoch, best, last = restore_training(resume, model, optimizer)
        if env.is_main:
            truncate_metrics(metrics_path, start_epoch)
        logger.info("resumed from %s at epoch %d of %d", cfg.resume, start_epoch, cfg.epochs)
        if not cfg.lr_stepped_before_epoch:
            warn_old_schedule(spec.lr_at, cfg.epochs, start_epoch)

    # Deviation: DistributedDataParallel, one process per GPU, instead of the release's
    # DataParallel. Faithful to the release: batch-norm statistics stay per GPU (no
    # SyncBatchNorm unless --sync_bn), and the batch and learning rate are global.
    prepare_model(model, channels_last=cfg.channels_last)
    logger.info("memory format: %s", "NHWC (--channels_last; on by default on the CPU, "
                "--no-channels_last for NCHW)" if cfg.channels_last else "NCHW")
    train_model: nn.Module = model
    if env.distributed:
        if cfg.sync_bn:
            if device.type != "cuda":
                raise UserError("--sync_bn needs GPUs (batch-norm synchronisation is CUDA-only)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    device_augment = None if cfg.host_data else spec.device_augment

    train_loader = make_loader(spec.train_set, batch, env, train=True, workers=cfg.workers,
                               seed=cfg.seed, device_augment=device_augment)
    test_loader = make_loader(spec.test_set, batch, env, train=False, workers=cfg.workers,
                              device_augment=device_augment)
    if isinstance(train_loader, DeviceLoader):
        logger.info("input pipeline: images on the GPU as uint8, augmented there in batches")

    divergence = DivergenceMonitor(spec.network["num_classes"], "training")
    for epoch in range(start_epoch, cfg.epochs):
        # Deviation: reseeded every epoch (the release seeds once) so --resume is exact.
        seed_everything(epoch_seed(cfg.seed, epoch, env.rank), cfg.deterministic)
        if isinstance(train_loader, DeviceLoader):
            train_loader.generator.manual_seed(epoch_seed(cfg.seed, epoch, env.rank))
        lr = spec.lr_at(epoch, stepped_before_epoch=cfg.lr_stepped_before_epoch)
        set_lr(optimizer, lr)
        model.drop_path_prob = drop_path_at(cfg.drop_path_prob, epoch, cfg.epochs)
        train_loader.sampler.set_epoch(epoch)
        logger.info("epoch %d/%d lr %e drop_path_prob %f", epoch, cfg.epochs, lr, model.drop_path_prob)
        reset_peak_memory(device)

        start = time.time()
        with report_out_of_memory(memory_plan, f"epoch {epoch}",
                                  os.path.join(run_dir, CHECKPOINT)):
            train = train_one_epoch(train_model, train_loader, optimizer, spec.train_criterion,
                                    device, auxiliary_weight=cfg.auxiliary_weight,
                                    grad_clip=cfg.grad_clip, report_freq=cfg.report_freq,
                                    topk=topk, desc=f"train {epoch}", show=env.is_main, amp=cfg.amp,
                                    channels_last=cfg.channels_last, scaler=scaler)
            train_time = time.time() - start
            # DDP broadcasts the buffers before each forward; each process then updates its
            # own copy with its own last batch.
            sync_buffers(model)
            test = evaluate(model, test_loader, spec.eval_criterion, device,
                            topk=topk, report_freq=cfg.report_freq, desc=f"test {epoch}",
                            show=env.is_main,
                            amp=cfg.amp, channels_last=cfg.channels_last)
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
        for warning in (divergence.check(f"epoch {epoch}", {"training loss": train["loss"],
                                                            "test loss": test["loss"]}),
                        # the search's rule, at the last epoch
                        validation_warning(None, epoch, epoch == cfg.epochs - 1, test["top1"],
                                           train["top1"], spec.network["num_classes"],
                                           *batch_norm_updates(model), training=True)):
            if warning and env.is_main:
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
            save_training(run_dir, training_state(model, optimizer, epoch + 1, cfg, spec.genotype,
                                                  spec.network, best, last, spec.data_info))
        barrier()

    if last.get("top1") is not None:
        logger.info("final test accuracy (last epoch, the result to report): %.2f%% top-1%s",
                    last["top1"], "" if last.get("top5") is None else f", {last['top5']:.2f}% top-5")
        logger.info("best epoch, chosen on the test set (optimistic, not a result): %.2f%% at "
                    "epoch %d", best["acc"], best["epoch"])
    if env.is_main:
        plot_run_safely(run_dir, cfg.plot_format)
    return 0
