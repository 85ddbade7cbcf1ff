"""Timing helpers shared by the benchmarks: warm-up, device synchronisation, peak
memory, one results table, and the environment line recorded with every result."""
from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], None], device: torch.device, images_per_step: int,
            warmup: int, steps: int) -> dict[str, float]:
    """Run ``warmup`` untimed steps, then ``steps`` timed ones; images/s and peak MiB."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")
    return {"images_per_sec": images_per_step * steps / elapsed,
            "step_ms": 1000 * elapsed / steps, "peak_mib": peak}


def environment(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (f"device {device} ({name}), {torch.get_num_threads()} CPU threads, python "
            f"{platform.python_version()}, torch {torch.__version__}")


def print_table(title: str, rows: list[tuple[str, dict[str, float]]], baseline: str) -> None:
    base = dict(rows)[baseline]["images_per_sec"]
    print(f"\n{title}")
    print(f"| {'path':<28} | {'images/s':>10} | {'step ms':>9} | {'peak MiB':>9} | {'vs plain':>8} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for name, r in rows:
        print(f"| {name:<28} | {r['images_per_sec']:>10.1f} | {r['step_ms']:>9.1f} | "
              f"{r['peak_mib']:>9.0f} | {r['images_per_sec'] / base:>7.2f}x |")


def pick_device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(arg)
