"""One command that measures and checks on a lent GPU everything the project needs to
know from it, within 8 minutes (issue 24).

    python benchmarks/gpu_check.py --out OUT/gpu_check                  # one CUDA GPU, <= 8 min
    python benchmarks/gpu_check.py --out /tmp/gc --device cpu --tiny    # same code, tiny sizes, < 1 min
    python benchmarks/gpu_check.py --out OUT/gc --parts 2,3             # only some parts

Parts (numbered as in issue 24; run in the order 2, 3, 5, 4, 1b, 1a, 6):

- 1a ``cuda_tests``: the CUDA-only tests (pytest, their own process); skipped on a CPU.
- 1b ``equivalence_tests``: the training-step and search-step equivalence tests on the
  device (pytest with PDARTS_TEST_DEVICE=cuda; on a CPU with --tiny, two of them on it).
- 2 ``search_step``: one search step (alpha step + weight step, batch 96 each) per stage
  (5/11/17 cells, 8/5/3 ops per edge): plain path, default, and the opt-ins
  channels_last, bf16 and compile (compile last: it spends most of its time compiling):
  images/s, peak memory, and the memory estimate the search prints for that stage.
- 3 ``projection``: the full default search (3 stages x 25 epochs, 25,000 images per
  half, 10 weight-only warm-up epochs, validation in the last 4) projected from N timed
  weight-only steps, N alpha+weight steps and one validation pass per stage, run by
  ``train_search.train_epoch`` and ``evaluate`` on generated CIFAR-shaped data through
  the real input pipeline (``SearchData``: on CUDA the images stay on the GPU and are
  augmented there).
- 4 ``train_step``: the 20-cell CIFAR network at batch 128 (plain, default, bf16,
  channels_last, compile) and the 14-cell ImageNet network at batch 128 (default).
- 5 ``checkpoint_cells``: stage 3's search step with and without --checkpoint_cells:
  time ratio, peak memory ratio, and the estimate's ratio.
- 6 ``nccl``: a 2-process NCCL run needs two GPUs: skipped, with the reason.

Time boxes: every part gets a share of the time left (``SHARES``, of ``--budget_s``,
default 480 s); time a part leaves unused goes to the parts after it. The measuring
parts (2-5) run one after another in one worker process, which checks its part's
deadline before every measurement; this process watches it and kills it when a
measurement overruns the deadline (a hang, or a compile that takes too long), records
that part as failed ("timed out after N s", its finished measurements kept) and starts
a new worker for the remaining parts. Tests run in their own pytest process with the
part's time box as timeout. A part that fails is recorded with its error; the others
still run.

Output in ``--out``: results.json (format in docs/gpu_check.md), results.md (every figure
with the command that reproduces it), logs/*.log; a one-screen summary is printed.
Nothing is written outside the repository and ``--out``: temporary files, the
torch.compile / Triton caches and pytest's tmp_path go to ``--out``/tmp, removed at the
end (--keep_tmp keeps it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = "benchmarks/gpu_check.py"

# (id, name, title), in the order.
PARTS = [
    ("1a", "cuda_tests", "CUDA-only tests"),
    ("1b", "equivalence_tests", "training-step and search-step equivalence tests on the device"),
    ("2", "search_step", "search step per stage: plain, default and the opt-ins"),
    ("3", "projection", "projection of the full default search"),
    ("4", "train_step", "training step of the CIFAR and ImageNet networks"),
    ("5", "checkpoint_cells", "--checkpoint_cells at stage 3"),
    ("6", "nccl", "2-process NCCL run"),
]
TITLES = {name: title for _, name, title in PARTS}
IDS = {name: pid for pid, name, _ in PARTS}
# Execution order: the headline figures first; the parts whose length is least certain
# (compiles, the test suite's compiled search) later, where unused time accumulates.
ORDER = ["search_step", "projection", "checkpoint_cells", "train_step", "equivalence_tests",
         "cuda_tests", "nccl"]
WORKER_PARTS = ("search_step", "projection", "checkpoint_cells", "train_step")
# Seconds of a 480-s budget per part (scaled with --budget_s, see box_seconds).
SHARES = {"search_step": 150, "projection": 70, "checkpoint_cells": 30, "train_step": 100,
          "equivalence_tests": 40, "cuda_tests": 90, "nccl": 0}
# A measurement running past its part's deadline is killed this many seconds later.
GRACE_S = 15.0

CUDA_TESTS = [
    "tests/test_operations.py::test_ops_run_on_cuda",
    "tests/test_device_data.py::test_device_loader_on_cuda_matches_cpu_arithmetic",
    "tests/test_search_run.py::test_search_on_cuda_with_the_gpu_input_pipeline",
]
EQUIVALENCE_TESTS = [
    "tests/test_speed_equivalence.py::test_train_step_default_equals_plain",
    "tests/test_speed_equivalence.py::test_search_step_default_equals_plain",
    "tests/test_speed_equivalence.py::test_batched_search_step_equals_plain",
]
# --tiny on a CPU: the quickest (all of them take ~40 s there; the suite runs them).
EQUIVALENCE_TESTS_TINY = EQUIVALENCE_TESTS[:1]
TEST_DEVICE_ENV = "PDARTS_TEST_DEVICE"     # read by tests/conftest.py's test_device fixture

SEARCH_PATHS = ["plain", "default", "default+channels_last", "default+bf16"]
CIFAR_PATHS = ["plain", "default", "default+bf16", "default+channels_last"]


@dataclass(frozen=True)
class Sizes:
    """What is measured how big: the paper's settings, or tiny ones for --tiny."""
    search_batch: int = 96
    search_C: int = 16
    search_image: int = 32
    search_layers: int | None = None      # None: the stage's 5 / 11 / 17 cells
    cifar_batch: int = 128
    cifar_C: int | None = None            # None: 36
    imagenet_batch: int = 128
    imagenet_C: int | None = None         # None: 48
    warmup: int = 3
    steps: int = 10
    projection_images: int = 50_000       # CIFAR's training split: 25,000 per half
    projection_steps: int = 20
    valid_batches: int | None = None      # None: the whole alpha half
    compile: bool = True


FULL = Sizes()
TINY = Sizes(search_batch=2, search_C=4, search_image=8, search_layers=3, cifar_batch=2,
             cifar_C=4, imagenet_batch=2, imagenet_C=4, warmup=0, steps=1,
             projection_images=48, projection_steps=1, valid_batches=2, compile=False)
TINY_NO_COMPILE = ("not run in --tiny mode: graph capture alone takes 1-2 min per network "
                   "on a 2-core CPU; tests/test_speed_equivalence.py checks compiled forwards "
                   "(graph capture with the eager backend)")


def box_seconds(part: str, selected: list[str], now: float, end: float) -> float:
    """The time box of ``part`` starting at ``now``: its share of the time left until
    ``end``, in proportion to the shares of the selected parts not yet run."""
    later = [p for p in ORDER[ORDER.index(part):] if p in selected]
    total = sum(SHARES[p] for p in later)
    return max(0.0, end - now) * (SHARES[part] / total if total else 0.0)


def _write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _number(x) -> float | None:
    """A finite float, else None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def _tail(path: str, lines: int = 12) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:]).strip()
    except OSError:
        return ""


def scratch_env(tmp: str) -> dict[str, str]:
    """Environment variables that keep temporary files and compiler caches under ``tmp``."""
    dirs = {"TMPDIR": "", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton/cache",
            "TRITON_HOME": "triton", "MPLCONFIGDIR": "matplotlib", "XDG_CACHE_HOME": "cache",
            "CUDA_CACHE_PATH": "nv", "TORCH_HOME": "torch"}
    env = {}
    for var, sub in dirs.items():
        env[var] = os.path.join(tmp, sub) if sub else tmp
        os.makedirs(env[var], exist_ok=True)
    return env


# ---------------------------------------------------------------------------------------
# Recording one part's measurements (in the worker)
# ---------------------------------------------------------------------------------------

class Part:
    """One part's record in DIR/parts/NAME.json, rewritten after every measurement so
    that a killed worker leaves what it finished."""

    def __init__(self, out: str, name: str, box: float) -> None:
        self.path = os.path.join(out, "parts", f"{name}.json")
        self.start = time.time()
        self.deadline = self.start + box
        self.record = {"id": IDS[name], "name": name, "title": TITLES[name], "status": "running",
                       "box_s": round(box, 1), "seconds": 0.0, "error": None, "reason": None,
                       "rows": [], "summary": {}}
        self.save()

    def save(self) -> None:
        self.record["seconds"] = round(time.time() - self.start, 2)
        _write_json(self.record, self.path)

    def measure(self, label: str, command: str, fn: Callable[[], dict]) -> dict | None:
        """Run ``fn`` (returning the row's figures) unless the deadline has passed; record
        the row as ok, failed (its error) or skipped ("running" while it runs)."""
        row = {"label": label, "status": "running", "command": command, "figures": {}}
        self.record["rows"].append(row)
        if time.time() > self.deadline:
            row["status"] = "skipped"
            row["reason"] = f"not run: the part's time box ({self.record['box_s']:.0f} s) was used up"
            print(f"  {label}: skipped (time box used up)", flush=True)
            self.save()
            return None
        print(f"  {label} ...", flush=True)
        self.save()                              # the parent sees which row is running
        t0 = time.time()
        try:
            figures = fn()
        except Exception as e:   # noqa: BLE001 - any failure is recorded, the rest runs
            row["status"] = "failed"
            row["error"] = _one_line(e)
            traceback.print_exc()
            sys.stdout.flush()
            _after_failure(e)
            self.save()
            return None
        row["figures"] = {k: _number(v) for k, v in figures.items()}
        row["status"] = "ok"
        row["seconds"] = round(time.time() - t0, 2)
        print(f"  {label}: {_brief(row['figures'])} ({row['seconds']:.1f} s)", flush=True)
        self.save()
        return row["figures"]

    def skip(self, label: str, reason: str, command: str = "") -> None:
        self.record["rows"].append({"label": label, "status": "skipped", "command": command,
                                    "figures": {}, "reason": reason})
        self.save()

    def finish(self, summary: dict | None = None) -> None:
        self.record["summary"] = {k: _number(v) for k, v in (summary or {}).items()}
        failed = [r["label"] for r in self.record["rows"] if r["status"] == "failed"]
        self.record["status"] = "failed" if failed else "ok"
        if failed:
            self.record["error"] = f"{len(failed)} measurement(s) failed: {', '.join(failed)}"
        skipped = [r for r in self.record["rows"] if r.get("reason", "").startswith("not run: the part")]
        if skipped:
            self.record["reason"] = (f"{len(skipped)} measurement(s) not run: the time box "
                                     f"({self.record['box_s']:.0f} s) was used up")
        self.save()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


class _CudaBroken(Exception):
    pass


def _after_failure(e: BaseException) -> None:
    """After an out-of-memory error free the cache and go on; after any other CUDA error
    the context may be unusable: stop this worker (the parent starts a fresh one)."""
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        torch.cuda.empty_cache()
        return
    text = str(e)
    if any(k in text for k in ("CUDA error", "cuDNN error", "CUBLAS_STATUS", "illegal memory access")):
        raise _CudaBroken(text) from e


def _brief(figures: dict) -> str:
    keys = [k for k in ("images_per_sec", "step_ms", "peak_mib", "stage_minutes")
            if figures.get(k) is not None]
    return ", ".join(f"{k} {figures[k]:.4g}" for k in keys) or "done"


# ---------------------------------------------------------------------------------------
# The measuring parts (run in the worker process)
# ---------------------------------------------------------------------------------------

@dataclass
class Context:
    device: object            # torch.device
    sizes: Sizes
    tiny: bool
    out: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def self_command(self, part: str) -> str:
        """This script, limited to one part (how tiny-size figures are reproduced)."""
        return (f"python {SCRIPT} --out DIR --device {self.device.type}"
                f"{' --tiny' if self.tiny else ''} --parts {IDS[part]}")


def _reset(ctx: Context) -> None:
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def _estimate(ctx: Context, name: str, batch: int, image: int, amp: str = "none", C=None, layers=None):
    """memory.estimate_memory of bench_memory's network ``name`` (what plan_memory logs
    at the start of a search stage or a training run)."""
    from functools import partial

    import bench_memory

    import memory
    from speed import autocast

    net, opts, _ = bench_memory.build(name, ctx.device, C, layers)
    est = memory.estimate_memory(net, opts, (3, image, image), batch, partial(autocast, ctx.device, amp))
    del net, opts
    _reset(ctx)
    return est


def _timed(make_step, path: str, ctx: Context, images: int, warmup: int) -> dict:
    """common.measure_paths for one path: images/s, step ms, peak MiB (CUDA)."""
    from common import measure_paths

    (_, row), = measure_paths(make_step, [path], ctx.device, images, warmup, ctx.sizes.steps)
    return row


def _with_estimate(row: dict, plain_rate: float | None, est) -> dict:
    """A timing row with its speed relative to the plain path and the memory estimate
    (None where there is none) next to the measured peak."""
    fig = dict(row)
    fig["vs_plain"] = row["images_per_sec"] / plain_rate if plain_rate else None
    fig["estimate_total_mib"] = est.total(False) / 2 ** 20 if est is not None else None
    fig["estimate_needed_mib"] = est.needed(False) / 2 ** 20 if est is not None else None
    peak = _number(row["peak_mib"])
    fig["peak_vs_estimate_total"] = peak / fig["estimate_total_mib"] if peak and est is not None else None
    return fig


def part_search_step(part: Part, ctx: Context) -> None:
    from functools import partial

    import bench_search

    s = ctx.sizes
    b, image = s.search_batch, s.search_image
    plain_rate: dict[int, float] = {}
    estimates = {}
    summary = {}

    def row(stage: int, path: str) -> dict:
        _reset(ctx)
        warmup = s.warmup
        make = partial(bench_search.make_step, stage, device=ctx.device, batch=b, C=s.search_C,
                       image=image, layers=s.search_layers)
        r = _timed(make, path, ctx, 2 * b, warmup)
        est = estimates.get((stage, "bf16" if "bf16" in path else "none"))
        if path == "plain":
            plain_rate[stage] = r["images_per_sec"]
            est = None     # the estimate is the default path's (the scripts' network)
        return _with_estimate(r, plain_rate.get(stage), est)

    def command(stage: int, path: str) -> str:
        if ctx.tiny:
            return ctx.self_command("search_step")
        return (f"python benchmarks/bench_search.py --device {ctx.device.type} --stages {stage} "
                f"--paths {path} --batch_size {b} --warmup {s.warmup} --steps {s.steps}")

    def estimate_command(stage: int, amp: str) -> str:
        if ctx.tiny or amp != "none":
            return ctx.self_command("search_step")
        return f'python benchmarks/bench_memory.py --no_timing --networks "stage {stage}"'

    def note_estimate(stage: int, amp: str):
        def fn():
            est = _estimate(ctx, f"stage {stage}", b, image, amp, s.search_C, s.search_layers)
            estimates[(stage, amp)] = est
            return {"needed_mib": est.needed(False) / 2 ** 20, "total_mib": est.total(False) / 2 ** 20,
                    "activations_mib": est.activations / 2 ** 20,
                    "needed_checkpointed_mib": est.needed(True) / 2 ** 20}
        return fn

    for stage in (1, 2, 3):
        for amp in ("none", "bf16"):
            part.measure(f"stage {stage}, memory estimate{'' if amp == 'none' else ', bf16'}",
                         estimate_command(stage, amp), note_estimate(stage, amp))
        for path in SEARCH_PATHS:
            fig = part.measure(f"stage {stage}, {path}", command(stage, path), partial(row, stage, path))
            if fig and path == "default" and fig.get("vs_plain") is not None:
                summary[f"stage{stage}_default_vs_plain"] = fig["vs_plain"]
                summary[f"stage{stage}_default_images_per_sec"] = fig["images_per_sec"]
    for stage in (1, 2, 3):
        label = f"stage {stage}, default+compile"
        if not s.compile:
            part.skip(label, TINY_NO_COMPILE, command(stage, "default+compile"))
            continue
        part.measure(label, command(stage, "default+compile"), partial(row, stage, "default+compile"))
    part.finish(summary)


class _FirstBatches:
    """The first ``n`` batches of a loader (len() included, as Progress reads it)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, min(n, len(loader))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for k, batch in enumerate(self.loader):
            if k == self.n:
                return
            yield batch


def part_projection(part: Part, ctx: Context) -> None:
    from types import SimpleNamespace

    import numpy as np
    import torch
    import torch.nn as nn
    from bench_search import stage_switches
    from common import sync

    import train_search as ts
    from data import ArrayDataset, SearchData, cifar_transforms
    from distributed import DistInfo
    from loop import evaluate
    from model_search import Network

    s = ctx.sizes
    argv = ["--dataset", "cifar10", "--device", ctx.device.type, "--batch_size", str(s.search_batch),
            "--init_channels", str(s.search_C)]
    if ctx.tiny:
        layers = s.search_layers or 5
        argv += ["--workers", "0", "--layers", str(layers)] + ["--add_layers", "0"] * 3
    args = ts.parse_args(argv)
    # Generated CIFAR-shaped data (uint8 32x32x3, 10 classes), split and loaded as a
    # search loads CIFAR-10 (on CUDA: kept on the GPU, augmented there).
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (s.projection_images, 32, 32, 3), dtype=np.uint8)
    labels = [k % 10 for k in range(s.projection_images)]   # every class in both halves
    dataset = ArrayDataset(images, labels, cifar_transforms("cifar10", True, 0))
    env = DistInfo(device=ctx.device)
    data = SearchData(dataset, args, env)
    steps_per_epoch, valid_batches = len(data.weights), len(data.valid)
    n, warm_epochs = s.projection_steps, args.arch_warmup_epochs
    total = 0.0
    summary = {"epochs": args.epochs, "arch_warmup_epochs": warm_epochs,
               "validation_epochs": ts.VALID_LAST_EPOCHS, "steps_per_epoch": steps_per_epoch,
               "valid_batches": valid_batches, "images_per_half": data.sizes[0]}
    command = ctx.self_command("projection")

    def stage_row(stage: int) -> dict:
        _reset(ctx)
        layers = args.layers + args.add_layers[stage]
        sw = stage_switches(stage + 1)
        torch.manual_seed(0)
        model = Network(args.init_channels, 10, layers, sw, sw,
                        drop_rate=args.dropout_rate[stage]).to(ctx.device)
        w_opt = torch.optim.SGD(model.weight_parameters(), lr=args.learning_rate, momentum=args.momentum,
                                weight_decay=args.weight_decay, foreach=True)
        a_opt = torch.optim.Adam(model.arch_parameters(), lr=args.arch_learning_rate, betas=(0.5, 0.999),
                                 weight_decay=args.arch_weight_decay, foreach=True)
        data.set_epoch(stage, 0)

        def epoch(steps: int, update_arch: bool) -> float:
            view = SimpleNamespace(weights=_FirstBatches(data.weights, steps),
                                   alphas=_FirstBatches(data.alphas, steps))
            sync(ctx.device)
            t0 = time.perf_counter()
            ts.train_epoch(model, view, w_opt, a_opt, args, update_arch, env)
            sync(ctx.device)
            return (time.perf_counter() - t0) / len(view.weights)

        for update_arch in (False, True):          # warm-up: cuDNN autotuning, allocator
            if s.warmup:
                epoch(s.warmup, update_arch)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        t_w = epoch(n, False)
        t_aw = epoch(n, True)
        view = _FirstBatches(data.valid, s.valid_batches or valid_batches)
        sync(ctx.device)
        t0 = time.perf_counter()
        evaluate(model, view, nn.CrossEntropyLoss(), ctx.device, show=False)
        sync(ctx.device)
        t_valid = (time.perf_counter() - t0) * valid_batches / len(view)
        stage_s = (warm_epochs * steps_per_epoch * t_w + (args.epochs - warm_epochs) * steps_per_epoch * t_aw
                   + ts.VALID_LAST_EPOCHS * t_valid)
        return {"cells": layers, "weight_step_ms": 1000 * t_w, "search_step_ms": 1000 * t_aw,
                "valid_pass_s": t_valid, "stage_minutes": stage_s / 60,
                "peak_mib": torch.cuda.max_memory_allocated(ctx.device) / 2 ** 20 if ctx.cuda else None}

    done = 0
    for stage in range(args.num_stages):
        fig = part.measure(f"stage {stage + 1}", command, lambda stage=stage: stage_row(stage))
        if fig:
            total += fig["stage_minutes"]
            done += 1
    summary["total_minutes"] = total if done == args.num_stages else None
    summary["target_minutes"] = 20
    on_device = data.on_device
    summary["pipeline_on_device"] = 1 if on_device else 0
    part.finish(summary)
    part.record["note"] = (f"{steps_per_epoch} steps per epoch (the last batch counted as full), "
                           f"{warm_epochs} weight-only epochs, {args.epochs - warm_epochs} alpha+weight "
                           f"epochs and {ts.VALID_LAST_EPOCHS} validation passes per stage; time of "
                           f"{n} steps of each kind after {s.warmup} warm-up steps; per-epoch "
                           "checkpoints and logging not counted; input pipeline: "
                           + ("images on the GPU (DeviceLoader)" if on_device else "DataLoader on the CPU"))
    part.save()


def part_train_step(part: Part, ctx: Context) -> None:
    from functools import partial

    import bench_train

    s = ctx.sizes
    plain = {}
    summary = {}
    estimates = {}

    def row(net: str, path: str) -> dict:
        _reset(ctx)
        batch, image, C = ((s.cifar_batch, 32, s.cifar_C) if net == "cifar"
                           else (s.imagenet_batch, 224, s.imagenet_C))
        make = partial(bench_train.make_step, net, device=ctx.device, batch=batch, image=image, C=C)
        r = _timed(make, path, ctx, batch, s.warmup)
        if path == "plain":
            plain[net] = r["images_per_sec"]
        est = None if path == "plain" else estimates.get((net, "bf16" if "bf16" in path else "none"))
        return _with_estimate(r, plain.get(net), est)

    def command(net: str, path: str) -> str:
        if ctx.tiny:
            return ctx.self_command("train_step")
        batch = (f"--batch_size {s.cifar_batch}" if net == "cifar"
                 else f"--imagenet_batch_size {s.imagenet_batch}")
        return (f"python benchmarks/bench_train.py --device {ctx.device.type} --networks {net} "
                f"--paths {path} {batch} --warmup {s.warmup} --steps {s.steps}")

    def estimate(net: str, amp: str):
        def fn():
            batch, image, C = ((s.cifar_batch, 32, s.cifar_C) if net == "cifar"
                               else (s.imagenet_batch, 224, s.imagenet_C))
            est = _estimate(ctx, net, batch, image, amp, C)
            estimates[(net, amp)] = est
            return {"needed_mib": est.needed(False) / 2 ** 20, "total_mib": est.total(False) / 2 ** 20,
                    "activations_mib": est.activations / 2 ** 20}
        return fn

    est_cmd = (ctx.self_command("train_step") if ctx.tiny
               else "python benchmarks/bench_memory.py --no_timing --networks cifar,imagenet")
    for amp in ("none", "bf16"):
        part.measure(f"cifar, memory estimate{'' if amp == 'none' else ', bf16'}",
                     est_cmd if amp == "none" else ctx.self_command("train_step"), estimate("cifar", amp))
    for path in CIFAR_PATHS:
        fig = part.measure(f"cifar, {path}", command("cifar", path), partial(row, "cifar", path))
        if fig and fig.get("vs_plain") is not None:
            summary[f"cifar_{path.replace('+', '_')}_vs_plain"] = fig["vs_plain"]
    part.measure("imagenet, memory estimate", est_cmd, estimate("imagenet", "none"))
    fig = part.measure("imagenet, default", command("imagenet", "default"),
                       partial(row, "imagenet", "default"))
    if fig:
        summary["imagenet_default_images_per_sec"] = fig["images_per_sec"]
    if s.compile:
        fig = part.measure("cifar, default+compile", command("cifar", "default+compile"),
                           partial(row, "cifar", "default+compile"))
        if fig and fig.get("vs_plain") is not None:
            summary["cifar_default_compile_vs_plain"] = fig["vs_plain"]
    else:
        part.skip("cifar, default+compile", TINY_NO_COMPILE, command("cifar", "default+compile"))
    part.finish(summary)


def part_checkpoint_cells(part: Part, ctx: Context) -> None:
    import bench_memory

    s = ctx.sizes
    b = s.search_batch
    rows = {}
    command = (ctx.self_command("checkpoint_cells") if ctx.tiny else
               f'python benchmarks/bench_memory.py --device {ctx.device.type} --no_bytes --networks '
               f'"stage 3" --time_batch {b} --warmup {s.warmup} --steps {s.steps}')

    def estimate() -> dict:
        est = _estimate(ctx, "stage 3", b, s.search_image, "none", s.search_C, s.search_layers)
        return {"activations_mib": est.activations / 2 ** 20,
                "activations_checkpointed_mib": est.activations_checkpointed / 2 ** 20,
                "activations_ratio": est.activations / est.activations_checkpointed,
                "needed_mib": est.needed(False) / 2 ** 20,
                "needed_checkpointed_mib": est.needed(True) / 2 ** 20}

    def timed(path: str) -> dict:
        _reset(ctx)
        (_, r), = bench_memory.time_steps("stage 3", ctx.device, b, s.warmup, s.steps, s.search_C,
                                          s.search_image, s.search_layers, paths=[path])
        rows[path] = r
        return r

    est_cmd = (command if ctx.tiny else
               'python benchmarks/bench_memory.py --no_timing --networks "stage 3"')
    est = part.measure("stage 3, memory estimate", est_cmd, estimate)
    for path in ("default", "checkpoint_cells"):
        part.measure(f"stage 3, {path}", command, lambda path=path: timed(path))
    summary = {}
    if len(rows) == 2:
        d, c = rows["default"], rows["checkpoint_cells"]
        summary["time_ratio"] = c["step_ms"] / d["step_ms"]
        summary["peak_ratio"] = (c["peak_mib"] / d["peak_mib"] if ctx.cuda else None)
        summary["time_ratio_target_max"] = 1.6
    if est:
        summary["estimate_activations_ratio"] = est["activations_ratio"]
    part.finish(summary)


WORKER_FUNCTIONS = {"search_step": part_search_step, "projection": part_projection,
                    "checkpoint_cells": part_checkpoint_cells, "train_step": part_train_step}


def environment(device) -> dict:
    """GPU name, driver, torch / CUDA / cuDNN versions and the rest of the setup."""
    import platform

    import numpy
    import torch
    import torchvision

    info = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "cuda_runtime": torch.version.cuda, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "gpu": None, "gpu_count": 0, "gpu_memory_gib": None, "driver": None, "cudnn": None,
            "cudnn_benchmark": None, "tf32_conv": None, "tf32_matmul": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    compute_capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                    tf32_conv=torch.backends.cudnn.allow_tf32,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        info["git_commit"] = rev.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git_commit"] = None
    return info


def start_part(out: str, name: str, selected: list[str], end: float, box: float | None = None) -> Part:
    """In the worker: open the part's record with its time box (``box``, else its share
    of the time left) and tell the parent (worker_state.json) which part runs until when."""
    part = Part(out, name, box_seconds(name, selected, time.time(), end) if box is None else box)
    _write_json({"part": name, "started": part.start, "deadline": part.deadline, "pid": os.getpid()},
                os.path.join(out, "worker_state.json"))
    print(f"== part {IDS[name]} {name}: time box {part.record['box_s']:.0f} s", flush=True)
    return part


def worker(args: argparse.Namespace) -> int:
    """Run the measuring parts in ``args.parts`` one after another (parent-supervised)."""
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import torch

    device = torch.device(args.device)
    if args.tiny:
        torch.set_num_threads(1)    # tiny tensors: more threads only add overhead
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # as utils.seed_everything sets it for the scripts
    ctx = Context(device, TINY if args.tiny else FULL, args.tiny, args.out)
    env_path = os.path.join(args.out, "parts", "environment.json")
    if not os.path.exists(env_path):
        try:
            info = environment(device)
        except Exception as e:   # noqa: BLE001 - the measurements matter more
            traceback.print_exc()
            info = {"device": str(device), "torch": torch.__version__, "error": _one_line(e)}
        _write_json(info, env_path)
    selected = args.selected.split(",")
    for name in args.parts.split(","):
        part = start_part(args.out, name, selected, args.end)
        try:
            WORKER_FUNCTIONS[name](part, ctx)
        except _CudaBroken as e:
            part.finish()
            part.record.update(status="failed", error=f"CUDA error, worker restarted: {_one_line(e)}")
            part.save()
            return 3
        except Exception as e:   # noqa: BLE001 - recorded; the next part still runs
            traceback.print_exc()
            part.finish()
            part.record.update(status="failed", error=_one_line(e))
            part.save()
        _reset(ctx)
    return 0


# ---------------------------------------------------------------------------------------
# The parent: time boxes, tests, results
# ---------------------------------------------------------------------------------------

def _kill(proc: subprocess.Popen) -> None:
    """Stop a child we started and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def supervise(cmd: list[str], env: dict, state_path: str, log_path: str, grace: float = GRACE_S,
              poll: float = 0.5, hard_end: float | None = None) -> tuple[int | None, str | None, float]:
    """Run a worker until it exits, or until the part it is in (``state_path``: part,
    deadline) overruns its deadline by ``grace`` seconds, or until ``hard_end`` (a hang
    before any part started): then kill it. Returns (exit code or None when killed, the
    part it was killed in or None, seconds that part ran)."""
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        while True:
            try:
                return proc.wait(poll), None, 0.0
            except subprocess.TimeoutExpired:
                pass
            state = _read_json(state_path)
            now = time.time()
            if (state and now > state["deadline"] + grace) or (hard_end is not None and now > hard_end):
                _kill(proc)
                if state is None:
                    return None, None, 0.0
                return None, state["part"], now - state["started"]


def worker_command(args, pending: list[str], selected: list[str], end: float) -> list[str]:
    return ([sys.executable, os.path.join(HERE, "gpu_check.py"), "--worker", "--out", args.out,
             "--device", args.device, "--parts", ",".join(pending), "--selected", ",".join(selected),
             "--end", repr(end)] + (["--tiny"] if args.tiny else []))


def run_worker_parts(parts: list[str], selected: list[str], args, env: dict, end: float,
                     grace: float = GRACE_S, command: Callable = worker_command) -> None:
    """Run the measuring parts in worker processes: one normally; after a worker was
    killed (time box) or died, a fresh one for the parts it had not started.
    ``command(args, pending, selected, end)`` is the worker's command line."""
    out = args.out
    pending = list(parts)
    log_path = os.path.join(out, "logs", "worker.log")
    state_path = os.path.join(out, "worker_state.json")
    while pending:
        if os.path.exists(state_path):
            os.remove(state_path)
        if time.time() >= end:
            for name in pending:
                rec = _skipped_record(name, "not started: the budget (--budget_s) was used up")
                _write_json(rec, os.path.join(out, "parts", f"{name}.json"))
                _announce(rec)
            return
        print(f"worker: parts {', '.join(IDS[p] for p in pending)} (log: {log_path})", flush=True)
        rc, killed_in, ran = supervise(command(args, pending, selected, end), env, state_path,
                                       log_path, grace, hard_end=end + grace)
        still = []
        for name in pending:
            path = os.path.join(out, "parts", f"{name}.json")
            rec = _read_json(path)
            if rec is None:
                still.append(name)           # not started
                continue
            if rec["status"] == "running":   # killed or died in it
                if name == killed_in:
                    why = "timed out"
                    rec["error"] = (f"timed out after {ran:.0f} s (time box {rec['box_s']:.0f} s + "
                                    f"{grace:.0f} s grace), killed during '{_running_row(rec)}'")
                    rec["seconds"] = round(ran, 1)
                else:
                    why = f"the worker exited with code {rc}"
                    rec["error"] = f"{why} during '{_running_row(rec)}': {_tail(log_path, 3)}"
                rec["status"] = "failed"
                for r in rec["rows"]:
                    if r["status"] == "running":
                        r.update(status="failed", error=why)
                _write_json(rec, path)
            _announce(rec)
        if still == pending:     # the worker failed before its first part: no use retrying
            why = (f"the worker exited with code {rc}" if rc is not None
                   else "the worker was killed at the end of the budget")
            for name in still:
                rec = _failed_record(name, f"{why} before the part started: {_tail(log_path, 3)}")
                _write_json(rec, os.path.join(out, "parts", f"{name}.json"))
                _announce(rec)
            still = []
        pending = still


def _running_row(rec: dict) -> str:
    rows = [r for r in rec.get("rows", []) if r.get("status") == "running"]
    return rows[-1]["label"] if rows else "(between measurements)"


def _failed_record(name: str, error: str) -> dict:
    return {"id": IDS[name], "name": name, "title": TITLES[name], "status": "failed", "box_s": None,
            "seconds": 0.0, "error": error, "reason": None, "rows": [], "summary": {}}


def _skipped_record(name: str, reason: str) -> dict:
    rec = _failed_record(name, "")
    rec.update(status="skipped", error=None, reason=reason)
    return rec


def _announce(rec: dict) -> None:
    extra = rec.get("error") or rec.get("reason") or ""
    print(f"part {rec['id']} {rec['name']}: {rec['status']} ({rec.get('seconds') or 0:.0f} s)"
          + (f": {extra}" if extra else ""), flush=True)


def pytest_command(tests: list[str], junit: str, basetemp: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
            f"--junitxml={junit}", *tests]


def parse_junit(path: str) -> list[dict]:
    """One row per test case: label (node id), status ok/failed/skipped, seconds, error."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        label = f"{module}.py::{case.get('name')}"
        row = {"label": label, "status": "ok", "command": "",
               "figures": {"seconds": _number(case.get("time"))}}
        for tag, status in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                row["status"] = status
                text = " ".join((el.get("message") or el.text or "").split())[:400]
                row["reason" if status == "skipped" else "error"] = text
                break
        rows.append(row)
    return rows


def run_tests(name: str, tests: list[str], args, env: dict, box: float, extra_env: dict) -> dict:
    out = args.out
    tmp = os.path.join(out, "tmp")
    junit = os.path.join(tmp, f"junit_{name}.xml")
    if os.path.exists(junit):
        os.remove(junit)
    cmd = pytest_command(tests, junit, os.path.join(tmp, f"pytest_{name}"))
    shown = " ".join([*(f"{k}={v}" for k, v in extra_env.items()), "python -m pytest -v",
                      *map(shlex.quote, tests)])
    log_path = os.path.join(out, "logs", f"{name}.log")
    rec = {"id": IDS[name], "name": name, "title": TITLES[name], "status": "ok", "box_s": round(box, 1),
           "seconds": 0.0, "error": None, "reason": None, "rows": [], "summary": {}, "command": shown}
    t0 = time.time()
    print(f"== part {IDS[name]} {name}: time box {box:.0f} s: {shown}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**env, **extra_env}, start_new_session=True)
        try:
            rc = proc.wait(max(1.0, box))
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
    rec["seconds"] = round(time.time() - t0, 2)
    if os.path.exists(junit):
        rec["rows"] = parse_junit(junit)
        prefix = "".join(f"{k}={v} " for k, v in extra_env.items())
        for r in rec["rows"]:
            r["command"] = f"{prefix}python -m pytest {shlex.quote(r['label'])}"
    counts = {k: sum(r["status"] == k for r in rec["rows"]) for k in ("ok", "failed", "skipped")}
    rec["summary"] = {"passed": counts["ok"], "failed": counts["failed"], "skipped": counts["skipped"]}
    if rc is None:
        rec.update(status="failed", error=f"timed out after {rec['seconds']:.0f} s; last output: "
                                          f"{_tail(log_path, 2)}")
    elif counts["failed"] or rc not in (0,):
        failed = [r["label"].split("::")[-1] for r in rec["rows"] if r["status"] == "failed"]
        rec.update(status="failed", error=(f"{len(failed)} test(s) failed: {', '.join(failed)}" if failed
                                           else f"pytest exited with code {rc}: {_tail(log_path, 3)}"))
    elif rec["rows"] and counts["skipped"] == len(rec["rows"]):
        rec.update(status="skipped", reason=f"every test skipped: {rec['rows'][0].get('reason', '')}")
    return rec


def run(args: argparse.Namespace) -> int:
    start = time.time()
    out = args.out = os.path.abspath(args.out)
    for sub in ("parts", "logs", "tmp"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for old in os.listdir(os.path.join(out, "parts")):     # an earlier run's records
        os.remove(os.path.join(out, "parts", old))
    if os.path.exists(os.path.join(out, "logs", "worker.log")):
        os.remove(os.path.join(out, "logs", "worker.log"))
    tmp = os.path.join(out, "tmp")
    env = {**os.environ, **scratch_env(tmp), "PYTHONUNBUFFERED": "1"}
    end = start + args.budget_s
    selected = [name for name in ORDER if name in args.parts]
    command = "python " + " ".join([SCRIPT] + [shlex.quote(a) for a in args.argv])
    print(f"gpu_check: device {args.device}{' (tiny)' if args.tiny else ''}, budget {args.budget_s:.0f} s, "
          f"parts {', '.join(IDS[p] for p in selected)}; results in {out}", flush=True)
    records = {}
    worker_parts = [p for p in selected if p in WORKER_PARTS]
    if worker_parts:
        run_worker_parts(worker_parts, selected, args, env, end)
        for name in worker_parts:
            records[name] = _read_json(os.path.join(out, "parts", f"{name}.json"))
    for name in [p for p in selected if p not in WORKER_PARTS]:
        box = box_seconds(name, selected, time.time(), end)
        if name == "nccl":
            envinfo = _read_json(os.path.join(out, "parts", "environment.json")) or {}
            gpus = envinfo.get("gpu_count", 0)
            rec = _skipped_record(name, (
                f"a 2-process NCCL run needs 2 GPUs; this machine has {gpus}" if args.device == "cuda"
                else "a 2-process NCCL run needs 2 CUDA GPUs (--device cpu)")
                + "; the 2-process gloo runs of the test suite cover the distributed code on a CPU")
        elif name == "cuda_tests" and args.device != "cuda":
            rec = _skipped_record(name, "needs a CUDA device (--device cpu)")
        elif box < 5:
            rec = _skipped_record(name, f"not started: {box:.0f} s of the budget (--budget_s) left")
        elif name == "cuda_tests":
            rec = run_tests(name, CUDA_TESTS, args, env, box, {})
        else:
            tests = EQUIVALENCE_TESTS_TINY if args.tiny and args.device == "cpu" else EQUIVALENCE_TESTS
            rec = run_tests(name, tests, args, env, box, {TEST_DEVICE_ENV: args.device})
        _write_json(rec, os.path.join(out, "parts", f"{name}.json"))
        _announce(rec)
        records[name] = rec
    for name in set(TITLES) - set(selected):
        records[name] = _skipped_record(name, "not selected (--parts)")
    results = {
        "format": "pdarts-gpu-check", "version": 1, "command": command, "out": out,
        "started": datetime.datetime.fromtimestamp(start).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - start, 1), "budget_s": args.budget_s, "device": args.device,
        "tiny": args.tiny, "sizes": asdict(TINY if args.tiny else FULL),
        "environment": _read_json(os.path.join(out, "parts", "environment.json"))
                       or {"error": "the worker did not report the environment (see logs/worker.log)"},
        "parts": [records[name] for _, name, _ in PARTS],
    }
    _write_json(results, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results))
    if not args.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
        state = os.path.join(out, "worker_state.json")
        if os.path.exists(state):
            os.remove(state)
    print(summary_text(results), flush=True)
    return 0 if all(p["status"] != "failed" for p in results["parts"]) else 1


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _tables(rows: list[dict]) -> list[str]:
    """Rows with the same figures as one table each (a shared command above it, else a
    command column); rows without figures (skipped, failed) as a list after them."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["figures"]:
            groups.setdefault(tuple(r["figures"]), []).append(r)
    lines: list[str] = []
    for keys, group in groups.items():
        commands = {r.get("command", "") for r in group}
        shared = commands.pop() if len(commands) == 1 else None
        lines += [""] + ([f"Command: `{shared}`", ""] if shared else [])
        lines += ["| measurement | " + " | ".join(keys) + ("" if shared else " | command") + " |",
                  "|" + "---|" * (len(keys) + 1 + (shared is None))]
        for r in group:
            status = "" if r["status"] == "ok" else f" ({r['status']}: {r.get('error') or r.get('reason')})"
            cells = [_fmt(r["figures"].get(k)) for k in keys]
            lines.append(f"| {r['label']}{status} | " + " | ".join(cells)
                         + ("" if shared else f" | `{r.get('command', '')}`") + " |")
    rest = [r for r in rows if not r["figures"]]
    if rest:
        lines.append("")
        for r in rest:
            why = r.get("error") or r.get("reason") or ""
            lines.append(f"- {r['label']}: {r['status']}" + (f": {why}" if why else "")
                         + (f" (`{r['command']}`)" if r.get("command") else ""))
    return lines


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = ["# gpu_check results", "",
             f"Command: `{results['command']}`; started {results['started']}, wall "
             f"{results['wall_s']:.0f} s of a {results['budget_s']:.0f}-s budget"
             + (" (--tiny: tiny sizes, the figures only show that the code runs)" if results["tiny"] else ""),
             "", "| setting | value |", "|---|---|"]
    for key in ("device", "gpu", "gpu_count", "gpu_memory_gib", "compute_capability", "driver", "torch",
                "cuda_runtime", "cudnn", "torchvision", "numpy", "python", "cpu_count", "torch_threads",
                "cudnn_benchmark", "tf32_conv", "tf32_matmul", "platform", "git_commit", "error"):
        if key in env:
            lines.append(f"| {key} | {env[key]} |")
    lines.append(f"| sizes | {', '.join(f'{k}={v}' for k, v in results['sizes'].items())} |")
    for p in results["parts"]:
        lines += ["", f"## Part {p['id']}: {p['title']} ({p['name']}): **{p['status']}**", ""]
        box = f" of a {p['box_s']:.0f}-s time box" if p.get("box_s") else ""
        lines.append(f"{p.get('seconds') or 0:.0f} s{box}."
                     + (f" Error: {p['error']}." if p.get("error") else "")
                     + (f" {p['reason']}." if p.get("reason") else ""))
        if p.get("command"):
            lines += ["", f"Command: `{p['command']}`"]
        if p.get("note"):
            lines += ["", p["note"] + "."]
        if p.get("summary"):
            lines += ["", "Summary: " + ", ".join(f"{k} **{_fmt(v)}**" for k, v in p["summary"].items())]
        lines += _tables(p["rows"])
    return "\n".join(lines) + "\n"


def summary_text(results: dict) -> str:
    env = results["environment"]
    head = (f"{env.get('gpu') or env.get('device', '?')}, driver {env.get('driver')}, "
            f"torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, cuDNN {env.get('cudnn')}")
    lines = ["", "=" * 78, f"gpu_check: {head}",
             f"wall {results['wall_s']:.0f} s (budget {results['budget_s']:.0f} s)"
             + (", --tiny" if results["tiny"] else "")]
    for p in results["parts"]:
        extra = p.get("error") or p.get("reason") or ""
        lines.append(f"[{p['status']:>7}] {p['id']:>2} {p['name']:<18} {p.get('seconds') or 0:5.0f} s"
                     + (f"  {extra[:90]}" if extra else ""))
        if p["name"] == "search_step":
            for stage in (1, 2, 3):
                rows = {r["label"].split(", ", 1)[1]: r["figures"] for r in p["rows"]
                        if r["label"].startswith(f"stage {stage}, ")}
                cells = [f"{path.replace('default+', '+')} {_fmt(rows[path].get('images_per_sec'))}"
                         for path in [*SEARCH_PATHS, "default+compile"] if rows.get(path)]
                peak = rows.get("default", {}).get("peak_mib")
                est = rows.get("memory estimate", {})
                if cells:
                    lines.append(f"      stage {stage} img/s: {', '.join(cells)}")
                    lines.append(f"        default peak {_fmt(peak)} MiB, estimate "
                                 f"{_fmt(est.get('total_mib'))} MiB ({_fmt(est.get('needed_mib'))} "
                                 "with headroom)")
        elif p["name"] == "projection" and p["rows"]:
            stages = " / ".join(_fmt(r["figures"].get("stage_minutes")) for r in p["rows"])
            lines.append(f"      full default search: {_fmt(p['summary'].get('total_minutes'))} min "
                         f"(target < 20; stages {stages} min)")
        elif p["name"] == "train_step" and p["rows"]:
            for net in ("cifar", "imagenet"):
                cells = [f"{r['label'].split(', ')[1].replace('default+', '+')} "
                         f"{_fmt(r['figures'].get('images_per_sec'))}" for r in p["rows"]
                         if r["label"].startswith(net) and r["figures"].get("images_per_sec") is not None]
                if cells:
                    lines.append(f"      {net} img/s: " + ", ".join(cells))
        elif p["name"] == "checkpoint_cells" and p["summary"]:
            sm = p["summary"]
            lines.append(f"      step {_fmt(sm.get('time_ratio'))}x the time (target <= 1.6), peak "
                         f"{_fmt(sm.get('peak_ratio'))}x; estimated activations "
                         f"{_fmt(sm.get('estimate_activations_ratio'))}x smaller")
        elif p["summary"]:
            lines.append("      " + ", ".join(f"{k} {_fmt(v)}" for k, v in p["summary"].items())[:150])
    lines += [f"results: {os.path.join(results['out'], 'results.json')} and results.md", "=" * 78]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for results.json, results.md and logs/")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="tiny sizes: checks that the code runs (< 1 min on a CPU)")
    p.add_argument("--budget_s", type=float, default=480.0, help="total wall-clock budget in seconds")
    p.add_argument("--parts", default=None,
                   help=f"comma-separated part ids or names (default all: "
                        f"{', '.join(f'{i} {n}' for i, n, _ in PARTS)})")
    p.add_argument("--keep_tmp", action="store_true", help="keep OUT/tmp (compiler caches, pytest files)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--selected", default="", help=argparse.SUPPRESS)
    p.add_argument("--end", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return args
    if args.budget_s <= 0:
        p.error(f"--budget_s {args.budget_s}: give a positive number of seconds")
    by_id = {pid: name for pid, name, _ in PARTS}
    names = []
    for item in (args.parts.split(",") if args.parts else [n for _, n, _ in PARTS]):
        item = item.strip()
        name = by_id.get(item, item if item in TITLES else None)
        if name is None:
            p.error(f"--parts: unknown part {item!r}; use ids or names of: "
                    f"{', '.join(f'{i} {n}' for i, n, _ in PARTS)}")
        names.append(name)
    args.parts = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is available; on a CPU use --device cpu --tiny",
                  file=sys.stderr)
            return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
