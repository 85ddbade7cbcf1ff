"""Collapse diagnostics of the search: how parameter-free the normal cell derived from the
current alphas is, epoch by epoch.

Differentiable searches tend to "collapse" into cells made mostly of parameter-free ops,
skip-connects above all (the P-DARTS paper, Sec. 3.3: skip-connects dominate as the
search network deepens, and such cells train badly). Each epoch after the weights-only
warm-up the search derives the normal cell from the current alphas with the final rule
(``model_search.derive_cell_switches``, no skip-connect budget) and logs how many of its
8 edges are parameter-free; the first time in a stage that most of them are, it warns.
The counts go to ``metrics.jsonl`` (``normal_param_free``, ``normal_skip_connects``,
``collapse``) and are drawn by plots.py.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from model_search import Switches, derive_cell_switches, switches_to_pairs
from utils import logger

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
    """One per stage: ``check`` each epoch, with the stage's switches and the current
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
