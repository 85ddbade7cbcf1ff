"""What the search's loop and the training's loop share, written once: a batch moved to
the device, the non-finite guards (a loss or a network value that is NaN or infinite
stops the run, on every process at once, before the epoch is saved), evaluation (loss
and top-k accuracy over a loader, summed over all processes), and the warning that
eval-mode validation says little (unsettled batch-norm statistics, or validation at
chance while training is well above it).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from distributed import dist_device
from errors import NonFiniteLossError
from speed import autocast, loss_precision, prepare_input
from utils import AverageMeter, Progress, accuracy


def to_device(batch, device: torch.device, channels_last: bool = False):
    """(images, labels) of a loader on ``device`` (images in the network's memory layout)."""
    x, y = batch
    return (prepare_input(x.to(device, non_blocking=True), channels_last),
            y.to(device, non_blocking=True))


# ---------------------------------------------------------------------------------------
# Non-finite values: stop before the epoch is saved
# ---------------------------------------------------------------------------------------

# run_main adds what the run folder holds and what to do (runs._nonfinite_advice).
NONFINITE_ADVICE = "stopping before this epoch is saved"


def check_finite(value: float, what: str = "loss") -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the {what} became {value}; {NONFINITE_ADVICE}")


def check_finite_state(model: torch.nn.Module) -> None:
    """Before saving an epoch: every floating-point parameter and buffer (batch-norm
    running statistics, alphas) must be finite (one host sync)."""
    tensors = [(k, t) for k, t in model.state_dict().items() if t.is_floating_point()]
    if not tensors:
        return
    ok = torch.stack([t.detach().isfinite().all() for _, t in tensors])
    if dist.is_available() and dist.is_initialized():  # every process stops together
        bad = (~ok.all()).to(dist_device(), torch.float32).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() and bool(ok.all()):
            raise NonFiniteLossError(f"another process's network became non-finite; {NONFINITE_ADVICE}")
    if not bool(ok.all()):
        name = tensors[int((~ok).nonzero()[0])][0]
        kind = ("batch-norm statistic" if name.endswith(("running_mean", "running_var"))
                else "network value")
        raise NonFiniteLossError(f"the {kind} {name} became non-finite; {NONFINITE_ADVICE}")


def stop_if_nonfinite(meter: AverageMeter, what: str) -> None:
    """Raise NonFiniteLossError if the running value of ``meter`` is not finite on any
    process: under torchrun every process learns it from one all-reduce of a flag (not of
    the values, whose sum could overflow), so all of them stop together. One host sync;
    called at report points."""
    value = meter.avg
    bad = not math.isfinite(value)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([1.0 if bad else 0.0], device=dist_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if bad:
        check_finite(value if not math.isfinite(value) else float("nan"), what)


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------

def new_meters(topk: Sequence[int]) -> dict[str, AverageMeter]:
    return {"loss": AverageMeter(), **{f"top{k}": AverageMeter() for k in topk}}


def update_meters(meters: dict[str, AverageMeter], loss: torch.Tensor, logits: torch.Tensor,
                  target: torch.Tensor, topk: Sequence[int]) -> None:
    n = target.size(0)
    meters["loss"].update(loss, n)
    for k, acc in zip(topk, accuracy(logits, target, topk)):
        meters[f"top{k}"].update(acc, n)


def averages(meters: dict[str, AverageMeter]) -> dict[str, float]:
    """The meters' averages over all processes, and ``count`` (images)."""
    for m in meters.values():
        m.all_reduce()
    stats = {k: m.avg for k, m in meters.items()}
    stats["count"] = meters["loss"].count
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: nn.Module, device: torch.device, *,
             topk: Sequence[int] = (1,), report_freq: int = 50, desc: str = "test",
             show: bool = True, amp: str = "none", channels_last: bool = False) -> dict[str, float]:
    """Loss and top-k accuracy (percent) over ``loader`` in eval mode, summed over all
    processes: {'loss', 'top1', ('top5',) 'count'}; the model's mode is restored after.
    ``model`` returns logits, or (logits, auxiliary logits) as the evaluation networks do;
    it may be a torch.compile wrapper, but not a DDP one (shards may differ in length, so
    no collective may run per batch)."""
    training = model.training
    model.eval()
    meters = new_meters(topk)
    progress = Progress(len(loader), desc, report_freq, enabled=show)
    for step, batch in enumerate(loader, 1):
        images, target = to_device(batch, device, channels_last)
        with autocast(device, amp):
            out = model(images)
        logits = loss_precision(out[0] if isinstance(out, tuple) else out)
        update_meters(meters, criterion(logits, target), logits, target, topk)
        progress.update(step, meters)
    model.train(training)
    return averages(meters)


# ---------------------------------------------------------------------------------------
# Validation that cannot be trusted: eval-mode batch norm with unsettled statistics
# ---------------------------------------------------------------------------------------

# Share of the initial running statistics (mean 0, variance 1) still held by a stage's
# batch norms at its last epoch above which the stage was too short to settle them.
BN_LEFT_AT_END = 0.1
# Validation within this many points of chance while training is this far above it.
CHANCE_MARGIN, TRAIN_ABOVE = 2.0, 15.0


def batch_norm_updates(model) -> tuple[int, float]:
    """(fewest updates of any batch norm's running statistics, its momentum) in ``model``:
    every training forward (weight and alpha steps alike) updates them."""
    fewest, momentum = None, 0.1
    for m in model.modules():
        tracked = getattr(m, "num_batches_tracked", None)
        if tracked is not None and getattr(m, "track_running_stats", False):
            n = int(tracked)
            if fewest is None or n < fewest:
                fewest, momentum = n, m.momentum if m.momentum is not None else 0.1
    return (fewest or 0), momentum


def validation_warning(stage: int | None, epoch: int, last_epoch: bool, valid_acc: float,
                       train_acc: float, num_classes: int, bn_updates: int,
                       momentum: float = 0.1, *, training: bool = False) -> str | None:
    """A one-line warning when the alpha half's validation says little, or None.

    Faithful to the release: validation runs in eval mode, on the running batch-norm
    statistics. With few steps per stage (a small image folder) those have barely left
    their start, and validation sits at chance while training accuracy rises. Judged at a
    stage's last epoch (earlier, validation at chance is normal while the statistics settle:
    the demo's stage 1 validates at 9% in epoch 1 and 100% in epoch 4): warned when
    validation is at chance while training is well above it, or when the statistics still
    hold more than BN_LEFT_AT_END of their start. ``training``: the same rule worded for a
    training run (train_cifar.py, train_imagenet.py): its test accuracy at its last epoch,
    ``stage`` unused."""
    left = (1.0 - momentum) ** bn_updates
    chance = 100.0 / num_classes
    at_chance = valid_acc <= chance + CHANCE_MARGIN and train_acc >= valid_acc + TRAIN_ABOVE
    unsettled = left > BN_LEFT_AT_END
    if not last_epoch or not (at_chance or unsettled):
        return None
    needed = math.ceil(math.log(BN_LEFT_AT_END / 2) / math.log(1.0 - momentum))
    where, measured, scope = (("", "test accuracy", "run") if training else
                              (f"stage {stage} ", "validation accuracy", "stage"))
    head = f"WARNING {where}epoch {epoch}: {measured} {valid_acc:.2f}%"
    what = (f"{head} is at chance level ({num_classes} classes) while training accuracy is "
            f"{train_acc:.2f}%" if at_chance else f"{head} is unreliable")
    more = "use more images, more epochs or a smaller --batch_size" if training else \
        "use more images or more epochs"
    if unsettled or left > BN_LEFT_AT_END / 2:
        why = (f"after {bn_updates} batch-norm updates in this {scope} the running statistics "
               f"used by eval-mode {'testing' if training else 'validation'} still hold "
               f"{left:.0%} of their initial values (momentum {momentum:g})")
        fix = (f"{more} (about {needed} or more updates in all; each training step is one)"
               if training else
               f"{more} (about {needed} or more updates per stage; each weight and each alpha "
               "step is one)")
    else:
        why = ("the network fits the training images but not the test images (eval mode)"
               if training else "the network fits the weight half but not the alpha half (eval mode)")
        fix = more
    return f"{what}: {why}; {fix}"
