"""The plain paths: the straightforward search step and training step, as the release
computes them (every gradient filled in each backward pass, clipping parameter by
parameter, the loss read back every step). The benchmarks time the project's steps
against them, and the equivalence tests prove in float64 that the project's steps compute
the same numbers; no script runs them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def reference_search_step(model: nn.Module, batch_w: tuple[torch.Tensor, torch.Tensor],
                          batch_a: tuple[torch.Tensor, torch.Tensor] | None,
                          w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer,
                          grad_clip: float, update_arch: bool) -> tuple[float, float | None]:
    """The plain path: the straightforward search step (SPEC section 2), single process.
    Each backward pass fills every gradient, weights' and alphas' alike; clipping goes
    parameter by parameter; both losses are read back every step. Build ``model`` with
    ``batched=False, skip_zero=False`` (the release's per-edge cells, `none` computed) and
    the optimizers with ``foreach=False``. Benchmarks and equivalence tests compare
    ``train_search.search_step`` with it."""
    loss_a = (_plain_update(model, batch_a, a_opt, model.arch_parameters(), grad_clip)
              if update_arch else None)
    loss_w = _plain_update(model, batch_w, w_opt, model.weight_parameters(), grad_clip)
    return loss_w, loss_a


def _plain_update(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                  optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                  grad_clip: float) -> float:
    x, y = batch
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    nn.utils.clip_grad_norm_(params, grad_clip, foreach=False)
    optimizer.step()
    return loss.item()


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
