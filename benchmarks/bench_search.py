"""Search-step speed and memory of the three P-DARTS stages: the plain path against the
default path and each opt-in feature, in one run.

    python benchmarks/bench_search.py                # CUDA if present, else a short CPU run
    python benchmarks/bench_search.py --device cuda --batch_size 96 --steps 20

A search step is what train_search.py runs per step after the warm-up: one first-order
alpha step on an alpha batch, then one weight step on a weight batch, both of
``--batch_size`` CIFAR-sized (32x32) images; images/s counts both batches.

Networks (C=16, 10 classes), as in the paper's stages:
- stage 1: 5 cells, all 8 ops on every edge, skip dropout 0.0;
- stage 2: 11 cells, 5 ops on every edge: none, skip_connect, sep_conv_3x3, sep_conv_5x5,
  dil_conv_3x3 (a fixed pattern; real runs keep different ops per edge), skip dropout 0.4;
- stage 3: 17 cells, 3 ops on every edge: none, sep_conv_3x3, sep_conv_5x5 (the most
  expensive 3-op pattern that a stage 3 can have with `none` still on), skip dropout 0.7.

Paths:
- plain: ``reference.reference_search_step``, the straightforward implementation of
  SPEC: `none` computed as a zero tensor, every backward pass fills the gradients of
  weights and alphas alike, per-parameter (non-foreach) Adam, SGD and clipping, both
  losses read back to the host every step.
- batched, per_edge: ``search_step`` (`none` skipped, gradients for the alphas only in
  the alpha step and for the weights only in the weight step, foreach optimizers and
  clipping, losses kept on the device) with the batched cell or the per-edge cells
  (``--cell_layout``), in NCHW; ``+channels_last`` in NHWC. The same maths as plain.
- default: what train_search.py runs by default on the device at this size
  (``speed.search_layout``: batched on CUDA; on the CPU per_edge+channels_last from
  ``speed.PER_EDGE_FROM_ELEMENTS`` elements per op, batched below); its row names it.
- +bf16, +channels_last, +compile, +all: the opt-in flags (change float rounding).

Before the timings, per stage and path (plain, batched: what CUDA runs): aten operators one warm search
step dispatches (a TorchDispatchMode around it, batch 2; a device-independent stand-in
for launch-bound GPU time) and the bytes of activations saved for backward
(saved_tensors_hooks, each storage once). ``--counts_only`` stops there.

``--switches first`` / ``random`` / ``random_none`` count other patterns (the operator
counts depend on how the ops on are spread over the edges): the first 8 / 5 / 3 ops of
PRIMITIVES on every edge (the patterns of the release figures in issue 9), 8 / 5 / 3 ops
drawn per edge as pruning leaves them, or `none` on every edge and the others drawn (the
fewest ops computed per edge: the batched cell's worst case). Draws use
``random.Random(seed)`` for normal cells and ``seed + 100`` for reduction cells.

The last line is ``speedup <x>``: default over plain at stage 1.
"""
from __future__ import annotations

import argparse
import random
from functools import partial

import torch
from common import (
    SEARCH_CPU_PATHS,
    SEARCH_CUDA_PATHS,
    add_common_args,
    measure_paths,
    path_options,
    print_table,
    setup,
)
from reference import reference_search_step
from torch.utils._python_dispatch import TorchDispatchMode

from flags import positive_int
from genotypes import PRIMITIVES
from model_search import CELL_LAYOUTS, Network
from speed import prepare_input, prepare_model, search_layout
from train_search import search_step

STAGES = {
    1: dict(layers=5, ops=PRIMITIVES, drop=0.0),
    2: dict(layers=11, ops=["none", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3"],
            drop=0.4),
    3: dict(layers=17, ops=["none", "sep_conv_3x3", "sep_conv_5x5"], drop=0.7),
}


def stage_switches(stage: int, pattern: str = "fixed", seed: int = 0) -> list[list[bool]]:
    """14 rows of switches for a stage: the fixed pattern of STAGES, the first n ops of
    PRIMITIVES, n ops drawn per edge, or `none` and n - 1 drawn (n = 8 / 5 / 3 at stages
    1 / 2 / 3)."""
    spec = STAGES[stage]
    n = len(spec["ops"])
    if pattern == "fixed":
        return [[name in spec["ops"] for name in PRIMITIVES] for _ in range(14)]
    if pattern == "first":
        return [[k < n for k in range(len(PRIMITIVES))] for _ in range(14)]
    rng = random.Random(seed)
    rows = []
    for _ in range(14):
        if pattern == "random_none":
            on = {0, *rng.sample(range(1, len(PRIMITIVES)), n - 1)}
        else:
            on = set(rng.sample(range(len(PRIMITIVES)), n))
        rows.append([k in on for k in range(len(PRIMITIVES))])
    return rows


def default_path(device: torch.device, batch: int, C: int = 16, image: int = 32) -> str:
    """The path train_search.py runs by default on ``device`` for this size."""
    layout, channels_last, _ = search_layout(device, batch, C, image)
    return layout + ("+channels_last" if channels_last else "")


def make_step(stage: int, path: str, device: torch.device, batch: int, pattern: str = "fixed",
              seed: int = 0, C: int = 16, image: int = 32, layers: int | None = None):
    """One search step of ``path`` on a fixed batch pair of ``image``-sided images, as a
    callable. ``layers`` defaults to the stage's cells; C, image and layers are smaller
    only in gpu_check.py's --tiny mode.

    ``path``: ``plain`` (the release's step), ``default`` (what train_search.py runs by
    default on ``device`` at this size: ``speed.search_layout``'s cells and memory
    format), or a cell layout, ``batched`` or ``per_edge`` (NCHW unless ``+channels_last``);
    ``+bf16``, ``+channels_last``, ``+compile``, ``+all`` add the opt-in flags."""
    spec = STAGES[stage]
    switches = stage_switches(stage, pattern, seed)
    switches_reduce = stage_switches(stage, pattern, seed + 100)
    base = path.split("+")[0]
    if base not in ("plain", "default", *CELL_LAYOUTS):
        raise ValueError(f"unknown path {path!r}")
    plain = base == "plain"
    amp, channels_last, compile_model = path_options(path)
    layout = base
    if base == "default":
        layout, nhwc, _ = search_layout(device, batch, C, image)
        channels_last = channels_last or bool(nhwc)
    torch.manual_seed(0)
    # plain: the release's per-edge cells, `none` computed; else the layout's cells.
    model = Network(C, 10, layers or spec["layers"], switches, switches_reduce, drop_rate=spec["drop"],
                    skip_zero=not plain, batched=False,
                    cell_layout=None if plain else layout).to(device).train()
    forward = prepare_model(model, channels_last, compile_model)
    w_opt = torch.optim.SGD(model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4,
                            foreach=not plain)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=6e-4, betas=(0.5, 0.999),
                             weight_decay=1e-3, foreach=not plain)

    def batch_of(n):
        x = prepare_input(torch.randn(n, 3, image, image, device=device), channels_last)
        return x, torch.randint(0, 10, (n,), device=device)

    batch_w, batch_a = batch_of(batch), batch_of(batch)

    def step_plain():
        reference_search_step(model, batch_w, batch_a, w_opt, a_opt, 5.0, True)

    def step_default():
        search_step(model, batch_w, batch_a, w_opt, a_opt, 5.0, True, forward=forward, amp=amp)

    return step_plain if plain else step_default


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_step(stage: int, path: str, device: torch.device, batch: int = 2,
               pattern: str = "fixed", seed: int = 0) -> tuple[int, int]:
    """(aten operators, bytes saved for backward) of one warm search step."""
    step = make_step(stage, path, device, batch, pattern, seed)
    step()
    with _CountOps() as ops:
        step()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return ops.count, sum(saved.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, cpu_steps=3)
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="images in each of the two batches (default 96 on CUDA, 8 on CPU)")
    p.add_argument("--stages", default="1,2,3", help="comma-separated stages to measure")
    p.add_argument("--counts_only", action="store_true",
                   help="print operators and saved bytes per step, no timing")
    p.add_argument("--switches", choices=("fixed", "first", "random", "random_none"), default="fixed",
                   help="switch pattern of every stage: the fixed one of the docstring, the "
                        "first n ops of PRIMITIVES on every edge, n ops drawn per edge, or "
                        "`none` and n - 1 others drawn per edge")
    p.add_argument("--seed", type=int, default=0, help="seed of --switches random and random_none")
    p.add_argument("--init_channels", type=positive_int, default=16,
                   help="C of the timed networks (the paper's 16; the demo's 4)")
    p.add_argument("--image_size", type=positive_int, default=32,
                   help="side of the timed images (CIFAR's 32; the demo's 16)")
    args = p.parse_args()
    device, steps, warmup, paths = setup(args, cpu_steps=3, cpu_paths=SEARCH_CPU_PATHS,
                                         cuda_paths=SEARCH_CUDA_PATHS)
    stages = [int(s) for s in args.stages.split(",")]
    print(f"\noperators and saved activations per search step (batch 2 + 2, switches "
          f"{args.switches}{f' seed {args.seed}' if args.switches.startswith('random') else ''})")
    print("| stage | plain ops | batched ops | fewer | plain saved MiB | batched saved MiB |")
    print("|---|---|---|---|---|---|")
    for stage in stages:
        (ops_p, mem_p), (ops_d, mem_d) = (count_step(stage, path, device, 2, args.switches, args.seed)
                                    for path in ("plain", "batched"))   # CUDA's default
        print(f"| {stage} | {ops_p} | {ops_d} | {ops_p / ops_d:.2f}x | {mem_p / 2 ** 20:.1f} | "
              f"{mem_d / 2 ** 20:.1f} |")
    if args.counts_only:
        return
    cuda = device.type == "cuda"
    batch = args.batch_size or (96 if cuda else 8)
    print(f"batch {batch} + {batch} (alpha + weight step), {warmup} warm-up + {steps} timed steps"
          + ("" if cuda or args.steps else f" ({2 * steps} at stage 1)"))
    speedup = None
    for stage in stages:
        if any("compile" in path or path.endswith("+all") for path in paths):
            torch._dynamo.reset()
        # On the CPU stage 1, which gives the speedup line, takes twice the timed rounds:
        # shared machines are noisy and its steps are the cheapest.
        rounds = steps if cuda or args.steps or stage != 1 else 2 * steps
        rows = measure_paths(partial(make_step, stage, device=device, batch=batch,
                                     pattern=args.switches, seed=args.seed,
                                     C=args.init_channels, image=args.image_size), paths, device,
                             2 * batch, warmup, rounds)
        spec = STAGES[stage]
        rows = [(f"default = {default_path(device, batch, args.init_channels, args.image_size)}"
                 if name == "default" else name, r)
                for name, r in rows]
        print_table(f"stage {stage}: {spec['layers']} cells, {len(spec['ops'])} ops per edge, "
                    f"search step at batch {batch}, C {args.init_channels}, "
                    f"{args.image_size} px", rows, rows[0][0])
        r = {name.split(" ")[0]: row for name, row in rows}
        if stage == 1 and "plain" in r and "default" in r:
            speedup = r["default"]["images_per_sec"] / r["plain"]["images_per_sec"]
    if speedup is not None:
        print(f"speedup {speedup:.2f}")


if __name__ == "__main__":
    main()
