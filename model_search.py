"""The P-DARTS search network.

``Network(C, num_classes, layers, switches_normal, switches_reduce)`` builds a search
network whose mixed edges hold exactly the ops switched on (14 rows of 8 booleans per
cell type, PRIMITIVES order). Alphas have shape 14 x (ops on). A stride-1
``skip_connect`` is followed by skip-connect dropout whose rate ``set_drop_rate`` changes
between epochs (paper Sec. 3.3, "search space regularization").

Three cells compute the same thing. ``Cell`` (with ``MixedOp``) runs the 14 edges one by
one, op by op, as the release does: the plain path (``Network(..., batched=False)``).
``BatchedCell``, the default, runs the edges that read the same input and have the same
op switched on as one op over their inputs stacked on channels, and mixes all of them
into the nodes with one matrix product: about a third of the operators per step, which
is what bounds the search on a GPU. ``PerEdgeCell`` (``cell_layout="per_edge"``) is
``Cell`` with what edges reading the same input compute alike done once: in
channels_last, the fastest on a CPU at the paper's sizes (``--cell_layout``). Every
layout's ``state_dict`` is the release's layout.

The rules that prune ops after a stage and derive the final cell from the alphas are
in derivation.py; they need no network.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from derivation import NONE, NUM_EDGES, STEPS, Switches, ops_on
from genotypes import PRIMITIVES
from memory import run_cell
from operations import OPS, DilConv, FactorizedReduce, Identity, ReLUConvBN, SepConv


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


# The per-edge cell's work items: what an (edge, op) computes from the state it reads.
_RELU, _POOL, _AS_IS = "relu", "pool", "as_is"


class PerEdgeCell(Cell):
    """``Cell``'s modules, parameters, state-dict keys and initial weights, and its sums
    edge by edge, op by op (`none` skipped), with what the edges reading the same state
    would compute alike done once: the ReLU that starts every convolution op (and the
    stride-2 skip), and each pooling (pooling has no parameters; each edge keeps its own
    batch norm after it). Each weighted output is added to its node in one fused
    multiply-add. The same maths as ``Cell``; the sums are added in another order, so
    float32 rounding differs. On the CPU with channels_last this is the fastest layout at
    the paper's sizes: unlike the batched cell's stacked tensors, every op's input and
    output stay NHWC (benchmarks/RESULTS.md, issue 35)."""

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, switches: Switches,
                 drop_rate: float = 0.0) -> None:
        super().__init__(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev,
                         switches, drop_rate, skip_zero=True)
        # Per edge: (position among its ops on, kind, module, PRIMITIVES index), `none` left
        # out. Plain lists: the modules stay registered only where Cell put them.
        self._work = []
        for mixed in self.cell_ops:
            items = []
            for pos, (k, op) in enumerate(zip(mixed.op_indices, mixed.m_ops, strict=True)):
                if k == NONE:
                    continue
                if isinstance(op, (SepConv, DilConv, FactorizedReduce)):
                    items.append((pos, _RELU, op.after_relu, k))
                elif "pool" in PRIMITIVES[k]:
                    items.append((pos, _POOL, op, k))      # Sequential(pool, BN)
                else:
                    items.append((pos, _AS_IS, op, k))     # skip (+ its dropout)
            self._work.append(items)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        rows = weights.unbind(0)
        offset = 0
        relus: dict[int, torch.Tensor] = {}                  # state -> ReLU(state)
        pooled: dict[tuple[int, int], torch.Tensor] = {}     # (state, op) -> pooled state
        for _ in range(self._steps):
            s = None
            for j, h in enumerate(states):
                edge = offset + j
                w = rows[edge].unbind(0)
                for pos, kind, op, k in self._work[edge]:
                    if kind == _RELU:
                        if j not in relus:
                            relus[j] = F.relu(h)
                        y = op(relus[j])
                    elif kind == _POOL:
                        if (j, k) not in pooled:
                            pooled[(j, k)] = op[0](h)
                        y = op[1](pooled[(j, k)])
                    else:
                        y = op(h)
                    s = y * w[pos] if s is None else torch.addcmul(s, y, w[pos])
            if s is None:   # only `none` on the node's edges: zeros of the right shape
                s = self.cell_ops[offset](states[0], rows[offset])
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


# ---------------------------------------------------------------------------------------
# The batched cell. A cell's 14 edges read only steps + 1 = 5 tensors; edges are grouped
# into "levels" by what they read (steps = 4):
#   level 0: s0 and s1, stacked on channels -> edges 0,1,2,3,5,6,9,10 (nodes 0-3)
#   level 1: node 0                           -> edges 4,7,11         (nodes 1-3)
#   level 2: node 1                           -> edges 8,12           (nodes 2-3)
#   level 3: node 2                           -> edge 13              (node 3)
# Within a level, the edges on which op k is switched on form one EdgeGroup: op k runs
# once on their inputs stacked on channels (grouped depthwise and pointwise convs, one
# pooling, one BN: BN statistics are per channel, so stacking changes nothing). The
# ReLU that starts every conv op runs once per level. The level's group outputs are
# concatenated and one matrix product with the softmax weights adds each (edge, op)
# output, weighted, to its node (Eq. 1 summed over a node's edges); the sums of all
# nodes live in one tensor, of which the next level's input and the cell's output are
# views. `none` is not computed; its alpha stays in the softmax.
# ---------------------------------------------------------------------------------------

class GroupLayout(NamedTuple):
    """Op ``op`` (PRIMITIVES index) on ``edges`` of one level; ``sources[i]`` is the
    input that edge ``edges[i]`` reads within the level's stacked input (0 = s0, 1 = s1
    at level 0; always 0 at later levels), ``positions[i]`` the op's place among the ops
    switched on at that edge (its alpha column and its index in the release's ``m_ops``)."""
    op: int
    edges: tuple[int, ...]
    sources: tuple[int, ...]
    positions: tuple[int, ...]


def edge_target(edge: int, steps: int = STEPS) -> tuple[int, int]:
    """(node, input) of an edge: edges are numbered node by node, node i has 2 + i inputs."""
    start = 0
    for i in range(steps):
        if edge < start + 2 + i:
            return i, edge - start
        start += 2 + i
    raise ValueError(f"edge {edge} is not in a cell of {steps} nodes")


def level_layouts(switches: Switches, steps: int = STEPS) -> list[list[GroupLayout]]:
    """The EdgeGroups of every level (see the comment above), ops in PRIMITIVES order,
    edges in edge order; `none` left out."""
    levels: list[list[GroupLayout]] = []
    num_edges = sum(2 + i for i in range(steps))
    for level in range(steps):
        groups = []
        for k in range(len(PRIMITIVES)):
            if k == NONE:
                continue
            members = []
            for e in range(num_edges):
                _, j = edge_target(e, steps)
                reads = j if level == 0 and j < 2 else (0 if level > 0 and j == level + 1 else None)
                if reads is not None and switches[e][k]:
                    members.append((e, reads, ops_on(switches[e]).index(k)))
            if members:
                edges, sources, positions = zip(*members, strict=True)
                groups.append(GroupLayout(k, edges, sources, positions))
        levels.append(groups)
    return levels


def mixing_index(switches: Switches, steps: int = STEPS) -> torch.Tensor:
    """Index into the flattened softmax weights (plus one trailing zero) that builds, for
    every level, the matrix whose row r, column m holds the weight of the level's m-th
    (edge, op) output if that edge feeds node r, else zero (rows below ``level`` are
    zero: those nodes are finished). Shape (steps, steps, most outputs of a level)."""
    levels = level_layouts(switches, steps)
    offsets = [0]
    for row in switches:
        offsets.append(offsets[-1] + sum(row))
    zero = offsets[-1]
    width = max(1, max(sum(len(g.edges) for g in groups) for groups in levels))
    index = torch.full((steps, steps, width), zero, dtype=torch.long)
    for level, groups in enumerate(levels):
        m = 0
        for g in groups:
            for e, pos in zip(g.edges, g.positions, strict=True):
                node, _ = edge_target(e, steps)
                index[level, node, m] = offsets[e] + pos
                m += 1
    return index


def level_widths(switches: Switches, steps: int = STEPS) -> list[int]:
    """The number of (edge, op) outputs each level computes (`none` left out)."""
    return [sum(len(g.edges) for g in groups) for groups in level_layouts(switches, steps)]


def mixing_weights(weights: torch.Tensor, index: torch.Tensor, widths: Sequence[int],
                   batch: int | None = None) -> list[torch.Tensor]:
    """The mixing matrix of every level (``mixing_index``), (nodes, level width), from
    softmax weights (14 x ops on); with ``batch``, each expanded (a view) to (batch,
    nodes, level width) for the cells' batched matrix products. Built once per forward
    and shared by the cells of a type, so that no cell slices or expands."""
    full = F.pad(weights.flatten(), (0, 1))[index]
    out = []
    for level, width in enumerate(widths):
        w = full[level, :, :width]
        out.append(w if batch is None else w.expand(batch, *w.shape))
    return out


def _stacked_op(name: str, C: int, stride: int, edges: int, drop_rate: float) -> nn.Module:
    """Op ``name`` of ``edges`` edges on their inputs stacked on channels, built so that its
    state-dict keys are those of one edge's op in ``MixedOp`` (tensors stacked on dim 0).
    Conv ops (and the stride-2 skip) leave their first ReLU to the caller."""
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        return nn.Sequential(OPS[name](C, stride, False), nn.BatchNorm2d(edges * C, affine=False))
    if name == "skip_connect":
        if stride == 1:
            return nn.Sequential(Identity(), SkipDropout(drop_rate))
        return FactorizedReduce(C, C, affine=False, stack=edges, relu=False)
    stacked = {
        "sep_conv_3x3": lambda: SepConv(C, C, 3, stride, 1, False, stack=edges, relu=False),
        "sep_conv_5x5": lambda: SepConv(C, C, 5, stride, 2, False, stack=edges, relu=False),
        "dil_conv_3x3": lambda: DilConv(C, C, 3, stride, 2, 2, False, stack=edges, relu=False),
        "dil_conv_5x5": lambda: DilConv(C, C, 5, stride, 4, 2, False, stack=edges, relu=False),
    }
    return stacked[name]()


class StackedBatchNorm(nn.BatchNorm2d):
    """The batch norms of the batched cell: the same normalisation and running statistics
    as ``nn.BatchNorm2d`` in two operators fewer per call. It calls ``native_batch_norm``
    itself (no reserve tensor) and leaves ``num_batches_tracked`` to its cell, which
    counts all of them with one foreach add per training forward: the counters keep the
    release's keys and values (with a momentum set they take no part in the numbers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_batch_norm(x, self.weight, self.bias, self.running_mean,
                                       self.running_var, self.training, self.momentum,
                                       self.eps)[0]


def _use_stacked_batch_norms(module: nn.Module) -> None:
    """Replace every ``nn.BatchNorm2d`` under ``module`` by a fresh StackedBatchNorm of
    the same shape (its values are loaded afterwards)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            if child.momentum is None or not child.track_running_stats:
                raise ValueError("StackedBatchNorm needs a momentum and running statistics")
            setattr(module, name, StackedBatchNorm(child.num_features, child.eps,
                                                   child.momentum, child.affine))
        else:
            _use_stacked_batch_norms(child)


class EdgeGroup(nn.Module):
    """One op on the edges of one level where it is switched on: their inputs are
    stacked on channels (one copy) and the op runs once; output channels
    ``i*C..(i+1)*C`` are edge ``layout.edges[i]``'s."""

    def __init__(self, layout: GroupLayout, C: int, stride: int, drop_rate: float,
                 num_inputs: int) -> None:
        super().__init__()
        self.layout = layout
        name = PRIMITIVES[layout.op]
        self.reads_relu = name.startswith(("sep_conv", "dil_conv")) or (
            name == "skip_connect" and stride == 2)
        self.op = _stacked_op(name, C, stride, len(layout.edges), drop_rate)
        n, sources = len(layout.edges), layout.sources
        # How to stack the inputs (``num_inputs`` tensors stacked: s0 and s1 at level 0):
        # one input n times, or (s0, s1) n/2 times, is a repeat; anything else a gather.
        self.repeat = None
        if num_inputs == 1:
            self.repeat = n
        elif n % num_inputs == 0 and sources == tuple(range(num_inputs)) * (n // num_inputs):
            self.repeat = n // num_inputs
        channels = [s * C + c for s in sources for c in range(C)]
        self.register_buffer("channels", torch.tensor(channels), persistent=False)

    def forward(self, x: torch.Tensor, relu_x: torch.Tensor | None) -> torch.Tensor:
        x = relu_x if self.reads_relu else x
        if self.repeat is None:
            x = x.index_select(1, self.channels)
        elif self.repeat > 1:
            x = x.repeat(1, self.repeat, 1, 1)
        return self.op(x)


class BatchedCell(nn.Module):
    """The search cell of ``Cell`` (same constructor, same state-dict keys and the same
    initial weights for the same random state), its edges run in EdgeGroups level by
    level (see the comment above). ``forward(s0, s1, mixing)`` takes the per-level mixing
    matrices of ``mixing_weights`` instead of the softmax weights."""

    def __init__(self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int,
                 reduction: bool, reduction_prev: bool, switches: Switches,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        # The release's cell draws the initial weights (the same random numbers as the
        # plain network); its preprocessing is kept and its edges' weights are stacked.
        plain = Cell(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev,
                     switches, drop_rate)
        self.reduction = reduction
        self.preprocess0, self.preprocess1 = plain.preprocess0, plain.preprocess1
        self._steps = steps
        self._multiplier = multiplier
        self._C = C
        self.layouts = level_layouts(switches, steps)
        with torch.random.fork_rng(devices=[]):   # their own initial values are overwritten
            self.stacked = nn.ModuleList(
                nn.ModuleList(EdgeGroup(g, C, 2 if reduction and level == 0 else 1, drop_rate,
                                        2 if level == 0 else 1) for g in groups)
                for level, groups in enumerate(self.layouts))
        initial = plain.state_dict()
        _use_stacked_batch_norms(self)
        self._count_batch_norms()
        self.register_state_dict_post_hook(_release_layout_hook)
        self.register_load_state_dict_pre_hook(_stacked_layout_hook)
        self.load_state_dict(initial)

    def _count_batch_norms(self) -> None:
        self._batch_counters = [m.num_batches_tracked for m in self.modules()
                                if isinstance(m, StackedBatchNorm)]

    def _apply(self, fn, recurse=True):   # .to() and the like may give buffers new tensors
        out = super()._apply(fn, recurse)
        self._count_batch_norms()
        return out

    def forward(self, s0: torch.Tensor, s1: torch.Tensor,
                mixing: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.training:   # what nn.BatchNorm2d does in every call (see StackedBatchNorm)
            torch._foreach_add_(self._batch_counters, 1)
        x = torch.cat([self.preprocess0(s0), self.preprocess1(s1)], dim=1)  # level 0 input
        nodes = None   # the nodes' sums so far, (N, steps, C, H, W); row i = node i
        for level, groups in enumerate(self.stacked):
            if level > 0:   # node level - 1 is finished: the next level reads it
                x = nodes[:, level - 1]
            relu_x = F.relu(x) if any(g.reads_relu for g in groups) else None
            outs = [g(x, relu_x) for g in groups]
            if outs:
                y = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
                added = _mix(mixing[level], y, self._C)   # zero rows for finished nodes
                nodes = added if nodes is None else nodes + added
            elif nodes is None:   # only `none` on every edge of level 0: zeros
                stride = 2 if self.reduction else 1
                z = x[:, : self._C, ::stride, ::stride]
                nodes = z.new_zeros(z.shape[0], self._steps, *z.shape[1:])
        # The last `multiplier` nodes side by side on channels: a view, no copy.
        return nodes[:, self._steps - self._multiplier:].flatten(1, 2)

    def release_layout(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Replace, in ``tensors``, this cell's stacked entries (names ``prefix`` +
        ``stacked.L.G.op.X``) by the release's per-edge ones (``cell_ops.E.m_ops.K.X``,
        slices of dim 0), appended in the release's order."""
        entries = []
        for level, groups in enumerate(self.stacked):
            for i, group in enumerate(groups):
                head = f"{prefix}stacked.{level}.{i}.op."
                layout, n = group.layout, len(group.layout.edges)
                for key in [k for k in tensors if k.startswith(head)]:
                    value = tensors.pop(key)
                    parts = [value] * n if value.dim() == 0 else value.chunk(n)
                    for e, pos, part in zip(layout.edges, layout.positions, parts, strict=True):
                        name = f"{prefix}cell_ops.{e}.m_ops.{pos}.{key[len(head):]}"
                        entries.append(((e, pos, len(entries)), name, part))
        for _, name, part in sorted(entries, key=lambda t: t[0]):
            tensors[name] = part


def _release_layout_hook(cell: BatchedCell, state_dict, prefix: str, local_metadata) -> None:
    cell.release_layout(state_dict, prefix)


def _stacked_layout_hook(cell: BatchedCell, state_dict, prefix: str, local_metadata, strict,
                         missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict from the release's layout: stack the per-edge tensors. Entries
    that are missing stay missing (load_state_dict reports them)."""
    for level, groups in enumerate(cell.stacked):
        for i, group in enumerate(groups):
            layout, n = group.layout, len(group.layout.edges)
            for suffix, own in group.op.state_dict().items():
                keys = [f"{prefix}cell_ops.{e}.m_ops.{pos}.{suffix}"
                        for e, pos in zip(layout.edges, layout.positions, strict=True)]
                if not all(k in state_dict for k in keys):
                    continue
                parts = [state_dict[k] for k in keys]
                if own.dim() == 0:   # num_batches_tracked: one counter for all
                    stacked = parts[0]
                else:
                    want = (own.shape[0] // n, *own.shape[1:])
                    bad = [(k, p) for k, p in zip(keys, parts, strict=True) if tuple(p.shape) != want]
                    if bad:
                        error_msgs.append(f"size mismatch for {bad[0][0]}: copying a param with "
                                          f"shape {tuple(bad[0][1].shape)} from checkpoint, the "
                                          f"shape in current model is {want}.")
                        continue
                    stacked = torch.cat(parts)
                for k in keys:
                    del state_dict[k]
                state_dict[f"{prefix}stacked.{level}.{i}.op.{suffix}"] = stacked


def _mix(w: torch.Tensor, y: torch.Tensor, C: int) -> torch.Tensor:
    """out[:, r] = sum_m w[r, m] * y[:, m*C:(m+1)*C], as (N, rows, C, H, W): one batched
    matrix product on a view of ``y`` (in either memory format, no copy). ``w`` is
    (rows, M) or already expanded to (N, rows, M)."""
    N, _, H, W = y.shape
    rows, M = w.shape[-2:]
    w = w.to(y.dtype)
    if y.is_contiguous():
        if w.dim() == 2:
            w = w.expand(N, rows, M)
        return torch.bmm(w, y.view(N, M, C * H * W)).view(N, rows, C, H, W)
    # channels_last: every pixel holds its M blocks of C channels side by side.
    if w.dim() == 3:
        w = w[0]
    y = y.permute(0, 2, 3, 1).reshape(N * H * W, M, C)
    out = torch.bmm(w.expand(N * H * W, rows, M), y)
    return out.view(N, H, W, rows, C).permute(0, 3, 4, 1, 2)


CELL_LAYOUTS = ("batched", "per_edge")   # --cell_layout's concrete values
STEMS = ("cifar", "imagenet")
STEM_REDUCTION = {"cifar": 1, "imagenet": 8}   # how much the stem shrinks the image


def imagenet_stem(C: int) -> tuple[nn.Sequential, nn.Sequential]:
    """stem0 (3x3 conv stride 2 to C/2, BN, ReLU, 3x3 conv stride 2 to C, BN) and stem1
    (ReLU, 3x3 conv stride 2, BN): the mobile network's stem, as in model.NetworkImageNet."""
    stem0 = nn.Sequential(
        nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )
    stem1 = nn.Sequential(
        nn.ReLU(inplace=True),
        nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )
    return stem0, stem1


class Network(nn.Module):
    """The search network: stem, ``layers`` cells (reduction at 1/3 and 2/3 of the
    depth), global pooling, classifier. Normal cells share ``alphas_normal``, reduction
    cells ``alphas_reduce``.

    ``batched`` (default) builds BatchedCells, else the release's per-edge Cells (the
    plain path); both have the same state-dict layout and, for the same random state,
    the same initial weights. ``skip_zero=False`` (plain cells only) computes `none`.
    ``cell_layout`` (``--cell_layout``; it overrides ``batched``): "batched" the
    BatchedCells, "per_edge" the PerEdgeCells (same state dict and initial weights too).
    ``checkpoint_cells``: recompute each cell's activations in the backward pass instead
    of keeping them (memory.run_cell; same results).

    ``stem="cifar"`` (the release's) keeps the image's resolution; ``stem="imagenet"``
    (for large images) is the mobile network's stride-8 stem (``stem0``, ``stem1``), so
    the cells of a 224-pixel search see 28x28 maps."""

    checkpoint_cells = False

    def __init__(self, C: int, num_classes: int, layers: int, switches_normal: Switches,
                 switches_reduce: Switches, drop_rate: float = 0.0, steps: int = STEPS,
                 multiplier: int = 4, stem_multiplier: int = 3, skip_zero: bool = True,
                 batched: bool = True, stem: str = "cifar", cell_layout: str | None = None) -> None:
        super().__init__()
        if cell_layout is not None:
            if cell_layout not in CELL_LAYOUTS:
                raise ValueError(f"cell_layout must be one of {', '.join(CELL_LAYOUTS)}, "
                                 f"got {cell_layout!r}")
            batched = cell_layout == "batched"
        self.cell_layout = cell_layout or ("batched" if batched else "release")
        if batched and not skip_zero:
            raise ValueError("skip_zero=False (compute `none`) needs batched=False")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        self.stem_kind = stem
        self.batched = batched
        self._C = C
        self._num_classes = num_classes
        self._layers = layers
        self._steps = steps
        self._multiplier = multiplier
        self.switches_normal = [list(map(bool, r)) for r in switches_normal]
        self.switches_reduce = [list(map(bool, r)) for r in switches_reduce]
        num_normal = _ops_per_edge(self.switches_normal, "switches_normal")
        num_reduce = _ops_per_edge(self.switches_reduce, "switches_reduce")

        if stem == "cifar":   # the release's: full resolution, 3C channels
            C_curr = stem_multiplier * C
            self.stem = nn.Sequential(
                nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
                nn.BatchNorm2d(C_curr),
            )
            C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
            reduction_prev = False
        else:
            # The mobile evaluation network's stem (model.NetworkImageNet, SPEC sec. 4):
            # the image shrinks by 8 before the first cell, which treats its inputs as
            # coming after a reduction (s0 at 1/4, s1 at 1/8 of the image).
            self.stem0, self.stem1 = imagenet_stem(C)
            C_prev_prev, C_prev, C_curr = C, C, C
            reduction_prev = True
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            switches = self.switches_reduce if reduction else self.switches_normal
            if batched:
                cell = BatchedCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                                   reduction_prev, switches, drop_rate)
            elif cell_layout == "per_edge":
                cell = PerEdgeCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                                   reduction_prev, switches, drop_rate)
            else:
                cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction,
                            reduction_prev, switches, drop_rate, skip_zero)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(NUM_EDGES, num_normal))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(NUM_EDGES, num_reduce))
        if batched:
            self.register_buffer("mixing_index_normal", mixing_index(self.switches_normal, steps),
                                 persistent=False)
            self.register_buffer("mixing_index_reduce", mixing_index(self.switches_reduce, steps),
                                 persistent=False)
            self._level_widths = {"normal": level_widths(self.switches_normal, steps),
                                  "reduce": level_widths(self.switches_reduce, steps)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights_normal = F.softmax(self.alphas_normal, dim=-1)
        weights_reduce = F.softmax(self.alphas_reduce, dim=-1)
        if self.batched:   # once per forward, shared by the cells of each type
            # Expanded to the batch for the cells' products, unless the input is
            # channels_last (there the cells multiply per pixel).
            batch = x.shape[0] if x.is_contiguous() else None
            weights_normal = mixing_weights(weights_normal, self.mixing_index_normal,
                                            self._level_widths["normal"], batch)
            weights_reduce = mixing_weights(weights_reduce, self.mixing_index_reduce,
                                            self._level_widths["reduce"], batch)
        if self.stem_kind == "cifar":
            s0 = s1 = self.stem(x)
        else:
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
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

    def release_layout(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` named as this network's parameters and buffers (e.g. optimizer
        state by parameter name), renamed and sliced to the release's per-edge layout,
        as ``state_dict`` does. The identity for a plain network."""
        out = dict(tensors)
        if self.batched:
            for i, cell in enumerate(self.cells):
                cell.release_layout(out, f"cells.{i}.")
        return out

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
