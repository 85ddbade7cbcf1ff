"""The command line of train_search.py: its flags (with the paper's defaults and the
demo's, from config.py) and how they resolve into the run's SearchConfig: presets,
repeated per-stage flags (``--add_layers 6 --add_layers 12``), the stem. The search itself
is in train_search.py; what a ``--resume`` may change is config.RUNTIME_FLAGS.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from config import (
    PAPER_DROPOUT_RATES,
    RELEASE_SEARCH_WORKERS,
    SEARCH_DEMO,
    SEARCH_DEMO_PLANS,
    SEARCH_PLANS,
    SearchConfig,
    default_of,
    plan_problem,
    stage_ops,
)
from distributed import add_dist_timeout_arg
from flags import (
    NO_EFFECT,
    ArgumentParser,
    HelpFormatter,
    add_no_effect_flags,
    add_plot_args,
    count_or_fraction,
    fraction,
    int_at_least,
    int_between,
    momentum,
    no_effect_lines,
    nonneg_float,
    nonneg_int,
    parse_given,
    positive_float,
    positive_int,
    prob,
    report_steps,
    run_note,
    seed_int,
    workers_help,
)
from model_search import CELL_LAYOUTS, STEM_REDUCTION, STEMS
from speed import PER_EDGE_FROM_ELEMENTS, add_speed_args, search_layout

RELEASE_WORKERS = RELEASE_SEARCH_WORKERS
MIN_IMAGE_SIZE = 8          # the smallest --image_size the two reduction cells can halve twice
AUTO_IMAGENET_STEM = 64     # --stem auto picks the stride-8 stem from this image size on


def paper(name: str):
    """The paper's default of a flag (SearchConfig's)."""
    return default_of(SearchConfig, name)


def resolve_stem(stem: str, image_size: int) -> tuple[str, str]:
    """The search network's stem for ``--stem`` at ``--image_size`` and why (for the log).
    A ValueError when the stride-8 stem would leave the last cells under 2x2 pixels."""
    if stem == "auto":
        stem = "imagenet" if image_size >= AUTO_IMAGENET_STEM else "cifar"
        reason = (f"--stem auto: {stem} since --image_size {image_size} is "
                  f"{'at least' if stem == 'imagenet' else 'under'} {AUTO_IMAGENET_STEM}")
    else:
        reason = f"--stem {stem}"
    smallest = 2 * 4 * STEM_REDUCTION[stem]     # the stem, then two reduction cells
    if image_size < smallest:
        raise ValueError(f"--stem {stem} shrinks the image by {STEM_REDUCTION[stem]} before the "
                         f"first cell and by {4 * STEM_REDUCTION[stem]} by the last: --image_size "
                         f"{image_size} leaves the last cells under 2x2 pixels; use --image_size "
                         f"{smallest} or more, or --stem cifar")
    return stem, reason


def stage_values(given: Sequence | None, flag: str, default: Sequence | None,
                 stages: int, implicit_first: bool) -> tuple:
    """The per-stage values of a repeated flag, one per stage of the plan.

    ``implicit_first``: the release's ``--add_layers``/``--add_width`` lists start with an
    implicit 0 for stage 1, so one value fewer than the stages (``--add_layers 6
    --add_layers 12`` of three stages) means 0, 6, 12; as many values are taken as given.
    Not given, the ``default`` (the plan's) applies when it has one value per stage.
    """
    forms = (f"{stages - 1} (stage 1 is then 0) or {stages}" if implicit_first and stages > 1
             else f"{stages}")
    plan = f"the plan has {stages} stage(s)"
    if given is None:
        if default is not None and len(default) == stages:
            return tuple(default)
        if implicit_first and (default is None or not any(default)):
            return (0,) * stages            # nothing added anywhere
        if implicit_first and stages == 1:
            return (0,)
        raise ValueError(f"{flag}: {plan} (--num_to_keep), and its default {list(default or [])} "
                         f"does not fit it; give {flag} {forms} times, one value per stage")
    values = tuple(given)
    if implicit_first and len(values) == stages - 1:
        return (type(values[0])(0),) + values
    if len(values) == stages:
        return values
    # Deviation: the release silently falls back to its defaults here.
    raise ValueError(f"{flag} was given {len(values)} time(s); {plan}: give it {forms} times, "
                     f"one value per stage (got {list(values)})")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="P-DARTS progressive architecture search (the paper's plan: 3 stages of "
                    "5/11/17 cells and 8/5/3 ops per edge). First try: python train_search.py --demo",
        formatter_class=HelpFormatter)
    d = SEARCH_DEMO
    g = p.add_argument_group("data")
    g.add_argument("--tmp_data_dir", "--data", default=paper("tmp_data_dir"),
                   help="folder holding cifar-10-batches-py / cifar-100-python; for "
                        "--dataset folder, the ImageFolder tree itself (class subfolders)")
    g.add_argument("--dataset", choices=["cifar10", "cifar100", "folder", "demo"], default=None,
                   help="cifar10 (default), cifar100, folder (your own ImageFolder tree, "
                        "normalised with its own mean/std), demo (built-in generated "
                        "10-class task; the default with --demo)")
    g.add_argument("--cifar100", action="store_true", help="same as --dataset cifar100")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR into --tmp_data_dir if it is missing")
    g.add_argument("--image_size", type=int_at_least(MIN_IMAGE_SIZE), default=None,
                   help="image side; --dataset folder: resized and centre-cropped to it; "
                        "CIFAR/demo: resized to it when not 32 (default 32, demo 16)")
    g.add_argument("--train_portion", type=fraction, default=paper("train_portion"),
                   help="part of the training split that trains the weights, the rest trains "
                        "the alphas: the first part for CIFAR and demo (the release's rule), a "
                        "stratified draw seeded with --seed for an image folder")
    g.add_argument("--subset_per_class", nargs=2, type=count_or_fraction, default=None,
                   metavar=("W", "A"),
                   help="search on a sample: from every class, a seeded draw of W images for "
                        "the weight half and A others for the alpha half (counts, or fractions "
                        "of the class such as 0.1 0.025); --train_portion is then not used")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="--dataset folder: decode every image once at the start and leave out "
                        "the unreadable ones (counted in the log) instead of stopping at the "
                        "first with its path")
    g.add_argument("--workers", type=nonneg_int, default=None,
                   help=workers_help(RELEASE_WORKERS) + f"; demo {d['workers']}")
    # Faithful to the release: its search takes --cutout/--cutout_length (Cutout on the
    # images of both halves, off by default) and --drop_path_prob (parsed, never used).
    g.add_argument("--cutout", action="store_true",
                   help="Cutout (after normalisation) on the images of both halves, as the "
                        "release's --cutout (off by default)")
    g.add_argument("--cutout_length", type=positive_int, default=paper("cutout_length"),
                   help="Cutout square side")
    g.add_argument("--drop_path_prob", type=prob, default=paper("drop_path_prob"),
                   help="accepted for the release's command lines; the search network has no "
                        "drop path, so the value is not used (default 0.3, the release's)")

    g = p.add_argument_group("search")
    g.add_argument("--epochs", type=positive_int, default=None,
                   help=f"epochs per stage (default {paper('epochs')}, demo {d['epochs']})")
    g.add_argument("--arch_warmup_epochs", type=nonneg_int, default=None,
                   help="epochs per stage that train only the weights "
                        f"(default {paper('arch_warmup_epochs')}, demo {d['arch_warmup_epochs']})")
    g.add_argument("--batch_size", type=positive_int, default=None,
                   help="batch of each half per step, over all processes together "
                        f"(default {paper('batch_size')}, demo {d['batch_size']})")
    g.add_argument("--learning_rate", type=positive_float, default=None,
                   help=f"initial weight learning rate (default {paper('learning_rate')}, "
                        f"demo {d['learning_rate']})")
    g.add_argument("--learning_rate_min", type=nonneg_float, default=paper("learning_rate_min"),
                   help="cosine schedule floor")
    g.add_argument("--momentum", type=momentum, default=paper("momentum"), help="SGD momentum")
    g.add_argument("--weight_decay", type=nonneg_float, default=paper("weight_decay"),
                   help="SGD weight decay")
    g.add_argument("--grad_clip", type=positive_float, default=paper("grad_clip"),
                   help="gradient norm clip for the weights and for the alphas")
    g.add_argument("--arch_learning_rate", type=positive_float, default=None,
                   help=f"Adam lr of the alphas (default {paper('arch_learning_rate')}, "
                        f"demo {d['arch_learning_rate']})")
    g.add_argument("--arch_weight_decay", type=nonneg_float, default=paper("arch_weight_decay"),
                   help="Adam weight decay of the alphas")
    g.add_argument("--init_channels", type=positive_int, default=None,
                   help=f"C of stage 1 (default {paper('init_channels')}, "
                        f"demo {d['init_channels']})")
    g.add_argument("--stem", choices=("auto",) + STEMS, default="auto",
                   help="the search network's stem: cifar (the release's, full resolution) or "
                        "imagenet (the mobile network's stride-8 stem: a 224-pixel search costs "
                        f"about what a 28-pixel one does); auto = imagenet when --image_size is "
                        f"{AUTO_IMAGENET_STEM} or more, else cifar")
    g.add_argument("--layers", type=positive_int, default=None,
                   help=f"cells in stage 1 (default {paper('layers')}, demo "
                        f"{SEARCH_DEMO_PLANS['paper']['layers']})")
    g.add_argument("--cell_layout", choices=("auto",) + CELL_LAYOUTS, default="auto",
                   help="how the search cell computes (the same maths; float rounding differs): "
                        "batched (edges stacked by what they read: a third of the operators, "
                        "for GPUs and tiny CPU runs), per_edge (edge by edge, channels_last on "
                        "the CPU unless --no-channels_last: about 2.7x the release's step on the CPU "
                        "at the paper's size); auto = batched on CUDA and for tiny CPU runs "
                        "(the demo), per_edge on the CPU from "
                        f"{PER_EDGE_FROM_ELEMENTS:,} elements per op (images x C x side x side). "
                        "A run saves the layout it used and a resume keeps it. --cell_layout "
                        "batched --deterministic reproduces runs from before this flag bit for bit")

    g = p.add_argument_group("the stage plan (one value per stage; repeat a flag per stage)")
    g.add_argument("--plan", choices=sorted(SEARCH_PLANS), default=paper("plan"),
                   help="paper: the paper's three stages (every default); darts: DARTS (first "
                        "order) as the paper's baseline, one stage of 8 cells with all 8 ops, 50 "
                        "epochs of batch 64, lr 0.025 to 0.001, alphas at 3e-4 from epoch 0, no "
                        "skip dropout, no skip budget. Flags given override the plan; --demo "
                        "scales any plan down")
    g.add_argument("--num_to_keep", type=positive_int, action="append", default=None,
                   help="ops per edge a stage keeps for the next one; given once per stage, "
                        "it sets the number of stages: stage 1 runs all 8 ops, stage s+1 what "
                        "stage s kept, the last value is the final cell's 1 (default 5 3 1: "
                        "8, 5 and 3 ops; darts: 1)")
    g.add_argument("--add_layers", type=nonneg_int, action="append", default=None,
                   help="cells added per stage; repeat: one time fewer than the stages means "
                        "stage 1 adds 0 (the release's --add_layers 6 --add_layers 12 is 0, 6, "
                        "12 -> 5/11/17 cells; demo 0, 2, 4 -> 3/5/7 cells)")
    g.add_argument("--add_width", type=nonneg_int, action="append", default=None,
                   help="channels added to C per stage; repeat like --add_layers (default 0 for "
                        "every stage)")
    g.add_argument("--dropout_rate", type=prob, action="append", default=None,
                   help="skip-connect dropout rate per stage; give it once per stage. Default: "
                        "the paper's rates, CIFAR-10 (and demo/folder) 0.0 0.4 0.7, CIFAR-100 "
                        "0.1 0.2 0.3 (the authors' README example: 0.1 0.4 0.7); darts 0.0")
    g.add_argument("--dropout_decay", type=nonneg_float, default=paper("dropout_decay"),
                   help="after the warm-up the skip-connect dropout rate decays as "
                        "rate * exp(-(epoch - warm-up) * decay) (paper: 0.2)")
    g.add_argument("--random_space", action="store_true",
                   help="the control of paper Sec. 4.4: run only the last stage, on a search "
                        "space drawn at random (seeded by --seed) from the full one with as many "
                        "ops per edge as the approximated space has (none plus ops drawn from "
                        "the other 7 on every edge), instead of the space the earlier stages "
                        "chose")
    # Deviation: the budget M is a flag (the paper's M = 2 is the default).
    g.add_argument("--max_skip", type=int_between(-1, 8), default=paper("max_skip"),
                   help="at most this many skip-connects in the final normal cell (paper: 2; "
                        "darts: -1); -1 = no restriction. With --derive: the run's own unless "
                        "given")

    g = p.add_argument_group("run")
    # Deviation: the default folder is runs/ (ignored by git).
    g.add_argument("--save", default=paper("save"),
                   help="run folder prefix: the run goes to {save}search-{note}-{timestamp}")
    g.add_argument("--note", type=run_note, default=None,
                   help="name part of the run folder (default try, demo demo)")
    g.add_argument("--seed", type=seed_int, default=paper("seed"),
                   help="seeds everything (the release's default)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (slower); with it a resumed CPU run equals "
                        "an uninterrupted one")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = CUDA when available")
    add_dist_timeout_arg(g)
    add_no_effect_flags(g)      # the release's --gpu
    g.add_argument("--threads", type=nonneg_int, default=None,
                   help="CPU threads for PyTorch; 0 = PyTorch's default (all cores). The demo "
                        "uses 1: its tensors are too small to gain from more, and on a busy "
                        "machine several threads per tiny op slow it down many times")
    g.add_argument("--report_freq", type=report_steps, default=None,
                   help=f"steps between progress lines (default {paper('report_freq')}, "
                        f"demo {d['report_freq']})")
    g.add_argument("--demo", action="store_true",
                   help="run the whole algorithm on the built-in demo data at a tiny size "
                        "(flags given with it override its presets)")
    g.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last completed epoch")
    g.add_argument("--derive", metavar="FILE", default=None,
                   help="no training: re-derive the final cell from saved alphas (arch_state.json) "
                        "at --max_skip and print it")
    g.add_argument("--out", metavar="FILE.json", default=None,
                   help="with --derive: also write the chosen cell there as a genotype JSON file, "
                        "which train_cifar.py --arch trains")
    g.add_argument("--host_data", action="store_true",
                   help="on CUDA, keep the CIFAR/demo augmentation in DataLoader workers on the "
                        "CPU instead of the default GPU pipeline (same distribution, other draws)")
    add_speed_args(p, " (default: on with the per-edge cells on the CPU, see --cell_layout, "
                      "and with --demo; else off)")
    add_plot_args(g)
    return p


def parse_args(argv: Sequence[str] | None = None) -> SearchConfig:
    """The command line as the run's config: the flags given, else the plan's values
    (--plan), scaled down by --demo, else the paper's; per-stage flags as one value per
    stage of the plan; the stem resolved. With --resume this is what the command line asks
    of the run: the flags it gave are compared with the run's own (checkpoint.resume_config)."""
    parser = build_parser()
    args, given = parse_given(parser, argv)
    if args.cifar100:
        if args.dataset not in (None, "cifar100"):
            parser.error(f"--cifar100 contradicts --dataset {args.dataset}")
        args.dataset = "cifar100"
        given = given - {"cifar100"} | {"dataset"}
    no_effect = tuple(no_effect_lines(args))
    values = {k: v for k, v in vars(args).items() if k not in ("cifar100", *NO_EFFECT)}
    presets = {**SEARCH_PLANS[args.plan],
               **({**SEARCH_DEMO, **SEARCH_DEMO_PLANS[args.plan]} if args.demo else {})}
    per_stage = ("num_to_keep", "add_layers", "add_width", "dropout_rate")
    for key, value in presets.items():
        if key not in given and key not in per_stage:
            values[key] = value
    for key in (*SEARCH_DEMO, "layers"):     # the flags whose default depends on --demo
        if values[key] is None:
            values[key] = paper(key)
    keep = (tuple(args.num_to_keep) if args.num_to_keep
            else presets.get("num_to_keep", paper("num_to_keep")))
    problem = plan_problem(keep)
    if problem:
        parser.error(f"--num_to_keep {' '.join(map(str, keep))}: {problem}")
    values["num_to_keep"], stages = keep, len(keep)
    try:
        values["add_layers"] = stage_values(args.add_layers, "--add_layers",
                                            presets.get("add_layers", paper("add_layers")), stages, True)
        values["add_width"] = stage_values(args.add_width, "--add_width", presets.get("add_width"),
                                           stages, True)
        # Deviation: no --dropout_rate means the paper's rates, not the release's fallback.
        rates = PAPER_DROPOUT_RATES.get(values["dataset"], PAPER_DROPOUT_RATES["cifar10"])
        values["dropout_rate"] = stage_values(args.dropout_rate, "--dropout_rate",
                                              presets.get("dropout_rate", rates), stages, False)
    except ValueError as e:
        parser.error(str(e))
    if args.resume:
        if args.stem == "auto":
            given = given - {"stem"}   # the run keeps the stem it chose
        if args.cell_layout == "auto":
            given = given - {"cell_layout"}   # and the cell layout
        values["stem"] = paper("stem") if args.stem == "auto" else args.stem
        return SearchConfig(given=given, no_effect=no_effect, **values)
    try:
        values["stem"], values["stem_reason"] = resolve_stem(args.stem, values["image_size"])
    except ValueError as e:
        parser.error(str(e))
    if values["arch_warmup_epochs"] >= values["epochs"]:
        parser.error(f"--arch_warmup_epochs {values['arch_warmup_epochs']} >= --epochs "
                     f"{values['epochs']}: no alpha would ever be updated and the cell would "
                     "come from the random initial alphas; use fewer warm-up epochs or more epochs")
    if args.out and not args.derive:
        parser.error("--out writes the cell of --derive; give --derive RUN/arch_state.json too")
    if args.random_space and stage_ops(keep)[-1] < 2:
        parser.error(f"--random_space: the last stage of the plan runs {stage_ops(keep)[-1]} op "
                     "per edge; a random space needs none and at least one op drawn, so a plan "
                     "whose last stage runs 2 or more (--num_to_keep)")
    return SearchConfig(given=given, no_effect=no_effect, **values)


def resolve_cell_layout(cfg: SearchConfig, device, world_size: int = 1) -> SearchConfig:
    """A new run's config with ``--cell_layout auto`` resolved (speed.search_layout, from
    the device and stage 1's per-process size) and, for the per-edge cells on the CPU,
    channels_last on unless the command line set it; a concrete layout is kept as given
    (``batched``: exactly the cells and memory format of the runs before the flag)."""
    side = cfg.image_size // STEM_REDUCTION[cfg.stem]
    images = max(1, cfg.batch_size // world_size)
    if cfg.cell_layout == "auto":
        layout, channels_last, reason = search_layout(device, images, cfg.init_channels, side)
    else:
        layout, reason = cfg.cell_layout, f"--cell_layout {cfg.cell_layout}"
        channels_last = True if layout == "per_edge" and device.type == "cpu" else None
    if channels_last is None or "channels_last" in cfg.given:
        channels_last = cfg.channels_last
    return cfg.replace(cell_layout=layout, channels_last=channels_last, cell_layout_reason=reason)
