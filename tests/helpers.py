"""What the tests share: the tiny command lines of the scripts, generated data written as
users keep it (CIFAR's pickle folders, image folders class by class), running a script's
main() in this process as its command line would, reading back what a run left, and
stopping a run as if killed after an epoch. Test modules import these from here only;
the pytest fixtures are in conftest.py."""
import contextlib
import glob
import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------
# Tiny command lines
# ---------------------------------------------------------------------------------------

# The search: 3/4/5 cells of C=4 on 16x16 images, 2 epochs per stage (1 weights-only,
# 1 with alphas), batches of 10.
SEARCH_TINY = ["--init_channels", "4", "--layers", "3", "--add_layers", "1", "--add_layers", "2",
               "--epochs", "2", "--arch_warmup_epochs", "1", "--batch_size", "10",
               "--image_size", "16", "--workers", "0", "--report_freq", "2", "--seed", "3",
               "--device", "cpu"]
# Training: 2 cells of C=4, 2 epochs, batches of 8.
TRAIN_TINY = ["--epochs", "2", "--layers", "2", "--init_channels", "4", "--batch_size", "8",
              "--workers", "0", "--report_freq", "5", "--device", "cpu"]


# The two tiny --deterministic searches whose outputs tests/fixtures/recorded holds (the
# paper's plan on the demo data and on a generated CIFAR folder).
RECORDED_RUNS = {
    "demo": ["--demo", "--deterministic", "--epochs", "2", "--arch_warmup_epochs", "1",
             "--subset_per_class", "8", "8", "--batch_size", "8", "--plot_format", "none"],
    "cifar": [*SEARCH_TINY, "--deterministic", "--threads", "1", "--plot_format", "none"],
}
SEARCH_TIMING_FIELDS = ("epoch_time_s", "images_per_s", "peak_memory_mb")


def run_recorded_search(name: str, work: str) -> str:
    """Run one of RECORDED_RUNS in a fresh folder under ``work``; its run folder."""
    import train_search as ts
    from runs import close_logging

    argv = [*RECORDED_RUNS[name], "--save", os.path.join(work, "runs") + os.sep]
    if name == "cifar":
        argv += ["--tmp_data_dir", write_cifar_folder(os.path.join(work, "data"))]
    threads = torch.get_num_threads()
    try:
        assert run_script(ts, argv) == 0
    finally:
        close_logging()
        torch.set_num_threads(threads)
    return only_search_dir(os.path.join(work, "runs") + os.sep)


def tiny(argv: list[str], **flags) -> list[str]:
    """``argv`` with the values of ``flags`` replaced (or added): ``tiny(SEARCH_TINY,
    epochs=3, add_layers=[0, 0])``; a list value replaces every occurrence of a repeated
    flag, None removes the flag."""
    out = list(argv)
    for name, value in flags.items():
        flag = f"--{name}"
        while flag in out:
            i = out.index(flag)
            del out[i:i + 2]
        values = value if isinstance(value, list) else [] if value is None else [value]
        for v in values:
            out += [flag, str(v)]
    return out


# ---------------------------------------------------------------------------------------
# Search networks in the equivalence tests
# ---------------------------------------------------------------------------------------

def random_stage_switches(n_ops: int, seed: int, none: str) -> list[list[bool]]:
    """Different ops on different edges, as pruning leaves them: ``n_ops`` per edge,
    `none` on for every edge (none="all"; always with 8 ops), off for every edge ("off")
    or on every other edge ("some")."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for e in range(14):
        with_none = none == "all" or n_ops == 8 or (none == "some" and e % 2 == 0)
        others = (torch.randperm(7, generator=g)[: n_ops - with_none] + 1).tolist()
        rows.append([(k == 0 and with_none) or k in others for k in range(8)])
    return rows


def search_optimizers(net, foreach: bool = True):
    """The weights' SGD and the alphas' Adam of a search step, at test rates."""
    w = torch.optim.SGD(net.weight_parameters(), 0.05, momentum=0.9, weight_decay=3e-4, foreach=foreach)
    a = torch.optim.Adam(net.arch_parameters(), lr=6e-3, betas=(0.5, 0.999), weight_decay=1e-3,
                         foreach=foreach)
    return w, a


def optimizer_state(net, opt) -> dict:
    """{state key: {release-layout name: tensor}} of an optimizer over ``net``'s parameters
    (comparable between cell layouts, whose parameters differ)."""
    names = {id(p): n for n, p in net.named_parameters()}
    by_key = {}
    for p, state in opt.state.items():
        for key, value in state.items():
            by_key.setdefault(key, {})[names[id(p)]] = value
    return {key: net.release_layout(named) for key, named in by_key.items()}


# ---------------------------------------------------------------------------------------
# Running scripts and reading their runs back
# ---------------------------------------------------------------------------------------

def run_script(module, argv: list[str]) -> int:
    """``python <script> argv``: the exit status (2 for bad input, with one line on stderr)."""
    from runs import run_main

    return run_main(module.main, module.parse_args(argv))


def search(argv: list[str], capsys) -> tuple[int, list[str]]:
    """train_search.py in this process: (exit status, stdout lines)."""
    import train_search as ts
    from runs import close_logging

    rc = run_script(ts, argv)
    close_logging()
    return rc, capsys.readouterr().out.strip().splitlines()


def load_test_script():
    """test.py as a module (the name ``test`` would clash with the standard library's)."""
    spec = importlib.util.spec_from_file_location("pdarts_test_script", os.path.join(ROOT, "test.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_test_script(argv: list[str], capsys):
    """Run test.py; return (exit status, its JSON summary line or None, its stderr)."""
    capsys.readouterr()
    rc = run_script(load_test_script(), argv)
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    return rc, (json.loads(out[-1]) if rc == 0 else None), captured.err


def only_run_dir(save_prefix: str, kind: str = "eval") -> str:
    """The one run folder a script made with ``--save save_prefix`` (kind: eval or search)."""
    dirs = glob.glob(save_prefix + f"{kind}-*") or glob.glob(os.path.join(save_prefix, f"{kind}-*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def only_search_dir(save_prefix: str) -> str:
    return only_run_dir(save_prefix, "search")


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def stopped_after_epochs(epochs: int):
    """Within it, a search or training run stops as if killed (Ctrl-C: exit status 130,
    the resume command printed) right after its ``epochs``-th checkpoint of this process."""
    import engine
    import train_search

    saves = [(train_search, "save_search"), (engine, "save_training")]
    originals = [getattr(module, name) for module, name in saves]
    count = [0]

    def then_stop(save):
        def save_then_stop(*args, **kwargs):
            save(*args, **kwargs)
            count[0] += 1
            if count[0] >= epochs:
                raise KeyboardInterrupt
        return save_then_stop

    for (module, name), save in zip(saves, originals):
        setattr(module, name, then_stop(save))
    try:
        yield
    finally:
        for (module, name), save in zip(saves, originals):
            setattr(module, name, save)


# ---------------------------------------------------------------------------------------
# Data as users keep it
# ---------------------------------------------------------------------------------------

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
