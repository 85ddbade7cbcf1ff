"""Losses that say a run diverged while staying finite: the warning of the search and the
training scripts (the non-finite guards in utils.py stop a run; this only warns, and
changes nothing that is computed).

A network that guesses uniformly has a cross-entropy of log(classes): 2.30 for 10
classes, the level every run starts at. A loss ``DIVERGED_FACTOR`` (100) times that, 230
for 10 classes, means a probability of about e^-230 for the right class on average: the
weights have blown up. Gradient clipping keeps such a run finite (``--learning_rate 1e3``
ended every stage with validation losses of 7e15 to 1e18 and printed a cell), so without
this warning nothing would say so.
"""
from __future__ import annotations

import math

DIVERGED_FACTOR = 100.0


def chance_loss(num_classes: int) -> float:
    """The cross-entropy of a uniform guess over ``num_classes`` (at least 2) classes."""
    return math.log(max(2, num_classes))


class DivergenceMonitor:
    """``check`` at the end of each epoch with its losses; the first loss above
    DIVERGED_FACTOR x chance_loss gives a warning line, once per monitor (one per stage of
    a search, one per training run)."""

    def __init__(self, num_classes: int, run: str = "the run",
                 fix: str = "a lower --learning_rate", scope: str = "") -> None:
        self.num_classes = num_classes
        self.limit = DIVERGED_FACTOR * chance_loss(num_classes)
        self.run, self.fix, self.scope = run, fix, scope
        self.warned = False

    def check(self, where: str, losses: dict[str, float | None]) -> str | None:
        if self.warned:
            return None
        for name, value in losses.items():
            # A non-finite loss is the guards' to stop; math.isfinite only for floats.
            if value is None or not math.isfinite(value) or value <= self.limit:
                continue
            self.warned = True
            chance = chance_loss(self.num_classes)
            return (f"WARNING {where}: the {name} {value:.3g} is {value / chance:.3g} times the "
                    f"loss of a uniform guess (log {max(2, self.num_classes)} = {chance:.2f}, "
                    f"where every run starts): {self.run} diverged, and what it gives now means "
                    f"little; start a new run with {self.fix}{self.scope}")
        return None
