"""The pure rules of the progressive search, over switches and alphas: no network, no I/O.

A cell has 14 edges (node i has 2 + i inputs); ``switches`` are 14 rows of 8 booleans
(PRIMITIVES order) saying which ops an edge still has, and the softmax weights of a
stage are 14 rows of one weight per op switched on. From them:

- pruning after a stage: switch off the lowest-weighted ops of every edge (paper Sec. 3.2);
- the final cell: 2 strongest non-``none`` edges per node, the best op on each;
- the skip-connect refinement of the normal cell to at most M skip-connects (Sec. 3.3);
- replaying saved stages (``--derive``, plots, reports) from their raw alphas;
- the collapse diagnostics: how parameter-free the cell derived now is.

The search network (model_search.py) and the run folder (runs.py) build on these.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from config import PAPER_KEEP, PAPER_OPS
from errors import UserError
from genotypes import PRIMITIVES, Genotype, alpha_rows_problem
from utils import logger, seed_for

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


# ---------------------------------------------------------------------------------------
# The progressive stages: pruning after a stage, replaying saved stages, the final cells
# ---------------------------------------------------------------------------------------

# The paper's stages (config.py's plan): 8, 5 and 3 candidate ops per edge, and how many
# of the lowest-weighted ones each stage switches off: after the last stage one op per
# edge is left, and `none` is always among those dropped. A run's own plan is its
# SearchConfig's stages; these are the paper's, for files that predate the plans.
NUM_STAGES = len(PAPER_OPS)
OPS_PER_STAGE = PAPER_OPS
DROPS_PER_STAGE = tuple(ops - keep for ops, keep in zip(PAPER_OPS, PAPER_KEEP))


def prune_after_stage(switches_normal: Switches, switches_reduce: Switches, probs_normal,
                      probs_reduce, drops: int, last: bool) -> tuple[Switches, Switches]:
    """Switch off the ``drops`` lowest-weighted ops of every edge (the stage's ops minus
    what it keeps); after the ``last`` stage `none` is always among them (paper Sec. 3.2)."""
    return (prune_switches(switches_normal, probs_normal, drops, drop_none=last),
            prune_switches(switches_reduce, probs_reduce, drops, drop_none=last))


# The random stream of --random_space's draw (apart from every other seeded stream).
RANDOM_SPACE_STREAM = 0x5ACE


def random_space_switches(ops: int, seed: int) -> tuple[Switches, Switches]:
    """The control of paper Sec. 4.4: a search space of ``ops`` ops per edge drawn at random
    from the full one, as large as the approximated space it replaces: on every edge `none`
    plus ``ops - 1`` ops drawn uniformly, without replacement, from the other 7, every edge
    of the normal cell and then of the reduction cell independently; seeded by ``seed``."""
    if not 2 <= ops <= len(PRIMITIVES):
        raise ValueError(f"a random space needs 2 to {len(PRIMITIVES)} ops per edge, got {ops}")
    g = torch.Generator().manual_seed(seed_for(seed, RANDOM_SPACE_STREAM))
    others = [k for k in range(len(PRIMITIVES)) if k != NONE]
    cells = []
    for _ in range(2):
        cell = []
        for _ in range(NUM_EDGES):
            drawn = {others[i] for i in torch.randperm(len(others), generator=g)[:ops - 1].tolist()}
            cell.append([k == NONE or k in drawn for k in range(len(PRIMITIVES))])
        cells.append(cell)
    return cells[0], cells[1]


def softmax_rows(alphas: Sequence[Sequence[float]]) -> torch.Tensor:
    """Softmax weights of saved alpha rows, in float32 as in the search, so a
    re-derivation ranks exactly as the search did."""
    return F.softmax(torch.tensor(alphas, dtype=torch.float32), dim=-1)


def _switches_problem(rows: Any, ops: int) -> str | None:
    if not (isinstance(rows, list) and len(rows) == NUM_EDGES and all(
            isinstance(r, list) and len(r) == len(PRIMITIVES) and all(isinstance(v, bool) for v in r)
            and sum(r) == ops and r[NONE] for r in rows)):
        return (f"needs {NUM_EDGES} rows of {len(PRIMITIVES)} true/false values, {ops} of them "
                "true, `none` among them (a random space's switches)")
    return None


def replay_stages(stages: Sequence[dict], source: str = "arch state") -> list[tuple[Switches, Switches]]:
    """The switches each stage ran with, from the saved stages of a search (any plan):
    stage 1 on all ops, every later stage on the ops its predecessor kept, recomputed from
    that stage's raw alphas as the search pruned them (the drops: one stage's ops per edge
    minus the next one's); a stage on a random space (``"space": "random"``) from the
    switches it saved. Every stage's alphas are checked."""
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{source}: 'stages' must be a list of one object per finished stage")
    result: list[tuple[Switches, Switches]] = []
    ops_of: list[int] = []
    for s, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise UserError(f"{source}: stage {s + 1} is not a JSON object")
        # Files written before the stage plans hold the paper's 8, 5, 3 (and say so).
        ops = stage.get("ops_per_edge", OPS_PER_STAGE[s] if s < NUM_STAGES else None)
        if isinstance(ops, bool) or not isinstance(ops, int) or not 1 <= ops <= len(PRIMITIVES):
            raise UserError(f"{source}: stage {s + 1} needs 'ops_per_edge', 1 to {len(PRIMITIVES)}")
        if stage.get("space") == "random":
            for key in ("switches_normal", "switches_reduce"):
                problem = _switches_problem(stage.get(key), ops)
                if problem:
                    raise UserError(f"{source}: stage {s + 1} '{key}' {problem}")
            switches = (stage["switches_normal"], stage["switches_reduce"])
        elif s == 0:
            if ops != len(PRIMITIVES):
                raise UserError(f"{source}: stage 1 runs {ops} ops per edge; the first stage of a "
                                f"search runs all {len(PRIMITIVES)}")
            switches = (all_on_switches(), all_on_switches())
        else:
            if ops > ops_of[-1]:
                raise UserError(f"{source}: stage {s + 1} runs {ops} ops per edge after stage "
                                f"{s}'s {ops_of[-1]}: a stage runs at most the ops its predecessor "
                                "had")
            previous = stages[s - 1]
            switches = prune_after_stage(*result[-1], softmax_rows(previous["alphas_normal"]),
                                         softmax_rows(previous["alphas_reduce"]), ops_of[-1] - ops,
                                         False)
        for key in ("alphas_normal", "alphas_reduce"):
            problem = alpha_rows_problem(stage.get(key), [ops] * NUM_EDGES)
            if problem:
                raise UserError(f"{source}: stage {s + 1} '{key}' {problem} (it needs {NUM_EDGES} "
                                f"rows of {ops} numbers, one column per op on)")
        result.append(switches)
        ops_of.append(ops)
    return result


def final_cells(sw_n: Switches, sw_r: Switches, probs_n, probs_r, max_skip: int
                ) -> tuple[Genotype, Genotype, int, list[tuple[int, Genotype]]]:
    """(chosen cell at max_skip, unrestricted cell, its skip-connect count, the cell for
    every budget from 8 down that the unrestricted cell exceeds).

    Faithful to the release: the skip-connect budget restricts the normal cell only."""
    unrestricted = derive_genotype(sw_n, sw_r, probs_n, probs_r, None)
    num_skips = count_skips(derive_cell_switches(sw_n, probs_n, None))
    budgets = skip_budget_genotypes(sw_n, sw_r, probs_n, probs_r)
    chosen = unrestricted if max_skip < 0 else derive_genotype(sw_n, sw_r, probs_n, probs_r, max_skip)
    return chosen, unrestricted, num_skips, budgets


# ---------------------------------------------------------------------------------------
# Collapse diagnostics: how parameter-free a derived normal cell is
# ---------------------------------------------------------------------------------------

# Ops without weights. `none` never survives the derivation but is counted for cells
# read from elsewhere. In a normal cell every skip_connect is the identity (a stride-2
# skip, FactorizedReduce, exists only in reduction cells).
PARAM_FREE_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect")
# "Mostly parameter-free": more than this fraction of the cell's edges.
COLLAPSE_FRACTION = 0.5


def param_free_ops(pairs: Sequence[tuple[str, int]]) -> Counter:
    """How many edges of a cell (its (op, input) pairs) use each parameter-free op."""
    return Counter(op for op, _ in pairs if op in PARAM_FREE_OPS)


def is_collapsed(num_param_free: int, num_edges: int) -> bool:
    return num_param_free > COLLAPSE_FRACTION * num_edges


class CollapseMonitor:
    """The collapse diagnostics. Differentiable searches tend to "collapse" into cells made
    mostly of parameter-free ops, skip-connects above all (paper Sec. 3.3: they dominate as
    the search network deepens, and such cells train badly). Each epoch after the warm-up
    the normal cell is derived from the current alphas with the final rule (no skip
    budget) and its parameter-free edges are counted; the counts go to metrics.jsonl
    (``normal_param_free``, ``normal_skip_connects``, ``collapse``), drawn by plots.py.

    One per stage: ``check`` each epoch, with the stage's switches and the current
    softmax weights of the normal cell; it logs the counts after the warm-up, warns the
    first time the cell is mostly parameter-free, and returns the metrics.jsonl fields
    (None during the warm-up, when the alphas have not been trained yet)."""

    def __init__(self, stage: int, warmup_epochs: int, is_main: bool = True) -> None:
        self.stage = stage              # 1-based, as in the logs and metrics.jsonl
        self.warmup_epochs = warmup_epochs
        self.warned = not is_main       # under torchrun only rank 0 warns

    def check(self, epoch: int, switches_normal: Switches, probs_normal) -> dict:
        if epoch < self.warmup_epochs:
            return {"normal_param_free": None, "normal_skip_connects": None, "collapse": None}
        pairs = switches_to_pairs(derive_cell_switches(switches_normal, probs_normal, None))
        counts = param_free_ops(pairs)
        free, skips = sum(counts.values()), counts["skip_connect"]
        collapsed = is_collapsed(free, len(pairs))
        detail = ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) or "none"
        logger.info("stage %d epoch %d: derived normal cell has %d of %d edges parameter-free "
                    "(%s)", self.stage, epoch, free, len(pairs), detail)
        if collapsed and not self.warned:
            self.warned = True
            logger.warning(
                "WARNING stage %d epoch %d: the derived normal cell is mostly parameter-free, "
                "%d of %d edges (%s; %d skip-connects): the collapse of differentiable search. "
                "Skip-connect dropout (--dropout_rate) and the final --max_skip budget work "
                "against it; a cell that stays this way trains poorly (warned once per stage)",
                self.stage, epoch, free, len(pairs), detail, skips)
        return {"normal_param_free": free, "normal_skip_connects": skips, "collapse": collapsed}
