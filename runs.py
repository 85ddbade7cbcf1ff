"""Read the run folders that train_search.py, train_cifar.py and train_imagenet.py write:
what kind of run a folder holds, whether it finished, its per-epoch metrics and its
results. Shared by plots.py and report.py; no drawing, no training.

A search run has ``arch_state.json`` or metrics lines with a ``stage``; it finished when
``genotype.json`` exists. A training run has metrics lines with ``test_acc`` (or a
training ``checkpoint.pt``); it finished when its checkpoint counts all ``--epochs``.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from checkpoint import CheckpointError, load_file
from errors import RunFolderError, UserError
from genotypes import GenotypeError, genotype_from_dict
from model_search import all_on_switches
from utils import read_metrics as read_metrics_file

METRICS = "metrics.jsonl"
ARCH_STATE = "arch_state.json"
GENOTYPE = "genotype.json"
BUDGETS = "genotypes_by_skip_budget.json"
CHECKPOINT = "checkpoint.pt"
LOG = "log.txt"
SEARCH, TRAIN = "search", "train"
# Folder name prefixes of utils.run_dir_name: {save}search-{note}-{time}, {save}eval-...
NAME_PREFIXES = {"search-": SEARCH, "eval-": TRAIN}


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise RunFolderError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path} is not valid JSON ({e})") from None


def read_metrics(run_dir: str) -> list[dict]:
    """The per-epoch records of the run's ``metrics.jsonl`` ([] when there is none); a
    torn last line (a run killed while writing it) is dropped, as on resume."""
    try:
        records = read_metrics_file(os.path.join(run_dir, METRICS))
    except UserError as e:
        raise RunFolderError(str(e)) from None
    return [r for r in records if isinstance(r, dict)]


def run_kind(run_dir: str, metrics: list[dict] | None = None) -> str | None:
    """SEARCH, TRAIN, or None when ``run_dir`` holds no run of this project."""
    if not os.path.isdir(run_dir):
        return None
    metrics = read_metrics(run_dir) if metrics is None else metrics
    if os.path.isfile(os.path.join(run_dir, ARCH_STATE)) or any("stage" in r for r in metrics):
        return SEARCH
    if any("test_acc" in r for r in metrics):
        return TRAIN
    # A run stopped before its first epoch ended: only its log (and the folder name) say.
    if os.path.isfile(os.path.join(run_dir, LOG)) or os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        name = os.path.basename(os.path.normpath(run_dir))
        for prefix, kind in NAME_PREFIXES.items():
            if prefix in name:   # --save may put a prefix before it: LOGsearch-...
                return kind
    return None


def read_checkpoint_info(run_dir: str) -> dict | None:
    """The run's checkpoint.pt without its tensors (None if there is none)."""
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        return None
    try:
        ckpt = load_file(path)
    except CheckpointError as e:
        raise RunFolderError(str(e)) from None
    if not isinstance(ckpt, dict):
        raise RunFolderError(f"{path} is not a checkpoint of this project")
    return {k: v for k, v in ckpt.items()
            if k not in ("model", "optimizer", "w_opt", "a_opt", "scaler", "rng")}


def read_arch_state(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, ARCH_STATE)
    if not os.path.isfile(path):
        return None
    state = read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("stages"), list):
        raise RunFolderError(f"{path}: expected a JSON object with a 'stages' list")
    return state


def read_genotype(path: str):
    try:
        return genotype_from_dict(read_json(path), source=path)
    except GenotypeError as e:
        raise RunFolderError(str(e)) from None


def search_stage_switches(arch_state: dict | None, num_stages: int) -> list[tuple[list, list]]:
    """The (normal, reduce) switches each of the first ``num_stages`` stages ran with:
    stored in arch_state.json for the finished stages; a stage still running starts from
    the previous stage's switches pruned as the search prunes them."""
    from train_search import prune_after_stage  # here: train_search imports plots, plots runs

    def probs(rows):   # float32, as the search ranks them
        return torch.softmax(torch.tensor(rows, dtype=torch.float32), dim=-1)

    done = (arch_state or {}).get("stages", [])
    result = []
    for s in range(num_stages):
        if s < len(done):
            result.append((done[s]["switches_normal"], done[s]["switches_reduce"]))
        elif s == 0:
            result.append((all_on_switches(), all_on_switches()))
        elif s - 1 < len(done):
            prev = done[s - 1]
            result.append(prune_after_stage(s - 1, prev["switches_normal"], prev["switches_reduce"],
                                            probs(prev["alphas_normal"]), probs(prev["alphas_reduce"])))
        else:
            raise RunFolderError(f"arch_state.json lacks stage {s} although metrics.jsonl has "
                                 f"epochs of stage {s + 1}")
    return result
