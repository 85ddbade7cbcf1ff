"""Shared by every script: run folders, logging, metrics, meters, progress output,
seeding, the distributed (torchrun) setup and the non-finite-loss guard.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

LOGGER_NAME = "pdarts"
logger = logging.getLogger(LOGGER_NAME)


class UserError(Exception):
    """Bad input from the user. Scripts print it as one line and exit with status 2."""


class NonFiniteLossError(UserError):
    pass


# ---------------------------------------------------------------------------------------
# Run folder, logging, metrics
# ---------------------------------------------------------------------------------------

def run_dir_name(save: str, kind: str, note: str) -> str:
    """The release's naming: ``{save}{kind}-{note}-{YYYYmmdd-HHMMSS}``."""
    return f"{save}{kind}-{note}-{time.strftime('%Y%m%d-%H%M%S')}"


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
            fh = logging.FileHandler(os.path.join(run_dir, "log.txt"))
            fh.setFormatter(fmt)
            logger.addHandler(fh)
    else:
        logger.setLevel(logging.WARNING)
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        logger.addHandler(stream)
    return logger


def close_logging() -> None:
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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


def check_finite(value: float, what: str = "loss") -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the {what} became {value}; stopping. The last good checkpoint is kept: lower "
            "--learning_rate, check the data, or resume from it with --resume")


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


def init_distributed(device_arg: str = "auto") -> DistInfo:
    """Single process unless launched by torchrun (WORLD_SIZE > 1). NCCL on GPU, gloo on
    CPU. ``device_arg`` is ``auto``, ``cpu`` or ``cuda``."""
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
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
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
        for h in logger.handlers:  # keep the reason in log.txt too
            if isinstance(h, logging.FileHandler):
                h.emit(logging.LogRecord(LOGGER_NAME, logging.ERROR, "", 0, f"error: {e}", None, None))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(), file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()
