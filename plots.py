"""Plots of a run folder, drawn from its metrics.jsonl (and arch_state.json).

    python plots.py RUN_DIR [RUN_DIR ...] [--plot_format svg]

A search run gets ``alphas.png`` (one panel per stage and cell type: for each of the 14
edges the softmax weight of every op still on, over the stage's epochs, in the op
colours of the cell diagrams) and ``curves.png`` (losses, accuracies, learning rate,
skip-connect dropout rate and the derived normal cell's skip-connects and parameter-free
edges, epoch by epoch across the three stages). A training run gets ``curves.png``
(losses, top-1/top-5, learning rate, drop-path rate). train_search.py, train_cifar.py and
train_imagenet.py draw them when they finish; report.py draws its summary plots here.

matplotlib is optional: it is imported only when drawing, without pyplot or a GUI
backend (figures render with Agg), and without it a run says once that plots are skipped.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from derivation import COLLAPSE_FRACTION, NUM_EDGES, STEPS, ops_on
from errors import TMP_INFIX, UserError, storage_error
from flags import PLOT_FORMATS, ArgumentParser
from genotypes import OP_COLORS, PRIMITIVES
from run_files import METRICS
from runs import (
    SEARCH,
    RunFolderError,
    read_arch_state,
    read_checkpoint_info,
    read_metrics,
    run_kind,
    run_main,
    search_stage_switches,
)
from utils import logger

DPI = 100
CELL_EDGES = 2 * STEPS          # edges kept in a derived cell
# First edge of every intermediate node after the first: 0-1 node 0, 2-4 node 1, ...
NODE_STARTS = [sum(2 + j for j in range(i)) for i in range(1, STEPS)]
NO_MATPLOTLIB = ("matplotlib is not installed: plots skipped (pip install matplotlib, then "
                 "python plots.py {run_dir})")


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported."""


def _figure_class():
    """matplotlib's Figure, used without pyplot: no global backend state, no display."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotsUnavailable(str(e)) from None
    return Figure


def matplotlib_available() -> bool:
    try:
        _figure_class()
    except PlotsUnavailable:
        return False
    return True


def _legend_handles(ops: Sequence[str]) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([0], [0], color=OP_COLORS[op], lw=3, label=op) for op in ops]


def _by_stage(records: list[dict]) -> dict[int, list[dict]]:
    stages: dict[int, list[dict]] = {}
    for r in records:
        stages.setdefault(int(r["stage"]), []).append(r)
    return {s: sorted(rs, key=lambda r: r["epoch"]) for s, rs in sorted(stages.items())}


# ---------------------------------------------------------------------------------------
# Search runs
# ---------------------------------------------------------------------------------------

def alphas_figure(records: list[dict], switches: list[tuple[list, list]]):
    """Two rows (normal, reduction cell) x one column per stage. In a panel each edge
    takes one unit of the x axis, its stage's epochs running left to right inside it."""
    Figure = _figure_class()
    stages = _by_stage(records)
    # Fixed margins: a layout engine would double the drawing time of these end-of-run plots.
    width = 6.5 * len(stages)
    fig = Figure(figsize=(width, 6.4), dpi=DPI)
    fig.subplots_adjust(left=0.85 / width, right=0.99, top=0.88, bottom=0.1, hspace=0.35,
                        wspace=0.12)
    axes = fig.subplots(2, len(stages), squeeze=False)
    for col, (stage, recs) in enumerate(stages.items()):
        for row, cell in enumerate(("normal", "reduce")):
            ax = axes[row][col]
            sw = switches[stage - 1][row]
            n = len(recs)
            # One line per op, broken (NaN) between edges: few artists, fast to draw.
            lines: dict[int, tuple[list[float], list[float]]] = {}
            for e in range(NUM_EDGES):
                xs = [e + 0.08 + 0.84 * (i / (n - 1) if n > 1 else 0.5) for i in range(n)]
                for c, k in enumerate(ops_on(sw[e])):
                    x, y = lines.setdefault(k, ([], []))
                    x += [*xs, math.nan]
                    y += [*(r[f"alphas_{cell}_softmax"][e][c] for r in recs), math.nan]
            for k, (x, y) in lines.items():
                ax.plot(x, y, color=OP_COLORS[PRIMITIVES[k]], lw=1.2, marker="." if n == 1 else None)
            light = [e for e in range(1, NUM_EDGES) if e not in NODE_STARTS]
            ax.vlines(light, 0, 1, transform=ax.get_xaxis_transform(), color="0.85", lw=0.6)
            ax.vlines(NODE_STARTS, 0, 1, transform=ax.get_xaxis_transform(), color="0.3", lw=1.0)
            ax.set_xlim(0, NUM_EDGES)
            ax.set_xticks([e + 0.5 for e in range(NUM_EDGES)], [str(e) for e in range(NUM_EDGES)])
            ax.tick_params(axis="x", length=0)
            ax.set_title(f"stage {stage}, {'normal' if row == 0 else 'reduction'} cell "
                         f"({sum(sw[0])} ops per edge, epochs {recs[0]['epoch']}-{recs[-1]['epoch']})",
                         fontsize=10)
            if col == 0:
                ax.set_ylabel("softmax weight")
            if row == 1:
                ax.set_xlabel("edge (nodes 0 | 1 | 2 | 3 = edges 0-1 | 2-4 | 5-8 | 9-13); "
                              "epochs left to right within each edge", fontsize=8)
    fig.legend(handles=_legend_handles(PRIMITIVES), loc="upper center", bbox_to_anchor=(0.5, 1.0),
               ncol=len(PRIMITIVES), fontsize=9, frameon=False)
    return fig


def _stage_x(records: list[dict]) -> tuple[list[float], list[tuple[float, int]]]:
    """One x position per record, epochs of stage after stage, and where each stage starts."""
    stages = _by_stage(records)
    offset, starts, pos = 0, [], {}
    for stage, recs in stages.items():
        starts.append((offset, stage))
        for r in recs:
            pos[(stage, r["epoch"])] = offset + r["epoch"]
        offset += max(r["epoch"] for r in recs) + 1
    return [pos[(int(r["stage"]), r["epoch"])] for r in records], starts


def _plot_keys(ax, xs: Sequence[float], records: list[dict], keys: Sequence[tuple[str, str, dict]],
               segments: Sequence[Sequence[int]] | None = None) -> bool:
    """One line per key, broken between ``segments`` (the stages: each starts afresh);
    epochs where a key is null (warm-up, no validation) are left out."""
    segments = segments or [range(len(records))]
    drawn = False
    for key, label, style in keys:
        first = True
        for seg in segments:
            pts = [(xs[i], records[i][key]) for i in seg if records[i].get(key) is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label if first else None,
                    **{"color": f"C{keys.index((key, label, style))}", "marker": ".", **style})
            first, drawn = False, True
    if drawn:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
    return drawn


def search_curves_figure(records: list[dict]):
    """Five panels sharing the epoch axis, the three stages side by side."""
    Figure = _figure_class()
    records = [r for stage in _by_stage(records).values() for r in stage]
    xs, starts = _stage_x(records)
    stage_of = [int(r["stage"]) for r in records]
    segments = [[i for i, s in enumerate(stage_of) if s == stage] for _, stage in starts]
    fig = Figure(figsize=(9, 12), dpi=DPI)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.96, bottom=0.05, hspace=0.1)
    axes = fig.subplots(5, 1, sharex=True)
    _plot_keys(axes[0], xs, records, [
        ("train_loss", "train loss (weight half)", {}),
        ("arch_loss", "alpha-step loss (alpha half)", {}),
        ("valid_loss", "validation loss (alpha half)", {"marker": "o"})], segments)
    axes[0].set_ylabel("loss")
    _plot_keys(axes[1], xs, records, [
        ("train_acc", "train accuracy", {}),
        ("valid_acc", "validation accuracy", {"marker": "o"})], segments)
    axes[1].set_ylabel("accuracy (%)")
    _plot_keys(axes[2], xs, records, [("lr", "weight learning rate", {})], segments)
    axes[2].set_ylabel("learning rate")
    _plot_keys(axes[3], xs, records, [("skip_dropout", "skip-connect dropout rate",
                                       {"color": OP_COLORS["skip_connect"]})], segments)
    axes[3].set_ylabel("dropout rate")
    ax = axes[4]
    if _plot_keys(ax, xs, records, [
            ("normal_skip_connects", "skip-connects", {"color": OP_COLORS["skip_connect"]}),
            ("normal_param_free", "parameter-free edges", {"color": "0.3"})], segments):
        ax.axhline(COLLAPSE_FRACTION * CELL_EDGES, color="0.6", ls=":", lw=1)
        ax.text(0.005, COLLAPSE_FRACTION * CELL_EDGES, " collapse warning above this",
                transform=ax.get_yaxis_transform(), va="bottom", fontsize=8, color="0.4")
    ax.set_ylim(-0.3, CELL_EDGES + 0.3)
    ax.set_ylabel("derived normal cell\n(of 8 edges)")
    ax.set_xlabel("epoch (stages one after another)")
    for ax in axes:
        for x0, _ in starts[1:]:
            ax.axvline(x0 - 0.5, color="0.3", lw=0.8, ls="--")
    for x0, stage in starts:
        axes[0].text(x0, 1.02, f"stage {stage}", transform=axes[0].get_xaxis_transform(), fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------

def train_curves_figure(records: list[dict]):
    """Four panels: losses, top-1/top-5 accuracies, learning rate, drop-path rate."""
    Figure = _figure_class()
    records = sorted(records, key=lambda r: r["epoch"])
    xs = [r["epoch"] for r in records]
    # Room on the right for the legends: inside, they covered the lines of short runs.
    fig = Figure(figsize=(11, 10), dpi=DPI)
    fig.subplots_adjust(left=0.1, right=0.78, top=0.97, bottom=0.06, hspace=0.1)
    axes = fig.subplots(4, 1, sharex=True)
    _plot_keys(axes[0], xs, records, [("train_loss", "train loss (with auxiliary)", {}),
                                      ("test_loss", "test loss", {})])
    axes[0].set_ylabel("loss")
    _plot_keys(axes[1], xs, records, [
        ("train_acc", "train top-1", {"color": "C0"}),
        ("train_top5", "train top-5", {"color": "C0", "ls": "--"}),
        ("test_acc", "test top-1", {"color": "C1"}),
        ("test_top5", "test top-5", {"color": "C1", "ls": "--"})])
    axes[1].set_ylabel("accuracy (%)")
    _plot_keys(axes[2], xs, records, [("lr", "learning rate", {})])
    axes[2].set_ylabel("learning rate")
    _plot_keys(axes[3], xs, records, [("drop_path_prob", "drop-path rate", {})])
    axes[3].set_ylabel("drop-path rate")
    axes[3].set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator
    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs, not 0.5 steps
    for ax in axes:
        if ax.get_legend() is not None:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


# ---------------------------------------------------------------------------------------
# Summaries over runs (report.py)
# ---------------------------------------------------------------------------------------

def accuracy_figure(groups: list[tuple[str, list[float]]]):
    """Final-epoch test accuracy of every finished run, one column per setting, with the
    mean and the sample standard deviation."""
    import statistics

    Figure = _figure_class()
    fig = Figure(figsize=(max(4.0, 1.6 * len(groups) + 2), 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for g, (_, accs) in enumerate(groups):
        ax.plot([g] * len(accs), accs, "o", color="C0", alpha=0.7)
        if accs:
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            ax.errorbar([g + 0.15], [statistics.fmean(accs)], yerr=[std], fmt="s", color="C3",
                        capsize=4)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8, rotation=10)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel("test accuracy, final epoch (%)")
    ax.set_title("runs (dots); mean +- sample std (squares)", fontsize=10)
    return fig


def op_frequency_figure(freq: dict[str, list[list[int]]], num_runs: int):
    """For each cell type, how many searches chose each op on each of the 14 edges."""
    Figure = _figure_class()
    fig = Figure(figsize=(11, 5.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, cell in zip(axes, ("normal", "reduce")):
        counts = freq[cell]
        top = max(num_runs, 1)
        ax.imshow(counts, cmap="Greens", vmin=0, vmax=1.25 * top, aspect="auto")
        for e, row in enumerate(counts):
            for k, n in enumerate(row):
                if n:
                    ax.text(k, e, str(n), ha="center", va="center", fontsize=8,
                            color="white" if n > 0.6 * top else "black")
        ax.set_xticks(range(len(PRIMITIVES)), PRIMITIVES, rotation=45, ha="right", fontsize=8)
        for label in ax.get_xticklabels():
            label.set_color(OP_COLORS[label.get_text()])
        ax.set_yticks(range(NUM_EDGES), [str(e) for e in range(NUM_EDGES)], fontsize=8)
        ax.set_ylabel("edge")
        ax.set_title(f"{'normal' if cell == 'normal' else 'reduction'} cell: op chosen, "
                     f"count over {num_runs} search(es)", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------------------

# Where plots.py's own plots can go instead of a run folder that cannot be written.
RUN_DIR_FIX = "copy the run folder somewhere writable and run plots.py on the copy"


def save_figure(fig, path: str, fix: str = RUN_DIR_FIX) -> str:
    """Write a figure (format from the file name) atomically; a failed write is one
    StorageError line (``fix``: where else it can go)."""
    fmt = os.path.splitext(path)[1][1:]
    tmp = f"{path}{TMP_INFIX}{os.getpid()}"
    try:
        fig.savefig(tmp, format=fmt, dpi=DPI)
        os.replace(tmp, path)
    except OSError as e:
        raise storage_error(e, path, "the plot", fix) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _alphas_that_fit(records: list[dict], switches: list[tuple[list, list]], run_dir: str) -> list[dict]:
    """The search records whose softmax alphas have one row per edge and one weight per op
    on there; the others are skipped with one warning (the epochs they belong to)."""
    def fits(r: dict) -> bool:
        sw = switches[int(r["stage"]) - 1]
        for cell, on in zip(("normal", "reduce"), sw):
            rows = r.get(f"alphas_{cell}_softmax")
            if not (isinstance(rows, list) and len(rows) == NUM_EDGES and all(
                    isinstance(row, list) and len(row) == len(ops_on(on[e]))
                    and all(v is not None for v in row) for e, row in enumerate(rows))):
                return False
        return True

    good = [r for r in records if fits(r)]
    if len(good) < len(records):
        bad = ", ".join(f"stage {r['stage']} epoch {r['epoch']}" for r in records if not fits(r))
        logger.warning("warning: %s: skipped the metrics of %s: their alphas do not fit the ops "
                       "on in each edge (arch_state.json)", os.path.join(run_dir, METRICS), bad)
    if not good:
        raise RunFolderError(f"{run_dir}: no epoch with usable alphas in {METRICS}: nothing to plot")
    return good


def plot_run(run_dir: str, fmt: str = "png") -> list[str]:
    """Draw a run folder's plots into it; return their paths. Raises RunFolderError for
    a folder without a run and PlotsUnavailable without matplotlib."""
    if fmt not in PLOT_FORMATS:
        raise UserError(f"plot format {fmt!r}: use one of {', '.join(PLOT_FORMATS)}")
    records = read_metrics(run_dir)
    kind = run_kind(run_dir, records)
    if kind is None:
        raise RunFolderError(f"{run_dir} is not a run folder (no metrics.jsonl of train_search.py, "
                             "train_cifar.py or train_imagenet.py)")
    if not records:
        raise RunFolderError(f"{run_dir} has no finished epoch yet: nothing to plot")
    _figure_class()
    out = []
    if kind == SEARCH:
        records = [r for r in records if "stage" in r]
        state = read_arch_state(run_dir)
        try:   # the switches of a stage still running
            ckpt = read_checkpoint_info(run_dir) or {}
        except RunFolderError:
            ckpt = {}
        running = ((ckpt["switches_normal"], ckpt["switches_reduce"])
                   if ckpt.get("stage") == len((state or {}).get("stages", [])) else None)
        switches = search_stage_switches(state, max(int(r["stage"]) for r in records), running)
        records = _alphas_that_fit(records, switches, run_dir)
        out.append(save_figure(alphas_figure(records, switches), os.path.join(run_dir, f"alphas.{fmt}")))
        out.append(save_figure(search_curves_figure(records), os.path.join(run_dir, f"curves.{fmt}")))
    else:
        out.append(save_figure(train_curves_figure(records), os.path.join(run_dir, f"curves.{fmt}")))
    return out


def plot_run_safely(run_dir: str, fmt: str | None) -> list[str]:
    """The end-of-run hook: draw the plots, and never let plotting fail a finished run
    (a missing matplotlib is said once, any other failure is a warning)."""
    if fmt in (None, "none"):
        return []
    try:
        paths = plot_run(run_dir, fmt)
    except PlotsUnavailable:
        logger.info(NO_MATPLOTLIB.format(run_dir=run_dir))
        return []
    except Exception as e:  # noqa: BLE001 - plotting must not lose a finished run
        logger.warning("could not draw the plots of %s: %s: %s (the run's results are "
                       "unaffected; retry with python plots.py %s)", run_dir, type(e).__name__, e,
                       run_dir)
        return []
    logger.info("plots: %s", ", ".join(os.path.basename(p) for p in paths))
    return paths


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="search or training run folders")
    p.add_argument("--plot_format", choices=PLOT_FORMATS, default="png", help="png (default) or svg")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    if not matplotlib_available():
        raise UserError("matplotlib is not installed; pip install matplotlib to draw plots")
    for run_dir in args.run_dirs:
        for path in plot_run(run_dir, args.plot_format):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
