"""Opt-in speed features shared by the search and the training scripts.

- ``--amp bf16|fp16``: autocast of the forward pass. Parameters (alphas included),
  optimizer state and batch-norm running statistics stay float32; softmax runs in
  float32 under autocast. fp16 uses a gradient scaler. Changes numerics (rounding).
- ``--channels_last``: NHWC memory layout for the network and the inputs. Same maths,
  different kernels (results equal up to float rounding).
- ``--compile``: ``torch.compile`` of the network's forward. Same maths, fused kernels
  (results equal up to float rounding); the first steps are slow while it compiles.
- ``--checkpoint_cells`` (memory, not speed; see memory.py): recompute each cell in the
  backward pass. Identical results, less memory, slower steps. Combines with the above.

None of them is on by default: the defaults reproduce the paper's float32 numerics.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn as nn

from errors import UserError


def add_speed_args(parser: argparse.ArgumentParser, channels_last_default: bool | None = False) -> None:
    """The opt-in speed flags. With ``channels_last_default=None`` the script sets the
    default itself (the search's --demo turns channels_last on) and ``--no-channels_last``
    exists too."""
    group = parser.add_argument_group("speed (opt-in; each changes float rounding, see README)")
    group.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                       help="mixed precision autocast; weights, alphas, BN statistics and "
                            "optimizer state stay float32 (default: none = float32)")
    group.add_argument("--channels_last", default=channels_last_default,
                       action="store_true" if channels_last_default is not None
                       else argparse.BooleanOptionalAction,
                       help="NHWC memory layout for network and inputs" +
                       ("" if channels_last_default is not None else
                        " (default off; on with --demo, where the CPU gains most from it)"))
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
