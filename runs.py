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

import datetime
import json
import logging
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

import torch

from checkpoint import load_file
from console import guard_stdout
from derivation import (
    DROPS_PER_STAGE,
    NUM_EDGES,
    NUM_STAGES,
    all_on_switches,
    prune_after_stage,
    replay_stages,
    softmax_rows,
)
from distributed import broadcast_object, cleanup_distributed, is_collective_failure
from errors import (
    ONE_LINE_ERRORS,
    CheckpointError,
    GenotypeError,
    NonFiniteLossError,
    RunFolderError,
    UserError,
    load_json,
    parse_json,
    remove_stale_temporaries,
    special_path,
    storage_error,
    write_all,
    write_bytes_atomic,
    write_json_atomic,
)
from flags import available_cpus
from genotypes import PRIMITIVES, alpha_rows_problem, genotype_from_dict, primitives_problem
from run_files import (
    ARCH_STATE,
    CHECKPOINT,
    LOCK,
    LOG,
    METRICS,
    SEARCH_PREFIX,
    TRAIN_PREFIX,
)
from utils import LOGGER_NAME, logger

SEARCH, TRAIN = "search", "train"
# Folder name prefixes of run_dir_name: {save}search-{note}-{time}, {save}eval-...
NAME_PREFIXES = {f"{SEARCH_PREFIX}-": SEARCH, f"{TRAIN_PREFIX}-": TRAIN}


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
    path = os.path.join(run_dir, LOCK)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            what = special_path(path)
            if what is not None:   # --save plays no part in a resume: say what to remove
                raise UserError(f"cannot lock the run folder {run_dir}: {path} is {what}, not "
                                "its lock file; remove it (it only marks which process owns "
                                "the run), then run again") from None
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
        holder = parse_json(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def release_run_locks() -> None:
    """Give up every run folder this process holds (the lock file is removed)."""
    _notes.clear()   # unsaid if the run stopped before its log existed
    for run_dir, fd in list(_held_locks.items()):
        try:
            os.remove(os.path.join(run_dir, LOCK))
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
            path = os.path.join(run_dir, LOG)
            try:
                # UTF-8 whatever the locale: a unicode path is logged as it is.
                fh = _LogFileHandler(path, encoding="utf-8")
            except OSError as e:   # a folder in its place, no permission: stdout only
                what = special_path(path)
                sys.stderr.write(f"warning: cannot write the log {path}: "
                                 f"{f'it is {what}' if what else e.strerror or e}; the log goes "
                                 "on to stdout only (rename or remove what is in its place to "
                                 "keep one)\n")
            else:
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
            records.append(parse_json(line))
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


def log_run_start(cfg, device: torch.device) -> None:
    """The run's settings (a config's saved ones, or a script's flags), versions, device."""
    settings = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    logger.info("args = %s", json.dumps(settings, sort_keys=True, default=str))
    logger.info("environment = %s", json.dumps(environment_info(device), sort_keys=True))
    if hasattr(cfg, "workers"):
        logger.info("data loading: %d worker process(es), %d CPU core(s) available",
                    cfg.workers, available_cpus())
    for line in getattr(cfg, "no_effect", ()):      # the release's --gpu
        logger.info(line)


def open_run_dir(save: str, kind: str, note: str, is_main: bool, existing: str | None = None) -> str:
    """Rank 0 creates ``{save}{kind}-{note}-{time}`` (or takes ``existing``, the folder of a
    resumed run), locks it for this run and tells the other processes its name."""
    run_dir = None
    if is_main:
        if existing is not None:
            run_dir = existing
        else:
            run_dir = create_run_dir(save, kind, note)
            # Known from here on: an interrupt before register_run still finds (and removes) it.
            _current_run.update(dir=os.path.abspath(run_dir), created=True)
        own_run_dir(run_dir)
    return broadcast_object(run_dir)


def truncate_metrics(path: str, epochs_done: int, stage: int | None = None,
                     epochs: int | None = None) -> None:
    """On resume: drop the metrics lines of epochs the checkpoint does not include (they
    will be run again) and a torn last line. A search counts epochs within its ``stage``
    (0-based) of ``epochs`` each; a training run has no stages. A file that lacks epochs
    the checkpoint has done (deleted, or cut short) is a warning."""
    if stage is None:
        rewrite_metrics(path, lambda record: record.get("epoch", -1) < epochs_done)
    else:
        rewrite_metrics(path, lambda record: (record.get("stage", 0) - 1, record.get("epoch", -1))
                        < (stage, epochs_done))
    warning = missing_metrics_warning(path, epochs_done, stage, epochs)
    if warning:
        logger.warning(warning)


def missing_metrics_warning(path: str, epochs_done: int, stage: int | None = None,
                            epochs: int | None = None) -> str | None:
    """A warning naming the epochs done (by the checkpoint) that ``metrics.jsonl`` has no
    line for, or None. ``epochs`` (a search's epochs per stage) lets the earlier stages be
    checked too."""
    if stage is None:
        expected = [(None, e) for e in range(epochs_done)]
    else:
        earlier = range(stage) if epochs is not None else []
        expected = ([(s + 1, e) for s in earlier for e in range(epochs)]
                    + [(stage + 1, e) for e in range(epochs_done)])
    if not expected:
        return None
    records = read_metrics_file(path)
    have = {(r.get("stage") if stage is not None else None, r.get("epoch"))
            for r in records if isinstance(r, dict)}
    missing = [key for key in expected if key not in have]
    if not missing:
        return None
    spans: list[list] = []   # runs of consecutive epochs, per stage
    for s, e in missing:
        if spans and spans[-1][0] == s and spans[-1][2] == e - 1:
            spans[-1][2] = e
        else:
            spans.append([s, e, e])
    shown = ", ".join((f"stage {s} " if s is not None else "")
                      + (f"epoch {a}" if a == b else f"epochs {a}-{b}")
                      for s, a, b in spans[:6]) + (" ..." if len(spans) > 6 else "")
    state = (f"is missing, so it has no line for the {len(expected)} epoch(s) the checkpoint has "
             f"done ({shown})" if not os.path.exists(path) else
             f"has lines for {len(expected) - len(missing)} of the {len(expected)} epochs the "
             f"checkpoint has done (none for {shown})")
    return (f"warning: {path} {state}; the resumed run appends its own epochs, so plots.py and "
            "report.py will lack those (restore the file from a copy to keep them)")


def write_arch_state(run_dir: str, stages: list[dict], extra: dict | None = None) -> None:
    """``arch_state.json``: the op names and, per finished stage, its alphas, switches and
    cell (with ``extra``: the final cell); rewritten after every stage."""
    write_json_atomic({"primitives": PRIMITIVES, "stages": stages, **(extra or {})},
                      os.path.join(run_dir, ARCH_STATE))


# The run folder of the run in progress, for the hint printed after Ctrl-C or SIGTERM;
# "created": this process made it in this run (an unstarted one is removed on interrupt).
_current_run: dict[str, Any] = {"dir": None, "checkpoint": CHECKPOINT, "script": None,
                                "created": False}


def register_run(run_dir: str, checkpoint: str, script: str) -> None:
    """Remember the run in progress: after Ctrl-C, run_main says how to resume it (or that
    it cannot be resumed because no checkpoint was written yet)."""
    _current_run.update(dir=os.path.abspath(run_dir), checkpoint=checkpoint, script=script)


def _script_name() -> str:
    script = _current_run["script"] or os.path.basename(sys.argv[0])
    return script if script.endswith(".py") else "SCRIPT.py"


def _has_checkpoint() -> bool:
    run_dir = _current_run["dir"]
    return run_dir is not None and os.path.isfile(os.path.join(run_dir, _current_run["checkpoint"]))


def resume_advice() -> str:
    """What to do after the run in progress stopped, true to what its folder holds: the
    resume command, or (no checkpoint yet) that it cannot be resumed."""
    run_dir = _current_run["dir"]
    if run_dir is None:
        return "nothing was saved; start the run again"
    if not _has_checkpoint():
        return (f"no epoch was saved yet, so {run_dir} cannot be resumed: start the run again "
                "(and delete that folder)")
    return f"continue with: python {_script_name()} --resume {run_dir}"


def interrupted_message(how: str = "interrupted") -> str:
    run_dir = _current_run["dir"]
    if run_dir is None:
        return f"{how} before the run folder was created; nothing to resume"
    if not _has_checkpoint():
        return (f"{how} in the first epoch, before a checkpoint was saved: {run_dir} "
                "cannot be resumed; start the run again (and delete that folder)")
    return f"{how}; continue with: python {_script_name()} --resume {run_dir}"


def _remove_unstarted_run() -> str | None:
    """After an interrupt: remove the run folder this process created in this run when no
    epoch of it finished (no checkpoint, no metrics line, no subfolder; what is left is
    its lock, log and start-up files). Returns the folder removed, or None."""
    run_dir = _current_run["dir"]
    if run_dir is None or not _current_run["created"] or _has_checkpoint():
        return None
    metrics = os.path.join(run_dir, METRICS)
    try:
        entries = [os.path.join(run_dir, name) for name in os.listdir(run_dir)]
        if any(os.path.isdir(p) for p in entries) or (os.path.isfile(metrics)
                                                      and os.path.getsize(metrics) > 0):
            return None
        close_logging()
        release_run_locks()
        for p in os.listdir(run_dir):
            os.remove(os.path.join(run_dir, p))
        os.rmdir(run_dir)
    except OSError:
        return None
    return run_dir


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster scheduler's stop, ``timeout``): the run ends as after Ctrl-C. A
    KeyboardInterrupt, so DataLoader workers that inherit the handler exit quietly."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not break the clean-up
    raise Terminated


def _catch_sigterm():
    """Turn SIGTERM into Terminated; returns the previous handler (None: not installed)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:   # not the main thread (an embedding program): leave SIGTERM alone
        return None


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _torchrun_note(cause: bool) -> str:
    """Under torchrun its own failure report (ChildFailedError and a traceback) follows
    ours: say which line explains."""
    if not under_torchrun():
        return ""
    rank = os.environ.get("RANK", "?")
    if cause:
        return (f" [process {rank} of the torchrun job: this is the cause; torchrun's "
                "ChildFailedError report that follows is a consequence]")
    return (f" [process {rank}: the cause is the other process's error line (none if it was "
            "killed or stopped); torchrun's ChildFailedError report that follows is a consequence]")


def run_main(main, args) -> int:
    """Run a script's ``main(args)``: user errors become one line on stderr and exit 2;
    Ctrl-C (exit 130) and SIGTERM (exit 143) end with the resume command; the run folder's
    lock is released either way."""
    _current_run.update(dir=None, checkpoint=CHECKPOINT, script=None, created=False)
    previous = _catch_sigterm()
    restore_stdout = guard_stdout()   # a closed, broken or full stdout must not stop the run
    try:
        try:
            return _run_reporting_errors(main, args)
        except KeyboardInterrupt as e:   # also a SIGTERM met while an error was reported
            return _report_interrupt(isinstance(e, Terminated))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        release_run_locks()
        cleanup_distributed()
        restore_stdout()


def _run_reporting_errors(main, args) -> int:
    try:
        return main(args) or 0
    except NonFiniteLossError as e:
        return _report_error(f"{e}; {_nonfinite_advice()}")
    except ONE_LINE_ERRORS as e:
        return _report_error(str(e) + _torchrun_note(cause=True))
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return _report_error(
            f"another process of this torchrun job failed or stopped responding ({first}); "
            f"{resume_advice()}{_torchrun_note(cause=False)}")


NONFINITE_FIXES = "with a lower --learning_rate, without --amp, or with checked data"
# The search has a second rate: its alpha steps (Adam) can blow up the alphas alone.
SEARCH_NONFINITE_FIXES = ("with a lower --learning_rate or --arch_learning_rate, without --amp, "
                          "or with checked data")


def _nonfinite_advice() -> str:
    """What to do after a non-finite value stopped the run, true to what its folder holds."""
    fixes = SEARCH_NONFINITE_FIXES if _script_name() == "train_search.py" else NONFINITE_FIXES
    if not _has_checkpoint():
        run_dir = _current_run["dir"]
        held = f" ({run_dir} holds no checkpoint)" if run_dir else ""
        return f"no epoch was saved yet{held}: start a new run {fixes}"
    return ("the run folder keeps the checkpoint of the last good epoch. A resumed run keeps "
            "its recipe, so --resume helps only if the cause was transient (e.g. a hardware "
            f"fault); otherwise start a new run {fixes}")


def _report_interrupt(terminated: bool) -> int:
    how = "stopped by SIGTERM" if terminated else "interrupted"
    message = interrupted_message(how)
    _log_to_file(message)
    removed = _remove_unstarted_run()
    if removed is not None:
        message = (f"{how} before its first epoch was saved: nothing to resume; removed its "
                   f"run folder {removed}; start the run again")
    print(message, file=sys.stderr)
    return 143 if terminated else 130


def _log_to_file(message: str, level: int = logging.WARNING) -> None:
    """Keep ``message`` in log.txt too, unless that write fails (a full disk)."""
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        for h in logger.handlers:
            if isinstance(h, logging.FileHandler):
                h.emit(logging.LogRecord(LOGGER_NAME, level, "", 0, message, None, None))
    finally:
        logging.raiseExceptions = raise_exceptions


def _report_error(message: str) -> int:
    _log_to_file(f"error: {message}", logging.ERROR)
    print(f"error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------
# Reading run folders back (plots.py, report.py)
# ---------------------------------------------------------------------------------------

def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return load_json(f)
    except OSError as e:
        raise RunFolderError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not valid JSON ({e})") from None


def read_metrics(run_dir: str) -> list[dict]:
    """The per-epoch records of the run's ``metrics.jsonl`` ([] when there is none), for
    plots and reports. A line that is not a record of this project (not JSON, not an
    object, no whole-number epoch, a value that is not a number, true/false, null or a
    list of numbers) is skipped, with one warning naming the file and its lines; a torn
    last line (a run killed while writing it) is dropped, as on resume."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise RunFolderError(f"cannot read {path}: {e.strerror}") from None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, bad = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = parse_json(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            if i == last:
                logger.warning("%s: dropped a torn last line (an interrupted write)", path)
            else:
                bad.append((i + 1, "not JSON"))
            continue
        problem = metrics_record_problem(record)
        if problem:
            bad.append((i + 1, problem))
        else:
            records.append(record)
    if bad:
        _warn_once(f"warning: {path}: skipped line{'s' if len(bad) > 1 else ''} "
                   f"{', '.join(str(n) for n, _ in bad)}, not a metrics record (line {bad[0][0]}: "
                   f"{bad[0][1]})")
    return records


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning about a file, said once per process (report.py reads a run more than once)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_value(v: Any) -> bool:
    """A metrics value: a number, true/false, null, or a (nested) list of numbers."""
    if isinstance(v, list):
        return all(_is_value(x) and not isinstance(x, bool) for x in v)
    # An integer is compared, not converted: float(10**400) raises OverflowError.
    return v is None or isinstance(v, bool) or (_is_number(v) and -sys.float_info.max
                                                <= v <= sys.float_info.max)


def metrics_record_problem(record: Any) -> str | None:
    """Why ``record`` is not a metrics line of this project (None when it is one)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__ if record is not None else 'null'}, not an object"
    epoch = record.get("epoch")
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
        return f"'epoch' is {json.dumps(epoch)}, not a whole number"
    stage = record.get("stage", 1)
    if not (isinstance(stage, int) and not isinstance(stage, bool) and stage >= 1):
        return f"'stage' is {json.dumps(stage)}, not a stage number (1, 2, ...)"
    for key, value in record.items():
        if not _is_value(value):
            return f"'{key}' is {json.dumps(value)[:40]}, not a number"
    return None


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
    """The run's ``arch_state.json`` (None if there is none), every stage checked: a
    RunFolderError names the file and what is wrong."""
    path = os.path.join(run_dir, ARCH_STATE)
    if not os.path.isfile(path):
        return None
    state = read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("stages"), list):
        raise RunFolderError(f"{path}: expected a JSON object with a 'stages' list")
    problem = primitives_problem(state)
    if problem:
        raise RunFolderError(f"{path}: {problem}")
    for s, stage in enumerate(state["stages"]):
        problem = _arch_stage_problem(stage)
        if problem:
            raise RunFolderError(f"{path}: stage {s + 1} {problem}; this is not an "
                                 "arch_state.json written by train_search.py")
    return state


def _arch_stage_problem(stage: Any) -> str | None:
    if not isinstance(stage, dict):
        return f"is {json.dumps(stage)[:40]}, not a JSON object"
    for cell in ("normal", "reduce"):
        switches = stage.get(f"switches_{cell}")
        if not (isinstance(switches, list) and len(switches) == NUM_EDGES
                and all(isinstance(row, list) and len(row) == len(PRIMITIVES) and any(row)
                        and all(isinstance(v, bool) for v in row) for row in switches)):
            return (f"needs 'switches_{cell}' as {NUM_EDGES} rows of {len(PRIMITIVES)} true/false "
                    "values (at least one true)")
        problem = alpha_rows_problem(stage.get(f"alphas_{cell}"), [sum(on) for on in switches])
        if problem:
            return (f"needs 'alphas_{cell}' as {NUM_EDGES} rows, one number per op switched on "
                    f"in 'switches_{cell}': {problem}")
    return None


def read_genotype(path: str):
    try:
        return genotype_from_dict(read_json(path), source=path)
    except GenotypeError as e:
        raise RunFolderError(str(e)) from None


def search_stage_switches(arch_state: dict | None, num_stages: int,
                          running: tuple[list, list] | None = None) -> list[tuple[list, list]]:
    """The (normal, reduce) switches each of the first ``num_stages`` stages ran with,
    replayed from the alphas of the finished stages in arch_state.json as the search
    prunes them. A stage still running has the switches ``running`` (its checkpoint's);
    without them, stage 1's are all ops and a later stage's the paper's pruning of the last
    finished one."""
    done = (arch_state or {}).get("stages", [])
    if num_stages > len(done) + 1:
        raise RunFolderError(f"arch_state.json lacks stage {num_stages - 1} although metrics.jsonl "
                             f"has epochs of stage {num_stages}")
    try:
        switches = replay_stages(done, ARCH_STATE) if done else []
    except UserError as e:
        raise RunFolderError(str(e)) from None
    if num_stages == len(done) + 1:
        if running is None and not done:
            running = all_on_switches(), all_on_switches()
        elif running is None:
            s = len(done) - 1
            if s >= NUM_STAGES - 1:
                raise RunFolderError(f"the switches of stage {num_stages}, still running, are in "
                                     f"its {CHECKPOINT}, which cannot be read")
            running = prune_after_stage(*switches[-1], softmax_rows(done[-1]["alphas_normal"]),
                                        softmax_rows(done[-1]["alphas_reduce"]), DROPS_PER_STAGE[s],
                                        False)
        switches.append(running)
    return switches[:num_stages]
