"""Opt-in speed features shared by the search and the training scripts.

- ``--amp bf16|fp16``: autocast of the forward pass. Parameters (alphas included),
  optimizer state and batch-norm running statistics stay float32; softmax runs in
  float32 under autocast. fp16 uses a gradient scaler. Changes numerics (rounding).
- ``--channels_last``: NHWC memory layout for the network and the inputs. Same maths,
  different kernels (results equal up to float rounding). On by default on the CPU, where
  it is faster: for training (``default_channels_last``) and for the search's per-edge
  cells (``search_layout``); ``--no-channels_last`` turns it off.
- ``--compile``: ``torch.compile`` of the network's forward. Same maths, fused kernels
  (results equal up to float rounding); the first steps are slow while it compiles.
- ``--checkpoint_cells`` (memory, not speed; see memory.py): recompute each cell in the
  backward pass. Identical results, less memory, slower steps. Combines with the above.

Apart from channels_last on the CPU none of them is on by default: the defaults compute
the paper's float32 maths, in the memory layout that is fastest on the device.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn as nn

from errors import UserError


def add_speed_args(parser: argparse.ArgumentParser, channels_last_help: str) -> None:
    """The speed flags. ``--channels_last`` / ``--no-channels_last`` default to None: the
    script resolves it (the device, the cell layout, --demo), as ``channels_last_help``
    says."""
    group = parser.add_argument_group("speed (each changes float rounding, see README)")
    group.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                       help="mixed precision autocast; weights, alphas, BN statistics and "
                            "optimizer state stay float32 (default: none = float32)")
    group.add_argument("--channels_last", default=None, action=argparse.BooleanOptionalAction,
                       help="NHWC memory layout for network and inputs" + channels_last_help)
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the network; compiling takes minutes per graph, "
                            "more on a CPU: for GPUs and long runs")
    group = parser.add_argument_group("memory (opt-in; results unchanged)")
    group.add_argument("--checkpoint_cells", action="store_true",
                       help="recompute each cell's activations in the backward pass instead of "
                            "keeping them (activation checkpointing): far less memory, same "
                            "numbers, slower steps")


def check_amp(device: torch.device, amp: str) -> None:
    """Refuse an ``--amp`` the device cannot run (call it before a run creates files)."""
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")


def autocast(device: torch.device, amp: str):
    """A context for the forward pass: a no-op unless ``amp`` is bf16 or fp16."""
    if amp in (None, "none"):
        return contextlib.nullcontext()
    check_amp(device, amp)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def loss_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the loss and the accuracy take them: half precision (from ``--amp``)
    promoted to float32; float32 and float64 unchanged, so a float64 network's step
    stays float64 (the equivalence tests rely on it)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def grad_scaler(device: torch.device, amp: str):
    """A GradScaler for fp16 (None otherwise: bf16 and float32 need no loss scaling)."""
    if amp == "fp16":
        return torch.amp.GradScaler(device.type)
    return None


def prepare_model(model: nn.Module, channels_last: bool = False, compile_model: bool = False):
    """Apply channels_last / torch.compile; returns the module to call for forward passes
    (the original ``model`` keeps owning the parameters and the state dict)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_model:
        return torch.compile(model)
    return model


def prepare_input(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --cell_layout auto on the CPU: the per-edge cells in channels_last from this many
# elements per cell op tensor (images per process x C x side x side, at the first cells)
# on; below it the batched cell, whose fewer operators win on tiny tensors. Measured on 2
# cores (benchmarks/RESULTS.md, issue 35), per-edge NHWC against batched: at 51,200 (the
# demo's size) 0.59-0.95x, at 131,072 1.32x at stage 1 and 0.94x at stage 3, at 524,288
# (batch 32 at the paper's C and size) 1.7-2.2x.
PER_EDGE_FROM_ELEMENTS = 2 ** 17


def search_layout(device: torch.device, images: int, channels: int,
                  side: int) -> tuple[str, bool | None, str]:
    """What ``--cell_layout auto`` runs for a search of ``images`` per process per step,
    ``channels`` (C of stage 1) and ``side`` (the first cells' map side) on ``device``:
    (cell layout, channels_last or None to leave the flag's value, why, for the log).
    Every layout computes the same maths; only float rounding differs between them."""
    if device.type != "cpu":
        return "batched", None, (f"--cell_layout auto: batched on {device.type} (a third of "
                                 "the release's operators per step)")
    elements = images * channels * side * side
    if elements >= PER_EDGE_FROM_ELEMENTS:
        return "per_edge", True, (f"--cell_layout auto: per_edge on the CPU "
                                  f"({images} images x C {channels} x {side}x{side} = {elements:,} "
                                  f"elements per op, at least {PER_EDGE_FROM_ELEMENTS:,})")
    return "batched", None, (f"--cell_layout auto: batched on the CPU ({images} images x C "
                             f"{channels} x {side}x{side} = {elements:,} elements per op, under "
                             f"{PER_EDGE_FROM_ELEMENTS:,}: tiny ops, where fewer of them win)")


def default_channels_last(device: torch.device) -> bool:
    """Training's memory format when ``--channels_last`` is not given: NHWC on the CPU,
    where the training step is about 1.4x faster in it (the 20-cell CIFAR and the 14-cell
    ImageNet networks, benchmarks/RESULTS.md, issue 35); NCHW on CUDA, as before."""
    return device.type == "cpu"
