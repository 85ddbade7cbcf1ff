"""Write a small image folder as users keep one, to measure the README's own-images
commands on (benchmarks/RESULTS.md): class folders of JPEG and PNG files of uneven sizes,
some grayscale, drawn from the demo task's patterns (data.py) so that a network can learn
them. Nothing else in the project uses it.

    python benchmarks/make_image_folder.py TREE                # 10 classes x 30 images
    python benchmarks/make_image_folder.py TREE --classes 4 --per_class 75
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DEMO_CLASSES, make_demo_arrays  # noqa: E402


def write_tree(root: str, classes: int = 10, per_class: int = 30, seed: int = 7) -> int:
    """``root/<class name>/<file>``: sizes 40-72 x 36-64 pixels, every 4th file a PNG,
    every 10th stored grayscale. Returns the number of files written."""
    imgs, labels = make_demo_arrays(True, num_train=10 * per_class, seed=seed)   # per_class each
    rng = np.random.default_rng(seed)
    counts = [0] * classes
    for img, y in zip(imgs, labels):
        if y >= classes or counts[y] >= per_class:
            continue
        i = counts[y]
        folder = os.path.join(root, DEMO_CLASSES[y].replace(" ", "_"))
        os.makedirs(folder, exist_ok=True)
        w, h = int(rng.integers(40, 73)), int(rng.integers(36, 65))
        picture = Image.fromarray(img).resize((w, h), Image.BILINEAR)
        if i % 10 == 9:
            picture = picture.convert("L")
        name = f"IMG_{1000 + i:04d}." + ("png" if i % 4 == 3 else "jpg")
        picture.save(os.path.join(folder, name), quality=90)
        counts[y] += 1
    return sum(counts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="folder to write (class folders go inside)")
    p.add_argument("--classes", type=int, default=10, choices=range(2, 11), metavar="2..10")
    p.add_argument("--per_class", type=int, default=30)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    n = write_tree(args.root, args.classes, args.per_class, args.seed)
    print(f"{n} images in {args.classes} class folders under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
