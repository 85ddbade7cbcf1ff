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

Also here: the warning that a stage's validation says little because its batch-norm
running statistics have not settled (too few steps per stage, e.g. a small image folder).
"""
from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------------------
# Validation that cannot be trusted: eval-mode batch norm with unsettled statistics
# ---------------------------------------------------------------------------------------

# Share of the initial running statistics (mean 0, variance 1) still held by a stage's
# batch norms at its last epoch above which the stage was too short to settle them.
BN_LEFT_AT_END = 0.1
# Validation within this many points of chance while training is this far above it.
CHANCE_MARGIN, TRAIN_ABOVE = 2.0, 15.0


def batch_norm_updates(model) -> tuple[int, float]:
    """(fewest updates of any batch norm's running statistics, its momentum) in ``model``:
    every training forward (weight and alpha steps alike) updates them."""
    fewest, momentum = None, 0.1
    for m in model.modules():
        tracked = getattr(m, "num_batches_tracked", None)
        if tracked is not None and getattr(m, "track_running_stats", False):
            n = int(tracked)
            if fewest is None or n < fewest:
                fewest, momentum = n, m.momentum if m.momentum is not None else 0.1
    return (fewest or 0), momentum


def validation_warning(stage: int, epoch: int, last_epoch: bool, valid_acc: float,
                       train_acc: float, num_classes: int, bn_updates: int,
                       momentum: float = 0.1) -> str | None:
    """A one-line warning when the alpha half's validation says little, or None.

    Faithful to the release: validation runs in eval mode, on the running batch-norm
    statistics. With few steps per stage (a small image folder) those have barely left
    their start, and validation sits at chance while training accuracy rises. Warned when
    validation is at chance while training is well above it, or when a stage ends with its
    statistics still holding more than BN_LEFT_AT_END of their start."""
    left = (1.0 - momentum) ** bn_updates
    chance = 100.0 / num_classes
    at_chance = valid_acc <= chance + CHANCE_MARGIN and train_acc >= valid_acc + TRAIN_ABOVE
    unsettled = left > BN_LEFT_AT_END
    if not at_chance and not (last_epoch and unsettled):
        return None
    needed = math.ceil(math.log(BN_LEFT_AT_END / 2) / math.log(1.0 - momentum))
    what = (f"WARNING stage {stage} epoch {epoch}: validation accuracy {valid_acc:.2f}% is at chance "
            f"level ({num_classes} classes) while training accuracy is {train_acc:.2f}%"
            if at_chance else
            f"WARNING stage {stage} epoch {epoch}: validation accuracy {valid_acc:.2f}% is unreliable")
    if unsettled or left > BN_LEFT_AT_END / 2:
        why = (f"after {bn_updates} batch-norm updates in this stage the running statistics "
               f"used by eval-mode validation still hold {left:.0%} of their initial values "
               f"(momentum {momentum:g})")
        fix = (f"use more images or more epochs (about {needed} or more updates per stage; each "
               "weight and each alpha step is one)")
    else:
        why = "the network fits the weight half but not the alpha half (eval mode)"
        fix = "use more images or more epochs"
    return f"{what}: {why}; {fix}"
