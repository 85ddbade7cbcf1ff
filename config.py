"""The settings of a run, typed, resolved and frozen: ``SearchConfig`` (train_search.py),
``CifarConfig`` (train_cifar.py) and ``ImageNetConfig`` (train_imagenet.py).

A run's config is built once: from the command line (``search_flags.parse_args``, the
training scripts' ``parse_args``), or on ``--resume`` from the run's saved settings plus
the flags given (``checkpoint.resume_config``). Code reads its fields; nothing changes
them afterwards. The field defaults are the paper's settings (SPEC sections 2 and 5);
``given`` names the flags the command line gave, whatever their values.

Every checkpoint saves its config as a plain dict (``to_dict``, the checkpoint's
``args``); ``from_dict`` reads one back: keys the config does not know are ignored, and a
setting an older run predates takes the value that run used (``OLDER_RUNS``), the one
place where older runs are caught up.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from distributed import DIST_TIMEOUT_S
from flags import DEFAULT_DATA_DIR, default_workers
from genotypes import PRIMITIVES

C = TypeVar("C", bound="RunConfig")

# Field metadata: not part of the saved settings (derived, or about this process only).
NOT_SAVED = {"saved": False}

# Flags a --resume may give with another value than the run's: where the data is read,
# how it is loaded and reported, which kernels run; not what the run computes. A resumed
# run takes them from the new command line; every other flag given must equal the run's
# own (else --resume refuses, naming them), and the rest comes from the run itself.
RUNTIME_FLAGS = frozenset({
    "resume", "tmp_data_dir", "download", "workers", "threads", "report_freq", "device",
    "dist_timeout", "host_data", "channels_last", "compile", "checkpoint_cells",
    "plot_format", "deterministic", "skip_bad_images", "derive", "out",
})
# Accepted on --resume and ignored: they only name the folder of a new run.
NEW_RUN_FLAGS = frozenset({"save", "note"})
# Run-time flags whose new value makes a resumed run differ from one never interrupted.
CHANGES_THE_DRAWS = {
    "workers": "the augmentation draws depend on the number of loader processes",
    "threads": "the sums of a CPU run are added in an order that depends on the thread count",
}


@dataclass(frozen=True)
class RunConfig:
    """What every run's config has: the flags the command line gave."""

    given: frozenset[str] = field(default=frozenset(), compare=False, metadata=NOT_SAVED)
    # The log lines of the release's flags given that have no effect here (--gpu).
    no_effect: tuple[str, ...] = field(default=(), compare=False, metadata=NOT_SAVED)

    def to_dict(self) -> dict[str, Any]:
        """The saved settings (lists for tuples, as the checkpoints always held them)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.metadata.get("saved", True)}

    @classmethod
    def from_dict(cls: type[C], saved: dict[str, Any], **changes: Any) -> C:
        """A run's config from its saved settings (with ``changes``): keys it does not
        know are ignored, a setting the run predates takes OLDER_RUNS's value or the
        default."""
        values = {}
        for f in fields(cls):
            if not f.metadata.get("saved", True) or f.init is False:
                continue
            if f.name in saved:
                values[f.name] = saved[f.name]
            elif f.name in cls.OLDER_RUNS:
                values[f.name] = cls.OLDER_RUNS[f.name]
        values.update(changes)
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        # Lists (from argparse's append, or a checkpoint) become tuples: a frozen config
        # holds nothing mutable.
        for f in fields(self):
            value = getattr(self, f.name, None)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    # Values of settings that runs saved before they existed used; a setting not listed
    # here takes its default (which is then what those runs used).
    OLDER_RUNS: ClassVar[dict[str, Any]] = {}


# ---------------------------------------------------------------------------------------
# The search (SPEC section 2)
# ---------------------------------------------------------------------------------------

RELEASE_SEARCH_WORKERS = 2       # the release's loader processes; never more than the cores
ALL_OPS = len(PRIMITIVES)        # the first stage runs every op (8)
# How many ops per edge each stage keeps for the next one ("the size of operation space
# is set to be 8, 5 and 3": the release's num_to_keep = [5, 3, 1]); after the last stage
# the final derivation keeps 1. Stage 1 runs all 8, stage s + 1 what stage s kept.
PAPER_KEEP = (5, 3, 1)
PAPER_OPS = (ALL_OPS, *PAPER_KEEP[:-1])
DROPOUT_DECAY = 0.2              # p = rate * exp(-(e - W) * 0.2) after the warm-up
# Skip-connect dropout rates per stage (paper Sec. 4.1.1); other datasets use CIFAR-10's.
PAPER_DROPOUT_RATES = {"cifar10": (0.0, 0.4, 0.7), "cifar100": (0.1, 0.2, 0.3)}
APPROXIMATED, RANDOM = "approximated", "random"   # a stage's search space


@dataclass(frozen=True)
class StagePlan:
    """One stage of the search: its network (cells, C), its skip-connect dropout rate, the
    ops per edge it runs and how many of them it keeps for the next stage, and its search
    space: the one the earlier stages approximated (the paper's), or one drawn at random
    from the full space (``--random_space``, the control of paper Sec. 4.4)."""
    layers: int
    init_channels: int
    dropout_rate: float
    ops: int
    keep: int
    space: str = APPROXIMATED

    @property
    def drops(self) -> int:
        return self.ops - self.keep


def stage_ops(num_to_keep: tuple[int, ...]) -> tuple[int, ...]:
    """The ops per edge each stage runs: all 8 first, then what the stage before kept."""
    return (ALL_OPS, *num_to_keep[:-1])


def plan_problem(num_to_keep: tuple[int, ...]) -> str | None:
    """Why ``--num_to_keep`` values are no plan (None when they are one)."""
    if not num_to_keep:
        return "needs one value per stage"
    ops = stage_ops(num_to_keep)
    for s, (run, keep) in enumerate(zip(ops, num_to_keep)):
        if not 1 <= keep <= run:
            return (f"stage {s + 1} runs {run} ops per edge and cannot keep {keep} (give 1 to "
                    f"{run})")
    if num_to_keep[-1] != 1:
        return (f"the last value is what the final derivation keeps: 1 op per edge (got "
                f"{num_to_keep[-1]})")
    return None


@dataclass(frozen=True)
class SearchConfig(RunConfig):
    """train_search.py's settings; the defaults are the paper's (CIFAR-10)."""

    # data
    dataset: str = "cifar10"
    tmp_data_dir: str = DEFAULT_DATA_DIR
    download: bool = False
    image_size: int = 32
    train_portion: float = 0.5
    subset_per_class: tuple[int | float, int | float] | None = None
    skip_bad_images: bool = False
    workers: int = default_workers(RELEASE_SEARCH_WORKERS)
    cutout: bool = False
    cutout_length: int = 16
    drop_path_prob: float = 0.3          # the release's flag; the search has no drop path
    # the search
    epochs: int = 25
    arch_warmup_epochs: int = 10
    batch_size: int = 96
    learning_rate: float = 0.025
    learning_rate_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_learning_rate: float = 6e-4
    arch_weight_decay: float = 1e-3
    init_channels: int = 16
    stem: str = "cifar"                  # resolved: cifar or imagenet, never auto
    layers: int = 5
    add_layers: tuple[int, ...] = (0, 6, 12)
    add_width: tuple[int, ...] = (0, 0, 0)
    dropout_rate: tuple[float, ...] = PAPER_DROPOUT_RATES["cifar10"]
    max_skip: int = 2
    # the stage plans: ops kept per stage (their number is the number of stages), the
    # dropout decay, the random-space control, and the preset of the whole plan
    num_to_keep: tuple[int, ...] = PAPER_KEEP
    dropout_decay: float = DROPOUT_DECAY
    random_space: bool = False
    plan: str = "paper"
    # the run
    save: str = "runs/"
    note: str = "try"
    seed: int = 2
    deterministic: bool = False
    device: str = "auto"
    dist_timeout: float = DIST_TIMEOUT_S
    threads: int = 0
    report_freq: int = 50
    demo: bool = False
    resume: str | None = None
    derive: str | None = None
    out: str | None = None               # with --derive: the chosen cell's genotype file
    host_data: bool = False
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    checkpoint_cells: bool = False
    # The search cell's layout: "auto" on the command line, resolved when the run starts
    # (search_flags.resolve_cell_layout) to "batched" or "per_edge", which the run saves and
    # a resume keeps (the optimizers' state is saved in the cells' own parameter order).
    cell_layout: str = "auto"
    plot_format: str = "png"
    # Derived once, not saved: why the stem is what it is (for the log), and whether the
    # weights' schedule is the release's (False: a run begun before the correction,
    # known from its checkpoint).
    stem_reason: str = field(default="the run's", compare=False, metadata=NOT_SAVED)
    cell_layout_reason: str = field(default="the run's", compare=False, metadata=NOT_SAVED)
    lr_stepped_before_epoch: bool = field(default=True, metadata=NOT_SAVED)
    stages: tuple[StagePlan, ...] = field(init=False, compare=False, metadata=NOT_SAVED)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.num_to_keep)
        counts = {"--add_layers": len(self.add_layers), "--add_width": len(self.add_width),
                  "--dropout_rate": len(self.dropout_rate)}
        wrong = [f"{flag} {k}" for flag, k in counts.items() if k != n]
        if wrong or plan_problem(self.num_to_keep):
            raise ValueError(f"the stage plan does not fit together: {n} stages (--num_to_keep "
                             f"{list(self.num_to_keep)}) but values per stage of {', '.join(wrong)}"
                             if wrong else f"--num_to_keep {plan_problem(self.num_to_keep)}")
        stages = tuple(
            StagePlan(self.layers + self.add_layers[s], self.init_channels + self.add_width[s],
                      self.dropout_rate[s], ops, keep)
            for s, (ops, keep) in enumerate(zip(stage_ops(self.num_to_keep), self.num_to_keep)))
        if self.random_space:   # the earlier stages are not run (paper Sec. 4.4)
            stages = (dataclasses.replace(stages[-1], space=RANDOM),)
        object.__setattr__(self, "stages", stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    # Runs saved before --stem existed (or with "auto" unresolved) used the release's;
    # runs saved before --cell_layout, the batched cell.
    OLDER_RUNS: ClassVar[dict[str, Any]] = {"stem": "cifar", "cell_layout": "batched"}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], **changes: Any) -> SearchConfig:
        saved = dict(saved)
        if saved.get("stem") == "auto":
            saved["stem"] = "cifar"
        return super().from_dict(saved, **changes)


# The demo: the full three-stage algorithm, scaled down to run on a 2-core CPU in a few
# minutes. channels_last: the CPU's depthwise convolutions are much faster in NHWC.
# The rates: a demo stage has 50 weight steps and 30 alpha steps, the paper's ~6,500 and
# ~3,900. At the paper's 0.025 the convolutions learn too little to be preferred over
# pooling, and at its 6e-4 the alphas (Adam moves each by at most about its rate per step)
# end within 2% of uniform, so near-ties pick the cell; the demo's rates let the weights
# learn and the alphas decide. The cells per plan: SEARCH_DEMO_PLANS below.
# Measurements: benchmarks/RESULTS.md (2026-12-05). Flags given with --demo override these.
SEARCH_DEMO = dict(dataset="demo", epochs=5, arch_warmup_epochs=2, batch_size=50,
                   learning_rate=0.1, arch_learning_rate=0.02, init_channels=4, workers=0,
                   report_freq=5, note="demo", image_size=16, threads=1, channels_last=True)

# The plans of --plan: the paper's (every default), and DARTS as the paper's baseline, first
# order (SPEC section 2b, its authors' search defaults): one stage of 8 cells with all 8
# ops, 50 epochs of batch 64, the weights' rate annealed to 0.001, the alphas at Adam 3e-4
# from epoch 0 (no warm-up), no skip-connect dropout, no skip budget. The paper's
# "regularisation applied to DARTS" is --plan darts --dropout_rate R --max_skip 2. Flags
# given with a plan override it.
SEARCH_PLANS = {
    "paper": {},
    "darts": dict(layers=8, add_layers=(0,), add_width=(0,), num_to_keep=(1,), epochs=50,
                  arch_warmup_epochs=0, batch_size=64, learning_rate_min=0.001,
                  arch_learning_rate=3e-4, dropout_rate=(0.0,), max_skip=-1),
}
# --demo scales any plan down: SEARCH_DEMO, with each plan's cells (the paper's 5/11/17
# scaled to 3/5/7: +2 per stage, so that stage 2 has a normal cell between its
# reductions, as 4 cells, N R R N, would not; DARTS's 8 to 5, N R N R N) and warm-up.
SEARCH_DEMO_PLANS = {
    "paper": dict(layers=3, add_layers=(0, 2, 4)),
    "darts": dict(layers=5, add_layers=(0,), arch_warmup_epochs=0),
}


# ---------------------------------------------------------------------------------------
# Training (SPEC section 5)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """What train_cifar.py and train_imagenet.py share; each recipe sets its defaults."""

    tmp_data_dir: str = DEFAULT_DATA_DIR
    workers: int = 0
    batch_size: int = 128
    learning_rate: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 3e-4
    report_freq: int = 50
    epochs: int = 600
    init_channels: int = 36
    layers: int = 20
    auxiliary: bool = False
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.3
    save: str = "runs/"
    note: str = "try"
    seed: int = 0
    arch: str = "PDARTS"
    grad_clip: float = 5.0
    resume: str | None = None
    device: str = "auto"
    dist_timeout: float = DIST_TIMEOUT_S
    sync_bn: bool = False
    deterministic: bool = False
    host_data: bool = False
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    checkpoint_cells: bool = False
    plot_format: str = "png"
    # --dataset folder
    image_size: int = 32
    val_portion: float = 0.1
    skip_bad_images: bool = False
    # Not saved: known from the checkpoint (False: a run begun before the correction of
    # the learning-rate schedule, which it keeps).
    lr_stepped_before_epoch: bool = field(default=True, metadata=NOT_SAVED)

    RELEASE_WORKERS: ClassVar[int] = 4   # the release's loader processes (at most the cores)


@dataclass(frozen=True)
class CifarConfig(TrainConfig):
    """train_cifar.py: the paper's CIFAR recipe (600 epochs, batch 128, lr 0.025, 20 cells,
    C 36; weight decay 5e-4 on CIFAR-100)."""

    workers: int = default_workers(4)
    dataset: str = "cifar10"          # --cifar100 is the release's spelling of cifar100
    learning_rate_min: float = 0.0
    cutout: bool = False
    cutout_length: int = 16
    download: bool = False
    threads: int = 0                  # 0: PyTorch's default (all cores)
    demo: bool = False

    CIFAR100_WEIGHT_DECAY: ClassVar[float] = 5e-4


# train_cifar.py --demo: 5 cells of C = 8 (N R N R N: each kind of cell, one normal cell at
# every resolution) for 10 epochs; batch 50 gives 20 steps an epoch on the 1,000 demo
# images, 200 in all (the paper: ~235,000). At the paper's rate 0.025 those steps reached
# 93% on the demo data and 27% on a small image folder, at 0.1 99% and 53% (93% in 30
# epochs). channels_last: the CPU's depthwise convolutions are much faster in NHWC. One
# thread: tensors this small gain little from more, and on a busy machine several threads
# per tiny op slow it down many times. Measurements: benchmarks/RESULTS.md (2026-12-07).
# Flags given with --demo override these; the dataset is the demo's unless --dataset or
# --cifar100 names another.
CIFAR_DEMO = dict(epochs=10, batch_size=50, learning_rate=0.1, init_channels=8, layers=5,
                  report_freq=5, workers=0, note="demo", threads=1, channels_last=True)
CIFAR_DEMO_DATASET = "demo"


@dataclass(frozen=True)
class ImageNetConfig(TrainConfig):
    """train_imagenet.py: the paper's mobile-setting recipe (250 epochs, global batch 1024
    at lr 0.5, label smoothing 0.1, 14 cells, C 48)."""

    workers: int = default_workers(8)
    batch_size: int = 1024
    learning_rate: float = 0.5
    weight_decay: float = 3e-5
    report_freq: int = 100
    epochs: int = 250
    init_channels: int = 48
    layers: int = 14
    drop_path_prob: float = 0.0
    image_size: int = 224
    dataset: str = "imagenet"
    label_smooth: float = 0.1
    lr_scheduler: str = "linear"

    RELEASE_WORKERS: ClassVar[int] = 8


def default_of(cls: type[RunConfig], name: str) -> Any:
    """A field's default (the paper's setting), for the parsers' defaults and help."""
    value = {f.name: f.default for f in fields(cls)}[name]
    assert value is not dataclasses.MISSING, name
    return value
