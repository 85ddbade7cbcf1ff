"""The run folder's whole life, for every script: creating it (``{save}search-...``,
``{save}eval-...``), locking it while a process owns it, its log, its ``metrics.jsonl``,
``arch_state.json``, the checks of ``--resume``, the one-line error report and the hint
after Ctrl-C (``run_main``), and reading finished or stopped runs back for plots.py and
report.py.

A search run has ``arch_state.json`` or metrics lines with a ``stage``; it finished when
``genotype.json`` exists. A training run has metrics lines with ``test_acc`` (or a
training ``checkpoint.pt``); it finished when its checkpoint counts all ``--epochs``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

import torch

from checkpoint import describe_checkpoint, load_file
from distributed import broadcast_object, cleanup_distributed, is_collective_failure
from errors import (
    ONE_LINE_ERRORS,
    CheckpointError,
    GenotypeError,
    RunFolderError,
    UserError,
    remove_stale_temporaries,
    storage_error,
    write_all,
    write_bytes_atomic,
    write_json_atomic,
)
from flags import available_cpus
from genotypes import PRIMITIVES, format_genotype, genotype_from_dict, load_genotype_file
from model_search import NUM_STAGES, all_on_switches, prune_after_stage, softmax_rows
from utils import LOGGER_NAME, logger

METRICS = "metrics.jsonl"
ARCH_STATE = "arch_state.json"
GENOTYPE = "genotype.json"
BUDGETS = "genotypes_by_skip_budget.json"
CHECKPOINT = "checkpoint.pt"
LOG = "log.txt"
SEARCH, TRAIN = "search", "train"
# Folder name prefixes of utils.run_dir_name: {save}search-{note}-{time}, {save}eval-...
NAME_PREFIXES = {"search-": SEARCH, "eval-": TRAIN}


# ---------------------------------------------------------------------------------------
# Run folder, logging, metrics
# ---------------------------------------------------------------------------------------

def run_dir_name(save: str, kind: str, note: str) -> str:
    """The release's naming: ``{save}{kind}-{note}-{YYYYmmdd-HHMMSS}``."""
    return f"{save}{kind}-{note}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(save: str, kind: str, note: str) -> str:
    """Create ``{save}{kind}-{note}-{time}`` atomically; when it exists (two runs started
    in the same second) take the next free suffix -2, -3, ... A folder that cannot be
    created is a UserError naming it."""
    base = run_dir_name(save, kind, note)
    parent = os.path.dirname(base)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        # Deviation: an existing folder gets the next suffix; mkdir itself is the test
        # (no gap between "does it exist" and "create it" for another run to fall into).
        for k in range(1, 10000):
            run_dir = base if k == 1 else f"{base}-{k}"
            try:
                os.mkdir(run_dir)
                return run_dir
            except FileExistsError:
                continue
    except OSError as e:
        where = parent or os.getcwd()
        raise UserError(f"cannot create the run folder {base} in {os.path.abspath(where)}: "
                        f"{e.strerror or e}; make the folder writable or choose another --save") from None
    raise UserError(f"cannot create the run folder {base}: every suffix up to -9999 exists")


LOCK_NAME = "run.lock"
_notes: list[str] = []             # said about a run folder before its log exists
_held_locks: dict[str, int] = {}   # run folder -> open descriptor of its lock file


def lock_run_dir(run_dir: str) -> None:
    """Own ``run_dir`` until release_run_locks() or the process ends: a second process
    (e.g. a second --resume of the same run) is refused with the holder's pid and host.
    The lock is a kernel lock (flock) on ``run.lock``, so a lock left by a dead process
    is free and simply taken over; the file only says who holds it."""
    key = os.path.realpath(run_dir)
    if fcntl is None or key in _held_locks:
        return
    path = os.path.join(run_dir, LOCK_NAME)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error(e, path, "the run lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_lock(fd)
            os.close(fd)
            raise UserError(
                f"the run folder {run_dir} is in use by process {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('since', '?')}); wait for it to end "
                f"or stop it first. Two processes must not write one run") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    previous = _read_lock(fd)
    if previous.get("pid") not in (None, os.getpid()):
        _notes.append(f"took over the lock of {run_dir} from process {previous.get('pid')} on "
                      f"{previous.get('host')}, which has ended")
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    _held_locks[key] = fd


def _read_lock(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def release_run_locks() -> None:
    """Give up every run folder this process holds (the lock file is removed)."""
    _notes.clear()   # unsaid if the run stopped before its log existed
    for run_dir, fd in list(_held_locks.items()):
        try:
            os.remove(os.path.join(run_dir, LOCK_NAME))
        except OSError:
            pass
        os.close(fd)
        del _held_locks[run_dir]


def own_run_dir(run_dir: str) -> None:
    """Lock the run folder and remove the temporaries that a kill during a write left."""
    lock_run_dir(run_dir)
    removed = remove_stale_temporaries(run_dir)
    if removed:
        _notes.append(f"removed {len(removed)} temporary file(s) of an interrupted write: "
                      f"{', '.join(removed)}")


def setup_logging(run_dir: str | None, is_main: bool = True) -> logging.Logger:
    """One log format to stdout and ``run_dir/log.txt`` (rank 0 only; other ranks log
    warnings and errors to stderr)."""
    close_logging()  # close (not just drop) the handlers of a previous run in this process
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%m/%d %I:%M:%S %p")
    if is_main:
        logger.setLevel(logging.INFO)
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(fmt)
        logger.addHandler(stream)
        if run_dir is not None:
            fh = _LogFileHandler(os.path.join(run_dir, "log.txt"))
            fh.setFormatter(fmt)
            logger.addHandler(fh)
        while _notes:
            logger.info(_notes.pop(0))
    else:
        logger.setLevel(logging.WARNING)
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        logger.addHandler(stream)
    return logger


class _LogFileHandler(logging.FileHandler):
    """log.txt. A write that fails (a full disk) is reported once, in one line, instead of
    a traceback per record; the log goes on to stdout, and the failing checkpoint or
    metrics write stops the run with its own error line."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):
            super().handleError(record)
        elif not self.failed:
            self.failed = True
            sys.stderr.write(f"warning: {storage_error(e, self.baseFilename, 'the log')}\n")


def close_logging() -> None:
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only). Each line
    goes to the file in one write call, so a kill leaves at most one torn last line
    (read_metrics drops it); non-finite numbers are written as null (valid JSON)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        data = (json.dumps(_finite_or_none(record), default=_json_default, allow_nan=False)
                + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
        except OSError as e:
            raise storage_error(e, self.path, "the metrics line to") from None


def _finite_or_none(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite_or_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_or_none(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return _finite_or_none(o.tolist())
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_metrics_file(path: str) -> list[dict]:
    """The records of ``metrics.jsonl``. A torn last line (a kill or a full disk while it
    was written) is dropped with a warning: it belongs to an epoch after the checkpoint.
    A broken line before the last is a UserError."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            if any(rest.strip() for rest in lines[i + 1:]):
                raise UserError(f"{path}: line {i + 1} is not JSON; repair or remove that "
                                "line, then resume") from None
            logger.warning("%s: dropped a torn last line (an interrupted write)", path)
    return records


def rewrite_metrics(path: str, keep: Callable[[dict], bool]) -> None:
    """On resume: keep only the records ``keep`` accepts (the epochs the checkpoint
    includes), dropping a torn last line; the file is replaced atomically."""
    if not os.path.isfile(path):
        return
    records = [r for r in read_metrics_file(path) if keep(r)]
    data = "".join(json.dumps(_finite_or_none(r), allow_nan=False) + "\n" for r in records)
    write_bytes_atomic(data.encode(), path, "the metrics file")


def environment_info(device: torch.device) -> dict:
    """Versions, git commit and device, logged at the start of every run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": commit,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def log_run_start(args, device: torch.device) -> None:
    logger.info("args = %s", json.dumps(vars(args), sort_keys=True, default=str))
    logger.info("environment = %s", json.dumps(environment_info(device), sort_keys=True))
    if hasattr(args, "workers"):
        logger.info("data loading: %d worker process(es), %d CPU core(s) available",
                    args.workers, available_cpus())


def refuse_changed_flags(given: dict, saved: dict, free, defaults: dict | None = None) -> None:
    """``--resume`` continues the saved run with its own settings: a flag given on the
    command line with a value other than the run's is an error, unless it is in ``free``
    (where data is read, how often to report, ...). A flag the saved run predates is
    compared with its default (``defaults``), the value that run used."""
    defaults = defaults or {}
    missing = object()
    conflicts = []
    for key in sorted(given):
        old = saved.get(key, defaults.get(key, missing))
        if key not in free and old is not missing and given[key] != old:
            conflicts.append(f"--{key} {given[key]} (the run's: {old})")
    if conflicts:
        raise UserError("--resume continues the saved run with its own settings; these flags "
                        "differ from them: " + ", ".join(conflicts) + ". Drop them, or start a "
                        "new run with the new settings")


def open_run_dir(save: str, kind: str, note: str, is_main: bool, existing: str | None = None) -> str:
    """Rank 0 creates ``{save}{kind}-{note}-{time}`` (or takes ``existing``, the folder of a
    resumed run), locks it for this run and tells the other processes its name."""
    run_dir = None
    if is_main:
        run_dir = existing if existing is not None else create_run_dir(save, kind, note)
        own_run_dir(run_dir)
    return broadcast_object(run_dir)


def truncate_metrics(path: str, epochs_done: int, stage: int | None = None) -> None:
    """On resume: drop the metrics lines of epochs the checkpoint does not include (they
    will be run again) and a torn last line. A search counts epochs within its ``stage``
    (0-based); a training run has no stages."""
    if stage is None:
        rewrite_metrics(path, lambda record: record.get("epoch", -1) < epochs_done)
    else:
        rewrite_metrics(path, lambda record: (record.get("stage", 0) - 1, record.get("epoch", -1))
                        < (stage, epochs_done))


def write_arch_state(run_dir: str, stages: list[dict], extra: dict | None = None) -> None:
    """``arch_state.json``: the op names and, per finished stage, its alphas, switches and
    cell (with ``extra``: the final cell); rewritten after every stage."""
    write_json_atomic({"primitives": PRIMITIVES, "stages": stages, **(extra or {})},
                      os.path.join(run_dir, ARCH_STATE))


# The run folder of the run in progress, for the hint printed after Ctrl-C.
_current_run: dict[str, str | None] = {"dir": None, "checkpoint": None, "script": None}


def register_run(run_dir: str, checkpoint: str, script: str) -> None:
    """Remember the run in progress: after Ctrl-C, run_main says how to resume it (or that
    it cannot be resumed because no checkpoint was written yet)."""
    _current_run.update(dir=os.path.abspath(run_dir), checkpoint=checkpoint, script=script)


def interrupted_message() -> str:
    run_dir, script = _current_run["dir"], _current_run["script"]
    if run_dir is None:
        return "interrupted before the run folder was created; nothing to resume"
    if not os.path.isfile(os.path.join(run_dir, _current_run["checkpoint"])):
        return (f"interrupted in the first epoch, before a checkpoint was saved: {run_dir} "
                "cannot be resumed; start the run again (and delete that folder)")
    return f"interrupted; continue with: python {script} --resume {run_dir}"


def run_main(main, args) -> int:
    """Run a script's ``main(args)``: user errors become one line on stderr and exit 2."""
    _current_run.update(dir=None, checkpoint=None, script=None)
    try:
        return main(args) or 0
    except ONE_LINE_ERRORS as e:
        return _report_error(str(e))
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return _report_error(
            f"another process of this torchrun job failed or stopped responding ({first}); "
            "the run folder keeps the checkpoint of the last completed epoch: continue with "
            "--resume RUN_DIR")
    except KeyboardInterrupt:
        print(interrupted_message(), file=sys.stderr)
        return 130
    finally:
        release_run_locks()
        cleanup_distributed()


def _report_error(message: str) -> int:
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    try:  # keep the reason in log.txt too, unless that write fails (a full disk)
        for h in logger.handlers:
            if isinstance(h, logging.FileHandler):
                h.emit(logging.LogRecord(LOGGER_NAME, logging.ERROR, "", 0, f"error: {message}",
                                         None, None))
    finally:
        logging.raiseExceptions = raise_exceptions
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------
# Resuming a search (train_search.py --resume); a training run's is engine.load_resume
# ---------------------------------------------------------------------------------------

# What a resume needs in a search checkpoint.
SEARCH_CHECKPOINT_KEYS = ("args", "stage", "epoch", "world_size", "switches_normal",
                          "switches_reduce", "model", "w_opt", "a_opt", "rng", "stages_done")



def load_search_resume(args: argparse.Namespace, runtime_flags: Sequence[str],
                       defaults: dict) -> tuple[argparse.Namespace, dict]:
    """``train_search.py --resume``: the run's checkpoint and its settings, with the
    ``runtime_flags`` of this command (``defaults``: the flags' defaults, the values of
    a flag the saved run predates)."""
    path = os.path.join(args.resume, CHECKPOINT)
    if not os.path.isdir(args.resume):
        raise UserError(f"--resume: no run folder {args.resume}")
    if not os.path.isfile(path):
        raise UserError(f"--resume: {args.resume} has no {CHECKPOINT}: the run stopped before "
                        "its first epoch ended, so there is nothing to resume; start it again")
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "pdarts-search":
        raise CheckpointError(f"{path} is {describe_checkpoint(ckpt)}; --resume of "
                              "train_search.py expects the folder of a search run")
    missing = [k for k in SEARCH_CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is a search checkpoint without {', '.join(missing)} "
                              "(damaged or written by another version); it cannot be resumed")
    saved = dict(ckpt["args"])
    # Deviation: the release has no resume. As train_cifar.py does, a recipe flag that
    # differs from the run's own is refused, not silently ignored; save/note only name
    # the folder of a new run.
    refuse_changed_flags(getattr(args, "resume_given", {}), saved,
                         set(runtime_flags) | {"save", "note"}, defaults)
    overrides = set(getattr(args, "resume_overrides", [])) | {"resume", "stop_after_epochs", "derive"}
    for key in overrides:
        saved[key] = getattr(args, key)
    saved["resume_overrides"] = sorted(overrides)
    return argparse.Namespace(**saved), ckpt


def search_complete(run_dir: str, ckpt: dict, epochs: int) -> bool:
    """The checkpoint is the last epoch of the last stage and the final cell was written."""
    return (ckpt["stage"] == NUM_STAGES - 1 and ckpt["epoch"] >= epochs
            and os.path.isfile(os.path.join(run_dir, GENOTYPE)))


def report_complete(run_dir: str, is_main: bool) -> int:
    """``--resume`` of a finished search: say so and print its cell; nothing is re-run,
    re-derived or appended."""
    path = os.path.join(run_dir, GENOTYPE)
    genotype = load_genotype_file(path)
    if is_main:
        print(f"the search in {os.path.abspath(run_dir)} is complete (all {NUM_STAGES} stages): "
              f"nothing to resume. Its cell ({path}; re-derive at another skip budget with "
              f"--derive {os.path.join(run_dir, ARCH_STATE)} --max_skip M):", flush=True)
        print(format_genotype(genotype), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# Reading run folders back (plots.py, report.py)
# ---------------------------------------------------------------------------------------

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
    done = (arch_state or {}).get("stages", [])
    result = []
    for s in range(num_stages):
        if s < len(done):
            result.append((done[s]["switches_normal"], done[s]["switches_reduce"]))
        elif s == 0:
            result.append((all_on_switches(), all_on_switches()))
        elif s - 1 < len(done):
            prev = done[s - 1]
            result.append(prune_after_stage(
                s - 1, prev["switches_normal"], prev["switches_reduce"],
                softmax_rows(prev["alphas_normal"]), softmax_rows(prev["alphas_reduce"])))
        else:
            raise RunFolderError(f"arch_state.json lacks stage {s} although metrics.jsonl has "
                                 f"epochs of stage {s + 1}")
    return result
