"""Memory of one step with and without --checkpoint_cells, and what checkpointing costs
in time, for the three search stages and the two training networks.

    python benchmarks/bench_memory.py                # CPU: bytes at the paper's batches, short timing
    python benchmarks/bench_memory.py --device cuda  # also peak allocated memory per network

Bytes: the tensors autograd saves for the backward pass in one training forward pass
(memory.measure_saved_activations: saved_tensors_hooks, each storage once, parameters
left out), counted at batches of 2 and 8 images, checked to grow linearly, and scaled to
the paper's batch: 96 per search step (C=16; 5/11/17 cells with 8/5/3 ops per edge, the
patterns of bench_search.py), 128 for CIFAR training (C=36, 20 cells, auxiliary head)
and 128 per process for ImageNet (1024 over 8 GPUs; C=48, 14 cells, auxiliary head,
224x224). "stage N @224": the same search stage on 224-pixel images with the
reduction stem (--stem imagenet: the cells see 28x28 maps). "checkpointed" is what is
held at the end of the forward pass plus the largest cell's activations, which the
backward pass brings back one cell at a time.
``needed`` is memory.MemoryEstimate.needed: parameters, gradients, optimizer state and
activations, times the estimate's headroom; "fits in" lists the usual GPU sizes it fits.

Time: one step (search: alpha step + weight step) with and without checkpointing, the
two taken in turn (common.measure_paths), on a smaller batch on the CPU.

The last line: ``stage 3: saved activations <x>x smaller, step <y>x the time``.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from bench_search import STAGES
from common import environment, measure_paths, pick_device, print_table

import memory
from engine import train_step
from genotypes import PDARTS, PRIMITIVES
from model import NetworkCIFAR, NetworkImageNet
from model_search import Network
from train_search import search_step

GPU_SIZES_GB = (8, 11, 12, 16, 24, 32, 40, 48, 80)   # memory of common GPUs, in GB (1e9 bytes)
COUNT_BATCHES = (2, 8)
# name -> (paper batch per process, image side, CPU timing batch)
NETWORKS = {"stage 1": (96, 32, 8), "stage 2": (96, 32, 8), "stage 3": (96, 32, 8),
            "cifar": (128, 32, 16), "imagenet": (128, 224, 4),
            "stage 1 @224": (96, 224, 8), "stage 2 @224": (96, 224, 8), "stage 3 @224": (96, 224, 8)}
FITS_GB = 16   # the largest batch that fits a GPU of this size is listed per network


def build(name: str, device: torch.device, C: int | None = None, layers: int | None = None):
    """(network, optimizers, step(model, x, y)) as the scripts build them; ``C`` defaults
    to the paper's (16 search, 36 CIFAR, 48 ImageNet), ``layers`` (search stages only) to
    the stage's cells."""
    torch.manual_seed(0)
    if name.startswith("stage"):
        spec = STAGES[int(name.split()[1])]
        sw = [[op in spec["ops"] for op in PRIMITIVES] for _ in range(14)]
        stem = "imagenet" if name.endswith("@224") else "cifar"
        net = Network(C or 16, 10, layers or spec["layers"], sw, sw, drop_rate=spec["drop"],
                      stem=stem).to(device)
        w = torch.optim.SGD(net.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4, foreach=True)
        a = torch.optim.Adam(net.arch_parameters(), lr=6e-4, betas=(0.5, 0.999), weight_decay=1e-3,
                             foreach=True)

        def step(x, y):
            search_step(net, (x, y), (x, y), w, a, 5.0, True)

        return net, [w, a], step
    if name == "cifar":
        net = NetworkCIFAR(C or 36, 10, 20, True, PDARTS).to(device)
        net.drop_path_prob = 0.15
    else:
        net = NetworkImageNet(C or 48, 1000, 14, True, PDARTS).to(device)
    opt = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, weight_decay=3e-4, foreach=True)
    criterion = nn.CrossEntropyLoss()

    def step(x, y):
        train_step(net, x, y, opt, criterion, 0.4, 5.0)

    return net, [opt], step


def count_bytes(name: str, device: torch.device) -> dict:
    batch, image, _ = NETWORKS[name]
    net, opts, _ = build(name, device)
    counts = {b: memory.measure_saved_activations(net, (b, 3, image, image)) for b in COUNT_BATCHES}
    small, large = (counts[b] for b in COUNT_BATCHES)
    ratio = COUNT_BATCHES[1] / COUNT_BATCHES[0]
    linearity = max(abs(large[k] / (ratio * small[k]) - 1) for k in small)
    est = memory.estimate_memory(net, opts, (3, image, image), batch)
    return {"batch": batch, "est": est, "linearity": linearity,
            "per_image": large["plain"] / COUNT_BATCHES[1]}


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f}"


def fits_in(needed: int) -> str:
    sizes = [s for s in GPU_SIZES_GB if s * 1e9 >= needed]
    return f">= {sizes[0]} GB" if sizes else f"> {GPU_SIZES_GB[-1]} GB"


def time_steps(name: str, device: torch.device, batch: int, warmup: int, steps: int,
               C: int | None = None, image: int | None = None, layers: int | None = None,
               paths: Sequence[str] = ("default", "checkpoint_cells")):
    """measure_paths rows of one step without ("default") and with ("checkpoint_cells")
    cell checkpointing."""
    image = image or NETWORKS[name][1]

    def make_step(path: str):
        net, _, step = build(name, device, C, layers)
        net.checkpoint_cells = path == "checkpoint_cells"
        net.train()
        x = torch.randn(batch, 3, image, image, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        return partial(step, x, y)

    images = 2 * batch if name.startswith("stage") else batch
    return measure_paths(make_step, list(paths), device, images, warmup, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--networks", default=",".join(NETWORKS),
                   help=f"comma-separated, of: {', '.join(NETWORKS)}")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--time_batch", type=int, default=None,
                   help="batch of the timed steps (default: the paper's on CUDA, 8 / 16 / 4 for "
                        "search / CIFAR / ImageNet on the CPU)")
    p.add_argument("--no_timing", action="store_true", help="bytes only")
    p.add_argument("--no_bytes", action="store_true", help="timing only")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = PyTorch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    steps, warmup = args.steps or (20 if cuda else 3), args.warmup or (5 if cuda else 1)
    names = args.networks.split(",")
    print(environment(device))

    ratios, results = {}, {}
    if not args.no_bytes:
        print(f"\nsaved activations per step (GiB), counted at batches {COUNT_BATCHES} and scaled; "
              f"needed = x{memory.SAFETY} (parameters + gradients + optimizer state + activations)")
        print("| network | batch | activations | checkpointed | smaller | needed | needed, checkpointed "
              "| fits in | fits in, checkpointed | linear within |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in names:
            r = results[name] = count_bytes(name, device)
            est = r["est"]
            ratios[name] = est.activations / est.activations_checkpointed
            print(f"| {name} | {r['batch']} | {gib(est.activations)} | "
                  f"{gib(est.activations_checkpointed)} | {ratios[name]:.1f}x | "
                  f"{gib(est.needed(False))} | {gib(est.needed(True))} | {fits_in(est.needed(False))} | "
                  f"{fits_in(est.needed(True))} | {100 * r['linearity']:.2f}% |")
        print(f"\nper image, and the largest batch per process whose 'needed' fits {FITS_GB} GB")
        print("| network | image | saved per image (MiB) | largest batch | largest batch, checkpointed |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            est = r["est"]
            print(f"| {name} | {NETWORKS[name][1]} | {r['per_image'] / 2 ** 20:.1f} | "
                  f"{est.batch_that_fits(int(FITS_GB * 1e9), False)} | "
                  f"{est.batch_that_fits(int(FITS_GB * 1e9), True)} |")
        if "stage 1" in results and "stage 1 @224" in results:
            print(f"stage 1: saved bytes per image at 224 pixels with the reduction stem "
                  f"{results['stage 1 @224']['per_image'] / results['stage 1']['per_image']:.2f}x "
                  "those at 32 pixels with the CIFAR stem")

    if args.no_timing:
        return
    slowdown = {}
    for name in names:
        batch = args.time_batch or (NETWORKS[name][0] if cuda else NETWORKS[name][2])
        rows = time_steps(name, device, batch, warmup, steps)
        print_table(f"{name}: one step at batch {batch}", rows, "default")
        r = dict(rows)
        slowdown[name] = r["checkpoint_cells"]["step_ms"] / r["default"]["step_ms"]
        print(f"{name}: checkpointed step {slowdown[name]:.2f}x the time")
    if "stage 3" in names and "stage 3" in ratios:
        print(f"stage 3: saved activations {ratios['stage 3']:.1f}x smaller, step "
              f"{slowdown['stage 3']:.2f}x the time")


if __name__ == "__main__":
    main()
