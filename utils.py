"""Shared by every script: run folders (atomic creation, a lock while a process owns
one), logging, metrics, meters, progress output, seeding, the distributed (torchrun)
setup, the non-finite guards and the one-line reports of storage faults.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import logging
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

import torch
import torch.distributed as dist

LOGGER_NAME = "pdarts"
logger = logging.getLogger(LOGGER_NAME)


class UserError(Exception):
    """Bad input from the user. Scripts print it as one line and exit with status 2."""


class NonFiniteLossError(UserError):
    pass


class StorageError(UserError):
    """A write that failed: disk full, permission denied, read-only file system."""


def storage_error(e: OSError, path: str, what: str = "") -> StorageError:
    """One line for a failed write of ``path``: what went wrong and where."""
    what = f"{what} " if what else ""
    folder = os.path.dirname(os.path.abspath(path))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"the disk is full (no space left on the device holding {folder}) "
                            f"while writing {what}{path}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write {what}{path}: the folder {folder} is not writable "
                            "(permission denied); make it writable or choose another --save")
    if e.errno == errno.EROFS:
        return StorageError(f"cannot write {what}{path}: the folder {folder} is on a read-only "
                            "file system; choose another --save")
    return StorageError(f"cannot write {what}{path}: {e.strerror or e}")


def write_bytes_atomic(data: bytes, path: str, what: str = "") -> None:
    """Write ``data`` to a temporary file beside ``path`` (one write, flushed to disk),
    then rename it over ``path``: a crash or a full disk leaves the previous file intact
    and no temporary behind (StorageError on failure)."""
    tmp = f"{path}{TMP_INFIX}{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise storage_error(e, path, what) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# Temporary files are named {file}.tmp.{pid}; a kill while writing leaves one behind.
TMP_INFIX = ".tmp."


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporaries of interrupted writes in ``folder`` (call it while holding
    the folder's lock, so no other process is writing them); return their names."""
    removed = []
    for name in sorted(os.listdir(folder)):
        stem, sep, pid = name.rpartition(TMP_INFIX)
        if sep and stem and pid.isdigit():
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


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
                _write_all(fd, data)
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


def read_metrics(path: str) -> list[dict]:
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
    records = [r for r in read_metrics(path) if keep(r)]
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
        from flags import available_cpus

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


# ---------------------------------------------------------------------------------------
# Meters and accuracy (device-side: no host synchronisation until a value is read)
# ---------------------------------------------------------------------------------------

class AverageMeter:
    """Running average of values that may be device tensors; summed on the device and
    only read back (one sync) when ``avg`` is asked for."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum: torch.Tensor | float = 0.0
        self.count = 0

    def update(self, val, n: int = 1) -> None:
        if isinstance(val, torch.Tensor):
            val = val.detach().float()
        self.sum = self.sum + val * n
        self.count += n

    @property
    def avg(self) -> float:
        if self.count == 0:
            return 0.0
        total = self.sum.item() if isinstance(self.sum, torch.Tensor) else float(self.sum)
        return total / self.count

    def all_reduce(self) -> None:
        """Sum this meter over all ranks (call on every rank at the end of an epoch)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = self.sum.device if isinstance(self.sum, torch.Tensor) else _dist_device()
        t = torch.tensor([float(self.sum) if not isinstance(self.sum, torch.Tensor) else 0.0,
                          float(self.count)], device=device, dtype=torch.float64)
        if isinstance(self.sum, torch.Tensor):
            t[0] = self.sum.to(torch.float64)
        dist.all_reduce(t)
        self.sum = t[0]
        self.count = int(t[1].item())


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[torch.Tensor]:
    """Top-k accuracies in percent, as 0-dim tensors on the output's device."""
    maxk = min(max(topk), output.shape[1])
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.eq(target.view(-1, 1))
    return [correct[:, :min(k, maxk)].any(dim=1).float().mean() * 100.0 for k in topk]


NONFINITE_ADVICE = (
    "stopping before this epoch is saved; the run folder keeps the checkpoint of the last "
    "good epoch. A resumed run keeps its recipe, so --resume helps only if the cause was "
    "transient (e.g. a hardware fault); otherwise start a new run with a lower "
    "--learning_rate, without --amp, or with checked data")


def check_finite(value: float, what: str = "loss") -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the {what} became {value}; {NONFINITE_ADVICE}")


def check_finite_state(model: torch.nn.Module) -> None:
    """Before saving an epoch: every floating-point parameter and buffer (batch-norm
    running statistics, alphas) must be finite (one host sync)."""
    tensors = [(k, t) for k, t in model.state_dict().items() if t.is_floating_point()]
    if not tensors:
        return
    ok = torch.stack([t.detach().isfinite().all() for _, t in tensors])
    if dist.is_available() and dist.is_initialized():  # every process stops together
        bad = (~ok.all()).to(_dist_device(), torch.float32).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() and bool(ok.all()):
            raise NonFiniteLossError(f"another process's network became non-finite; {NONFINITE_ADVICE}")
    if not bool(ok.all()):
        name = tensors[int((~ok).nonzero()[0])][0]
        kind = ("batch-norm statistic" if name.endswith(("running_mean", "running_var"))
                else "network value")
        raise NonFiniteLossError(f"the {kind} {name} became non-finite; {NONFINITE_ADVICE}")


class Progress:
    """Progress over one epoch: a live bar on a terminal, plain lines every
    ``report_freq`` steps otherwise (parsable in logs)."""

    def __init__(self, total: int, desc: str, report_freq: int = 50, enabled: bool = True) -> None:
        self.total = total
        self.desc = desc
        self.report_freq = max(1, report_freq)
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self.start = time.time()

    def update(self, step: int, meters: dict[str, AverageMeter] | None = None) -> None:
        """``step`` counts from 1. Reading meters syncs the device, so it is only done at
        report points."""
        if not self.enabled:
            return
        if self.tty:
            if step % max(1, self.total // 100) and step != self.total:
                return
            width = 30
            done = int(width * step / max(1, self.total))
            elapsed = time.time() - self.start
            eta = elapsed / step * (self.total - step)
            extra = ""
            if meters and (step % self.report_freq == 0 or step == self.total):
                extra = " " + " ".join(f"{k} {m.avg:.3f}" for k, m in meters.items())
            sys.stdout.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] "
                             f"{step}/{self.total} eta {eta:5.0f}s{extra}   ")
            if step == self.total:
                sys.stdout.write("\n")
            sys.stdout.flush()
        elif step % self.report_freq == 0 or (step == self.total and self.total < self.report_freq):
            # An epoch shorter than report_freq still prints one line, at its end.
            parts = " ".join(f"{k} {m.avg:.6f}" for k, m in (meters or {}).items())
            logger.info("%s step %03d/%d %s", self.desc, step, self.total, parts)


# ---------------------------------------------------------------------------------------
# The learning-rate schedule shared by the search and the training scripts
# ---------------------------------------------------------------------------------------

# Stored in checkpoints since the correction below; a checkpoint without it began on the
# schedule before it and resumes on that one.
LR_SCHEDULE = "stepped-before-epoch"


def cosine_lr(lr0: float, epoch: int, epochs: int, lr_min: float = 0.0,
              stepped_before_epoch: bool = True) -> float:
    """The rate epoch ``epoch`` (0-based) of ``epochs`` trains at, set once per epoch.

    Faithful to the release: its CosineAnnealingLR is stepped at the start of every epoch
    (the PyTorch < 1.1 order), so epoch e trains at the rate of step e + 1:
    lr_min + (lr0 - lr_min) * (1 + cos(pi * (e + 1) / E)) / 2, epoch 0 already below lr0
    and the last epoch at lr_min (SPEC sections 2 and 5). ``stepped_before_epoch=False``
    gives cos(pi * e / E), this project's schedule before the correction, kept only so that
    a run begun then resumes on the schedule it began with."""
    step = epoch + 1 if stepped_before_epoch else epoch
    return lr_min + (lr0 - lr_min) * (1 + math.cos(math.pi * step / epochs)) / 2


def schedule_of_checkpoint(ckpt: dict) -> bool:
    """``stepped_before_epoch`` for a resumed run: True for checkpoints written since the
    correction (they carry LR_SCHEDULE), False for older ones."""
    return ckpt.get("lr_schedule") == LR_SCHEDULE


# ---------------------------------------------------------------------------------------
# Seeding and devices
# ---------------------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:
        pass
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def get_rng_state() -> dict:
    import numpy as np

    # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store
    # it as plain Python values so a checkpoint with RNG states loads safely.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------
# Distributed (torchrun) helpers
# ---------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _dist_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Seconds a collective may wait for the other processes before the job stops: a killed
# or stopped process then ends the job in minutes, not after torch's 10-30 min default.
# It must exceed the longest gap between collectives: one step (the first one compiles
# under --compile) and rank 0 writing a checkpoint.
DIST_TIMEOUT_S = 300


def add_dist_timeout_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    from flags import positive_float

    parser.add_argument("--dist_timeout", type=positive_float, default=DIST_TIMEOUT_S, metavar="SECONDS",
                        help="under torchrun: stop when a process waits this long for the "
                             "others (one was killed or hangs); raise it if a step or a "
                             "checkpoint write takes longer")


def init_distributed(device_arg: str = "auto", timeout_s: float = DIST_TIMEOUT_S) -> DistInfo:
    """Single process unless launched by torchrun (WORLD_SIZE > 1). NCCL on GPU, gloo on
    CPU. ``device_arg`` is ``auto``, ``cpu`` or ``cuda``; ``timeout_s`` bounds every
    collective."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if not timeout_s > 0:
            raise UserError(f"--dist_timeout must be a positive number of seconds (got {timeout_s})")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank (identity when single)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory in MiB since the last reset (0 on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return 0.0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


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


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (batch-norm running statistics) before
    evaluating or saving: each process updated its own copy with its own batches, so
    without this the figures would depend on how the data was split over the processes."""
    if dist.is_available() and dist.is_initialized():
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def run_main(main, args) -> int:
    """Run a script's ``main(args)``: user errors become one line on stderr and exit 2."""
    from checkpoint import CheckpointError
    from genotypes import GenotypeError

    _current_run.update(dir=None, checkpoint=None, script=None)
    try:
        return main(args) or 0
    except (UserError, CheckpointError, GenotypeError) as e:
        return _report_error(str(e))
    except RuntimeError as e:
        if not _is_collective_failure(e):
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


# How gloo and NCCL report a peer that died or stopped answering (gloo raises a plain
# RuntimeError, newer code paths DistError).
_COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                        "Application timeout caused pair closure", "NCCL", "gloo", "ProcessGroup")


def _is_collective_failure(e: RuntimeError) -> bool:
    if isinstance(e, dist.DistError):
        return True
    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and any(s in str(e) for s in _COLLECTIVE_FAILURES))


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
