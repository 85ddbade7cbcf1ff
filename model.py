"""Evaluation networks built from a genotype (SPEC section 4).

``NetworkCIFAR(C, num_classes, layers, auxiliary, genotype)`` and
``NetworkImageNet(C, num_classes, layers, auxiliary, genotype)`` keep the release's
module names, so the authors' checkpoints load with ``strict=True``. ``forward`` returns
``(logits, logits_aux)``; ``logits_aux`` is None unless training with ``auxiliary``.
Set ``model.drop_path_prob`` before each epoch.

``model_summary`` counts parameters (with and without the auxiliary head) and forward
multiply-adds with torch alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from genotypes import Genotype
from memory import run_cell
from operations import OPS, FactorizedReduce, Identity, ReLUConvBN


def drop_path(x: torch.Tensor, drop_prob: float | torch.Tensor) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob`` (a number or a 0-dim tensor)
    and scale survivors by 1 / (1 - drop_prob). Works on any device and dtype."""
    if not torch.is_tensor(drop_prob) and drop_prob <= 0.0:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep_prob)
    return x / keep_prob * mask


class Cell(nn.Module):
    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        if reduction:
            op_names, indices = zip(*genotype.reduce, strict=False)
            concat = genotype.reduce_concat
        else:
            op_names, indices = zip(*genotype.normal, strict=False)
            concat = genotype.normal_concat
        self._steps = len(op_names) // 2
        self._concat = list(concat)
        self.multiplier = len(self._concat)
        self.reduction = reduction
        self._ops = nn.ModuleList()
        for name, index in zip(op_names, indices, strict=False):
            stride = 2 if reduction and index < 2 else 1
            self._ops.append(OPS[name](C, stride, True))
        self._indices = list(indices)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float | torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            hs = []
            for k in (2 * i, 2 * i + 1):
                op = self._ops[k]
                h = op(states[self._indices[k]])
                if self.training and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier on the 8x8 feature map after cell 2*layers//3."""

    def __init__(self, C: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),  # 8x8 -> 2x2
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _AuxPool(nn.AvgPool2d):
    """The ImageNet auxiliary head's average pool 5 stride 2, which makes 2x2 of the 7x7
    map of 224-pixel images (and of 8x8). Deviation (other image sizes only): any other
    map is averaged to 2x2 adaptively, so the head fits any --image_size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] in ((7, 7), (8, 8)):
            return super().forward(x)
        return F.adaptive_avg_pool2d(x, 2)


class AuxiliaryHeadImageNet(nn.Module):
    """Auxiliary classifier on the map after the second reduction cell, 7x7 at 224 pixels
    (the authors' checkpoint has the BatchNorm after the 768-channel conv)."""

    def __init__(self, C: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            _AuxPool(5, stride=2, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _EvalNetwork(nn.Module):
    """Shared cell stack of the CIFAR and ImageNet networks.

    ``drop_path_prob`` is a settable number; the forward pass reads it from a tensor
    (and only whether it is zero as a Python value), so changing it every epoch does not
    recompile a ``torch.compile``d network.

    ``checkpoint_cells``: recompute each cell's activations in the backward pass instead
    of keeping them (memory.run_cell; same results, less memory)."""

    checkpoint_cells = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_drop_path_rate", torch.zeros(()), persistent=False)
        self.drop_path_prob = 0.0

    @property
    def drop_path_prob(self) -> float:
        return self._drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, value: float) -> None:
        self._drop_path_prob = float(value)
        self._drop_path_on = self._drop_path_prob > 0.0
        self._drop_path_rate.fill_(self._drop_path_prob)

    def drop_auxiliary_head(self) -> None:
        """Remove the auxiliary head for inference and export: it serves only training
        (eval mode never runs it), and without it an exported file holds no dead weights."""
        if self._auxiliary:
            del self.auxiliary_head
            self._auxiliary = False

    def _build_cells(self, C: int, C_stem: int, layers: int, genotype: Genotype,
                     reduction_prev: bool) -> int:
        """Build ``self.cells``; return the channels seen by the auxiliary head."""
        C_prev_prev, C_prev, C_curr = C_stem, C_stem, C
        self.cells = nn.ModuleList()
        C_to_auxiliary = C_prev
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_to_auxiliary = C_prev
        self._C_final = C_prev
        return C_to_auxiliary

    def _cells_forward(self, s0: torch.Tensor, s1: torch.Tensor):
        logits_aux = None
        for i, cell in enumerate(self.cells):
            drop_prob = self._drop_path_rate if self._drop_path_on else 0.0
            s0, s1 = s1, run_cell(cell, s0, s1, drop_prob, checkpointed=self.checkpoint_cells)
            if i == 2 * self._layers // 3 and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        return s1, logits_aux


class NetworkCIFAR(_EvalNetwork):
    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool,
                 genotype: Genotype) -> None:
        super().__init__()
        self._layers = layers
        self._auxiliary = auxiliary
        stem_multiplier = 3
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_aux = self._build_cells(C, C_curr, layers, genotype, reduction_prev=False)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(C_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self._C_final, num_classes)

    def forward(self, x: torch.Tensor):
        s = self.stem(x)
        out, logits_aux = self._cells_forward(s, s)
        logits = self.classifier(self.global_pooling(out).flatten(1))
        return logits, logits_aux


class NetworkImageNet(_EvalNetwork):
    def __init__(self, C: int, num_classes: int, layers: int, auxiliary: bool,
                 genotype: Genotype) -> None:
        super().__init__()
        self._layers = layers
        self._auxiliary = auxiliary
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        # The first cell treats its inputs as coming after a reduction.
        C_aux = self._build_cells(C, C, layers, genotype, reduction_prev=True)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadImageNet(C_aux, num_classes)
        self.global_pooling = nn.AvgPool2d(7)
        self.classifier = nn.Linear(self._C_final, num_classes)

    def forward(self, x: torch.Tensor):
        s0 = self.stem0(x)
        s1 = self.stem1(s0)
        out, logits_aux = self._cells_forward(s0, s1)
        # Deviation (other image sizes only): the release's 7x7 pooling needs 224 pixels;
        # any other final map is averaged adaptively (not bitwise the same at 7x7).
        pooled = (self.global_pooling(out) if out.shape[-2:] == (7, 7)
                  else F.adaptive_avg_pool2d(out, 1))
        logits = self.classifier(pooled.flatten(1))
        return logits, logits_aux


# ---------------------------------------------------------------------------------------
# Size and cost
# ---------------------------------------------------------------------------------------

def count_parameters(model: nn.Module, include_auxiliary: bool = False) -> int:
    """Number of parameters; the auxiliary head is left out unless asked for."""
    return sum(p.numel() for name, p in model.named_parameters()
               if include_auxiliary or "auxiliary" not in name)


def count_multiply_adds(model: nn.Module, input_size: tuple[int, int, int, int]) -> int:
    """Forward multiply-adds of convolutions and linear layers, counted by hooks on one
    eval-mode forward pass (auxiliary head inactive). BN, pooling and additions are not
    counted: the paper's 557M for PDARTS on ImageNet counts some of these; this counts
    542.8M."""
    total = 0

    def conv_hook(m: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += output.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += output.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // input_size[0]


def model_summary(model: nn.Module, input_size: tuple[int, int, int, int]) -> dict[str, int]:
    """Parameters with and without the auxiliary head, and forward multiply-adds per image."""
    return {
        "params": count_parameters(model),
        "params_with_aux": count_parameters(model, include_auxiliary=True),
        "multiply_adds": count_multiply_adds(model, input_size),
    }


def format_summary(summary: dict[str, int]) -> str:
    return (f"param size = {summary['params'] / 1e6:.6f}M "
            f"({summary['params']:,} parameters without the auxiliary head, "
            f"{summary['params_with_aux']:,} with it), "
            f"multiply-adds = {summary['multiply_adds'] / 1e6:.1f}M per image")
