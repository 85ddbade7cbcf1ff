"""Datasets and input pipelines.

- CIFAR-10/100 from the standard python-version folders (``cifar-10-batches-py``,
  ``cifar-100-python``) under the data directory, read with a restricted unpickler and
  no checksum check, so any correct pickle-format folder works. ``--download`` fetches
  the official archive with torchvision.
- ``demo``: a deterministic, generated 10-class 32x32 RGB task of textures and shapes
  in random colours (only spatial structure tells the classes apart), for the README's
  first command and the tests.
- A user's own ImageFolder tree (class subfolders), resized to ``image_size``.
- ImageNet from ``imagenet/train`` and ``imagenet/val`` class folders.
- The search's data (train_search.py): the training split with its augmentation, divided
  into a weight half and an alpha half, and their per-epoch samplers and loaders
  (``build_search_data``, ``search_split``, ``SearchData``).
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from config import SearchConfig
from distributed import DistInfo
from errors import BadImageError, DataError, UserError, exit_on_torchvision_error
from utils import seed_for

try:    # the project's first import of torchvision
    import torchvision.transforms as T
except Exception as e:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
    exit_on_torchvision_error(e, torch.__version__)

CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_FOLDERS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std used for a dataset name (demo uses CIFAR-10's, imagenet ImageNet's;
    an image folder's own are computed by ``image_stats``)."""
    if dataset == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    if dataset in ("cifar10", "demo"):
        return CIFAR10_MEAN, CIFAR10_STD
    return IMAGENET_MEAN, IMAGENET_STD


# ---------------------------------------------------------------------------------------
# In-memory uint8 image arrays (CIFAR and demo)
# ---------------------------------------------------------------------------------------

class ArrayDataset(Dataset):
    """Images as a uint8 N x H x W x 3 array and integer labels; each item goes through
    ``transform`` as a PIL image, exactly as torchvision's CIFAR datasets do."""

    def __init__(self, data: np.ndarray, targets, transform=None) -> None:
        self.data = data
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    @property
    def num_classes(self) -> int:
        return max(self.targets) + 1


class _CifarUnpickler(pickle.Unpickler):
    """Only what the CIFAR pickles need: numpy arrays, dtypes and bytes."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"}

    def find_class(self, module: str, name: str):
        if (module.startswith("numpy") and name in self._ALLOWED) or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_batch(path: str) -> dict:
    with open(path, "rb") as f:
        batch = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a dict: expected a CIFAR "
                        "python-version batch file (a dict with 'data' and the labels)")
    # The official files were pickled by Python 2 (bytes keys); accept str keys too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


CIFAR_IMAGE_VALUES = 3 * 32 * 32


def _batch_arrays(batch: dict, path: str, label_key: str,
                  num_classes: int) -> tuple[np.ndarray, list[int]]:
    """Check one CIFAR batch and return (uint8 N x 3 x 32 x 32, labels): the images are
    integers in 0..255 (N x 3072 as in the official files, or N x 3 x 32 x 32), the labels
    one integer in 0..num_classes-1 per image."""
    for key in ("data", label_key):
        if key not in batch:
            raise DataError(f"{path} has no '{key}' entry (it has: {', '.join(map(str, batch))}); "
                            "expected a CIFAR python-version batch file")
    x = batch["data"]
    if not isinstance(x, np.ndarray):
        raise DataError(f"{path}: 'data' is a {type(x).__name__}, expected a numpy array of uint8")
    if x.dtype.kind not in "ui":
        raise DataError(f"{path}: the image data is stored as {x.dtype}; expected integers "
                        "0..255 (uint8), as in the official files. Convert with "
                        "np.clip(np.round(data), 0, 255).astype(np.uint8) if that is what it holds")
    if x.size and (x.min() < 0 or x.max() > 255):
        raise DataError(f"{path}: image values range from {x.min()} to {x.max()}; expected 0..255")
    if x.ndim == 2 and x.shape[1] == CIFAR_IMAGE_VALUES:
        x = x.reshape(-1, 3, 32, 32)
    if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
        raise DataError(f"{path}: 'data' has shape {list(x.shape)}; expected N x {CIFAR_IMAGE_VALUES} "
                        "(the official layout) or N x 3 x 32 x 32")
    y = batch[label_key]
    y = y.tolist() if isinstance(y, np.ndarray) else y
    if not isinstance(y, (list, tuple)):
        raise DataError(f"{path}: '{label_key}' is a {type(y).__name__}; expected a list of integers")
    bad = next((v for v in y if isinstance(v, bool) or not isinstance(v, (int, np.integer))), None)
    if bad is not None:
        raise DataError(f"{path}: the labels must be integers, found {bad!r} "
                        f"({type(bad).__name__}) in '{label_key}'")
    out = [v for v in y if not 0 <= v < num_classes]
    if out:
        raise DataError(f"{path}: label {out[0]} is out of range for {num_classes} classes "
                        f"(expected 0..{num_classes - 1}); is this the right dataset "
                        "(--cifar100 / --dataset)?")
    if len(y) != len(x):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return x.astype(np.uint8, copy=False), [int(v) for v in y]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def looks_like_image_folder(root: str) -> bool:
    """Class subfolders with image files in them at ``root`` (or in ``root/train``): what
    ``--dataset folder`` reads. Only the first files of each subfolder are looked at."""
    for top in (os.path.join(root, "train"), root):
        try:
            subfolders = [e.path for e in os.scandir(top) if e.is_dir()]
        except OSError:
            continue
        for sub in subfolders[:20]:
            try:
                names = [e.name.lower() for _, e in zip(range(20), os.scandir(sub))]
            except OSError:
                continue
            if any(name.endswith(IMAGE_SUFFIXES) for name in names):
                return True
    return False


def cifar_folder(root: str, dataset: str) -> str:
    return os.path.join(root, CIFAR_FOLDERS[dataset][0])


def load_cifar_arrays(root: str, dataset: str, train: bool, download: bool = False,
                      offer_download: bool = True) -> tuple[np.ndarray, list[int]]:
    """Read a CIFAR split into (uint8 N x 32 x 32 x 3, labels). ``offer_download``: the
    script has a --download flag to suggest when the folder is missing."""
    folder_name, train_files, test_files, label_key, num_classes = CIFAR_FOLDERS[dataset]
    folder = os.path.join(root, folder_name)
    if not os.path.isdir(folder) and download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
        try:
            cls(root, train=train, download=True)
        except Exception as e:  # noqa: BLE001 - network failures come in many types
            raise DataError(f"could not download {dataset} into {root}: {e}") from None
    files = train_files if train else test_files
    if not os.path.isdir(folder):
        if looks_like_image_folder(root):
            raise DataError(f"{dataset} not found in {root}, which looks like an image folder "
                            f"(class subfolders of images): add --dataset folder to use it, or set "
                            f"--tmp_data_dir to the folder that contains {folder_name}")
        raise DataError(
            f"{dataset} not found: expected the python-version folder {folder} "
            f"(with {', '.join(files)}). Set --tmp_data_dir to the folder that contains "
            f"{folder_name}" + (", or add --download to fetch it." if offer_download else "."))
    data, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        try:
            batch = _read_batch(path)
        except (OSError, EOFError, ValueError, IndexError, TypeError, pickle.UnpicklingError) as e:
            raise DataError(f"cannot read {path}: {e}. Expected a CIFAR python-version batch "
                            "file; re-download the dataset.") from None
        x, y = _batch_arrays(batch, path, label_key, num_classes)
        data.append(x)
        labels.extend(y)
    if train and len(set(labels)) < 2:
        # As an image folder with one class folder: nothing to tell apart, and the
        # accuracy (100% by construction) would say nothing.
        raise DataError(f"the training files of {folder} hold one class only (label "
                        f"{labels[0] if labels else '-'} in all {len(labels)} images): training and "
                        "the search need 2 or more classes; is this the right data?")
    return np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1)), labels


DEMO_CLASSES = ("horizontal stripes", "vertical stripes", "coarse horizontal stripes",
                "fine checkerboard", "coarse checkerboard", "rings", "dots", "circle outline",
                "square outline", "plus sign")


def _demo_pattern(label: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class ``label``'s pattern at the (rotated, scaled, centred) coordinates x, y."""
    tau = 2 * math.pi
    r = torch.sqrt(x * x + y * y)
    box = torch.maximum(x.abs(), y.abs())

    def line(distance: torch.Tensor, half_width: float) -> torch.Tensor:   # soft band
        return torch.sigmoid(4 * (half_width - distance))

    if label == 0:
        return torch.cos(tau * y / 8)
    if label == 1:
        return torch.cos(tau * x / 8)
    if label == 2:
        return torch.cos(tau * y / 16)
    if label == 3:
        return torch.cos(tau * x / 8) * torch.cos(tau * y / 8)
    if label == 4:
        return torch.cos(tau * x / 16) * torch.cos(tau * y / 16)
    if label == 5:
        return torch.cos(tau * r / 8)
    if label == 6:
        return line(2 - torch.cos(tau * x / 8) - torch.cos(tau * y / 8), 0.8)
    if label == 7:
        return line((r - 8).abs(), 1.2)
    if label == 8:
        return line((box - 8).abs(), 1.2)
    return line(torch.minimum(x.abs(), y.abs()), 2) * line(box, 11)


def make_demo_arrays(train: bool, num_train: int = 1000, num_test: int = 500,
                     seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """A deterministic 10-class task that needs spatial filters: each class is a structure
    (``DEMO_CLASSES``: stripes and checkerboards at two scales, rings, dots, shape outlines)
    at a random position, small rotation and scale, drawn in a random colour direction
    and polarity around a random mean colour with a random contrast, plus noise. The
    pattern is normalised to zero mean and unit variance per image before colouring, so
    an image's mean colour and per-channel contrast say nothing about its class: colour
    statistics (what pooling alone can reach) stay at chance, and shapes and textures
    have to be found."""
    n = num_train if train else num_test
    g = torch.Generator().manual_seed(seed + (0 if train else 1))
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    yy, xx = torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="ij")
    cx, cy = uniform(11, 21), uniform(11, 21)          # centre
    angle = uniform(-0.2, 0.2)                          # small rotation (radians)
    scale = uniform(0.85, 1.15)
    mean_colour = uniform(0.35, 0.65, 3)
    direction = torch.randn(n, 3, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True)   # colour and polarity
    contrast = uniform(0.08, 0.2)
    noise = torch.randn(n, 3, 32, 32, generator=g)
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    x = (dx * cos + dy * sin) / scale[:, None, None]
    y = (dy * cos - dx * sin) / scale[:, None, None]
    pattern = torch.empty(n, 32, 32)
    for k in range(10):
        idx = (labels == k).nonzero().flatten()
        pattern[idx] = _demo_pattern(k, x[idx], y[idx])
    pattern = pattern - pattern.mean((1, 2), keepdim=True)
    pattern = pattern / pattern.std((1, 2), keepdim=True).clamp(min=1e-6)
    amplitude = math.sqrt(3) * contrast[:, None] * direction     # n x 3, per-channel
    img = mean_colour[:, :, None, None] + amplitude[:, :, None, None] * pattern[:, None]
    img = img + 0.04 * noise
    data = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return data.numpy(), labels.tolist()


# ---------------------------------------------------------------------------------------
# Dividing a training set in two (the search's weight/alpha halves, a held-out split)
# ---------------------------------------------------------------------------------------

# The CIFAR training batches are stored in random order, and the demo data is generated in
# random order (its labels go through a random permutation), so their first and second
# parts hold every class in about the same proportions: the release's in-order split is
# right there and kept. Every other dataset (an image folder lists its images class by
# class) is divided by a seeded, stratified draw.
IN_ORDER_DATASETS = ("cifar10", "cifar100", "demo")
COUNTS_SHOWN = 20   # class counts listed one by one in the log up to this many classes


def split_rule(dataset: str) -> str:
    """'in order' for the CIFAR pickles and the demo data, 'stratified' otherwise."""
    return "in order" if dataset in IN_ORDER_DATASETS else "stratified"


@dataclass
class Split:
    """Two disjoint sets of indices into one dataset, each in increasing order."""
    first: list[int]
    second: list[int]
    rule: str
    names: Sequence[str] = ()   # the files indexed (image folders), part of the digest

    @property
    def digest(self) -> str:
        """A short fingerprint of the division (and of the files, when known), stored in
        checkpoints so a resume can check that it divides the same data the same way."""
        h = hashlib.sha256(f"{self.first}/{self.second}".encode())
        for name in self.names:
            h.update(name.encode() + b"\0")
        return h.hexdigest()[:16]


def sample_names(dataset) -> list[str]:
    """The files of an image-folder dataset relative to its root ([] for arrays)."""
    samples, root = getattr(dataset, "samples", None), getattr(dataset, "root", None)
    if samples is None or root is None:
        return []
    return [os.path.relpath(path, root).replace(os.sep, "/") for path, _ in samples]


def split_indices(labels: Sequence[int], portion: float, seed: int, rule: str) -> Split:
    """Divide the indices of ``labels`` into ``floor(portion * n)`` and the rest.

    ``rule`` 'in order': the first ones and the others (the release's rule). 'stratified':
    every class is divided in the same proportion, each class's count in the first part
    being ``portion * n_c`` rounded down or up (the remainders go to the classes with the
    largest fractions, ties broken at random), and which images of a class go first is a
    seeded random draw. A function of (labels, portion, seed) only.
    """
    n = len(labels)
    m = int(math.floor(portion * n))
    if rule == "in order":
        return Split(list(range(m)), list(range(m, n)), rule)
    if rule != "stratified":
        raise ValueError(f"unknown split rule {rule!r}")
    g = torch.Generator().manual_seed(int(seed))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    classes = sorted(by_class)
    quota = [portion * len(by_class[c]) for c in classes]
    take = [int(math.floor(q)) for q in quota]
    # Largest remainders get the images left over; random tie-break, then class order.
    ties = torch.rand(len(classes), generator=g).tolist()
    order = sorted(range(len(classes)), key=lambda k: (-(quota[k] - take[k]), ties[k], k))
    for k in order[:m - sum(take)]:
        take[k] += 1
    first: list[int] = []
    for c, t in zip(classes, take):
        idx = by_class[c]
        perm = torch.randperm(len(idx), generator=g).tolist()
        first.extend(idx[j] for j in perm[:t])
    chosen = set(first)
    return Split(sorted(first), [i for i in range(n) if i not in chosen], rule)


SUBSET_RULE = "per-class subset"


def per_class_take(amount: int | float, size: int) -> int:
    """Images of a class of ``size`` that ``amount`` asks for: a count as given, a
    fraction of the class rounded to the nearest count (at least 1)."""
    if isinstance(amount, float):
        return max(1, int(math.floor(amount * size + 0.5)))
    return int(amount)


def subset_indices(labels: Sequence[int], weights: int | float, alphas: int | float, seed: int,
                   class_names: Sequence[str] | None = None) -> Split:
    """``--subset_per_class W A``: from every class, a seeded random draw of W images for
    the weight half and A other images for the alpha half (counts, or fractions of the
    class); a function of (labels, W, A, seed) only. A DataError when a class has fewer
    than the two take together."""
    g = torch.Generator().manual_seed(int(seed))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    first: list[int] = []
    second: list[int] = []
    short = []
    for c in sorted(by_class):
        idx = by_class[c]
        w, a = per_class_take(weights, len(idx)), per_class_take(alphas, len(idx))
        if w + a > len(idx):
            name = class_names[c] if class_names is not None else str(c)
            short.append(f"{name} ({len(idx)} images, {w}+{a} asked)")
            continue
        perm = torch.randperm(len(idx), generator=g).tolist()
        first.extend(idx[j] for j in perm[:w])
        second.extend(idx[j] for j in perm[w:w + a])
    if short:
        shown = ", ".join(short[:COUNTS_SHOWN]) + (" ..." if len(short) > COUNTS_SHOWN else "")
        raise DataError(f"--subset_per_class {weights} {alphas} asks for more images than "
                        f"{len(short)} class(es) hold: {shown}; ask for fewer (or fractions "
                        "such as 0.1 0.025)")
    return Split(sorted(first), sorted(second), SUBSET_RULE)


def class_counts(labels: Sequence[int], indices: Sequence[int], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for i in indices:
        counts[int(labels[i])] += 1
    return counts


def check_split(split: Split, labels: Sequence[int], class_names: Sequence[str],
                names: tuple[str, str], advice: str) -> tuple[list[int], list[int]]:
    """The class counts of both parts; a DataError naming the classes that have images
    but none in one part (a class the weights never see, or one never validated)."""
    counts = [class_counts(labels, part, len(class_names)) for part in (split.first, split.second)]
    for name, part, other in zip(names, counts, counts[::-1]):
        # A class with no image at all (a tiny CIFAR copy) has nothing to divide.
        empty = [class_names[c] for c, k in enumerate(part) if k == 0 and other[c] > 0]
        if empty:
            shown = ", ".join(empty[:COUNTS_SHOWN]) + (" ..." if len(empty) > COUNTS_SHOWN else "")
            raise DataError(f"the {split.rule} split leaves {len(empty)} class(es) with no "
                            f"image in the {name}: {shown}; {advice}")
    return counts[0], counts[1]


def describe_counts(class_names: Sequence[str], first: Sequence[int], second: Sequence[int]) -> str:
    """'name a/b, ...' for few classes, else the range of counts per class."""
    if len(class_names) <= COUNTS_SHOWN:
        return ", ".join(f"{c} {a}/{b}" for c, a, b in zip(class_names, first, second))
    return (f"{len(class_names)} classes, {min(first)}..{max(first)} / "
            f"{min(second)}..{max(second)} images per class")


# ---------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------

class Cutout:
    """Zero one square of side ``length`` at a uniformly random centre, clipped at the
    border (applied to the normalised tensor, as in the release)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        y = int(torch.randint(h, (1,)))
        x = int(torch.randint(w, (1,)))
        y1, y2 = max(0, y - self.length // 2), min(h, y + self.length // 2)
        x1, x2 = max(0, x - self.length // 2), min(w, x + self.length // 2)
        img = img.clone()
        img[..., y1:y2, x1:x2] = 0.0
        return img


def cifar_transforms(dataset: str, train: bool, cutout_length: int = 0, image_size: int = 32):
    """Random crop with 4 pixels of zero padding, horizontal flip, normalise, optional
    cutout (training); normalise only (evaluation)."""
    mean, std = normalization(dataset)
    if not train:
        return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    steps = [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip(),
             T.ToTensor(), T.Normalize(mean, std)]
    if cutout_length > 0:
        steps.append(Cutout(cutout_length))
    return T.Compose(steps)


def folder_transforms(train: bool, image_size: int = 32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      cutout_length: int = 0):
    """A user's image folder: resize the short side to ``image_size`` and centre-crop
    (evaluation), then for training the CIFAR augmentation (crop with zero padding
    image_size/8, flip) and optional cutout; normalised with ``mean`` and ``std`` (the
    training images' own, see ``image_stats``)."""
    steps = [T.Resize(image_size), T.CenterCrop(image_size)]
    if train:
        steps += [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and cutout_length > 0:
        steps.append(Cutout(cutout_length))
    return T.Compose(steps)


def scaled_cutout(length: int, image_size: int) -> int:
    """The CIFAR cutout length (16 of 32 pixels) scaled to another image size."""
    return max(1, round(length * image_size / 32))


def imagenet_transforms(train: bool, image_size: int = 224, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD):
    """The release's ImageNet augmentation (train) and resize 256 / centre crop 224 (eval);
    at another ``image_size`` the eval resize keeps the ratio 256/224."""
    normalize = T.Normalize(mean, std)
    if train:
        return T.Compose([
            T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2),
            T.ToTensor(), normalize])
    resize = round(image_size * 256 / 224)
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize])


def own_transforms(augment: str, train: bool, image_size: int, mean, std, cutout_length: int = 0):
    """An image folder's transforms: ``augment`` 'cifar' (train_cifar.py's, see
    ``folder_transforms``) or 'imagenet' (train_imagenet.py's, with the folder's mean/std)."""
    if augment == "imagenet":
        return imagenet_transforms(train, image_size, mean, std)
    return folder_transforms(train, image_size, mean, std, cutout_length)


# ---------------------------------------------------------------------------------------
# Dataset builders
# ---------------------------------------------------------------------------------------

def get_image_folder(path: str, transform, what: str = "image folder") -> FolderDataset:
    """A folder of class subfolders as a dataset (``scan_image_tree``), with a clear error
    when the folder is missing or a class is empty. Images are read lazily; an unreadable
    one stops with its path (BadImageError)."""
    if not os.path.isdir(path):
        raise DataError(f"{what} not found: expected a folder of class subfolders at {path}")
    data = scan_image_tree(path, what)
    data.transform = transform
    return data


# ---------------------------------------------------------------------------------------
# A user's own image folder: read lazily (in DataLoader workers), any mode -> RGB
# ---------------------------------------------------------------------------------------

NORM_SAMPLE = 2000        # at most this many training images give the mean and std
SCAN_BATCH = 64           # images per batch of the statistics and --skip_bad_images passes
EVAL_FOLDERS = ("val", "test")


# Pillow opens 16-bit grayscale files (PNG, TIFF, PGM) in these modes, and its RGB
# conversion clips their values (0..65535) at 255: nearly white images. They are scaled
# to 8 bits by their high byte instead, as Pillow reads 16-bit colour PNGs.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
EXIF_ORIENTATION = 0x0112   # the EXIF tag of how a camera was held


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB: 16-bit grayscale scaled (not clipped), every other mode
    (grayscale, palette, RGBA, CMYK, ...) by Pillow's conversion."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def read_image(path: str) -> Image.Image:
    """Decode a whole image file as RGB (grayscale, 16-bit grayscale, palette, RGBA and
    CMYK converted), turned upright by its EXIF orientation.

    Deviation (image folders only): a photo whose EXIF data says the camera was turned is
    rotated/mirrored as a viewer shows it (``ImageOps.exif_transpose``), in training,
    evaluation and the normalisation statistics alike; torchvision's loader ignores it."""
    try:
        with Image.open(path) as img:
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)   # decodes everything: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read image {path}: {e}{SKIP_ADVICE}") from None


SKIP_ADVICE = ". Replace or remove the file, or pass --skip_bad_images to leave unreadable images out"


class FolderDataset(Dataset):
    """(path, label) samples of an image folder and its class names; each item is read
    from disk when asked for (by a DataLoader worker), so nothing is held in memory."""

    def __init__(self, root: str, samples: list[tuple[str, int]], classes: list[str],
                 transform=None) -> None:
        self.root, self.samples, self.classes = root, samples, classes
        self.transform = transform
        self.skipped: list[str] = []    # why each unreadable image was left out
        self.notes: list[str] = []      # warnings for the log: files not read, blank images

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, y = self.samples[index]
        img = read_image(path)
        return (self.transform(img) if self.transform is not None else img), y

    def subset(self, indices: Sequence[int], transform=None) -> FolderDataset:
        part = FolderDataset(self.root, [self.samples[i] for i in indices], self.classes, transform)
        part.notes = list(self.notes)
        return part


def scan_folder(path: str, what: str = "image folder") -> FolderDataset:
    """The images of a folder of class subfolders (file names only, nothing decoded)."""
    return get_image_folder(path, None, what)


# The file types read, by extension (any case): torchvision's ImageFolder's.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EXAMPLES_SHOWN = 3


class NotRead:
    """What a scan of an image tree passed over, by reason, for one line in the log."""

    def __init__(self) -> None:
        self.by_type: dict[str, list[str]] = {}   # extension -> files
        self.hidden: list[str] = []                # hidden files and folders (names with '.')
        self.repeated: list[str] = []              # folder links to a folder already read
        self.unlisted: list[str] = []              # folders that could not be listed
        self.outside: list[str] = []               # files beside the class folders

    def count(self) -> int:
        return (sum(map(len, self.by_type.values())) + len(self.hidden) + len(self.repeated)
                + len(self.unlisted) + len(self.outside))

    def describe(self, root: str) -> str | None:
        if not self.count():
            return None

        def shown(items: list[str]) -> str:
            return ", ".join(items[:EXAMPLES_SHOWN]) + (" ..." if len(items) > EXAMPLES_SHOWN else "")

        parts = []
        for ext, files in sorted(self.by_type.items()):
            parts.append(f"{len(files)} {ext or 'without extension'} (e.g. {shown(files)})")
        if parts:
            parts = [f"{'; '.join(parts)}: not a file type read here "
                     f"({' '.join(IMAGE_EXTENSIONS)}; convert them to read them)"]
        if self.hidden:
            parts.append(f"{len(self.hidden)} hidden ({shown(self.hidden)}): names starting "
                         "with '.' are skipped")
        if self.outside:
            parts.append(f"{len(self.outside)} beside the class folders ({shown(self.outside)})")
        if self.repeated:
            parts.append(f"{len(self.repeated)} folder link(s) to a folder already read "
                         f"({shown(self.repeated)}; a loop or a second path), each folder "
                         "read once")
        if self.unlisted:
            parts.append(f"{len(self.unlisted)} folder(s) that could not be listed "
                         f"({shown(self.unlisted)})")
        return f"{self.count()} entries of {root} not read: " + "; ".join(parts)


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _class_files(class_dir: str, root: str, not_read: NotRead) -> list[str]:
    """The image files under ``class_dir`` in torchvision's order (folders by path, files
    by name in each). Symbolic links are followed, each real folder read once (a link
    ``loop -> .`` read it again and again, until the path grew too long); hidden files and
    folders are skipped, other files counted in ``not_read``."""
    def unlisted(e: OSError) -> None:
        not_read.unlisted.append(f"{_relative(e.filename, root)} ({e.strerror})"
                                 if e.filename else str(e))

    try:
        top = os.stat(class_dir)
    except OSError as e:
        unlisted(e)
        return []
    visited = {(top.st_dev, top.st_ino)}
    found: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=unlisted, followlinks=True):
        dirnames.sort()   # which of two paths to one folder is read: the first in this order
        keep = []
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                not_read.hidden.append(_relative(path, root) + "/")
                continue
            try:
                st = os.stat(path)
            except OSError as e:
                unlisted(e)
                continue
            if (st.st_dev, st.st_ino) in visited:
                not_read.repeated.append(f"{_relative(path, root)} -> {os.readlink(path)}"
                                         if os.path.islink(path) else _relative(path, root))
                continue
            visited.add((st.st_dev, st.st_ino))
            keep.append(name)
        dirnames[:] = keep
        files = []
        for name in sorted(filenames):
            if name.startswith("."):
                not_read.hidden.append(_relative(os.path.join(dirpath, name), root))
            elif name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(name)
            else:
                ext = os.path.splitext(name)[1].lower()
                not_read.by_type.setdefault(ext, []).append(_relative(os.path.join(dirpath, name), root))
        found.append((dirpath, files))
    return [os.path.join(dirpath, name) for dirpath, files in sorted(found) for name in files]


def scan_image_tree(path: str, what: str = "image folder") -> FolderDataset:
    """The class folders of ``path`` (sorted; hidden ones skipped) and their image files,
    as torchvision's ImageFolder lists them for an ordinary tree; what was not read (other
    file types, hidden names, repeated folder links) is one line in ``dataset.notes``.
    A class folder without an image file is a DataError."""
    not_read = NotRead()
    classes = []
    try:
        entries = sorted(os.scandir(path), key=lambda entry: entry.name)
    except OSError as e:
        raise DataError(f"cannot list {what} {path}: {e.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            not_read.hidden.append(entry.name + ("/" if entry.is_dir() else ""))
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            not_read.outside.append(entry.name)
    if not classes:
        raise DataError(f"cannot use {path} as {what}: it has no class folder (expected one "
                        "subfolder of images per class)")
    samples, empty = [], []
    for label, name in enumerate(classes):
        files = _class_files(os.path.join(path, name), path, not_read)
        if not files:
            empty.append(name)
        samples += [(f, label) for f in files]
    data = FolderDataset(path, samples, classes)
    note = not_read.describe(path)
    if empty:
        raise DataError(f"cannot use {path} as {what}: class folder(s) {', '.join(empty[:COUNTS_SHOWN])} "
                        f"hold no image file ({' '.join(IMAGE_EXTENSIONS)})"
                        + (f"; {note}" if note else ""))
    if note:
        data.notes.append(note)
    return data


def files_dataset(root: str, names: Sequence[str], classes: list[str], source: str) -> FolderDataset:
    """Images listed by path relative to ``root`` (``class/file``), e.g. a stored split."""
    index = {c: k for k, c in enumerate(classes)}
    samples, missing = [], []
    for name in names:
        path = os.path.join(root, *name.split("/"))
        label = index.get(name.split("/")[0])
        if label is None or not os.path.isfile(path):
            missing.append(name)
        samples.append((path, label))
    if missing:
        raise DataError(f"{len(missing)} image(s) listed in {source} are not in {root} (first: "
                        f"{missing[0]}); give the folder the run was trained on (--data)")
    return FolderDataset(root, samples, classes)


def compare_classes(expected: Sequence[str], found: Sequence[str], expected_from: str,
                    found_in: str) -> None:
    """A DataError naming the classes that differ (the network's outputs follow the
    training classes in sorted order)."""
    missing = [c for c in expected if c not in set(found)]
    extra = [c for c in found if c not in set(expected)]
    if missing or extra:
        parts = ([f"missing from {found_in}: {', '.join(missing[:COUNTS_SHOWN])}"] if missing else []) + \
                ([f"only in {found_in}: {', '.join(extra[:COUNTS_SHOWN])}"] if extra else [])
        raise DataError(f"the classes of {found_in} differ from {expected_from}'s: "
                        + "; ".join(parts))


def folder_tree(root: str) -> tuple[str, str | None, str | None]:
    """(training folder, validation folder, test folder) of a tree: ``root/train`` with
    ``root/val`` and/or ``root/test``, or the class folders at the top of ``root``
    (no evaluation folder: a part is held out)."""
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    train = os.path.join(root, "train")
    val, test = (os.path.join(root, name) for name in EVAL_FOLDERS)
    if os.path.isdir(train):
        if not (os.path.isdir(val) or os.path.isdir(test)):
            raise DataError(f"{root} has train/ but no val/ or test/: add one, or put the class "
                            "folders at the top to hold out --val_portion of them")
        return train, val if os.path.isdir(val) else None, test if os.path.isdir(test) else None
    try:
        top = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        top = []
    if top and all(name in EVAL_FOLDERS for name in top):
        # val/ or test/ alone: the layout with train/ missing, not classes named "val".
        raise DataError(f"{root} has {' and '.join(n + '/' for n in sorted(top))} but no train/: "
                        "add train/ with the same class folders, or put the class folders at "
                        "the top to hold out --val_portion of them")
    return root, None, None


class _Decode(Dataset):
    """Items (index, error or None, tensor or None) for passes over a folder's images."""

    def __init__(self, dataset: FolderDataset, indices: Sequence[int], transform=None) -> None:
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            img = read_image(self.dataset.samples[i][0])
        except BadImageError as e:
            return i, str(e), None
        return i, None, self.transform(img) if self.transform is not None else None


def _decode_all(dataset: FolderDataset, indices: Sequence[int], transform, workers: int):
    from torch.utils.data import DataLoader

    loader = DataLoader(_Decode(dataset, indices, transform), batch_size=SCAN_BATCH,
                        num_workers=workers, collate_fn=list)
    for batch in loader:
        yield from batch


def drop_unreadable(dataset: FolderDataset, workers: int = 0) -> tuple[FolderDataset, list[str]]:
    """``--skip_bad_images``: decode every image once and leave out those that fail;
    returns the remaining dataset and the messages of the ones left out."""
    bad = {i: err for i, err, _ in _decode_all(dataset, range(len(dataset)), None, workers) if err}
    keep = [i for i in range(len(dataset)) if i not in bad]
    # The reasons, without the advice to pass --skip_bad_images: it was given.
    return dataset.subset(keep, dataset.transform), [bad[i].removesuffix(SKIP_ADVICE)
                                                     for i in sorted(bad)]


def open_training_folder(path: str, image_size: int, seed: int, skip_bad_images: bool = False,
                         workers: int = 0, stats: dict | None = None,
                         what: str = "image folder") -> tuple[FolderDataset, dict]:
    """A training folder ready to use: scanned, with ``skip_bad_images`` every image
    decoded once and the unreadable ones left out (``dataset.skipped``), and the
    normalisation ``stats`` ({'mean', 'std', 'images'}) computed from a sample of its
    images unless given (a resumed run passes its own)."""
    data = scan_folder(path, what)
    if skip_bad_images:
        scanned = data
        data, skipped = drop_unreadable(scanned, workers)
        data.skipped = skipped
        if len(data) == 0:
            raise DataError(f"no readable image in {path}")
        left = Counter(data.targets)
        emptied = [k for k in range(len(data.classes)) if not left[k]]
        if emptied:
            names = [data.classes[k] for k in emptied]
            bad = [p for p, y in scanned.samples if y in emptied]
            raise DataError(
                f"--skip_bad_images left class(es) {', '.join(names[:COUNTS_SHOWN])} of {path} "
                f"without a readable image (all {len(bad)} of its files unreadable, e.g. "
                f"{bad[0]}); replace the files, or remove the class folder to train without "
                "that class")
    if stats is None:
        mean, std, count, constant = _image_stats(data, image_size, seed, NORM_SAMPLE, workers)
        stats = {"mean": list(mean), "std": list(std), "images": count}
        note = constant_images_note(constant, count, std, path)
        if note:
            data.notes.append(note)
    return data, stats


# A channel whose pixels vary less than this (std on 0..1) is normalised by dividing by
# almost nothing (the std is clamped at 1e-6): inputs of size ~1e6 instead of ~1.
FLAT_STD = 1e-3


def constant_images_note(constant: int, count: int, std: Sequence[float], path: str) -> str | None:
    """A warning when sampled training images are a single colour (every pixel alike):
    there is nothing in them to learn from, and when all are alike the normalisation
    divides by ~0."""
    flat = [c for c, v in zip("RGB", std) if v < FLAT_STD]
    if not constant and not flat:
        return None
    what = (f"{constant} of the {count} sampled training images of {path} are a single colour "
            "(every pixel alike): they carry nothing to learn")
    if flat:
        what += (f"; channel(s) {', '.join(flat)} hardly vary over the sample (std "
                 f"{', '.join(f'{v:.2g}' for v in std)}), so normalising divides by ~0 and "
                 "the network sees inputs of ~1e6")
    return what + "; check the images (blank, or an export that lost them)"


def describe_stats(stats: dict) -> str:
    mean = ", ".join(f"{v:.4f}" for v in stats["mean"])
    std = ", ".join(f"{v:.4f}" for v in stats["std"])
    return f"mean ({mean}) std ({std}) of {stats['images']} sampled training images"


def image_stats(dataset: FolderDataset, image_size: int, seed: int = 0,
                max_images: int = NORM_SAMPLE, workers: int = 0
                ) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per-channel mean and std of the pixels of at most ``max_images`` images (a seeded
    sample), resized and centre-cropped as for evaluation; returns (mean, std, count)."""
    return _image_stats(dataset, image_size, seed, max_images, workers)[:3]


def _image_stats(dataset: FolderDataset, image_size: int, seed: int, max_images: int,
                 workers: int) -> tuple[tuple[float, ...], tuple[float, ...], int, int]:
    """``image_stats`` and the number of sampled images that are a single colour."""
    n = len(dataset)
    g = torch.Generator().manual_seed(int(seed))
    indices = sorted(torch.randperm(n, generator=g)[:max_images].tolist())
    geometry = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor()])
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = constant = 0
    for _, err, x in _decode_all(dataset, indices, geometry, workers):
        if err:
            raise BadImageError(err)
        x = x.double().flatten(1)
        total += x.sum(1)
        squares += (x * x).sum(1)
        pixels += x.shape[1]
        constant += bool((x == x[:, :1]).all())
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp(min=1e-12).sqrt()
    return (tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist()),
            len(indices), constant)


def get_dataset(name: str, root: str, train: bool, transform, download: bool = False,
                offer_download: bool = True):
    """``cifar10``, ``cifar100`` (from ``root``) or ``demo`` (generated) as an
    ArrayDataset with the given transform."""
    if name in CIFAR_FOLDERS:
        data, labels = load_cifar_arrays(root, name, train, download, offer_download)
    elif name == "demo":
        data, labels = make_demo_arrays(train)
    else:
        raise UserError(f"unknown dataset {name!r}")
    return ArrayDataset(data, labels, transform)


def num_classes_of(name: str) -> int:
    return {"cifar10": 10, "cifar100": 100, "demo": 10, "imagenet": 1000}[name]


# ---------------------------------------------------------------------------------------
# Device-side input pipeline (CIFAR and demo arrays): the images stay on the GPU as
# uint8 and crop, flip, normalisation and cutout run on whole batches there.
# ---------------------------------------------------------------------------------------

def augment_batch(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  crop_offsets: torch.Tensor | None = None, flips: torch.Tensor | None = None,
                  cutout_centres: torch.Tensor | None = None, padding: int = 4,
                  cutout_length: int = 0) -> torch.Tensor:
    """The CIFAR transforms applied to a uint8 B x H x W x 3 batch with given random draws.

    ``crop_offsets`` (B x 2, each in 0..2*padding) picks the crop of the zero-padded
    image, ``flips`` (B, bool) mirrors horizontally, ``cutout_centres`` (B x 2) zeroes a
    square of side ``cutout_length`` after normalisation. Same arithmetic as
    RandomCrop(padding, fill 0) + RandomHorizontalFlip + ToTensor + Normalize + Cutout.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    B, _, H, W = x.shape
    if crop_offsets is not None:
        x = F.pad(x, (padding, padding, padding, padding))
        rows = crop_offsets[:, 0, None] + torch.arange(H, device=x.device)       # B x H
        cols = crop_offsets[:, 1, None] + torch.arange(W, device=x.device)       # B x W
        b = torch.arange(B, device=x.device)[:, None, None]
        x = x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flips is not None:
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    if cutout_centres is not None and cutout_length > 0:
        half = cutout_length // 2
        ys = torch.arange(H, device=x.device)
        xs = torch.arange(W, device=x.device)
        cy, cx = cutout_centres[:, 0, None], cutout_centres[:, 1, None]
        in_y = (ys >= (cy - half).clamp(min=0)) & (ys < (cy + half).clamp(max=H))   # B x H
        in_x = (xs >= (cx - half).clamp(min=0)) & (xs < (cx + half).clamp(max=W))   # B x W
        keep = ~(in_y[:, :, None] & in_x[:, None, :])
        x = x * keep[:, None].to(x.dtype)
    return x.contiguous()


class DeviceLoader:
    """Iterates batches of an ArrayDataset kept on ``device`` as uint8, in the order
    given by ``sampler`` (the same sampler a DataLoader would use, so the batches and
    their order are the same, tail batch included), augmenting on the device.

    The random draws come from a generator on the device: the augmentations have the
    same distribution as the torchvision transforms, not the same samples.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, sampler, device: torch.device,
                 train: bool, mean, std, cutout_length: int = 0, padding: int = 4,
                 drop_last: bool = False, seed: int = 0) -> None:
        self.images = torch.from_numpy(dataset.data).to(device)
        self.targets = torch.tensor(dataset.targets, dtype=torch.long, device=device)
        self.batch_size = batch_size
        self.sampler = sampler
        self.device = device
        self.train = train
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)
        self.cutout_length = cutout_length
        self.padding = padding
        self.drop_last = drop_last
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def draw(self, B: int, H: int, W: int):
        """Random draws for a batch: crop offsets uniform on 0..2*padding (RandomCrop),
        flips with probability 1/2 (RandomHorizontalFlip), cutout centres uniform over
        the image (Cutout)."""
        g, dev = self.generator, self.device
        offsets = torch.randint(0, 2 * self.padding + 1, (B, 2), device=dev, generator=g)
        flips = torch.rand(B, device=dev, generator=g) < 0.5
        centres = None
        if self.cutout_length > 0:
            centres = torch.stack([torch.randint(0, H, (B,), device=dev, generator=g),
                                   torch.randint(0, W, (B,), device=dev, generator=g)], dim=1)
        return offsets, flips, centres

    def __iter__(self):
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long).to(self.device)
        H, W = self.images.shape[1:3]
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            images = self.images[idx]
            B = len(idx)
            if self.train:
                offsets, flips, centres = self.draw(B, H, W)
                x = augment_batch(images, self.mean, self.std, offsets, flips, centres,
                                  self.padding, self.cutout_length)
            else:
                x = augment_batch(images, self.mean, self.std)
            yield x, self.targets[idx]


# ---------------------------------------------------------------------------------------
# The search's data: the training split, divided into a weight half and an alpha half
# ---------------------------------------------------------------------------------------

class EpochSampler(Sampler[int]):
    """A fixed set of indices in a new random order every epoch, the order a function of
    (seed, stage, epoch, stream) only, so a resumed run sees the same batches.

    With several processes every rank draws the same order and takes every
    ``world_size``-th index from ``rank`` on (like DistributedSampler). ``num_samples``
    (per rank) longer than one pass appends further passes.
    """

    def __init__(self, indices: Sequence[int], seed: int, stream: int, rank: int = 0,
                 world_size: int = 1, num_samples: int | None = None, shuffle: bool = True) -> None:
        self.indices = list(indices)
        self.seed, self.stream, self.shuffle = seed, stream, shuffle
        self.rank, self.world_size = rank, world_size
        self.num_samples = num_samples or math.ceil(len(self.indices) / world_size)
        self.stage, self.epoch = 0, 0

    def set_epoch(self, stage: int, epoch: int) -> None:
        self.stage, self.epoch = stage, epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(seed_for(self.seed, self.stage, self.epoch, self.stream))
        total = self.num_samples * self.world_size
        order: list[int] = []
        while len(order) < total:
            order += (torch.randperm(len(self.indices), generator=g).tolist() if self.shuffle
                      else list(range(len(self.indices))))
        return iter([self.indices[i] for i in order[:total][self.rank::self.world_size]])


def _resize_images(images, size: int):
    """Resize uint8 N x H x W x 3 images (antialiased bilinear), once, before augmentation."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def search_cutout(cfg: SearchConfig) -> int:
    """Cutout side for both halves: --cutout_length with --cutout, else 0 (off)."""
    return cfg.cutout_length if cfg.cutout else 0


def build_search_data(cfg: SearchConfig, stats: dict | None = None
                      ) -> tuple[Dataset, int, str]:
    """The training split with the training augmentation, its number of classes, and a
    line describing it. An image folder's normalisation is ``stats`` when given (a
    resumed run's), else computed from its images; it is left in ``dataset.stats``."""
    size = cfg.image_size
    cutout = search_cutout(cfg)
    if cfg.dataset in CIFAR_FOLDERS:
        folder = os.path.join(cfg.tmp_data_dir, CIFAR_FOLDERS[cfg.dataset][0])
        data = get_dataset(cfg.dataset, cfg.tmp_data_dir, True,
                           cifar_transforms(cfg.dataset, True, cutout, image_size=size),
                           download=cfg.download)
        num_classes = CIFAR_FOLDERS[cfg.dataset][4]
        where = f"from {folder}"
    elif cfg.dataset == "demo":
        data = get_dataset("demo", cfg.tmp_data_dir, True,
                           cifar_transforms("demo", True, cutout, image_size=size))
        num_classes, where = 10, "(built-in, generated)"
    elif cfg.dataset == "folder":
        # The layouts training and test.py read: class folders at the top, or train/ with
        # val/ and/or test/. The search needs training images only: both halves come from
        # train/; the evaluation folder must hold the same classes, as training requires.
        train_dir, val_dir, test_dir = folder_tree(cfg.tmp_data_dir)
        # Deviation: normalised with the folder's own mean and std (computed once, kept in
        # the checkpoint), not a fixed dataset's.
        data, stats = open_training_folder(
            train_dir, size, cfg.seed, cfg.skip_bad_images,
            cfg.workers, stats, "image folder (--dataset folder)")
        data.transform = folder_transforms(True, size, stats["mean"], stats["std"], cutout)
        num_classes = len(data.classes)
        where = f"from {train_dir}, resized to {size}x{size}"
        if num_classes < 2:
            raise DataError(f"{train_dir} has {num_classes} class folder(s); "
                            "a search needs 2 or more")
        eval_dir = val_dir or test_dir
        if eval_dir:
            compare_classes(data.classes, scan_folder(eval_dir, "validation image folder").classes,
                            train_dir, eval_dir)
            where += (f" (both halves from {os.path.basename(train_dir)}/; "
                      f"{os.path.basename(eval_dir)}/ is not used by the search)")
        if data.skipped:
            where += f", {len(data.skipped)} unreadable image(s) left out (--skip_bad_images)"
        norm = describe_stats(stats)
    else:
        raise UserError(f"unknown dataset {cfg.dataset!r}")
    if cfg.dataset != "folder":
        if size != data.data.shape[1]:
            # Deviation (CIFAR/demo only when asked): smaller images make the demo fast.
            data.data = _resize_images(data.data, size)
            where += f", resized to {size}x{size}"
        mean, std = normalization(cfg.dataset)
        norm = f"mean {tuple(mean)} std {tuple(std)}"
        stats = None
    text = (f"{cfg.dataset} {where}: {len(data)} training images, {num_classes} classes, "
            f"normalised with {norm}"
            + (f", cutout {cutout} on both halves" if cutout else ""))
    data.stats = stats
    return data, num_classes, text


def search_split(dataset: Dataset, cfg: SearchConfig, saved_digest: str | None = None) -> Split:
    """The weight half and the alpha half of the training split (SPEC section 2).

    Faithful to the release for CIFAR: the first ``--train_portion`` of the training set
    trains the weights, the rest the alphas (its batches are in random order; so is the
    demo data). Deviation for every other dataset: an image folder lists its images class
    by class, so an in-order split would train the weights and the alphas on different
    classes; it is divided by a stratified draw seeded with ``--seed`` instead (both
    halves hold every class in the same proportion). A class left without an image in
    either half is refused. On resume the division must equal the run's (``saved_digest``)."""
    labels = dataset.targets
    names = getattr(dataset, "classes", None) or [str(c) for c in range(max(labels) + 1)]
    subset = cfg.subset_per_class
    if subset:
        # Deviation (asked for): a per-class sample of the data, as PC-DARTS searches
        # ImageNet on 10% / 2.5% of each class; --train_portion is then not used.
        split = subset_indices(labels, subset[0], subset[1], cfg.seed, names)
    else:
        split = split_indices(labels, cfg.train_portion, cfg.seed, split_rule(cfg.dataset))
    split.names = sample_names(dataset)
    if not split.first or not split.second:
        raise DataError(f"{len(labels)} training images cannot be split into a weight and an "
                        f"alpha half at --train_portion {cfg.train_portion}")
    check_split(split, labels, names, ("weight half", "alpha half"),
                "add images to them or change --train_portion")
    saved = saved_digest
    if saved is not None and saved != split.digest:
        raise DataError(f"the data in {cfg.tmp_data_dir} is divided differently from the run "
                        f"being resumed (split {split.digest}, the run's {saved}): images were "
                        "added, removed or renamed since it started; resume with the same data")
    return split


def check_search_batch(cfg: SearchConfig, split: Split) -> None:
    """A batch larger than either half is refused (one line with the sizes).
    Deviation: the release runs it as one short batch per epoch, silently."""
    smaller = min(len(split.first), len(split.second))
    if cfg.batch_size > smaller:
        raise DataError(f"--batch_size {cfg.batch_size} is larger than a half of the search's "
                        f"{len(split.first) + len(split.second)} training images (weight half "
                        f"{len(split.first)}, alpha half {len(split.second)} at --train_portion "
                        f"{cfg.train_portion}); use --batch_size {smaller} or less")


def describe_split(dataset: Dataset, split: Split) -> str:
    labels = dataset.targets
    num = max(labels) + 1
    names = getattr(dataset, "classes", None) or [str(c) for c in range(num)]
    return describe_counts(names, class_counts(labels, split.first, len(names)),
                           class_counts(labels, split.second, len(names)))


class SearchData:
    """The loaders of one run: weight half and alpha half (both shuffled per epoch, the
    alpha half as long as the weight half so the two step in lockstep), and the alpha
    half in order for validation.

    Deviation: each step's alpha batch is the next one of the alpha half, reshuffled every
    epoch (sampling without replacement, SPEC section 2), and every epoch's order is a
    function of (seed, stage, epoch) so that resuming is exact.
    Faithful to the release: the last, smaller batch of an epoch is kept.

    On CUDA, CIFAR and the demo data stay on the GPU as uint8 and are augmented there in
    batches (DeviceLoader, unless ``--host_data``): the same batches in the same order,
    augmentations of the same distribution.
    """

    def __init__(self, dataset: Dataset, cfg: SearchConfig, env: DistInfo,
                 split: Split | None = None) -> None:
        if split is None:
            split = search_split(dataset, cfg)
        weight_idx, alpha_idx = split.first, split.second
        rank, world = env.rank, env.world_size
        self.w_sampler = EpochSampler(weight_idx, cfg.seed, 0, rank, world)
        self.a_sampler = EpochSampler(alpha_idx, cfg.seed, 1, rank, world,
                                      num_samples=len(self.w_sampler))
        self.v_sampler = EpochSampler(alpha_idx, cfg.seed, 2, rank, world, shuffle=False)
        self.seed, self.rank = cfg.seed, rank
        # --batch_size is global (as in the training scripts): each process takes its share.
        batch = cfg.batch_size // world
        self.on_device = (env.device.type == "cuda" and not cfg.host_data
                          and isinstance(dataset, ArrayDataset))
        if self.on_device:
            # Faithful to the release: every loader, validation included, augments.
            mean, std = normalization(cfg.dataset)
            padding = dataset.data.shape[1] // 8
            self.weights, self.alphas, self.valid = (
                DeviceLoader(dataset, batch, sampler, env.device, train=True, mean=mean,
                             std=std, padding=padding, cutout_length=search_cutout(cfg))
                for sampler in (self.w_sampler, self.a_sampler, self.v_sampler))
            self.generators = [loader.generator for loader in (self.weights, self.alphas, self.valid)]
        else:
            self.generators = [torch.Generator()]  # worker seeds
            kw = dict(batch_size=batch, num_workers=cfg.workers,
                      pin_memory=env.device.type == "cuda", generator=self.generators[0])
            self.weights = DataLoader(dataset, sampler=self.w_sampler, **kw)
            self.alphas = DataLoader(dataset, sampler=self.a_sampler, **kw)
            self.valid = DataLoader(dataset, sampler=self.v_sampler, **kw)
        self.sizes = (len(weight_idx), len(alpha_idx))
        self.stats = getattr(dataset, "stats", None)   # an image folder's mean and std

    def set_epoch(self, stage: int, epoch: int) -> None:
        """Every epoch's batches and augmentation draws are a function of (seed, stage,
        epoch, rank), so a resumed run continues with the same ones."""
        for s in (self.w_sampler, self.a_sampler, self.v_sampler):
            s.set_epoch(stage, epoch)
        for k, g in enumerate(self.generators):
            g.manual_seed(seed_for(self.seed, stage, epoch, 3 + k, self.rank))
