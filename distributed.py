"""Data-parallel runs under torchrun: the process group (NCCL on GPU, gloo on CPU, every
collective bounded by ``--dist_timeout``), and the few collectives the scripts use:
barrier, broadcast of an object or a model, gather, gradient averaging, batch-norm
buffer sync. Single-process runs call the same functions; they do nothing there.
"""
from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from errors import UserError
from flags import positive_float


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_device() -> torch.device:
    """Where a collective's tensors live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Seconds a collective may wait for the other processes before the job stops: a killed
# or stopped process then ends the job in minutes, not after torch's 10-30 min default.
# It must exceed the longest gap between collectives: one step (the first one compiles
# under --compile) and rank 0 writing a checkpoint.
DIST_TIMEOUT_S = 300


def add_dist_timeout_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--dist_timeout", type=positive_float, default=DIST_TIMEOUT_S, metavar="SECONDS",
                        help="under torchrun: stop when a process waits this long for the "
                             "others (one was killed or hangs); raise it if a step or a "
                             "checkpoint write takes longer")


def init_distributed(device_arg: str = "auto", timeout_s: float = DIST_TIMEOUT_S) -> DistInfo:
    """Single process unless launched by torchrun (WORLD_SIZE > 1). NCCL on GPU, gloo on
    CPU. ``device_arg`` is ``auto``, ``cpu`` or ``cuda``; ``timeout_s`` bounds every
    collective."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if not timeout_s > 0:
            raise UserError(f"--dist_timeout must be a positive number of seconds (got {timeout_s})")
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except getattr(dist, "DistNetworkError", dist.DistError) as e:   # torch >= 2.2 has the first
            # Before the job exists no other process can be blamed: the rendezvous itself failed.
            raise UserError(rendezvous_failure(e)) from None
    return DistInfo(rank, world_size, local_rank, device)


def rendezvous_failure(e: Exception) -> str:
    """One line for a process group that could not be formed: the address it tried."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return (f"the rendezvous address {where} (MASTER_ADDR:MASTER_PORT) of this torchrun job cannot "
            f"be reached ({first}); check the host name and port (torchrun --master_addr / "
            "--master_port, or --rdzv_endpoint) and that the master node is up")


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank (identity when single)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (batch-norm running statistics) before
    evaluating or saving: each process updated its own copy with its own batches, so
    without this the figures would depend on how the data was split over the processes."""
    if dist.is_available() and dist.is_initialized():
        for buf in model.buffers():
            dist.broadcast(buf, 0)


# Deviation: data-parallel with torchrun and hand-averaged gradients (the release used
# DataParallel). No DistributedDataParallel wrapper: its reducer does not fit a step that
# differentiates two parameter groups separately.
def average_gradients(params: Sequence[torch.Tensor], world_size: int) -> None:
    """Average the gradients of ``params`` over all ranks with one all_reduce. Parameters
    without a gradient are left out (every rank runs the same network, so the same ones)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p)
        offset += g.numel()


def gather(obj, env: DistInfo) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` when single)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_model(model: nn.Module) -> None:
    """Every rank starts a stage from rank 0's weights and alphas."""
    for t in model.state_dict().values():
        dist.broadcast(t, 0)


# How gloo and NCCL report a peer that died or stopped answering (gloo raises a plain
# RuntimeError, newer code paths DistError).
_COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                        "Application timeout caused pair closure", "NCCL", "gloo", "ProcessGroup")


def is_collective_failure(e: RuntimeError) -> bool:
    """Whether ``e`` says another process of the job died or stopped answering."""
    if isinstance(e, dist.DistError):
        return True
    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and any(s in str(e) for s in _COLLECTIVE_FAILURES))
