"""The files of a run folder, named once for every script.

A search run (``{save}search-{note}-{time}/``) holds the log, ``metrics.jsonl``, its
``checkpoint.pt``, ``arch_state.json`` (the alphas and switches of every finished stage),
``genotype.json`` (the final cell), each stage's cell (``stage1_genotype.json``, ...) and
the cells per skip-connect budget; a training run
(``{save}eval-{note}-{time}/``) the log, ``metrics.jsonl``, ``checkpoint.pt`` (resume,
test.py), ``weights.pt`` (the release's plain state dict) and, for an image folder with a
held-out part, ``split.json``. docs/outputs.md describes each file.
"""
from __future__ import annotations

LOG = "log.txt"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"            # everything needed to resume (or to rebuild a network)
WEIGHTS = "weights.pt"                  # the release's name: a plain state dict
LOCK = "run.lock"                       # who owns the folder while a process runs it
ARCH_STATE = "arch_state.json"
GENOTYPE = "genotype.json"              # the final cell of a search
BUDGETS = "genotypes_by_skip_budget.json"
SPLIT = "split.json"                    # an image folder's held-out images (test.py, --resume)


def stage_genotype(stage: int) -> str:
    """The cell of a search's stage ``stage`` (1-based), derived with the final rule."""
    return f"stage{stage}_genotype.json"


# Folder name prefixes: {save}search-{note}-{time}, {save}eval-{note}-{time}.
SEARCH_PREFIX, TRAIN_PREFIX = "search", "eval"
