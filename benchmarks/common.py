"""Timing helpers shared by the benchmarks: warm-up, device synchronisation, peak
memory, one results table, and the environment line recorded with every result."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_paths(make_step: Callable[[str], Callable[[], None]], paths: list[str],
                  device: torch.device, images_per_step: int, warmup: int,
                  steps: int) -> list[tuple[str, dict[str, float]]]:
    """Images/s, step time and peak memory of every path's step.

    On CUDA each path is built, warmed up and timed on its own, its timed steps back to
    back and timed together (a sync per step would hide the cost of host syncs inside a
    step), with its own peak memory. On the CPU, where shared machines drift by tens of
    percent within a minute, all paths are built first and their steps are taken in
    turn (plain, default, ..., plain, default, ...); each step is timed on its own and
    the median is used."""
    if device.type == "cuda":
        rows = []
        for path in paths:
            step = make_step(path)
            for _ in range(warmup):
                step()
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            seconds = (time.perf_counter() - start) / steps
            rows.append((path, _row(images_per_step, seconds,
                                    torch.cuda.max_memory_allocated(device) / 2 ** 20)))
            del step
            torch.cuda.empty_cache()
        return rows
    step_of = {path: make_step(path) for path in paths}
    for step in step_of.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(steps):
        for path, step in step_of.items():
            start = time.perf_counter()
            step()
            times[path].append(time.perf_counter() - start)
    return [(path, _row(images_per_step, statistics.median(times[path]), float("nan"),
                        min(times[path]), max(times[path]))) for path in paths]


def _row(images: int, seconds: float, peak_mib: float, fastest: float | None = None,
         slowest: float | None = None) -> dict[str, float]:
    """Images/s and the step time (the median on the CPU, with the fastest and slowest
    round: NCHW steps on a shared CPU are bimodal)."""
    return {"images_per_sec": images / seconds, "step_ms": 1000 * seconds, "peak_mib": peak_mib,
            "min_ms": 1000 * (fastest if fastest is not None else seconds),
            "max_ms": 1000 * (slowest if slowest is not None else seconds)}


def environment(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (f"device {device} ({name}), {torch.get_num_threads()} CPU threads, python "
            f"{platform.python_version()}, torch {torch.__version__}")


def print_table(title: str, rows: list[tuple[str, dict[str, float]]], baseline: str) -> None:
    base = dict(rows)[baseline]["images_per_sec"]
    print(f"\n{title}")
    print(f"| {'path':<36} | {'images/s':>10} | {'step ms':>9} | {'min-max ms':>15} | "
          f"{'peak MiB':>9} | {'vs ' + baseline:>9} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 11}|{'-' * 17}|{'-' * 11}|{'-' * 11}|")
    for name, r in rows:
        spread = f"{r['min_ms']:.0f}-{r['max_ms']:.0f}"
        print(f"| {name:<36} | {r['images_per_sec']:>10.1f} | {r['step_ms']:>9.1f} | {spread:>15} | "
              f"{r['peak_mib']:>9.0f} | {r['images_per_sec'] / base:>8.2f}x |")


def pick_device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)


# The paths every benchmark compares: the plain reference implementation, the default
# path, and the default path with each opt-in feature ("all" = all of them).
ALL_PATHS = ["plain", "default", "default+bf16", "default+channels_last", "default+compile", "default+all"]
CPU_PATHS = ["plain", "default", "default+channels_last"]
# The search benchmark: every cell layout, in both memory formats, and the default.
SEARCH_CPU_PATHS = ["plain", "batched", "batched+channels_last", "per_edge", "per_edge+channels_last",
                    "default"]
# The training benchmark on the CPU: the earlier default (NCHW) and today's (NHWC there).
TRAIN_CPU_PATHS = ["plain", "nchw", "default"]
SEARCH_CUDA_PATHS = ["plain", "batched", "per_edge", "default", "default+bf16", "default+channels_last",
                     "default+compile", "default+all"]


def add_common_args(parser, cpu_steps: int) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    from flags import nonneg_int, positive_int

    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"timed steps (default 20 on CUDA, {cpu_steps} on CPU)")
    parser.add_argument("--warmup", type=nonneg_int, default=None,
                        help="untimed steps (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--paths", default=None,
                        help=f"comma-separated, of: {','.join(ALL_PATHS)} "
                             f"(CPU default: {','.join(CPU_PATHS)})")
    parser.add_argument("--threads", type=nonneg_int, default=0, help="CPU threads (0 = PyTorch's default)")


def setup(args, cpu_steps: int, cpu_paths: list[str] | None = None,
          cuda_paths: list[str] | None = None) -> tuple[torch.device, int, int, list[str]]:
    """Apply the common flags; return (device, timed steps, warm-up steps, paths)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (20 if cuda else cpu_steps)
    warmup = args.warmup or (5 if cuda else 1)
    paths = (args.paths.split(",") if args.paths else
             (cuda_paths or ALL_PATHS) if cuda else (cpu_paths or CPU_PATHS))
    print(environment(device))
    return device, steps, warmup, paths


def path_options(path: str) -> tuple[str, bool, bool]:
    """(amp, channels_last, compile) of a path name such as ``default+bf16``."""
    opts = set(path.split("+")[1:])
    if "all" in opts:
        opts = {"bf16", "channels_last", "compile"}
    return ("bf16" if "bf16" in opts else "none"), "channels_last" in opts, "compile" in opts
