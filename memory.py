"""Device memory: activation checkpointing of cells, the estimate printed at the start of
every search stage and of training, and out-of-memory errors as one line.

- ``run_cell(cell, *inputs, checkpointed=...)``: the networks' cell loops call every
  cell through it. With ``--checkpoint_cells`` (``model.checkpoint_cells = True``) a
  cell's activations are not kept for the backward pass; the cell's forward runs again
  there (``torch.utils.checkpoint``, non-reentrant). Nothing changes numerically: the
  random state is restored for the recomputation (the same skip-dropout and drop-path
  masks) and the recomputation leaves the batch-norm running statistics alone (they are
  updated once per forward, as without it).
- ``estimate_memory``: parameters, gradients, optimizer state and the tensors saved for
  the backward pass of one step at the configured batch, with and without
  checkpointing. The saved tensors are counted once on a batch of ``MEASURE_BATCH``
  images (``saved_tensors_hooks``, each storage once) and scaled linearly to the batch.
- ``check_fits``: on CUDA, stop before training with one line when the estimate exceeds
  the free memory (a warning when only its headroom does); ``report_out_of_memory``: the
  same advice for an out-of-memory error that happens anyway.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from errors import OutOfMemory
from speed import autocast
from utils import logger

GiB = 2 ** 30
# Images per measurement forward pass (2: batch norm needs more than one value per
# channel, and the auxiliary heads end in 1x1 maps).
MEASURE_BATCH = 2
# Needed = estimate x SAFETY: gradients of activations during the backward pass,
# temporaries, cuDNN workspaces and allocator fragmentation are not counted one by one.
SAFETY = 1.2


# ---------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _keep_running_stats(cell: nn.Module) -> Iterator[None]:
    """During a recomputation: batch norm still normalises with the batch statistics,
    and its running statistics are put back afterwards, so they are updated once per
    step as without checkpointing."""
    buffers = [b for m in cell.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)


def _recompute_contexts(cell: nn.Module):
    return contextlib.nullcontext(), _keep_running_stats(cell)


def run_cell(cell: nn.Module, *inputs, checkpointed: bool = False):
    """``cell(*inputs)``; with ``checkpointed`` (in training, with autograd on) through
    ``torch.utils.checkpoint`` with the random state preserved."""
    counter = _counter
    if not (checkpointed and cell.training and torch.is_grad_enabled()):
        if counter is None:
            return cell(*inputs)
        before = counter.bytes
        out = cell(*inputs)
        counter.largest_cell = max(counter.largest_cell, counter.bytes - before)
        return out
    if counter is not None:     # the checkpoint keeps the cell's inputs until the backward
        counter.add(*[x for x in inputs if torch.is_tensor(x)])
    if torch.compiler.is_compiling():
        # Under torch.compile the recomputation is planned by AOTAutograd, which keeps
        # buffer updates in the forward graph; it accepts no context_fn.
        return checkpoint(cell, *inputs, use_reentrant=False, preserve_rng_state=True)
    return checkpoint(cell, *inputs, use_reentrant=False, preserve_rng_state=True,
                      context_fn=partial(_recompute_contexts, cell))


# ---------------------------------------------------------------------------------------
# Counting saved activations
# ---------------------------------------------------------------------------------------

_counter: SavedTensors | None = None


class SavedTensors:
    """Bytes of the tensors autograd saves for the backward pass while active (each
    storage counted once, the model's parameters and buffers left out). ``largest_cell``:
    the most any one un-checkpointed cell saved (what a recomputation brings back)."""

    def __init__(self, model: nn.Module) -> None:
        self._skip = {t.untyped_storage().data_ptr()
                      for t in list(model.parameters()) + list(model.buffers())}
        self._seen: dict[int, int] = {}
        self.largest_cell = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def add(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._skip:
                self._seen[ptr] = storage.nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def __enter__(self) -> SavedTensors:
        global _counter
        _counter = self
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        global _counter
        self._hooks.__exit__(*exc)
        _counter = None


def set_checkpoint_cells(model: nn.Module, on: bool) -> None:
    """Turn cell checkpointing on or off (``model`` may be wrapped by DDP)."""
    getattr(model, "module", model).checkpoint_cells = bool(on)


def measure_saved_activations(model: nn.Module, input_shape: Sequence[int],
                              amp_context: Callable[[], contextlib.AbstractContextManager]
                              = contextlib.nullcontext) -> dict[str, int]:
    """Bytes saved for the backward pass by one training forward pass of ``model`` on
    ``input_shape`` (random images), without and with cell checkpointing, plus the
    largest single cell's share. The model's batch-norm statistics, mode and the random
    state are left as they were."""
    device = next(model.parameters()).device
    buffers = [b.clone() for b in model.buffers()]
    was_training, was_checkpointed = model.training, model.checkpoint_cells
    out: dict[str, int] = {}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            x = torch.randn(*input_shape, device=device)
            model.train()
            for on in (False, True):
                model.checkpoint_cells = on
                with SavedTensors(model) as counter, amp_context():
                    result = model(x)
                del result
                out["checkpointed" if on else "plain"] = counter.bytes
                if not on:
                    out["largest_cell"] = counter.largest_cell
    finally:
        model.train(was_training)
        model.checkpoint_cells = was_checkpointed
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
    return out


# ---------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------

def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer's state tensors: as stored once it has stepped, else as it will
    store them (SGD: a momentum buffer; Adam/AdamW: two moments, three with amsgrad)."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                total += _nbytes(v for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
                continue
            if isinstance(optimizer, torch.optim.SGD):
                copies = 1 if group.get("momentum", 0) else 0
            elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                copies = 3 if group.get("amsgrad") else 2
            else:
                copies = 2
            total += copies * p.numel() * torch.finfo(p.dtype).bits // 8
    return total


@dataclass
class MemoryEstimate:
    """Bytes per process for one step at ``batch`` images (per process)."""
    batch: int
    params: int
    grads: int
    optimizer: int
    activations: int                # saved for the backward pass, no checkpointing
    activations_checkpointed: int   # held with --checkpoint_cells, plus one recomputed cell

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer

    def total(self, checkpointed: bool) -> int:
        """Parameters, gradients, optimizer state and activations."""
        return self.static + (self.activations_checkpointed if checkpointed else self.activations)

    def needed(self, checkpointed: bool) -> int:
        """What to have free: the total times SAFETY."""
        return int(SAFETY * self.total(checkpointed))

    def batch_that_fits(self, available: int, checkpointed: bool) -> int:
        """The largest per-process batch whose ``needed`` is within ``available``."""
        acts = self.activations_checkpointed if checkpointed else self.activations
        per_image = acts / self.batch
        return max(0, math.floor((available / SAFETY - self.static) / per_image))

    def describe(self, checkpointed: bool) -> str:
        gib = format_bytes
        on, off = self.needed(True), self.needed(False)
        return (f"memory estimate at batch {self.batch} per process: parameters {gib(self.params)}, "
                f"gradients {gib(self.grads)}, optimizer state {gib(self.optimizer)}, saved "
                f"activations {gib(self.activations)} ({gib(self.activations_checkpointed)} with "
                f"--checkpoint_cells); needed with x{SAFETY} headroom: {gib(off)} without "
                f"checkpointing, {gib(on)} with it (checkpointing {'on' if checkpointed else 'off'})")


def estimate_memory(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                    input_shape: Sequence[int], batch: int,
                    amp_context: Callable[[], contextlib.AbstractContextManager]
                    = contextlib.nullcontext) -> MemoryEstimate:
    """The estimate for one step of ``batch`` images (per process) of ``input_shape``
    (C, H, W). Activations are measured at MEASURE_BATCH and scaled linearly."""
    saved = measure_saved_activations(model, (MEASURE_BATCH, *input_shape), amp_context)
    scale = batch / MEASURE_BATCH
    params = list(model.parameters())
    return MemoryEstimate(
        batch=batch,
        params=_nbytes(params),
        grads=_nbytes(p for p in params if p.requires_grad),
        optimizer=sum(optimizer_state_bytes(o) for o in optimizers),
        activations=int(saved["plain"] * scale),
        activations_checkpointed=int((saved["checkpointed"] + saved["largest_cell"]) * scale),
    )


# ---------------------------------------------------------------------------------------
# Will it fit? One line when it will not (or did not)
# ---------------------------------------------------------------------------------------

def free_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on ``device`` (free memory plus what its
    caching allocator holds); None on a CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


@dataclass
class MemoryPlan:
    """An estimate and the run settings the advice is written from. ``learning_rates``:
    flag -> value of the learning rates that scale with the batch (linear scaling)."""
    estimate: MemoryEstimate
    checkpointed: bool
    global_batch: int
    world_size: int
    learning_rates: dict[str, float]
    available: int | None = None

    def advice(self, available: int) -> str:
        """What to do, as one clause list: checkpointing, a smaller batch, more GPUs."""
        est, options = self.estimate, []
        if not self.checkpointed:
            fits = "fits" if est.needed(True) <= available else "does not fit either"
            options.append(f"--checkpoint_cells (same results, slower steps; "
                           f"needs {est.needed(True) / GiB:.1f} GiB: {fits})")
        per_process = est.batch_that_fits(available, True)
        if per_process >= 1:
            new_batch = per_process * self.world_size
            if new_batch >= 8:
                new_batch -= new_batch % 8
            if new_batch < self.global_batch:
                ratio = new_batch / self.global_batch
                flags = [f"--batch_size {new_batch}"] + [
                    f"{flag} {lr * ratio:.4g}" for flag, lr in self.learning_rates.items()]
                options.append(f"{' '.join(['--checkpoint_cells'] + flags)} (a new run; "
                               f"learning rates scaled linearly with the batch)")
            gpus = next(k for k in range(1, self.global_batch + 1) if self.global_batch % k == 0
                        and self.global_batch // k <= per_process)
            if gpus > self.world_size:
                options.append(f"torchrun --nproc_per_node {gpus} on {gpus} GPUs with "
                               f"--checkpoint_cells (batch and learning rates unchanged)")
        else:
            options.append("a GPU with more memory (not even one image per step fits)")
        return "; or ".join(options)


def check_fits(plan: MemoryPlan, device: torch.device,
               available_fn: Callable[[torch.device], int | None] | None = None) -> bool:
    """On CUDA: raise OutOfMemory, before anything trains, if the step surely will not fit
    (the estimate without headroom exceeds the free memory); return False, after a
    warning, if it fits only without the headroom; True otherwise (and on a CPU)."""
    available = (available_fn or free_memory)(device)
    plan.available = available
    if available is None:
        return True
    est = plan.estimate
    bare = est.total(plan.checkpointed)
    if bare > available:
        raise OutOfMemory(
            f"one step at batch {est.batch} per process needs about {bare / GiB:.1f} GiB of GPU "
            f"memory ({est.needed(plan.checkpointed) / GiB:.1f} GiB with headroom), "
            f"{available / GiB:.1f} GiB are free on {device}: use {plan.advice(available)}")
    if est.needed(plan.checkpointed) > available:
        logger.warning("the step may not fit: about %.1f GiB needed (%.1f GiB with headroom), "
                       "%.1f GiB free on %s; if it runs out of memory, use %s", bare / GiB,
                       est.needed(plan.checkpointed) / GiB, available / GiB, device,
                       plan.advice(available))
        return False
    return True


def plan_memory(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                input_shape: Sequence[int], batch: int, global_batch: int, world_size: int,
                learning_rates: dict[str, float], checkpointed: bool, device: torch.device,
                amp: str = "none") -> MemoryPlan:
    """Estimate one step's memory, log it, and on CUDA stop (OutOfMemory) if it will not
    fit. Call it when the network and its optimizers exist, before training."""
    try:
        estimate = estimate_memory(model, optimizers, input_shape, batch,
                                   partial(autocast, device, amp))
    except torch.OutOfMemoryError:
        raise OutOfMemory(f"CUDA out of memory while measuring the activations of "
                          f"{MEASURE_BATCH} images: {device} is (nearly) full; free it, or use a "
                          f"GPU with more memory") from None
    logger.info(estimate.describe(checkpointed))
    plan = MemoryPlan(estimate, checkpointed, global_batch, world_size, learning_rates)
    if check_fits(plan, device) and plan.available is not None:
        logger.info("%.1f GiB free on %s: the step fits", plan.available / GiB, device)
    return plan


@contextlib.contextmanager
def report_out_of_memory(plan: MemoryPlan | None, where: str,
                         checkpoint_path: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into OutOfMemory: one line saying where it
    happened, what was estimated, where the last good checkpoint is and what to do."""
    try:
        yield
    except torch.OutOfMemoryError:
        text = f"CUDA out of memory in {where}"
        if plan is not None and plan.available is not None:
            text += (f" (estimated {plan.estimate.needed(plan.checkpointed) / GiB:.1f} GiB, "
                     f"{plan.available / GiB:.1f} GiB were free)")
        run_dir = os.path.dirname(os.path.abspath(checkpoint_path))
        if os.path.isfile(checkpoint_path):
            text += (f"; the last completed epoch is saved in {checkpoint_path}: --resume "
                     f"{run_dir} --checkpoint_cells continues from it")
        else:
            text += "; no epoch was completed, nothing was saved"
        if plan is not None and plan.available is not None:
            text += f"; or use {plan.advice(plan.available)}"
        elif plan is not None and not plan.checkpointed:
            text += "; or use --checkpoint_cells, a smaller --batch_size or more GPUs (torchrun)"
        raise OutOfMemory(text) from None
