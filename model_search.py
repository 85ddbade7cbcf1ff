"""The P-DARTS search network and the pure functions over switches and alphas.

``Network(C, num_classes, layers, switches_normal, switches_reduce)`` builds a search
network whose mixed edges hold exactly the ops switched on (14 rows of 8 booleans per
cell type, PRIMITIVES order). Alphas have shape 14 x (ops on). A stride-1
``skip_connect`` is followed by skip-connect dropout whose rate ``set_drop_rate`` changes
between epochs (paper Sec. 3.3, "search space regularization").

The functions at the end prune ops after a stage, derive the final cell and restrict
the number of skip-connects (paper Sec. 3.3, "architecture refinement"). They do no I/O.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from genotypes import PRIMITIVES, Genotype
from memory import run_cell
from operations import OPS, FactorizedReduce, Identity, ReLUConvBN

NONE = PRIMITIVES.index("none")
SKIP = PRIMITIVES.index("skip_connect")
STEPS = 4  # intermediate nodes per cell
NUM_EDGES = sum(2 + i for i in range(STEPS))  # 14

Switches = list[list[bool]]


def all_on_switches() -> Switches:
    return [[True] * len(PRIMITIVES) for _ in range(NUM_EDGES)]


def ops_on(row: Sequence[bool]) -> list[int]:
    """PRIMITIVES indices switched on in one edge's row."""
    return [k for k, on in enumerate(row) if on]


class SkipDropout(nn.Module):
    """Element-wise dropout, as ``nn.Dropout(p)``, whose rate ``p`` can change between
    epochs without rebuilding the network and without recompiling it under
    ``torch.compile``: the rate lives in a tensor, and only whether it is zero is a
    Python value the compiled graph depends on."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("rate", torch.zeros(()), persistent=False)
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"skip-connect dropout rate must be in [0, 1), got {value}")
        self._p = value
        self.active = value > 0.0
        self.rate.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.active):
            return x
        keep = 1.0 - self.rate
        return x * (torch.empty_like(x).bernoulli_(keep) / keep)

    def extra_repr(self) -> str:
        return f"p={self._p}"


class MixedOp(nn.Module):
    """Eq. (1) of the paper: sum over the ops switched on of softmax(alpha)[o] * o(x).

    With ``skip_zero`` (the default) the ``none`` op is not computed: its output is zero,
    so it adds nothing to the sum and nothing to any gradient, while its alpha still
    takes part in the softmax. The result is identical to computing it.
    """

    def __init__(self, C: int, stride: int, switch: Sequence[bool], drop_rate: float = 0.0,
                 skip_zero: bool = True) -> None:
        super().__init__()
        self.op_indices = ops_on(switch)
        if not self.op_indices:
            raise ValueError("an edge needs at least one op switched on")
        self.skip_zero = skip_zero
        self.m_ops = nn.ModuleList()
        for k in self.op_indices:
            op = OPS[PRIMITIVES[k]](C, stride, False)
            if "pool" in PRIMITIVES[k]:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            elif isinstance(op, Identity):
                # Skip-connect dropout (paper Sec. 3.3) after every stride-1 skip.
                op = nn.Sequential(op, SkipDropout(drop_rate))
            self.m_ops.append(op)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = None
        for k, w, op in zip(self.op_indices, weights.unbind(0), self.m_ops, strict=False):
            if self.skip_zero and k == NONE:
                continue
            y = w * op(x)
            out = y if out is None else out + y
        if out is None:  # only `none` is on: the edge outputs zeros of the right shape
            out = self.m_ops[0](x) * weights[0]
        return out


class Cell(nn.Module):
    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, switches: Switches,
                 drop_rate: float = 0.0, skip_zero: bool = True) -> None:
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self.cell_ops = nn.ModuleList()
        edge = 0
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.cell_ops.append(MixedOp(C, stride, switches[edge], drop_rate, skip_zero))
                edge += 1

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            s = None
            for j, h in enumerate(states):
                y = self.cell_ops[offset + j](h, weights[offset + j])
                s = y if s is None else s + y
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
    """The search network: stem, ``layers`` cells (reduction at 1/3 and 2/3 of the
    depth), global pooling, classifier. Normal cells share ``alphas_normal``, reduction
    cells ``alphas_reduce``. ``checkpoint_cells``: recompute each cell's activations in
    the backward pass instead of keeping them (memory.run_cell; same results)."""

    checkpoint_cells = False

    def __init__(self, C: int, num_classes: int, layers: int, switches_normal: Switches,
                 switches_reduce: Switches, drop_rate: float = 0.0, steps: int = STEPS,
                 multiplier: int = 4, stem_multiplier: int = 3, skip_zero: bool = True) -> None:
        super().__init__()
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._steps = steps
        self._multiplier = multiplier
        self.switches_normal = [list(map(bool, r)) for r in switches_normal]
        self.switches_reduce = [list(map(bool, r)) for r in switches_reduce]
        num_normal = _ops_per_edge(self.switches_normal, "switches_normal")
        num_reduce = _ops_per_edge(self.switches_reduce, "switches_reduce")

        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
            nn.BatchNorm2d(C_curr),
        )
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            switches = self.switches_reduce if reduction else self.switches_normal
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                        reduction_prev, switches, drop_rate, skip_zero)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(NUM_EDGES, num_normal))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(NUM_EDGES, num_reduce))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights_normal = F.softmax(self.alphas_normal, dim=-1)
        weights_reduce = F.softmax(self.alphas_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            weights = weights_reduce if cell.reduction else weights_normal
            s0, s1 = s1, run_cell(cell, s0, s1, weights, checkpointed=self.checkpoint_cells)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1))

    def set_drop_rate(self, p: float) -> None:
        """Set the skip-connect dropout rate of every stride-1 skip (no rebuild needed)."""
        for m in self.modules():
            if isinstance(m, SkipDropout):
                m.p = p

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def arch_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(alphas) for normal and reduction cells, detached, float32, on the CPU."""
        with torch.no_grad():
            return (F.softmax(self.alphas_normal.float(), dim=-1).cpu(),
                    F.softmax(self.alphas_reduce.float(), dim=-1).cpu())


def _ops_per_edge(switches: Switches, name: str) -> int:
    if len(switches) != NUM_EDGES or any(len(r) != len(PRIMITIVES) for r in switches):
        raise ValueError(f"{name} must be {NUM_EDGES} rows of {len(PRIMITIVES)} booleans")
    counts = {sum(r) for r in switches}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"{name}: every edge must have the same, non-zero number of ops on, "
                         f"got {sorted(counts)}")
    return counts.pop()


# ---------------------------------------------------------------------------------------
# Pruning and derivation: pure functions over switches and softmax weights.
# `probs` is a 14 x (ops on) array-like whose columns follow the ops on in each row.
# Ties are broken as the release's repeated argmin does: among equal weights the earlier
# op (or edge) is dropped first, so the later one is kept.
# ---------------------------------------------------------------------------------------

def _as_rows(probs) -> list[list[float]]:
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().float().cpu().tolist()
    return [[float(v) for v in row] for row in probs]


def _check_rows(switches: Switches, probs: list[list[float]]) -> None:
    if len(probs) != len(switches):
        raise ValueError(f"expected {len(switches)} rows of weights, got {len(probs)}")
    for e, (row, p) in enumerate(zip(switches, probs, strict=False)):
        if len(p) != sum(row):
            raise ValueError(f"edge {e}: {sum(row)} ops are on but {len(p)} weights were given")


def prune_switches(switches: Switches, probs, num_drop: int, drop_none: bool = False) -> Switches:
    """Switch off the ``num_drop`` lowest-weighted ops of every edge (paper Sec. 3.2).
    With ``drop_none`` (after the last stage) ``none`` is dropped first if it is on, then
    the ``num_drop - 1`` lowest of the rest."""
    rows = _as_rows(probs)
    _check_rows(switches, rows)
    out = [list(r) for r in switches]
    for e, (row, p) in enumerate(zip(switches, rows, strict=False)):
        idxs = ops_on(row)
        if num_drop >= len(idxs):
            raise ValueError(f"edge {e}: cannot drop {num_drop} of {len(idxs)} ops")
        candidates = list(range(len(idxs)))
        drop = []
        if drop_none and idxs[0] == NONE:
            drop.append(0)
            candidates.remove(0)
        ranked = sorted(candidates, key=lambda c: p[c])  # stable: earlier first among ties
        drop += ranked[: num_drop - len(drop)]
        for c in drop:
            out[e][idxs[c]] = False
    return out


def zero_none(switches: Switches, probs) -> list[list[float]]:
    """Copy of ``probs`` with the weight of ``none`` set to 0 where it is on, so that it
    is never chosen and never makes an edge look strong."""
    rows = _as_rows(probs)
    _check_rows(switches, rows)
    for row, p in zip(switches, rows, strict=False):
        if row[NONE]:
            p[0] = 0.0
    return rows


def keep_best_op(switches: Switches, probs: list[list[float]]) -> Switches:
    """Per edge keep only the op with the largest weight among those on (``none`` must
    already be zeroed by ``zero_none``)."""
    out = []
    for row, p in zip(switches, probs, strict=False):
        idxs = ops_on(row)
        best = max(range(len(idxs)), key=lambda c: (p[c], c))  # ties: the later op
        out.append([k == idxs[best] for k in range(len(PRIMITIVES))])
    return out


def keep_two_edges(switches: Switches, probs: list[list[float]], steps: int = STEPS) -> Switches:
    """Per intermediate node keep its 2 strongest incoming edges (strength: the largest
    weight on the edge); switch every op of the other edges off."""
    strength = [max(p) for p in probs]
    out = [list(r) for r in switches]
    start = 0
    for i in range(steps):
        n = 2 + i
        edges = list(range(start, start + n))
        kept = sorted(edges, key=lambda e: (strength[e], e))[-2:]
        for e in edges:
            if e not in kept:
                out[e] = [False] * len(PRIMITIVES)
        start += n
    return out


def count_skips(switches: Switches) -> int:
    return sum(1 for row in switches if row[SKIP])


def switches_to_pairs(switches: Switches, steps: int = STEPS) -> list[tuple[str, int]]:
    """(op, input) pairs for a cell whose edges have at most one op on, in edge order."""
    pairs = []
    start = 0
    for i in range(steps):
        n = 2 + i
        for e in range(start, start + n):
            for k in ops_on(switches[e]):
                pairs.append((PRIMITIVES[k], e - start))
        start += n
    return pairs


def derive_cell_switches(switches: Switches, probs, max_skip: int | None = None) -> Switches:
    """The final cell of one cell type, as switches with one op on per kept edge.

    ``switches`` and ``probs`` are those of the last stage. With ``max_skip`` the number
    of skip-connects is then restricted (paper Sec. 3.3): repeatedly zero the weight of
    the weakest chosen skip-connect and re-pick every edge's op and every node's 2 edges.
    """
    p = zero_none(switches, probs)
    final = keep_two_edges(keep_best_op(switches, p), p)
    if max_skip is None:
        return final
    while count_skips(final) > max_skip:
        skip_edges = [e for e, row in enumerate(final) if row[SKIP]]
        # Column of skip_connect in each edge's weights = ops on before it.
        col = {e: sum(switches[e][:SKIP]) for e in skip_edges}
        weakest = min(skip_edges, key=lambda e: (p[e][col[e]], e))  # ties: the earlier edge
        p[weakest][col[weakest]] = 0.0
        final = keep_two_edges(keep_best_op(switches, p), p)
    return final


def derive_genotype(switches_normal: Switches, switches_reduce: Switches, probs_normal,
                    probs_reduce, max_skip: int | None = None) -> Genotype:
    """The cell from the last stage's switches and softmax weights. The skip-connect
    restriction applies to the normal cell only, as in the release."""
    normal = derive_cell_switches(switches_normal, probs_normal, max_skip)
    reduce = derive_cell_switches(switches_reduce, probs_reduce, None)
    concat = list(range(2, 2 + STEPS))
    return Genotype(normal=switches_to_pairs(normal), normal_concat=concat,
                    reduce=switches_to_pairs(reduce), reduce_concat=concat)


def skip_budget_genotypes(switches_normal: Switches, switches_reduce: Switches, probs_normal,
                          probs_reduce) -> list[tuple[int, Genotype]]:
    """The release's refinement log: for every budget M from 8 down to 0 for which the
    unrestricted cell has more than M skip-connects, the cell restricted to M."""
    unrestricted = derive_cell_switches(switches_normal, probs_normal, None)
    n = count_skips(unrestricted)
    return [(m, derive_genotype(switches_normal, switches_reduce, probs_normal, probs_reduce, m))
            for m in range(8, -1, -1) if n > m]
