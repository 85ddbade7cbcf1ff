"""P-DARTS architecture search: three progressive stages (SPEC section 2, paper Sec. 3).

    python train_search.py --demo                    # the whole algorithm on built-in data, CPU, ~3-4 min
    python train_search.py --tmp_data_dir DATA --save LOG --add_layers 6 --add_layers 12 \\
        --dropout_rate 0.1 --dropout_rate 0.4 --dropout_rate 0.7 --note NOTE [--cifar100]
    torchrun --nproc_per_node 4 train_search.py ...  # data-parallel; --batch_size stays global
    python train_search.py --resume RUN_DIR          # continue after the last completed epoch
    python train_search.py --derive RUN_DIR/arch_state.json --max_skip 3   # re-derive, no training

Stage s builds a fresh search network of ``--layers + add_layers[s]`` cells with the ops
still switched on (8, 5, then 3 per edge) and fresh alphas, trains only the weights for
``--arch_warmup_epochs`` epochs, then alternates one first-order alpha step (on the alpha
half of the training split) and one weight step (on the weight half). After the stage
the lowest-weighted ops of every edge are switched off. After the last stage the cell
keeps the 2 strongest non-``none`` edges per node, and the normal cell is refined to at
most ``--max_skip`` skip-connects. The last line on stdout is the ``Genotype(...)`` line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from checkpoint import CheckpointError, describe_checkpoint, load_file, save_atomic
from collapse import CollapseMonitor
from data import SearchData, build_search_data, describe_split, search_split
from distributed import (
    DistInfo,
    add_dist_timeout_arg,
    average_gradients,
    barrier,
    broadcast_model,
    gather,
    init_distributed,
    sync_buffers,
)
from errors import UserError, write_json_atomic
from flags import (
    DEFAULT_DATA_DIR,
    HelpFormatter,
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
    workers_help,
)
from genotypes import (
    GENOTYPE_FILE,
    PRIMITIVES,
    Genotype,
    format_genotype,
    genotype_to_dict,
    load_genotype_file,
)
from memory import plan_memory, report_out_of_memory
from model_search import (
    NUM_EDGES,
    STEM_REDUCTION,
    STEMS,
    Network,
    Switches,
    all_on_switches,
    count_skips,
    derive_cell_switches,
    derive_genotype,
    ops_on,
    prune_switches,
    skip_budget_genotypes,
)
from plots import add_plot_args, plot_run_safely
from runs import (
    MetricsWriter,
    log_run_start,
    open_run_dir,
    refuse_changed_flags,
    register_run,
    release_run_locks,
    run_main,
    setup_logging,
    truncate_metrics,
    write_arch_state,
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
    cosine_lr,
    get_rng_state,
    logger,
    peak_memory_mb,
    reset_peak_memory,
    schedule_of_checkpoint,
    seed_everything,
    seed_for,
    set_rng_state,
)

# ---------------------------------------------------------------------------------------
# The algorithm's constants (paper Sec. 4.1.1)
# ---------------------------------------------------------------------------------------

NUM_STAGES = 3
# Candidate ops per edge in stages 1, 2, 3 ("the size of operation space is set to be
# 8, 5 and 3"), and how many of the lowest-weighted ones each stage switches off: after
# the last stage one op per edge is left, and `none` is always among those dropped.
OPS_PER_STAGE = (8, 5, 3)
DROPS_PER_STAGE = (3, 2, 2)
assert all(k - d == nxt for k, d, nxt in zip(OPS_PER_STAGE, DROPS_PER_STAGE, OPS_PER_STAGE[1:] + (1,)))
# Faithful to the release: the alpha half is validated when `epochs - epoch < 5`, i.e. in
# the last 4 epochs of a stage (21-24 of 25).
VALID_LAST_EPOCHS = 4
DROPOUT_DECAY = 0.2         # p = rate * exp(-(e - W) * 0.2) after the warm-up
# Skip-connect dropout rates per stage (paper Sec. 4.1.1); other datasets use CIFAR-10's.
PAPER_DROPOUT_RATES = {"cifar10": (0.0, 0.4, 0.7), "cifar100": (0.1, 0.2, 0.3)}

CHECKPOINT = "checkpoint.pt"
# What a resume needs in a search checkpoint.
SEARCH_CHECKPOINT_KEYS = ("args", "stage", "epoch", "world_size", "switches_normal",
                          "switches_reduce", "model", "w_opt", "a_opt", "rng", "stages_done")
ARCH_STATE = "arch_state.json"
BUDGETS_FILE = "genotypes_by_skip_budget.json"
METRICS_FILE = "metrics.jsonl"

RELEASE_WORKERS = 2         # the release's loader processes; never more than the CPU cores
MIN_IMAGE_SIZE = 8          # the smallest --image_size the two reduction cells can halve twice
AUTO_IMAGENET_STEM = 64     # --stem auto picks the stride-8 stem from this image size on

# Flags whose default depends on --demo (None on the command line = not given).
PAPER_DEFAULTS = dict(dataset="cifar10", epochs=25, arch_warmup_epochs=10, batch_size=96,
                      init_channels=16, layers=5, add_layers=[0, 6, 12],
                      workers=default_workers(RELEASE_WORKERS),
                      report_freq=50, note="try", image_size=32, threads=0, channels_last=False)
# The demo: the full three-stage algorithm, scaled down to run on a 2-core CPU in a few
# minutes. channels_last: the CPU's depthwise convolutions are much faster in NHWC.
DEMO_DEFAULTS = dict(dataset="demo", epochs=5, arch_warmup_epochs=2, batch_size=50,
                     init_channels=4, layers=3, add_layers=[0, 1, 2], workers=0,
                     report_freq=5, note="demo", image_size=16, threads=1, channels_last=True)
# On --resume these come from the new command line; everything else from the run itself.
RUNTIME_FLAGS = ("resume", "workers", "report_freq", "device", "tmp_data_dir", "download",
                 "stop_after_epochs", "derive", "threads", "host_data", "channels_last", "compile",
                 "dist_timeout", "plot_format", "checkpoint_cells")


# ---------------------------------------------------------------------------------------
# Schedules (pure functions, checked against SPEC's formulas by the tests)
# ---------------------------------------------------------------------------------------

def learning_rate(epoch: int, epochs: int, lr0: float, lr_min: float,
                  stepped_before_epoch: bool = True) -> float:
    """The weights' rate in ``epoch`` (0-based) of a stage: the release's cosine annealing,
    its scheduler stepped before each epoch, so epoch 0 trains at 0.024901 and the last
    epoch at ``lr_min`` (see ``utils.cosine_lr``)."""
    return cosine_lr(lr0, epoch, epochs, lr_min, stepped_before_epoch)


def skip_dropout_rate(epoch: int, epochs: int, rate: float, warmup: int) -> float:
    """Skip-connect dropout rate for an epoch (paper Sec. 3.3): a linear decay during the
    weights-only warm-up, then an exponential one."""
    if epoch < warmup:
        return rate * (epochs - epoch - 1) / epochs
    return rate * math.exp(-(epoch - warmup) * DROPOUT_DECAY)


def is_validation_epoch(epoch: int, epochs: int) -> bool:
    """Validation accuracy is reported in the last VALID_LAST_EPOCHS (4) epochs of a stage."""
    return epoch >= epochs - VALID_LAST_EPOCHS


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


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    g.add_argument("--learning_rate", type=positive_float, default=0.025, help="initial weight learning rate")
    g.add_argument("--learning_rate_min", type=nonneg_float, default=0.0, help="cosine schedule floor")
    g.add_argument("--momentum", type=momentum, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=nonneg_float, default=3e-4, help="SGD weight decay")
    g.add_argument("--grad_clip", type=positive_float, default=5.0,
                   help="gradient norm clip for the weights and for the alphas")
    g.add_argument("--arch_learning_rate", type=positive_float, default=6e-4, help="Adam lr of the alphas")
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
                        "demo 0, 1, 2)")
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
    g.add_argument("--note", default=None, help="name part of the run folder (default try, demo demo)")
    g.add_argument("--seed", type=nonneg_int, default=2, help="seeds everything (the release's default)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (slower); with it a resumed CPU run equals "
                        "an uninterrupted one")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = CUDA when available")
    add_dist_timeout_arg(g)
    g.add_argument("--threads", type=nonneg_int, default=None,
                   help="CPU threads for PyTorch; 0 = PyTorch's default (all cores). The demo "
                        "uses 1: its tensors are too small to gain from more, and on a busy "
                        "machine several threads per tiny op slow it down many times")
    g.add_argument("--report_freq", type=positive_int, default=None,
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


# ---------------------------------------------------------------------------------------
# One step, one epoch, validation
# ---------------------------------------------------------------------------------------

def search_step(model: Network, batch_w: tuple[torch.Tensor, torch.Tensor],
                batch_a: tuple[torch.Tensor, torch.Tensor] | None,
                w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer, grad_clip: float,
                update_arch: bool, world_size: int = 1, forward: nn.Module | None = None,
                amp: str = "none", scaler=None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One search step: with ``update_arch`` first one first-order alpha step on
    ``batch_a`` (the gradient of its loss at the current weights, for the alphas only),
    then one weight step on ``batch_w`` (alphas held fixed). Returns the weight batch's
    logits and loss and the alpha batch's loss, detached, on the device (no host sync).

    ``forward`` is the module to call (``model`` itself, or its torch.compile wrapper);
    ``amp`` autocasts the forward passes (the loss of half-precision logits is taken in
    float32; float64 stays float64); ``scaler`` is
    the GradScaler of ``--amp fp16``, shared by both optimizers."""
    forward = model if forward is None else forward
    alphas = model.arch_parameters()
    weights = w_opt.param_groups[0]["params"]
    loss_a = None
    if update_arch:
        x_a, y_a = batch_a
        with autocast(x_a.device, amp):
            logits_a = forward(x_a)
        loss_a = F.cross_entropy(loss_precision(logits_a), y_a)
        # Gradients for the alphas only: autograd skips every weight gradient. An alpha
        # matrix no cell uses (a network too shallow for normal cells) keeps no gradient.
        grads = torch.autograd.grad(loss_a if scaler is None else scaler.scale(loss_a), alphas,
                                    allow_unused=True)
        for p, g in zip(alphas, grads):
            p.grad = g
        if world_size > 1:
            average_gradients(alphas, world_size)
        if scaler is not None:
            scaler.unscale_(a_opt)
        nn.utils.clip_grad_norm_(alphas, grad_clip)
        if scaler is not None:
            scaler.step(a_opt)
        else:
            a_opt.step()
        loss_a = loss_a.detach()

    x_w, y_w = batch_w
    w_opt.zero_grad(set_to_none=True)
    for a in alphas:  # the weight step sees the alphas as constants: no graph through them
        a.requires_grad_(False)
    try:
        with autocast(x_w.device, amp):
            logits = forward(x_w)
        loss_w = F.cross_entropy(loss_precision(logits), y_w)
        (loss_w if scaler is None else scaler.scale(loss_w)).backward()
    finally:
        for a in alphas:
            a.requires_grad_(True)
    if world_size > 1:
        average_gradients(weights, world_size)
    if scaler is not None:
        scaler.unscale_(w_opt)
    nn.utils.clip_grad_norm_(weights, grad_clip)
    if scaler is not None:
        scaler.step(w_opt)
        scaler.update()
    else:
        w_opt.step()
    return logits.detach(), loss_w.detach(), loss_a


def reference_search_step(model: Network, batch_w: tuple[torch.Tensor, torch.Tensor],
                          batch_a: tuple[torch.Tensor, torch.Tensor] | None,
                          w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer,
                          grad_clip: float, update_arch: bool) -> tuple[float, float | None]:
    """The plain path: the straightforward search step (SPEC section 2), single process.
    Each backward pass fills every gradient, weights' and alphas' alike; clipping goes
    parameter by parameter; both losses are read back every step. Build ``model`` with
    ``batched=False, skip_zero=False`` (the release's per-edge cells, `none` computed) and the optimizers with
    ``foreach=False``. Benchmarks and equivalence tests compare ``search_step`` with it."""
    loss_a = (_plain_update(model, batch_a, a_opt, model.arch_parameters(), grad_clip)
              if update_arch else None)
    loss_w = _plain_update(model, batch_w, w_opt, model.weight_parameters(), grad_clip)
    return loss_w, loss_a


def _plain_update(model: Network, batch: tuple[torch.Tensor, torch.Tensor],
                  optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                  grad_clip: float) -> float:
    x, y = batch
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    nn.utils.clip_grad_norm_(params, grad_clip, foreach=False)
    optimizer.step()
    return loss.item()


def _to(batch, device: torch.device, channels_last: bool = False):
    x, y = batch
    return prepare_input(x.to(device, non_blocking=True), channels_last), y.to(device, non_blocking=True)


def _stop_if_nonfinite(meter: AverageMeter, what: str, device: torch.device, world_size: int) -> None:
    """Raise NonFiniteLossError on every rank at once if any rank's running loss is not
    finite (one host sync; called at report points and at the end of an epoch)."""
    value = meter.avg
    if world_size > 1:
        t = torch.tensor([value], dtype=torch.float64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        value = float(t.item())
    check_finite(value, what)


def train_epoch(model: Network, data: SearchData, w_opt: torch.optim.Optimizer,
                a_opt: torch.optim.Optimizer, args: argparse.Namespace, update_arch: bool,
                env: DistInfo, desc: str = "train", forward: nn.Module | None = None,
                scaler=None) -> dict[str, float]:
    """One epoch of the search. Returns averages over all ranks: ``train_loss``,
    ``train_acc``, ``arch_loss`` (None without alpha steps) and ``images`` (all ranks)."""
    model.train()
    meters = {"loss": AverageMeter(), "acc": AverageMeter(), "arch_loss": AverageMeter()}
    alpha_batches = iter(data.alphas) if update_arch else None
    progress = Progress(len(data.weights), desc, args.report_freq, enabled=env.is_main)
    images = 0
    for step, batch in enumerate(data.weights, 1):
        batch_w = _to(batch, env.device, args.channels_last)
        batch_a = _to(next(alpha_batches), env.device, args.channels_last) if update_arch else None
        logits, loss_w, loss_a = search_step(model, batch_w, batch_a, w_opt, a_opt,
                                             args.grad_clip, update_arch, env.world_size,
                                             forward, args.amp, scaler)
        n = batch_w[1].shape[0]
        meters["loss"].update(loss_w, n)
        meters["acc"].update(accuracy(logits, batch_w[1])[0], n)
        images += n
        if loss_a is not None:
            meters["arch_loss"].update(loss_a, batch_a[1].shape[0])
            images += batch_a[1].shape[0]
        if step % args.report_freq == 0:
            _stop_if_nonfinite(meters["loss"], "training loss", env.device, env.world_size)
        progress.update(step, {"loss": meters["loss"], "acc": meters["acc"]})
    for m in meters.values():
        m.all_reduce()
    check_finite(meters["loss"].avg, "training loss")
    if update_arch:
        check_finite(meters["arch_loss"].avg, "alpha-step loss")
    return {"train_loss": meters["loss"].avg, "train_acc": meters["acc"].avg,
            "arch_loss": meters["arch_loss"].avg if update_arch else None,
            "images": images * env.world_size}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: str = "none",
             channels_last: bool = False) -> dict[str, float]:
    """Loss and top-1 accuracy in eval mode (averaged over all ranks). ``model`` may be
    a torch.compile wrapper."""
    model.eval()
    loss, acc = AverageMeter(), AverageMeter()
    for batch in loader:
        x, y = _to(batch, device, channels_last)
        with autocast(device, amp):
            logits = loss_precision(model(x))
        loss.update(F.cross_entropy(logits, y), y.shape[0])
        acc.update(accuracy(logits, y)[0], y.shape[0])
    loss.all_reduce()
    acc.all_reduce()
    model.train()
    return {"valid_loss": loss.avg, "valid_acc": acc.avg}


# ---------------------------------------------------------------------------------------
# Derivation from saved alphas (--derive) and reporting of cells
# ---------------------------------------------------------------------------------------

def prune_after_stage(stage: int, switches_normal: Switches, switches_reduce: Switches,
                      probs_normal, probs_reduce) -> tuple[Switches, Switches]:
    """Switch off the DROPS_PER_STAGE[stage] lowest-weighted ops of every edge (stage is
    0-based); after the last stage `none` is always among them (paper Sec. 3.2)."""
    last = stage == NUM_STAGES - 1
    return (prune_switches(switches_normal, probs_normal, DROPS_PER_STAGE[stage], drop_none=last),
            prune_switches(switches_reduce, probs_reduce, DROPS_PER_STAGE[stage], drop_none=last))


def _softmax_rows(alphas: Sequence[Sequence[float]]) -> torch.Tensor:
    # float32, as in the search, so a re-derivation ranks exactly as the search did.
    return F.softmax(torch.tensor(alphas, dtype=torch.float32), dim=-1)


def replay_stages(stages: Sequence[dict], source: str = "arch state") -> list[tuple[Switches, Switches]]:
    """The switches each stage ran with, recomputed from the raw alphas of all stages,
    starting with all ops on and pruning after each stage as the search does."""
    if not isinstance(stages, list) or len(stages) != NUM_STAGES:
        raise UserError(f"{source}: 'stages' must be a list of {NUM_STAGES} objects")
    sw_n, sw_r = all_on_switches(), all_on_switches()
    result = []
    for s, stage in enumerate(stages):
        for key in ("alphas_normal", "alphas_reduce"):
            rows = stage.get(key) if isinstance(stage, dict) else None
            ok = (isinstance(rows, list) and len(rows) == NUM_EDGES
                  and all(isinstance(r, list) and len(r) == OPS_PER_STAGE[s]
                          and all(isinstance(v, (int, float)) for v in r) for r in rows))
            if not ok:
                raise UserError(f"{source}: stage {s + 1} needs '{key}' as {NUM_EDGES} rows of "
                                f"{OPS_PER_STAGE[s]} numbers (one column per op on, PRIMITIVES order)")
            if not all(math.isfinite(v) for r in rows for v in r):
                raise UserError(f"{source}: stage {s + 1} '{key}' holds non-finite values (NaN or "
                                "infinity): the search diverged, and no cell can be derived from it")
        result.append((sw_n, sw_r))
        sw_n, sw_r = prune_after_stage(s, sw_n, sw_r, _softmax_rows(stage["alphas_normal"]),
                                       _softmax_rows(stage["alphas_reduce"]))
    return result


def final_cells(sw_n: Switches, sw_r: Switches, probs_n, probs_r, max_skip: int
                ) -> tuple[Genotype, Genotype, int, list[tuple[int, Genotype]]]:
    """(chosen cell at max_skip, unrestricted cell, its skip-connect count, the cell for
    every budget from 8 down that the unrestricted cell exceeds).

    Faithful to the release: the skip-connect budget restricts the normal cell only."""
    unrestricted = derive_genotype(sw_n, sw_r, probs_n, probs_r, None)
    num_skips = count_skips(derive_cell_switches(sw_n, probs_n, None))
    budgets = skip_budget_genotypes(sw_n, sw_r, probs_n, probs_r)
    chosen = unrestricted if max_skip < 0 else derive_genotype(sw_n, sw_r, probs_n, probs_r, max_skip)
    return chosen, unrestricted, num_skips, budgets


def run_derive(args: argparse.Namespace) -> int:
    """``--derive FILE``: print the cell for every skip budget, then the chosen one last."""
    try:
        with open(args.derive, encoding="utf-8") as f:
            state = json.load(f)
    except UnicodeDecodeError:
        raise UserError(f"{args.derive} is not an arch_state.json file (it is not text)") from None
    except OSError as e:
        raise UserError(f"cannot read {args.derive}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{args.derive} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or "stages" not in state:
        raise UserError(f"{args.derive}: expected a JSON object with a top-level 'stages' list")
    if state.get("stem", "cifar") != "cifar":
        # The cell does not depend on the stem; where it was found does (train it with
        # train_imagenet.py, whose network has the same stem).
        print(f"searched with the {state['stem']} stem (train the cell with train_imagenet.py)")
    switches = replay_stages(state["stages"], args.derive)
    sw_n, sw_r = switches[-1]
    last = state["stages"][-1]
    chosen, unrestricted, num_skips, budgets = final_cells(
        sw_n, sw_r, _softmax_rows(last["alphas_normal"]), _softmax_rows(last["alphas_reduce"]),
        args.max_skip)
    print(f"unrestricted cell ({num_skips} skip-connects in the normal cell): "
          f"{format_genotype(unrestricted)}")
    for m, g in budgets:
        print(f"max_skip {m}: {format_genotype(g)}")
    print(format_genotype(chosen))
    return 0


def _names(row: Sequence[bool]) -> str:
    return ",".join(PRIMITIVES[k] for k in ops_on(row))


def _log_switches(stage: int, sw_n: Switches, sw_r: Switches) -> None:
    for kind, sw in (("normal", sw_n), ("reduce", sw_r)):
        logger.info("stage %d %s cell, ops kept per edge:", stage, kind)
        for e, row in enumerate(sw):
            logger.info("  edge %2d: %s", e, _names(row))


def _draw(genotype: Genotype, out_dir: str, prefix: str) -> None:
    from visualize import draw_genotype, graphviz_available

    if not graphviz_available():
        logger.info("graphviz not installed: no diagram %s*.pdf", prefix)
        return
    try:
        paths = draw_genotype(genotype, out_dir, "pdf", prefix)
        logger.info("diagrams: %s", ", ".join(os.path.basename(p) for p in paths))
    except Exception as e:  # noqa: BLE001 - a drawing failure must not lose the search
        logger.warning("could not draw %s cells: %s", prefix or "final", e)


# ---------------------------------------------------------------------------------------
# Run folder, resume, checkpoints
# ---------------------------------------------------------------------------------------

def _load_resume(args: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """The run's checkpoint and its settings, with the run-time flags of this command."""
    path = os.path.join(args.resume, CHECKPOINT)
    if not os.path.isdir(args.resume):
        raise UserError(f"--resume: no run folder {args.resume}")
    if not os.path.isfile(path):
        raise UserError(f"--resume: {args.resume} has no {CHECKPOINT}: the run stopped before "
                        "its first epoch ended, so there is nothing to resume; start it again")
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "pdarts-search":
        raise CheckpointError(f"{path} is {describe_checkpoint(ckpt)}; --resume of "
                              "train_search.py expects the folder of a search run")
    missing = [k for k in SEARCH_CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is a search checkpoint without {', '.join(missing)} "
                              "(damaged or written by another version); it cannot be resumed")
    saved = dict(ckpt["args"])
    # Deviation: the release has no resume. As train_cifar.py does, a recipe flag that
    # differs from the run's own is refused, not silently ignored; save/note only name
    # the folder of a new run.
    refuse_changed_flags(getattr(args, "resume_given", {}), saved,
                         set(RUNTIME_FLAGS) | {"save", "note"}, vars(build_parser().parse_args([])))
    overrides = set(getattr(args, "resume_overrides", [])) | {"resume", "stop_after_epochs", "derive"}
    for key in overrides:
        saved[key] = getattr(args, key)
    saved["resume_overrides"] = sorted(overrides)
    return argparse.Namespace(**saved), ckpt


def search_stem(args: argparse.Namespace) -> str:
    """The run's stem; runs saved before --stem existed used the release's."""
    stem = getattr(args, "stem", "cifar")
    return "cifar" if stem == "auto" else stem


def search_complete(run_dir: str, ckpt: dict, epochs: int) -> bool:
    """The checkpoint is the last epoch of the last stage and the final cell was written."""
    return (ckpt["stage"] == NUM_STAGES - 1 and ckpt["epoch"] >= epochs
            and os.path.isfile(os.path.join(run_dir, GENOTYPE_FILE)))


def report_complete(run_dir: str, env: DistInfo) -> int:
    """``--resume`` of a finished search: say so and print its cell; nothing is re-run,
    re-derived or appended."""
    path = os.path.join(run_dir, GENOTYPE_FILE)
    genotype = load_genotype_file(path)
    if env.is_main:
        print(f"the search in {os.path.abspath(run_dir)} is complete (all {NUM_STAGES} stages): "
              f"nothing to resume. Its cell ({path}; re-derive at another skip budget with "
              f"--derive {os.path.join(run_dir, ARCH_STATE)} --max_skip M):", flush=True)
        print(format_genotype(genotype), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------

@dataclass
class SearchRun:
    """What every stage of one run shares."""
    args: argparse.Namespace
    env: DistInfo
    data: SearchData
    num_classes: int
    run_dir: str
    metrics: MetricsWriter
    split_digest: str = ""                                  # weight/alpha division
    stages_done: list[dict] = field(default_factory=list)   # arch_state.json's "stages"
    epochs_run: int = 0                                     # epochs run by this process
    lr_stepped_before_epoch: bool = True                    # False: a run begun before the fix


def search_stage(run: SearchRun, stage: int, switches_n: Switches, switches_r: Switches,
                 ckpt: dict | None = None) -> Network | None:
    """Train one stage (resuming from ``ckpt`` if given) and return its network, or None
    when --stop_after_epochs stopped the run."""
    args, env = run.args, run.env
    layers = args.layers + args.add_layers[stage]
    C = args.init_channels + args.add_width[stage]
    rate = args.dropout_rate[stage]
    # Every stage starts afresh: new network, new alphas, new optimizers; only the
    # switches carry over (paper Sec. 3.2).
    # Deviation: seeded per stage (the release seeds once) so a resume rebuilds it.
    torch.manual_seed(seed_for(args.seed, stage))
    model = Network(C, run.num_classes, layers, switches_n, switches_r, drop_rate=rate,
                    stem=search_stem(args)).to(env.device)
    if env.distributed:
        broadcast_model(model)
        if env.rank > 0:  # different dropout masks and augmentations per rank
            torch.manual_seed(seed_for(args.seed, stage, env.rank))
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=args.learning_rate,
                            momentum=args.momentum, weight_decay=args.weight_decay, foreach=True)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=args.arch_learning_rate,
                             betas=(0.5, 0.999), weight_decay=args.arch_weight_decay, foreach=True)
    scaler = grad_scaler(env.device, args.amp)
    first_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        w_opt.load_state_dict(ckpt["w_opt"])
        a_opt.load_state_dict(ckpt["a_opt"])
        rng = ckpt["rng"]
        set_rng_state(rng[env.rank] if len(rng) == env.world_size else rng[0])
        first_epoch = ckpt["epoch"]
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    if args.compile:
        torch._dynamo.reset()   # the previous stage's network leaves its compiled graphs
    model.checkpoint_cells = getattr(args, "checkpoint_cells", False)  # absent in older runs
    forward = prepare_model(model, args.channels_last, args.compile)
    reset_peak_memory(env.device)
    logger.info("=== stage %d/%d: %d cells, C=%d, %d ops per edge, skip dropout %.2f, "
                "%.3fM weights ===", stage + 1, NUM_STAGES, layers, C, OPS_PER_STAGE[stage],
                rate, sum(p.numel() for p in model.weight_parameters()) / 1e6)
    # A smaller batch in the advice scales the weights' SGD rate (linear scaling); Adam's
    # alpha rate does not depend on the gradient's scale and stays.
    memory_plan = plan_memory(model, [w_opt, a_opt], (3, args.image_size, args.image_size),
                              args.batch_size // env.world_size, args.batch_size, env.world_size,
                              {"--learning_rate": args.learning_rate}, model.checkpoint_cells,
                              env.device, args.amp)

    collapse = CollapseMonitor(stage + 1, args.arch_warmup_epochs, env.is_main)
    for epoch in range(first_epoch, args.epochs):
        t0 = time.time()
        lr = learning_rate(epoch, args.epochs, args.learning_rate, args.learning_rate_min,
                           run.lr_stepped_before_epoch)
        for group in w_opt.param_groups:
            group["lr"] = lr
        drop = skip_dropout_rate(epoch, args.epochs, rate, args.arch_warmup_epochs)
        model.set_drop_rate(drop)
        update_arch = epoch >= args.arch_warmup_epochs
        run.data.set_epoch(stage, epoch)
        logger.info("stage %d epoch %d/%d lr %.6e skip-dropout %.4f %s", stage + 1, epoch,
                    args.epochs, lr, drop, "weights+alphas" if update_arch else "weights only")
        with report_out_of_memory(memory_plan, f"stage {stage + 1} epoch {epoch}",
                                  os.path.join(run.run_dir, CHECKPOINT)):
            stats = train_epoch(model, run.data, w_opt, a_opt, args, update_arch, env,
                                desc=f"stage {stage + 1} epoch {epoch}", forward=forward,
                                scaler=scaler)
            valid = {"valid_loss": None, "valid_acc": None}
            if is_validation_epoch(epoch, args.epochs):
                # Faithful to the release: the alpha half is validated with the training
                # augmentation (it is the same dataset object).
                # Every process validates with rank 0's batch-norm statistics, so the figures
                # do not depend on how the batches were split over the processes.
                sync_buffers(model)
                valid = evaluate(forward, run.data.valid, env.device, args.amp, args.channels_last)
                check_finite(valid["valid_loss"], "validation loss")
        check_finite_state(model)   # batch-norm statistics and alphas: nothing non-finite is saved
        seconds = time.time() - t0
        probs_n, probs_r = model.arch_probs()
        record = {
            "stage": stage + 1, "epoch": epoch, "lr": lr, "skip_dropout": drop,
            "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
            "arch_loss": stats["arch_loss"], **valid, "epoch_time_s": round(seconds, 3),
            "images_per_s": round(stats["images"] / max(seconds, 1e-9), 2),
            "peak_memory_mb": round(peak_memory_mb(env.device), 1),
            "alphas_normal_softmax": probs_n.tolist(), "alphas_reduce_softmax": probs_r.tolist(),
            **collapse.check(epoch, switches_n, probs_n),
        }
        logger.info("stage %d epoch %d: train_acc %.2f train_loss %.4f%s, %.1fs, %.0f img/s",
                    stage + 1, epoch, stats["train_acc"], stats["train_loss"],
                    "" if valid["valid_acc"] is None else
                    f", valid_acc {valid['valid_acc']:.2f} valid_loss {valid['valid_loss']:.4f}",
                    seconds, record["images_per_s"])
        state = {
            "kind": "pdarts-search", "version": 1, "args": vars(args),
            "stage": stage, "epoch": epoch + 1, "world_size": env.world_size,
            "switches_normal": switches_n, "switches_reduce": switches_r,
            "model_args": {"C": C, "num_classes": run.num_classes, "layers": layers,
                           "stem": search_stem(args)},
            "model": model.state_dict(), "w_opt": w_opt.state_dict(), "a_opt": a_opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "lr": lr, "skip_dropout": drop, "stages_done": run.stages_done,
            "split_digest": run.split_digest, "data_stats": run.data.stats,
            "lr_schedule": LR_SCHEDULE if run.lr_stepped_before_epoch else None,
            "rng": gather(get_rng_state(), env),
        }
        if env.is_main:
            run.metrics.write(record)   # a resume drops lines after its checkpoint
            save_atomic(state, os.path.join(run.run_dir, CHECKPOINT), resume_hint=run.run_dir)
        run.epochs_run += 1
        if args.stop_after_epochs is not None and run.epochs_run >= args.stop_after_epochs:
            logger.info("stopping after %d epoch(s) as asked (--stop_after_epochs); continue "
                        "with --resume %s", run.epochs_run, run.run_dir)
            return None
    return model


def end_stage(run: SearchRun, stage: int, model: Network, switches_n: Switches,
              switches_r: Switches) -> tuple[Switches, Switches]:
    """Record the stage (alphas, switches, its cell, peak memory) and switch off the
    lowest-weighted ops of every edge; return the next stage's switches."""
    args, env = run.args, run.env
    probs_n, probs_r = model.arch_probs()
    peak = peak_memory_mb(env.device)
    logger.info("stage %d peak device memory: %s", stage + 1,
                f"{peak:.0f} MiB" if env.device.type == "cuda" else "n/a on CPU")
    stage_cell = derive_genotype(switches_n, switches_r, probs_n, probs_r,
                                 None if args.max_skip < 0 else args.max_skip)
    logger.info("stage %d cell (derived with the final rule): %s", stage + 1,
                format_genotype(stage_cell))
    run.stages_done.append({
        "stage": stage + 1, "layers": args.layers + args.add_layers[stage],
        "init_channels": args.init_channels + args.add_width[stage],
        "ops_per_edge": OPS_PER_STAGE[stage], "dropout_rate": args.dropout_rate[stage],
        "alphas_normal": model.alphas_normal.detach().float().cpu().tolist(),
        "alphas_reduce": model.alphas_reduce.detach().float().cpu().tolist(),
        "switches_normal": switches_n, "switches_reduce": switches_r,
        "genotype": genotype_to_dict(stage_cell), "peak_memory_mb": round(peak, 1),
    })
    last = stage == NUM_STAGES - 1
    logger.info("------ dropping %d ops per edge%s ------", DROPS_PER_STAGE[stage],
                " (none first)" if last else "")
    new_n, new_r = prune_after_stage(stage, switches_n, switches_r, probs_n, probs_r)
    _log_switches(stage + 1, new_n, new_r)
    if env.is_main:
        write_arch_state(run.run_dir, run.stages_done)
        _draw(stage_cell, run.run_dir, f"stage{stage + 1}_")
    return new_n, new_r


def finish_search(run: SearchRun, model: Network, switches_n: Switches,
                  switches_r: Switches) -> Genotype:
    """The final cell from the last stage's switches and weights: 2 strongest non-none
    edges per node, then the skip-connect refinement of the normal cell (paper Sec. 3.3).
    Writes genotype.json, the cells per skip budget, arch_state.json and the diagrams."""
    args, env = run.args, run.env
    probs_n, probs_r = model.arch_probs()
    # Deviation: the last stage's pruned switches are only logged; the final cell is
    # derived from its 3-op switches and weights, which gives the release's cell.
    chosen, unrestricted, num_skips, budgets = final_cells(
        switches_n, switches_r, probs_n, probs_r, args.max_skip)
    logger.info("unrestricted cell (%d skip-connects in the normal cell): %s", num_skips,
                format_genotype(unrestricted))
    logger.info("------ restricting skip-connects ------")
    if not budgets:
        logger.info("the normal cell has %d skip-connect(s): no budget from 8 down is exceeded",
                    num_skips)
    for m, g in budgets:
        logger.info("max_skip %d: %s", m, format_genotype(g))
    logger.info("final cell (max_skip %s): %s", "none" if args.max_skip < 0 else args.max_skip,
                format_genotype(chosen))
    lines = gather(format_genotype(chosen), env)
    if len(set(lines)) != 1:
        raise RuntimeError(f"ranks derived different cells: {lines}")
    if env.distributed:
        logger.info("all %d processes derived this same cell", env.world_size)
    # How the cell was found; training scripts ignore it (the cell is the same either way).
    cell = {**genotype_to_dict(chosen), "metadata": {
        "stem": search_stem(args), "image_size": args.image_size, "dataset": args.dataset}}
    if env.is_main:
        write_json_atomic(cell, os.path.join(run.run_dir, GENOTYPE_FILE))
        write_json_atomic({"num_skip_connects": num_skips, "unrestricted": genotype_to_dict(unrestricted),
                     "by_max_skip": {str(m): genotype_to_dict(g) for m, g in budgets}},
                    os.path.join(run.run_dir, BUDGETS_FILE))
        write_arch_state(run.run_dir, run.stages_done,
                         {"max_skip": args.max_skip, "genotype": cell, "stem": search_stem(args)})
        _draw(chosen, run.run_dir, "")
    return chosen


def main(args: argparse.Namespace) -> int:
    """The search (or --derive); the run folder is locked while it runs."""
    try:
        return _main(args)
    finally:
        release_run_locks()


def _main(args: argparse.Namespace) -> int:
    if args.derive:
        return run_derive(args)
    env = init_distributed(args.device, args.dist_timeout)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = None
    if args.resume:
        args, ckpt = _load_resume(args)
        if search_complete(args.resume, ckpt, args.epochs):
            return report_complete(args.resume, env)
        if ckpt["world_size"] != env.world_size:
            logger.warning("resuming a %d-process run with %d processes: the data order and "
                           "random streams differ from the original run", ckpt["world_size"],
                           env.world_size)
    if args.batch_size % env.world_size:
        raise UserError(f"--batch_size {args.batch_size} does not divide evenly over "
                        f"{env.world_size} processes")
    check_amp(env.device, args.amp)
    # Read the data before creating the run folder: a wrong path leaves nothing behind.
    dataset, num_classes, description = build_search_data(args, (ckpt or {}).get("data_stats"))
    split = search_split(dataset, args, ckpt)
    # Faithful to the release: --save is a prefix, the folder is {save}search-{note}-{time}.
    run_dir = open_run_dir(args.save, "search", args.note, env.is_main, args.resume)
    setup_logging(run_dir if env.is_main else None, env.is_main)
    register_run(run_dir, CHECKPOINT, "train_search.py")
    logger.info("run folder %s", os.path.abspath(run_dir))
    seed_everything(args.seed, args.deterministic)
    log_run_start(args, env.device)
    stem = search_stem(args)
    cells_at = args.image_size // STEM_REDUCTION[stem]
    logger.info("stem: %s (%s); the first cells see %dx%d maps",
                stem, getattr(args, "stem_reason", "the run's"), cells_at, cells_at)
    if env.distributed:
        logger.info("data-parallel over %d processes: batch %d = %d x %d per process (gradients "
                    "averaged, as one process with batch %d); batch-norm statistics are per "
                    "process", env.world_size, args.batch_size, env.world_size,
                    args.batch_size // env.world_size, args.batch_size)
    data = SearchData(dataset, args, env, split)
    logger.info("data: %s; %d train the weights, %d the alphas", description, *data.sizes)
    for reason in getattr(dataset, "skipped", []):
        logger.warning("left out: %s", reason)
    logger.info("split %s%s, images per class weight/alpha half: %s", split.rule,
                f" with seed {args.seed}" if split.rule != "in order" else "",
                describe_split(dataset, split))
    if data.on_device:
        logger.info("input pipeline: images on the GPU as uint8, augmented there in batches")
    if args.amp != "none" or args.channels_last or args.compile:
        logger.info("speed options: amp %s, channels_last %s, compile %s (float rounding "
                    "differs from the default float32 path)", args.amp, args.channels_last,
                    args.compile)
    run = SearchRun(args, env, data, num_classes, run_dir,
                    MetricsWriter(os.path.join(run_dir, METRICS_FILE) if env.is_main else None),
                    split.digest)

    switches_n, switches_r = all_on_switches(), all_on_switches()
    start_stage = 0
    if ckpt is not None:
        switches_n, switches_r = ckpt["switches_normal"], ckpt["switches_reduce"]
        run.stages_done = ckpt["stages_done"]
        start_stage = ckpt["stage"]
        run.lr_stepped_before_epoch = schedule_of_checkpoint(ckpt)
        if not run.lr_stepped_before_epoch:
            logger.warning("this run began before the learning-rate schedule was corrected to "
                           "the release's (epoch e at cos(pi*(e+1)/E)); it continues on the "
                           "schedule it began with (cos(pi*e/E))")
        logger.info("resuming %s at stage %d after epoch %d", run_dir, start_stage + 1, ckpt["epoch"])
        if env.is_main:
            truncate_metrics(os.path.join(run_dir, METRICS_FILE), ckpt["epoch"], start_stage)

    search_start = time.time()
    for stage in range(start_stage, NUM_STAGES):
        model = search_stage(run, stage, switches_n, switches_r,
                             ckpt if stage == start_stage else None)
        if model is None:       # --stop_after_epochs
            barrier()
            return 0
        next_n, next_r = end_stage(run, stage, model, switches_n, switches_r)
        if stage < NUM_STAGES - 1:
            switches_n, switches_r = next_n, next_r
    genotype = finish_search(run, model, switches_n, switches_r)
    if env.device.type == "cuda":
        logger.info("peak device memory per stage: %s", ", ".join(
            f"{s['peak_memory_mb']:.0f} MiB" for s in run.stages_done))
    logger.info("search done in %.1f min; outputs in %s", (time.time() - search_start) / 60, run_dir)
    barrier()
    if env.is_main:     # the other ranks' cells were checked equal in finish_search
        plot_run_safely(run_dir, getattr(args, "plot_format", "png"))  # older runs lack the flag
        print(format_genotype(genotype), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
