"""Checkpoints: where a run's checkpoint is written and how it is resumed, for the search
and for training side by side, and the files underneath.

- The runs' checkpoints (``checkpoint.pt`` after every epoch): ``search_state`` /
  ``save_search`` and ``resume_search`` / ``restore_search_stage`` for train_search.py,
  ``training_state`` / ``save_training`` and ``resume_training`` / ``restore_training``
  for train_cifar.py and train_imagenet.py. Their keys are written here only. One rule
  for both says what a ``--resume`` may change (``resume_config``, with config.py's
  RUNTIME_FLAGS) and which learning-rate schedule a resumed run continues on
  (``schedule_marker``).
- Files: atomic saving (a crash or a full disk never leaves a half-written checkpoint),
  safe loading (``weights_only=True``: no code runs), and loading weights into a network
  from any of the layouts in use: a plain state dict (the authors' CIFAR checkpoints, our
  ``weights.pt``), the same with every key prefixed ``module.`` (DataParallel / DDP), a
  dict wrapping it under ``'state_dict'`` (the authors' ImageNet checkpoint) or
  ``'model'`` (our full checkpoints). When keys or shapes do not fit, ``CheckpointError``
  names a few of them and the setting that is most likely wrong.
"""
from __future__ import annotations

import io
import os
from typing import Any, TypeVar

import torch
import torch.nn as nn

from config import CHANGES_THE_DRAWS, NEW_RUN_FLAGS, RUNTIME_FLAGS, RunConfig, SearchConfig, TrainConfig
from distributed import DistInfo, gather
from errors import CheckpointError, StorageError, UserError, special_path, write_bytes_atomic
from genotypes import Genotype, genotype_from_dict, genotype_to_dict
from run_files import CHECKPOINT, GENOTYPE, METRICS, WEIGHTS
from utils import get_rng_state, logger, set_rng_state

C = TypeVar("C", bound=RunConfig)
SEARCH_KIND = "pdarts-search"
TRAIN_FORMAT = "pdarts-eval-checkpoint/1"
# Stored in checkpoints since this project's schedule was corrected to the release's.
LR_SCHEDULE = "stepped-before-epoch"


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
        if obj.get("kind") == SEARCH_KIND:
            return "a train_search.py checkpoint (a search, not a trained network)"
        if str(obj.get("format", "")).startswith(TRAIN_FORMAT.split("/")[0]):
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


# ---------------------------------------------------------------------------------------
# Both runs: the learning-rate schedule a run continues on, and what a resume may change
# ---------------------------------------------------------------------------------------

def schedule_marker(stepped_before_epoch: bool) -> str | None:
    """What a checkpoint records of its run's learning-rate schedule: LR_SCHEDULE for the
    release's (epoch e at cos(pi (e+1)/E)), nothing for a run begun before this project
    corrected its schedule to it. Such a run keeps its old schedule (cos(pi e/E)) through
    every resume, so every checkpoint it writes carries no marker either."""
    return LR_SCHEDULE if stepped_before_epoch else None


def stepped_before_epoch(ckpt: dict) -> bool:
    """The schedule a checkpoint's run trains on (see ``schedule_marker``)."""
    return ckpt.get("lr_schedule") == LR_SCHEDULE


def warn_old_schedule(lr_at, epochs: int, start_epoch: int) -> None:
    """Say that a resumed run continues on the schedule it began with, when that differs
    from the release's for an epoch still to train. ``lr_at(epoch, stepped_before_epoch=)``."""
    if any(lr_at(e, stepped_before_epoch=False) != lr_at(e, stepped_before_epoch=True)
           for e in range(start_epoch, epochs)):
        logger.warning("this run began before the learning-rate schedule was corrected to the "
                       "release's (epoch e at cos(pi*(e+1)/E)); it continues on the schedule it "
                       "began with (cos(pi*e/E))")


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resume_config(request: C, saved: dict, ckpt: dict) -> C:
    """The config of a resumed run: the run's own (``saved``, its checkpoint's ``args``),
    with the run-time flags the command line gave (config.RUNTIME_FLAGS: where data is
    read, how it is loaded and reported). Any other flag given must equal the run's
    (whatever its default), else a UserError names each; ``--save``/``--note`` only name
    a new run and are ignored. ``request`` is the command line's config."""
    run = type(request).from_dict(saved, lr_stepped_before_epoch=stepped_before_epoch(ckpt))
    given = {k for k in request.given if hasattr(run, k)}
    recipe = sorted(given - RUNTIME_FLAGS - NEW_RUN_FLAGS)
    # Deviation: the release has no resume; a recipe flag that differs from the run's own
    # is refused, not silently ignored.
    conflicts = [f"--{k} {_shown(getattr(request, k))} (the run's: {_shown(getattr(run, k))})"
                 for k in recipe if getattr(request, k) != getattr(run, k)]
    if conflicts:
        raise UserError("--resume continues the saved run with its own settings; these flags "
                        "differ from them: " + ", ".join(conflicts) + ". Drop them, or start a "
                        "new run with the new settings")
    changes = {k: getattr(request, k) for k in sorted(given & RUNTIME_FLAGS)}
    for key, why in CHANGES_THE_DRAWS.items():
        if key in changes and changes[key] != getattr(run, key):
            logger.warning("--%s %s on resume, the run's was %s: %s, so from here on this run "
                           "differs from one never interrupted", key, changes[key],
                           getattr(run, key), why)
    return run.replace(given=request.given, **changes)


# ---------------------------------------------------------------------------------------
# The search's checkpoint (train_search.py), written after every epoch
# ---------------------------------------------------------------------------------------

# What a resume needs in a search checkpoint.
SEARCH_KEYS = ("args", "stage", "epoch", "world_size", "switches_normal", "switches_reduce",
               "model", "w_opt", "a_opt", "rng", "stages_done")


def search_state(cfg: SearchConfig, env: DistInfo, *, stage: int, epochs_done: int,
                 switches_normal, switches_reduce, model_args: dict, model: nn.Module,
                 w_opt: torch.optim.Optimizer, a_opt: torch.optim.Optimizer, scaler,
                 lr: float, skip_dropout: float, stages_done: list[dict], split_digest: str,
                 data_stats: dict | None) -> dict[str, Any]:
    """Everything a search resumes from after ``epochs_done`` epochs of ``stage``
    (0-based): the run's settings, where it is, the switches the stage runs with, the
    network and both optimizers (the release's state-dict layout), the finished stages,
    how the data was divided, and every process's random state (gathered: call on every
    process)."""
    return {
        "kind": SEARCH_KIND, "version": 1, "args": cfg.to_dict(),
        "stage": stage, "epoch": epochs_done, "world_size": env.world_size,
        "switches_normal": switches_normal, "switches_reduce": switches_reduce,
        "model_args": model_args,
        "model": model.state_dict(), "w_opt": w_opt.state_dict(), "a_opt": a_opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "lr": lr, "skip_dropout": skip_dropout, "stages_done": stages_done,
        "split_digest": split_digest, "data_stats": data_stats,
        "lr_schedule": schedule_marker(cfg.lr_stepped_before_epoch),
        "rng": gather(get_rng_state(), env),
    }


def save_search(run_dir: str, state: dict) -> None:
    save_atomic(state, os.path.join(run_dir, CHECKPOINT), resume_hint=run_dir)


def load_search(run_dir: str) -> dict:
    """A search run folder's checkpoint, checked: one line names what is wrong."""
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isdir(run_dir):
        raise UserError(f"--resume: no run folder {run_dir}")
    if not os.path.isfile(path):
        raise UserError(f"--resume: {missing_checkpoint(run_dir)}")
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != SEARCH_KIND:
        raise CheckpointError(f"{path} is {describe_checkpoint(ckpt)}; --resume of "
                              "train_search.py expects the folder of a search run")
    missing = [k for k in SEARCH_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is a search checkpoint without {', '.join(missing)} "
                              "(damaged or written by another version); it cannot be resumed")
    return ckpt


def missing_checkpoint(run_dir: str) -> str:
    """Why ``run_dir`` has no checkpoint file to resume, true to what the folder holds: a
    folder or a dangling link in its place, a checkpoint removed from a run whose
    metrics.jsonl records epochs, or a run that stopped in its first epoch."""
    path = os.path.join(run_dir, CHECKPOINT)
    what = special_path(path)
    if what is not None:
        return (f"{path} is {what}, not a checkpoint file; put the run's checkpoint.pt back in "
                "its place to resume")
    try:
        with open(os.path.join(run_dir, METRICS), "rb") as f:
            done = sum(1 for line in f if line.strip().endswith(b"}"))
    except OSError:
        done = 0
    if done:
        return (f"{run_dir} has no {CHECKPOINT}, although its {METRICS} records {done} finished "
                f"epoch(s): the file was removed or moved; put it back to resume")
    return (f"{run_dir} has no {CHECKPOINT}: the run stopped before its first epoch ended, so "
            "there is nothing to resume; start it again")


def resume_search(request: SearchConfig) -> tuple[SearchConfig, dict | None]:
    """``train_search.py --resume RUN_DIR``: the run's config (``resume_config``) and its
    checkpoint; (request, None) without --resume."""
    if not request.resume:
        return request, None
    ckpt = load_search(request.resume)
    return resume_config(request, ckpt["args"], ckpt), ckpt


def search_complete(run_dir: str, ckpt: dict, cfg: SearchConfig) -> bool:
    """The checkpoint is the last epoch of the last stage and the final cell was written."""
    return (ckpt["stage"] == cfg.num_stages - 1 and ckpt["epoch"] >= cfg.epochs
            and os.path.isfile(os.path.join(run_dir, GENOTYPE)))


def restore_search_stage(ckpt: dict, model: nn.Module, w_opt: torch.optim.Optimizer,
                         a_opt: torch.optim.Optimizer, scaler, env: DistInfo) -> int:
    """Load the stage's network, optimizers, scaler and this process's random state from
    ``ckpt``; returns the first epoch to run."""
    model.load_state_dict(ckpt["model"])
    w_opt.load_state_dict(ckpt["w_opt"])
    a_opt.load_state_dict(ckpt["a_opt"])
    rng = ckpt["rng"]
    set_rng_state(rng[env.rank] if len(rng) == env.world_size else rng[0])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"]


# ---------------------------------------------------------------------------------------
# Training's checkpoint (train_cifar.py, train_imagenet.py; read by test.py, export.py)
# ---------------------------------------------------------------------------------------

# What a resume and test.py need in a training checkpoint.
TRAIN_KEYS = ("model", "optimizer", "epoch", "args", "genotype", "network",
              "best_acc_on_test", "best_epoch_on_test", "last_acc", "last_top5", "last_loss")


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                   cfg: TrainConfig, genotype: Genotype, network: dict, best: dict,
                   last: dict, data: dict | None = None) -> dict[str, Any]:
    """The full checkpoint: plain types and tensors only, so ``torch.load(...,
    weights_only=True)`` reads it. ``epoch`` counts the epochs completed. ``data``: what
    an image folder run needs to be tested or resumed (classes, size, normalisation)."""
    return {
        "data": data,
        "format": TRAIN_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "args": cfg.to_dict(),
        "genotype": genotype_to_dict(genotype),
        "network": network,
        "best_acc_on_test": best["acc"],        # chosen on the test set: optimistic
        "best_epoch_on_test": best["epoch"],
        "last_acc": last.get("top1"),            # the headline: the final epoch's
        "last_top5": last.get("top5"),
        "last_loss": last.get("loss"),
        "lr_schedule": schedule_marker(cfg.lr_stepped_before_epoch),
    }


def save_training(run_dir: str, state: dict) -> None:
    """``checkpoint.pt``, then ``weights.pt`` (its network's state dict alone).
    Faithful to the release: weights.pt, a plain state dict, every epoch (the release's
    train_cifar.py saves ``model.module``'s, so it has no 'module.' prefix either)."""
    path = os.path.join(run_dir, CHECKPOINT)
    save_atomic(state, path, resume_hint=run_dir)
    save_atomic(state["model"], os.path.join(run_dir, WEIGHTS), resume_hint=run_dir,
                resume_from=path)


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT


def check_training_checkpoint(obj: Any, path: str) -> None:
    """A CheckpointError unless ``obj`` is a complete checkpoint.pt of a training run."""
    if not is_training_checkpoint(obj):
        raise CheckpointError(
            f"{path} is {describe_checkpoint(obj)}; expected the {CHECKPOINT} of a "
            f"train_cifar.py / train_imagenet.py run: give its run folder or its {CHECKPOINT}")
    missing = [k for k in TRAIN_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is a training checkpoint without {', '.join(missing)} "
                              "(damaged or written by another version); expected all of "
                              f"{', '.join(TRAIN_KEYS)}")


def checkpoint_genotype(obj: dict, source: str) -> Genotype:
    return genotype_from_dict(obj.get("genotype"), source=f"{source} (genotype)")


def training_path(path: str) -> str:
    """A training run folder's checkpoint.pt, or ``path`` itself when it is a file."""
    return os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path


def resume_training(request: C) -> tuple[C, dict | None]:
    """``--resume RUN_DIR_OR_CHECKPOINT`` of a training script: the run's config
    (``resume_config``, ``resume`` naming its checkpoint.pt) and the checkpoint;
    (request, None) without --resume."""
    if not request.resume:
        return request, None
    path = training_path(request.resume)
    ckpt = load_file(path)
    check_training_checkpoint(ckpt, path)
    return resume_config(request, ckpt["args"], ckpt).replace(resume=path), ckpt


def restore_training(ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[int, dict, dict]:
    """Load the network and the optimizer; returns (first epoch to run, the best epoch so
    far, the last epoch's test figures)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    best = {"acc": ckpt["best_acc_on_test"], "epoch": ckpt["best_epoch_on_test"]}
    last = {"top1": ckpt["last_acc"], "top5": ckpt["last_top5"], "loss": ckpt["last_loss"]}
    return ckpt["epoch"], best, last
