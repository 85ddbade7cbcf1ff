"""Shared test setup: import the project's top-level modules, keep tests on CPU and quick."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

torch.set_num_threads(1)  # tiny nets: threads only add overhead, and CI has 2 cores


# The equivalence tests run on this device: cpu (the default, CI), or cuda when
# benchmarks/gpu_check.py runs them on a lent GPU (PDARTS_TEST_DEVICE=cuda).
TEST_DEVICE_ENV = "PDARTS_TEST_DEVICE"


@pytest.fixture
def test_device():
    """The device named by $PDARTS_TEST_DEVICE (default cpu); the test skips when it is
    cuda and none is present. On CUDA, TF32 is off while the test runs (it rounds float32
    convolution inputs to 10-bit mantissas; the float64 proofs do not use it, a float32
    comparison would)."""
    name = os.environ.get(TEST_DEVICE_ENV, "cpu")
    if name not in ("cpu", "cuda"):
        pytest.fail(f"${TEST_DEVICE_ENV}={name!r}: use cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"${TEST_DEVICE_ENV}=cuda but no CUDA device is present")
    if name == "cpu":
        yield torch.device("cpu")
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def fixtures_dir():
    """The authors' checkpoint layouts, kept in the repository (tests/fixtures)."""
    return os.path.join(ROOT, "tests", "fixtures")


def write_cifar_folder(root: str, num_classes: int = 10, per_file: int = 20, seed: int = 0) -> str:
    """Write a tiny CIFAR-10 (``cifar-10-batches-py``: 5 train batches + test_batch) or
    CIFAR-100 (``cifar-100-python``: train + test) folder in the real pickle format.
    Images are the generated demo task's, so a network can learn them."""
    import pickle

    import numpy as np

    from data import make_demo_arrays

    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder = os.path.join(root, "cifar-10-batches-py")
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key = "labels"
    else:
        folder = os.path.join(root, "cifar-100-python")
        files = ["train", "test"]
        label_key = "fine_labels"
    os.makedirs(folder, exist_ok=True)
    imgs, labels = make_demo_arrays(True, num_train=per_file * len(files))
    for k, name in enumerate(files):
        x = imgs[k * per_file:(k + 1) * per_file]
        y = labels[k * per_file:(k + 1) * per_file]
        if num_classes != 10:
            y = [int(v) + 10 * int(rng.integers(num_classes // 10)) for v in y]
        batch = {"batch_label": name, label_key: y,
                 "data": x.transpose(0, 3, 1, 2).reshape(len(x), -1).copy(),
                 "filenames": [f"{name}_{i}.png" for i in range(len(x))]}
        if num_classes != 10:
            batch["coarse_labels"] = [v // 5 for v in y]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


def write_image_folder(root: str, num_classes: int = 3, per_class: int = 4, size: int = 40) -> str:
    """A tiny ImageFolder tree of generated JPEGs: root/class_k/img_i.jpg."""
    from PIL import Image

    from data import make_demo_arrays

    imgs, labels = make_demo_arrays(True, num_train=num_classes * per_class * 4)
    counts = [0] * num_classes
    for img, y in zip(imgs, labels):
        if y >= num_classes or counts[y] >= per_class:
            continue
        d = os.path.join(root, f"class_{y}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).resize((size, size)).save(os.path.join(d, f"img_{counts[y]}.jpg"))
        counts[y] += 1
    return root


COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]


def write_colour_folder(root: str, num_classes: int = 4, per_class: int = 12, seed: int = 0,
                        modes: bool = False, large: bool = False) -> str:
    """A learnable image folder as users keep one, class by class: each class a flat colour
    under strong noise, odd sizes (12-20 x 14-20; ``large``: 96-128 x 100-128), PNG files.
    ``modes``: the first image of class 0 is stored grayscale, the first of class 1 as
    RGBA and (``large``) the first of class 2 as a palette image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = os.path.join(root, f"class_{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            h, w = 12 + (i % 3) * 4, 14 + (i % 2) * 6
            if large:
                h, w = 96 + (i % 3) * 16, 100 + (i % 2) * 28
            img = np.clip(np.array(COLOURS[c])[None, None] + rng.normal(0, 40, (h, w, 3)), 0, 255)
            img = Image.fromarray(img.astype(np.uint8))
            if modes and i == 0 and c < (3 if large else 2):
                img = img.convert(("L", "RGBA", "P")[c])
            img.save(os.path.join(d, f"{i:03d}.png"))
    return root


@pytest.fixture
def cifar10_dir(tmp_path):
    return write_cifar_folder(str(tmp_path / "data"), 10)


@pytest.fixture
def cifar100_dir(tmp_path):
    return write_cifar_folder(str(tmp_path / "data"), 100)


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(str(tmp_path / "images"))
