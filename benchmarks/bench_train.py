"""Training-step speed of the evaluation networks: the plain path against the default
path and each opt-in feature, in one run.

    python benchmarks/bench_train.py                 # CUDA if present, else a short CPU run
    python benchmarks/bench_train.py --device cuda --batch_size 128 --steps 30

Networks: the 20-cell CIFAR network (C=36, PDARTS, auxiliary head, drop path 0.15 as in
mid-training) and the 14-cell ImageNet network (C=48). Each path times a full SGD step
(forward, auxiliary loss, backward, clipping, update) on a fixed on-device batch.

- plain: ``reference.reference_train_step``, the straightforward implementation:
  per-parameter (non-foreach) SGD and clipping, the loss read back every step.
- nchw, nhwc: the scripts' step (foreach SGD and clipping, metrics kept on the device:
  no per-step host sync) in either memory format. The same maths as plain.
- default: what train_cifar.py / train_imagenet.py run by default on the device
  (``speed.default_channels_last``: nhwc on the CPU, nchw on CUDA); its row names it.
- +bf16, +channels_last, +compile, +all: the opt-in flags (change float rounding).

The last line is ``speedup <x>``: default over plain for the CIFAR network.
"""
from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn as nn
from common import TRAIN_CPU_PATHS, add_common_args, measure_paths, path_options, print_table, setup
from reference import reference_train_step

from engine import train_step
from flags import positive_int
from genotypes import PDARTS
from model import NetworkCIFAR, NetworkImageNet
from speed import default_channels_last, prepare_input, prepare_model

FORMATS = ("nchw", "nhwc")


def default_format(device: torch.device) -> str:
    """The memory format the training scripts use by default on ``device``."""
    return "nhwc" if default_channels_last(device) else "nchw"


def make_step(net: str, path: str, device: torch.device, batch: int, image: int,
              C: int | None = None):
    """One training step of ``path`` on a fixed batch, as a callable; ``C`` defaults to
    the paper's (36 CIFAR, 48 ImageNet; smaller only in gpu_check.py's --tiny mode)."""
    base = path.split("+")[0]
    if base not in ("plain", "default", *FORMATS):
        raise ValueError(f"unknown path {path!r}")
    if base == "default":
        base = default_format(device)
    torch.manual_seed(0)
    if net == "cifar":
        model = NetworkCIFAR(C or 36, 10, 20, True, PDARTS)
        classes = 10
    else:
        model = NetworkImageNet(C or 48, 1000, 14, True, PDARTS)
        classes = 1000
    model = model.to(device).train()
    model.drop_path_prob = 0.15  # the middle of the CIFAR schedule
    amp, channels_last, compile_model = path_options(path)
    channels_last = channels_last or base == "nhwc"
    forward_model = prepare_model(model, channels_last, compile_model)
    x = prepare_input(torch.randn(batch, 3, image, image, device=device), channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    criterion = nn.CrossEntropyLoss()
    plain = base == "plain"
    optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4,
                                foreach=not plain)

    def step_plain():
        reference_train_step(model, x, y, optimizer, criterion, 0.4, 5.0)

    def step_default():
        train_step(forward_model, x, y, optimizer, criterion, 0.4, 5.0, amp)

    return step_plain if plain else step_default


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, cpu_steps=3)
    p.add_argument("--batch_size", type=positive_int, default=None,
                   help="CIFAR batch (default 128 on CUDA, 16 on CPU)")
    p.add_argument("--imagenet_batch_size", type=positive_int, default=None,
                   help="default 128 on CUDA, 4 on CPU")
    p.add_argument("--networks", default="cifar,imagenet")
    args = p.parse_args()
    device, steps, warmup, paths = setup(args, cpu_steps=3, cpu_paths=TRAIN_CPU_PATHS)
    cuda = device.type == "cuda"
    batch = args.batch_size or (128 if cuda else 16)
    ibatch = args.imagenet_batch_size or (128 if cuda else 4)
    print(f"CIFAR batch {batch}, ImageNet batch {ibatch}, {warmup} warm-up + {steps} timed steps")
    speedup = None
    for net in args.networks.split(","):
        b, size = (batch, 32) if net == "cifar" else (ibatch, 224)
        rows = measure_paths(partial(make_step, net, device=device, batch=b, image=size), paths,
                             device, b, warmup, steps)
        rows = [(f"default = {default_format(device)}" if name == "default" else name, r)
                for name, r in rows]
        print_table(f"{net} network, training step at batch {b}", rows, "plain")
        r = {name.split(" ")[0]: row for name, row in rows}
        if net == "cifar" and "plain" in r and "default" in r:
            speedup = r["default"]["images_per_sec"] / r["plain"]["images_per_sec"]
    if speedup is not None:
        print(f"speedup {speedup:.2f}")


if __name__ == "__main__":
    main()
