"""Checkpoint files: atomic saving, safe loading (``weights_only=True``) and one helper
that loads weights into a network from any of the layouts in use:

- a plain state dict (the authors' CIFAR checkpoints, and our ``weights.pt``),
- the same with every key prefixed ``module.`` (DataParallel / DDP),
- a dict wrapping it under ``'state_dict'`` (the authors' ImageNet checkpoint) or
  ``'model'`` (our full checkpoints).

When keys or shapes do not fit, ``CheckpointError`` names a few of them and the setting
that is most likely wrong.
"""
from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.nn as nn

from errors import CheckpointError, StorageError, special_path, write_bytes_atomic


def save_atomic(obj: Any, path: str, resume_hint: str | None = None,
                resume_from: str | None = None) -> None:
    """Serialise in memory, write to a temp file in the same folder, then rename: a crash
    or a full disk never leaves a half-written checkpoint behind, and the previous one
    stays intact. A failed write is a StorageError (one line; ``resume_hint`` is the run
    folder to name in its advice, ``resume_from`` the checkpoint --resume needs, by
    default ``path``: without one the advice is to start again, not to resume)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        write_bytes_atomic(buffer.getbuffer(), path, "the checkpoint")
    except StorageError as e:
        name = os.path.basename(path)
        kept = f"the previous {name} is intact" if os.path.exists(path) else f"{name} was not saved"
        hint = ""
        if resume_hint and os.path.exists(resume_from or path):
            hint = f"; once the cause is fixed, continue with --resume {resume_hint}"
        elif resume_hint:
            # No epoch was saved yet: --resume would find nothing to resume.
            hint = (f"; no epoch was saved yet, so the run cannot be resumed: once the cause is "
                    f"fixed, start it again (and delete {resume_hint})")
        raise StorageError(f"{e}; {kept}{hint}") from None


def describe_checkpoint(obj: Any) -> str:
    """What kind of file a loaded checkpoint is, for messages about the wrong kind."""
    if isinstance(obj, dict):
        if obj.get("kind") == "pdarts-search":
            return "a train_search.py checkpoint (a search, not a trained network)"
        if str(obj.get("format", "")).startswith("pdarts-eval-checkpoint"):
            return "a train_cifar.py / train_imagenet.py checkpoint"
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return "a plain state dict (network weights only)"
        keys = sorted(str(k) for k in obj)
        return (f"a dict with the keys {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
                if keys else "an empty dict")
    return f"a {type(obj).__name__}, not a dict"


# What a file that is not a checkpoint begins with, and what to call it.
_FILE_KINDS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
               (b"GIF8", "a GIF image"), (b"%PDF", "a PDF file"), (b"<svg", "an SVG image"),
               (b"<?xml", "an XML/SVG file"))


def _what_file(path: str) -> str | None:
    """Name a file that is plainly not a PyTorch checkpoint from its first bytes (an image,
    a genotype or other JSON file, a text file such as log.txt); None for anything that may
    be one (torch's zip format, a pickle, unknown binary)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    for magic, kind in _FILE_KINDS:
        if head.startswith(magic):
            return kind
    if not head or b"\0" in head or head[:1] in (b"\x80", b"PK"):
        return None
    try:
        text = head.decode("utf-8").lstrip()
    except UnicodeDecodeError:
        return None
    if text.startswith(("{", "[")):
        if all(f'"{key}"' in text for key in ("normal", "reduce")):
            return "a genotype JSON file (a cell's operations, not trained weights)"
        return "a JSON file"
    first = text.splitlines()[0][:60] if text.strip() else ""
    return f"a text file (it begins {first!r})" if first else "a text file"


def _unpickler_reason(e: Exception) -> str:
    """The part of torch.load's error that says what was wrong, without its advice: its
    suggestion to retry with ``weights_only=False`` would run arbitrary code, and is wrong
    for a file that is not a checkpoint."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    for cut in (" was not an allowed global", ". Please", ". Re-running", " Check the documentation"):
        first = first.split(cut)[0]
    if "weights_only" in first:         # torch's preamble without a detail: say nothing of it
        first = type(e).__name__
    return first[:200]


def load_file(path: str, map_location: str | torch.device = "cpu",
              genotype_hint: str | None = None) -> Any:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs). A file that is
    not one (an image, a genotype JSON, log.txt) is named as what it is; ``genotype_hint``
    is the caller's advice for a genotype file. torch's advice to load with
    ``weights_only=False`` is never passed on."""
    if not os.path.isfile(path):
        what = special_path(path)   # a folder or a dangling link in its place
        raise CheckpointError(f"checkpoint {path} is {what}, not a checkpoint file" if what
                              else f"checkpoint not found: {path}")
    kind = _what_file(path)
    if kind is not None:
        hint = f": {genotype_hint}" if genotype_hint and kind.startswith("a genotype") else ""
        raise CheckpointError(f"cannot read checkpoint {path}: it is {kind}, not a PyTorch "
                              f"checkpoint{hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        reason = _unpickler_reason(e)
        if "Unsupported global" in reason:
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds Python objects beyond tensors, numbers, "
                f"strings and containers ({reason}), which are not loaded (loading them could "
                "run arbitrary code)") from None
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt, truncated or not a PyTorch "
            f"checkpoint ({reason})") from None


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint, with any ``module.`` prefix removed."""
    original = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"the checkpoint is {describe_checkpoint(original)}, with no state dict "
                              "in it: expected network weights (a dict of tensors, optionally "
                              "wrapped as {'state_dict': ...} or {'model': ...})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _num_cells(keys) -> int:
    """Number of cells in a state dict (1 + the largest ``cells.<i>.`` index)."""
    ids = [int(k.split(".")[1]) for k in keys
           if k.startswith("cells.") and k.split(".")[1].isdigit()]
    return max(ids) + 1 if ids else 0


CIFAR_STEM_MULTIPLIER = 3   # model.NetworkCIFAR's stem: a 3x3 conv from 3 to 3C channels


def infer_network(state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """What a state dict of an evaluation network tells about it: ``kind`` (cifar or
    imagenet, from the stem), ``C`` (the stem's width), ``layers`` (cells), ``auxiliary``
    (an auxiliary head) and ``num_classes`` (the classifier's outputs); None if it does not
    look like one. The cells' operations cannot be read back: that is ``--arch``."""
    if "stem.0.weight" in state:
        kind, C = "cifar", state["stem.0.weight"].shape[0] // CIFAR_STEM_MULTIPLIER
    elif "stem0.0.weight" in state:     # NetworkImageNet: stem0 is a 3x3 conv from 3 to C/2
        kind, C = "imagenet", 2 * state["stem0.0.weight"].shape[0]
    else:
        return None
    classifier = state.get("classifier.weight")
    return {"kind": kind, "C": int(C), "layers": _num_cells(state),
            "auxiliary": any(k.startswith("auxiliary_head.") for k in state),
            "num_classes": int(classifier.shape[0]) if classifier is not None else None}


def _likely_cause(missing: list[str], unexpected: list[str],
                  shapes: list[tuple[str, tuple, tuple]],
                  num_cells: tuple[int, int] = (0, 0)) -> str:
    keys = missing + unexpected
    if keys and all(k.startswith("auxiliary_head.") for k in keys):
        return ("--auxiliary (the checkpoint has an auxiliary head)" if unexpected else
                "--auxiliary (the checkpoint has no auxiliary head)")
    if any(k.startswith(("stem0.", "stem1.")) for k in keys) and any(
            k.startswith("stem.") for k in keys):
        return "the dataset (a CIFAR network and an ImageNet network do not share weights)"
    if num_cells[0] != num_cells[1]:
        # Fewer or more cells also moves the reduction cells, so keys and shapes differ
        # all over; the cell count is the telling difference.
        return (f"--layers (the checkpoint has {num_cells[0]} cells, "
                f"the network {num_cells[1]})")
    if shapes and all(k.startswith(("classifier.", "auxiliary_head.classifier.")) for k, _, _ in shapes):
        return "the number of classes (--cifar100 / --dataset)"
    cell_ids = {int(k.split(".")[1]) for k in keys if k.startswith("cells.")}
    if cell_ids and (unexpected and not missing or missing and not unexpected):
        return "--layers (the number of cells)"
    if shapes and not keys:
        return "--init_channels (the tensor shapes differ)"
    return "--arch (the cells have different operations)"


def load_weights(model: nn.Module, obj: Any, source: str = "checkpoint") -> None:
    """Load a checkpoint object (already read from disk) into ``model`` with strict key
    and shape checking; raise CheckpointError with a helpful message otherwise."""
    state = extract_state_dict(obj)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {', '.join(unexpected[:3])}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) e.g. " + ", ".join(
                f"{k} {list(a)} vs {list(b)} in the network" for k, a, b in shapes[:2]))
        raise CheckpointError(
            f"{source} does not fit the network: {'; '.join(parts)}. "
            f"Check {_likely_cause(missing, unexpected, shapes, (_num_cells(state), _num_cells(own)))}.")
    model.load_state_dict(state, strict=True)
