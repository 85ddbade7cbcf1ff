"""Summarise many runs: Markdown tables on stdout (``--json`` for machines), optional plots.

    python report.py runs/eval-seed*                    # training runs: final test accuracy, mean +- std
    python report.py 'runs/search-*' runs/eval-*        # globs (quoted or not) and folders, mixed
    python report.py runs/                              # a folder of run folders
    python report.py runs/* --json                      # one JSON object instead of Markdown
    python report.py runs/* --plots figs                # also figs/accuracy.png, figs/op_frequency.png

Each folder is recognised from its files (runs.py). Training runs (train_cifar.py,
train_imagenet.py): the final epoch's test accuracy (never the best epoch, which is
chosen on the test set), parameters, multiply-adds, epochs and time; finished runs with
the same setting (the same cell, every flag the same but the seed and the run-time flags)
are summarised as mean +- the sample standard deviation (ddof=1), min and max. Search
runs (train_search.py): the final cells, their skip-connect count (final and before the
--max_skip refinement), the parameters and multiply-adds of the 20-cell C=36 CIFAR network
built from each cell, the search time, the stages whose derived cell collapsed, and how
often each op was chosen on each edge. Runs that did not finish are listed as such and
never averaged.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from collections.abc import Sequence
from functools import cache
from typing import Any

from config import NEW_RUN_FLAGS, RUNTIME_FLAGS, CifarConfig, ImageNetConfig
from derivation import NUM_EDGES, STEPS
from engine import build_network
from errors import UserError, storage_error
from flags import PLOT_FORMATS, ArgumentParser
from genotypes import (
    PRIMITIVES,
    Genotype,
    GenotypeError,
    format_genotype,
    genotype_from_dict,
    genotype_to_dict,
)
from model import model_summary
from plots import accuracy_figure, matplotlib_available, op_frequency_figure, save_figure
from run_files import BUDGETS, GENOTYPE
from runs import (
    SEARCH,
    TRAIN,
    RunFolderError,
    read_arch_state,
    read_checkpoint_info,
    read_genotype,
    read_json,
    read_metrics,
    run_kind,
    run_main,
)
from utils import logger

# The evaluation network every searched cell is measured in (SPEC section 4, the paper's
# Table 1): 20 cells, C = 36, 32x32 inputs, no auxiliary head.
EVAL_CIFAR = {"kind": "cifar", "C": 36, "layers": 20, "auxiliary": False}
CIFAR_INPUT = (1, 3, 32, 32)
IMAGENET_INPUT = (1, 3, 224, 224)
STD_NOTE = "sample standard deviation (ddof=1)"
# Flags that do not change what a training run computes, and so do not split a setting.
SEED_AND_RUNTIME_FLAGS = RUNTIME_FLAGS | NEW_RUN_FLAGS | {"seed"}
GLOB_CHARS = "*?["


# ---------------------------------------------------------------------------------------
# Finding the run folders
# ---------------------------------------------------------------------------------------

def expand_run_dirs(paths: Sequence[str]) -> list[str]:
    """Run folders from folders and globs. A folder that holds run folders stands for them;
    a glob keeps the run folders among its matches."""
    found: list[str] = []
    for path in paths:
        if any(c in path for c in GLOB_CHARS):
            matches = sorted(p for p in glob.glob(path) if os.path.isdir(p))
            found_here = [m for m in matches if run_kind(m) is not None]
            if not found_here:
                raise UserError(f"{path} matches no run folder" if matches else f"{path} matches no folder")
        elif not os.path.isdir(path):
            raise UserError(f"{path}: no such folder (give run folders or globs of them)")
        elif run_kind(path) is not None:
            found_here = [path]
        else:
            found_here = sorted(os.path.join(path, d) for d in os.listdir(path)
                                if run_kind(os.path.join(path, d)) is not None)
            if not found_here:
                raise UserError(f"{path} is not a run folder: no metrics.jsonl, arch_state.json or "
                                "checkpoint.pt of train_search.py, train_cifar.py or "
                                "train_imagenet.py in it or in its subfolders")
        # One run given twice (a link to it, a second glob, a/../a) is counted once.
        seen = {os.path.realpath(f) for f in found}
        for d in found_here:
            if os.path.realpath(d) not in seen:
                seen.add(os.path.realpath(d))
                found.append(d)
    return found


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------

@cache
def _network_cost(network_json: str, genotype_json: str) -> tuple[int, int]:
    info = json.loads(network_json)
    model = build_network(info, genotype_from_dict(json.loads(genotype_json)))
    summary = model_summary(model, IMAGENET_INPUT if info["kind"] == "imagenet" else CIFAR_INPUT)
    return summary["params"], summary["multiply_adds"]


def network_cost(network: dict, genotype: Genotype) -> tuple[int, int]:
    """Parameters (without the auxiliary head) and multiply-adds per image."""
    return _network_cost(json.dumps(network, sort_keys=True),
                         json.dumps(genotype_to_dict(genotype), sort_keys=True))


def _epoch_seconds(records: list[dict], key: str) -> float:
    return round(sum(float(r.get(key) or 0.0) for r in records), 1)


def summarize_training(run_dir: str) -> dict[str, Any]:
    records = sorted(read_metrics(run_dir), key=lambda r: r.get("epoch", -1))
    ckpt = read_checkpoint_info(run_dir)
    run: dict[str, Any] = {"run": run_dir, "kind": TRAIN, "finished": False,
                           "epochs_done": len(records), "epochs": None, "seed": None,
                           "test_acc": None, "test_top5": None, "last_test_acc": None,
                           "params": None, "multiply_adds": None,
                           "time_s": _epoch_seconds(records, "epoch_time"), "setting": None}
    if records:
        run["last_test_acc"] = records[-1].get("test_acc")
    if ckpt is None or ckpt.get("format") is None:
        run["status"] = f"unfinished ({len(records)} epochs, no checkpoint)"
        return run
    args, network = ckpt.get("args", {}), ckpt.get("network", {})
    genotype = read_genotype_dict(ckpt.get("genotype"), run_dir)
    run.update(epochs=args.get("epochs"), seed=args.get("seed"), arch=args.get("arch"),
               dataset=network.get("dataset"), C=network.get("C"), layers=network.get("layers"),
               epochs_done=ckpt.get("epoch", len(records)), genotype=format_genotype(genotype))
    run["params"], run["multiply_adds"] = network_cost(network, genotype)
    run["setting"] = (f"{run['arch']} on {run['dataset']}, {run['layers']} cells C={run['C']}, "
                      f"{run['epochs']} epochs")
    # Runs are averaged together only when everything but the seed and the run-time flags
    # (where data lives, workers, speed options...) is the same, the cell included.
    # The settings as this version reads them (older runs' filled in as they ran).
    config = ImageNetConfig if network.get("kind") == "imagenet" else CifarConfig
    recipe = {k: v for k, v in config.from_dict(args).to_dict().items()
              if k not in SEED_AND_RUNTIME_FLAGS}
    run["setting_key"] = json.dumps([recipe, network, run["genotype"]], sort_keys=True, default=str)
    # The checkpoint says whether the run finished; metrics.jsonl only what each epoch gave
    # (a line of it may be torn or bad: read_metrics skipped it with a warning).
    done = (isinstance(run["epochs"], int) and isinstance(run["epochs_done"], int)
            and run["epochs_done"] >= run["epochs"])
    if done:
        final = [r for r in records if r.get("epoch") == run["epochs"] - 1]
        if final and final[-1].get("test_acc") is not None:
            acc, top5 = final[-1]["test_acc"], final[-1].get("test_top5")
        else:
            acc, top5 = ckpt.get("last_acc"), ckpt.get("last_top5")
            logger.warning("warning: %s: metrics.jsonl has no good line for the final epoch %d; "
                           "its test accuracy is taken from checkpoint.pt", run_dir, run["epochs"] - 1)
        run.update(finished=acc is not None, test_acc=acc, test_top5=top5,
                   status="finished" if acc is not None else "finished (no final test accuracy)")
        if run["last_test_acc"] is None or not final:
            run["last_test_acc"] = acc
    else:
        run["status"] = f"unfinished ({run['epochs_done']} of {run['epochs']} epochs)"
    return run


def read_genotype_dict(data: Any, source: str) -> Genotype:
    try:
        return genotype_from_dict(data, source=f"{source} (checkpoint genotype)")
    except GenotypeError as e:
        raise RunFolderError(str(e)) from None


def _edge_of(pair_index: int, source: int) -> int:
    """Edge number (0-13, node by node) of a genotype's pair: node i's inputs come first."""
    node = pair_index // 2
    return sum(2 + j for j in range(node)) + source


def summarize_search(run_dir: str) -> dict[str, Any]:
    records = [r for r in read_metrics(run_dir) if "stage" in r]
    ckpt = read_checkpoint_info(run_dir)
    args = (ckpt or {}).get("args", {})
    arch_state = read_arch_state(run_dir)
    genotype_path = os.path.join(run_dir, GENOTYPE)
    run: dict[str, Any] = {
        "run": run_dir, "kind": SEARCH, "finished": os.path.isfile(genotype_path),
        "seed": args.get("seed"), "dataset": args.get("dataset"),
        "time_s": _epoch_seconds(records, "epoch_time_s"),
        "epochs_done": len(records),
        "collapse_stages": sorted({int(r["stage"]) for r in records if r.get("collapse")}),
        "genotype": None, "skip_connects": None, "skip_connects_unrestricted": None,
        "params": None, "multiply_adds": None,
    }
    if not run["finished"]:
        last = records[-1] if records else None
        where = (f"stage {last['stage']} epoch {last['epoch'] + 1} of {args.get('epochs', '?')}"
                 if last else "no epoch finished")
        run["status"] = f"unfinished ({where})"
        return run
    genotype = read_genotype(genotype_path)
    budgets_path = os.path.join(run_dir, BUDGETS)
    budgets = read_json(budgets_path) if os.path.isfile(budgets_path) else {}
    skips = sum(op == "skip_connect" for op, _ in genotype.normal)
    network = {**EVAL_CIFAR, "num_classes": 100 if run["dataset"] == "cifar100" else 10}
    run.update(status="finished", genotype=format_genotype(genotype),
               genotype_dict=genotype_to_dict(genotype), skip_connects=skips,
               skip_connects_unrestricted=budgets.get("num_skip_connects", skips),
               max_skip=(arch_state or {}).get("max_skip"))
    run["params"], run["multiply_adds"] = network_cost(network, genotype)
    return run


# ---------------------------------------------------------------------------------------
# Over runs
# ---------------------------------------------------------------------------------------

def training_summary(runs: list[dict]) -> list[dict]:
    """Per setting, over its finished runs: final-epoch test accuracy mean, sample std
    (None for a single run), min, max."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if r["finished"]:
            groups.setdefault(r["setting_key"], []).append(r)
    out, labels = [], []
    for rs in groups.values():
        setting = rs[0]["setting"]
        labels.append(setting)
        if labels.count(setting) > 1:    # same name, other recipe or cell
            setting += f" (variant {labels.count(setting)})"
            for r in rs:
                r["setting"] = setting
        accs = [float(r["test_acc"]) for r in rs]
        top5 = [float(r["test_top5"]) for r in rs if r["test_top5"] is not None]
        out.append({
            "setting": setting, "runs": len(rs), "seeds": [r["seed"] for r in rs],
            "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "test_acc_min": min(accs), "test_acc_max": max(accs),
            "test_top5_mean": statistics.fmean(top5) if top5 else None,
            "test_error_mean": 100.0 - statistics.fmean(accs),
            "params": rs[0]["params"], "multiply_adds": rs[0]["multiply_adds"],
            "epochs": rs[0]["epochs"], "time_s_mean": statistics.fmean(r["time_s"] for r in rs),
        })
    return out


def op_frequency(searches: list[dict]) -> dict[str, list[list[int]]]:
    """Per cell type, an edge x op table: how many finished searches chose that op there."""
    freq = {cell: [[0] * len(PRIMITIVES) for _ in range(NUM_EDGES)] for cell in ("normal", "reduce")}
    for r in searches:
        if not r["finished"]:
            continue
        for cell in ("normal", "reduce"):
            for p, (op, source) in enumerate(r["genotype_dict"][cell]):
                freq[cell][_edge_of(p, source)][PRIMITIVES.index(op)] += 1
    return freq


def build_report(run_dirs: Sequence[str]) -> dict[str, Any]:
    training, searches = [], []
    for d in run_dirs:
        kind = run_kind(d)
        (searches if kind == SEARCH else training).append(
            summarize_search(d) if kind == SEARCH else summarize_training(d))
    return {"std": STD_NOTE, "training_runs": training, "training_summary": training_summary(training),
            "search_runs": searches, "op_frequency": op_frequency(searches),
            "finished_searches": sum(r["finished"] for r in searches)}


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------

def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _or_dash(x: Any) -> str:
    return "-" if x is None else str(x)


def _millions(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _input_name(source: int) -> str:
    return {0: "c_{k-2}", 1: "c_{k-1}"}.get(source, f"node {source - 2}")


def _cell_text(pairs: Sequence[Sequence]) -> str:
    """A cell as one line: node by node, its two (op input) pairs."""
    return "; ".join(" ".join(f"{op}({source})" for op, source in pairs[2 * i:2 * i + 2])
                     for i in range(len(pairs) // 2))


def render_markdown(report: dict[str, Any]) -> str:
    out: list[str] = []
    training, searches = report["training_runs"], report["search_runs"]
    if training:
        out += [f"## Training runs ({len(training)})", ""]
        out += _table(["run", "status", "setting", "seed", "epochs", "test acc, final epoch (%)",
                       "top-5 (%)", "params", "multiply-adds", "time"],
                      [[r["run"], r["status"], r["setting"] or "-", _or_dash(r["seed"]),
                        f"{r['epochs_done']}/{r['epochs'] if r['epochs'] is not None else '?'}",
                        _num(r["test_acc"]), _num(r["test_top5"]), _millions(r["params"]),
                        _millions(r["multiply_adds"]), _duration(r["time_s"])] for r in training])
        out += ["", f"### Summary over finished runs (final-epoch test accuracy; std = {STD_NOTE})", ""]
        summary = report["training_summary"]
        if summary:
            out += _table(["setting", "runs", "test acc mean ± std (%)", "test error (%)", "min", "max",
                           "top-5 mean", "params", "multiply-adds", "time per run"],
                          [[s["setting"], s["runs"],
                            f"{s['test_acc_mean']:.2f} ± {_num(s['test_acc_std'])}",
                            _num(s["test_error_mean"]), _num(s["test_acc_min"]), _num(s["test_acc_max"]),
                            _num(s["test_top5_mean"]), _millions(s["params"]),
                            _millions(s["multiply_adds"]), _duration(s["time_s_mean"])] for s in summary])
            if any(s["test_acc_std"] is None for s in summary):
                out += ["", "A std of - means a single finished run."]
        else:
            out += ["No finished training run."]
        out.append("")
    if searches:
        out += [f"## Search runs ({len(searches)})", ""]
        out += _table(["run", "status", "seed", "skip-connects (final / before --max_skip)",
                       "params (20 cells, C=36)", "multiply-adds", "search time",
                       "collapse warned in stages"],
                      [[r["run"], r["status"], _or_dash(r["seed"]),
                        "-" if r["skip_connects"] is None else
                        f"{r['skip_connects']} / {r['skip_connects_unrestricted']}",
                        _millions(r["params"]), _millions(r["multiply_adds"]), _duration(r["time_s"]),
                        ", ".join(map(str, r["collapse_stages"])) or "none"] for r in searches])
        finished = [r for r in searches if r["finished"]]
        if finished:
            out += ["", "### Final cells (per node: op(input); input 0 = c_{k-2}, 1 = c_{k-1}, "
                    "j >= 2 = node j-2)", ""]
            out += _table(["run", "normal cell", "reduction cell"],
                          [[r["run"], _cell_text(r["genotype_dict"]["normal"]),
                            _cell_text(r["genotype_dict"]["reduce"])] for r in finished])
            out += ["", f"### Op chosen per edge, over {len(finished)} finished search(es)", ""]
            for cell in ("normal", "reduce"):
                rows = []
                for e, counts in enumerate(report["op_frequency"][cell]):
                    if any(counts):
                        node = next(i for i in range(STEPS) if e < sum(2 + j for j in range(i + 1)))
                        source = e - sum(2 + j for j in range(node))
                        rows.append([e, f"node {node} <- {_input_name(source)}",
                                     *[n or "" for n in counts]])
                out += [f"{'Normal' if cell == 'normal' else 'Reduction'} cell:", ""]
                out += _table(["edge", "", *PRIMITIVES], rows) + [""]
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------
# Plots and command line
# ---------------------------------------------------------------------------------------

PLOTS_FIX = "choose another --plots folder"


def write_plots(report: dict[str, Any], out_dir: str, fmt: str) -> list[str]:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise storage_error(e, os.path.join(out_dir, f"accuracy.{fmt}"), "the plot", PLOTS_FIX) from None
    paths = []
    groups = [(s["setting"], [r["test_acc"] for r in report["training_runs"]
                              if r["finished"] and r["setting"] == s["setting"]])
              for s in report["training_summary"]]
    if groups:
        paths.append(save_figure(accuracy_figure(groups), os.path.join(out_dir, f"accuracy.{fmt}"),
                                 PLOTS_FIX))
    if report["finished_searches"]:
        paths.append(save_figure(op_frequency_figure(report["op_frequency"], report["finished_searches"]),
                                 os.path.join(out_dir, f"op_frequency.{fmt}"), PLOTS_FIX))
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # The docstring's first paragraph is the description; the rest (examples, what is
    # summarised) follows the flags, each said once.
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run folders, globs of them, or folders holding run folders")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown")
    p.add_argument("--plots", metavar="OUT_DIR", default=None,
                   help="also draw accuracy per run and op frequencies into OUT_DIR (needs matplotlib)")
    p.add_argument("--plot_format", choices=PLOT_FORMATS, default="png",
                   help="format of the --plots files (default: png)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    if args.plots and not matplotlib_available():
        raise UserError("--plots needs matplotlib (pip install matplotlib), or drop --plots")
    report = build_report(expand_run_dirs(args.run_dirs))
    paths = write_plots(report, args.plots, args.plot_format) if args.plots else []
    if args.json:
        report["plots"] = paths
        print(json.dumps(report, indent=1))
    else:
        print(render_markdown(report), end="")
        for p in paths:
            print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
