"""Shared by every script, as in the release's utils: meters and accuracy, progress
output, the learning-rate schedule, seeding and random states, device memory figures, and
the project's logger.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time

import torch
import torch.distributed as dist

from console import is_tty
from distributed import dist_device

LOGGER_NAME = "pdarts"
logger = logging.getLogger(LOGGER_NAME)


# ---------------------------------------------------------------------------------------
# Meters and accuracy (device-side: no host synchronisation until a value is read)
# ---------------------------------------------------------------------------------------

class AverageMeter:
    """Running average of values that may be device tensors; summed on the device and
    only read back (one sync) when ``avg`` is asked for."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum: torch.Tensor | float = 0.0
        self.count = 0

    def update(self, val, n: int = 1) -> None:
        if isinstance(val, torch.Tensor):
            val = val.detach().float()
        self.sum = self.sum + val * n
        self.count += n

    @property
    def avg(self) -> float:
        if self.count == 0:
            return 0.0
        total = self.sum.item() if isinstance(self.sum, torch.Tensor) else float(self.sum)
        return total / self.count

    def all_reduce(self) -> None:
        """Sum this meter over all ranks (call on every rank at the end of an epoch)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = self.sum.device if isinstance(self.sum, torch.Tensor) else dist_device()
        t = torch.tensor([float(self.sum) if not isinstance(self.sum, torch.Tensor) else 0.0,
                          float(self.count)], device=device, dtype=torch.float64)
        if isinstance(self.sum, torch.Tensor):
            t[0] = self.sum.to(torch.float64)
        dist.all_reduce(t)
        self.sum = t[0]
        self.count = int(t[1].item())


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[torch.Tensor]:
    """Top-k accuracies in percent, as 0-dim tensors on the output's device."""
    maxk = min(max(topk), output.shape[1])
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.eq(target.view(-1, 1))
    return [correct[:, :min(k, maxk)].any(dim=1).float().mean() * 100.0 for k in topk]


class Progress:
    """Progress over one epoch: a live bar on a terminal, plain lines otherwise (parsable
    in logs) every ``report_freq`` steps and at least every ``interval_s`` seconds, so a
    long epoch of few steps is never silent."""

    def __init__(self, total: int, desc: str, report_freq: int = 50, enabled: bool = True,
                 interval_s: float = 30.0) -> None:
        self.total = total
        self.desc = desc
        self.report_freq = max(1, report_freq)
        self.enabled = enabled
        self.tty = enabled and is_tty(sys.stdout)   # False for a closed or broken stdout
        self.start = time.time()
        self.interval_s = interval_s
        self.last_line = self.start

    def update(self, step: int, meters: dict[str, AverageMeter] | None = None) -> None:
        """``step`` counts from 1. Reading meters syncs the device, so it is only done at
        report points."""
        if not self.enabled:
            return
        if self.tty:
            if step % max(1, self.total // 100) and step != self.total:
                return
            width = 30
            done = int(width * step / max(1, self.total))
            elapsed = time.time() - self.start
            eta = elapsed / step * (self.total - step)
            extra = ""
            if meters and (step % self.report_freq == 0 or step == self.total):
                extra = " " + " ".join(f"{k} {m.avg:.3f}" for k, m in meters.items())
            sys.stdout.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] "
                             f"{step}/{self.total} eta {eta:5.0f}s{extra}   ")
            if step == self.total:
                sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            now = time.time()
            # An epoch shorter than report_freq still prints one line, at its end; a slow
            # one prints at least every interval_s (reading meters syncs: only then).
            if (step % self.report_freq == 0 or (step == self.total and self.total < self.report_freq)
                    or now - self.last_line >= self.interval_s):
                self.last_line = now
                parts = " ".join(f"{k} {m.avg:.6f}" for k, m in (meters or {}).items())
                logger.info("%s step %03d/%d %s", self.desc, step, self.total, parts)


# ---------------------------------------------------------------------------------------
# The learning-rate schedule shared by the search and the training scripts
# ---------------------------------------------------------------------------------------

def cosine_lr(lr0: float, epoch: int, epochs: int, lr_min: float = 0.0,
              stepped_before_epoch: bool = True) -> float:
    """The rate epoch ``epoch`` (0-based) of ``epochs`` trains at, set once per epoch.

    Faithful to the release: its CosineAnnealingLR is stepped at the start of every epoch
    (the PyTorch < 1.1 order), so epoch e trains at the rate of step e + 1:
    lr_min + (lr0 - lr_min) * (1 + cos(pi * (e + 1) / E)) / 2, epoch 0 already below lr0
    and the last epoch at lr_min (SPEC sections 2 and 5). ``stepped_before_epoch=False``
    gives cos(pi * e / E), this project's schedule before the correction, kept only so that
    a run begun then resumes on the schedule it began with."""
    step = epoch + 1 if stepped_before_epoch else epoch
    return lr_min + (lr0 - lr_min) * (1 + math.cos(math.pi * step / epochs)) / 2


# ---------------------------------------------------------------------------------------
# Seeding and devices
# ---------------------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:
        pass
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (run seed, stage, epoch, stream, rank)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = ((h ^ (int(part) + 0x632BE5AB)) * 0x100000001B3) % (2 ** 63 - 1)
    return h


def get_rng_state() -> dict:
    import numpy as np

    # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store
    # it as plain Python values so a checkpoint with RNG states loads safely.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory in MiB since the last reset (0 on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return 0.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
