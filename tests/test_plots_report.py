"""Plots of a run (plots.py), collapse diagnostics of the search (collapse.py) and the
summary over many runs (report.py): plots from a tiny search and a tiny training run, a run
without matplotlib, mean and sample std over generated run folders, bad input."""
import errno
import glob
import json
import logging
import math
import os
import sys

import pytest
import torch
from helpers import SEARCH_TINY, TRAIN_TINY, read_metrics, run_script, tiny

import plots
import report
import runs
import train_cifar
import train_search
from checkpoint import TRAIN_FORMAT, save_atomic
from derivation import NUM_EDGES, SKIP, CollapseMonitor, all_on_switches
from engine import network_info
from genotypes import PDARTS, genotype_to_dict, load_genotype_file
from runs import close_logging
from utils import logger

PNG = b"\x89PNG"
# 3 cells of C=4 per stage on 16x16 images, 2 epochs per stage (1 weights-only, 1 with alphas).
TINY_SEARCH = tiny(SEARCH_TINY, add_layers=[0, 0], batch_size=25, report_freq=5)
TINY_TRAIN = tiny(TRAIN_TINY, batch_size=25)


@pytest.fixture(autouse=True)
def _close_logging():
    det = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(det)
    close_logging()


def _only(pattern):
    dirs = glob.glob(pattern)
    assert len(dirs) == 1, dirs
    return dirs[0]


def _log(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return f.read()


def _check_image(path, magic):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(magic) and len(data) > 5000, path


def _report(argv, capsys):
    capsys.readouterr()
    rc = run_script(report, argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------------------
# A tiny search: plots at its end, collapse counts per epoch, report.py on it
# ---------------------------------------------------------------------------------------

def test_search_draws_plots_logs_collapse_counts_and_reports(cifar10_dir, tmp_path, capsys):
    save = str(tmp_path / "runs") + "/"
    os.makedirs(save)
    assert run_script(train_search, ["--tmp_data_dir", cifar10_dir, "--save", save, *TINY_SEARCH,
                                     "--plot_format", "svg"]) == 0
    close_logging()
    run_dir = _only(save + "search-*")
    for name in ("alphas.svg", "curves.svg"):
        _check_image(os.path.join(run_dir, name), b"<")
    assert not glob.glob(os.path.join(run_dir, "*.png"))
    log = _log(run_dir)
    assert "plots: alphas.svg, curves.svg" in log

    # Collapse counts: null in the warm-up epoch, the derived normal cell's counts after it.
    records = read_metrics(run_dir)
    for r in records:
        if r["epoch"] == 0:
            assert r["normal_param_free"] is None and r["collapse"] is None
        else:
            assert 0 <= r["normal_skip_connects"] <= r["normal_param_free"] <= 8
            assert r["collapse"] == (r["normal_param_free"] > 4)
            assert (f"stage {r['stage']} epoch 1: derived normal cell has {r['normal_param_free']} of "
                    "8 edges parameter-free") in log
    collapsed_stages = {r["stage"] for r in records if r["collapse"]}
    assert log.count("is mostly parameter-free") == len(collapsed_stages)

    # The panels: one per stage and cell type; five curves sharing the epoch axis.
    switches = runs.search_stage_switches(runs.read_arch_state(run_dir), 3)
    assert len(plots.alphas_figure(records, switches).axes) == 6
    assert len(plots.search_curves_figure(records).axes) == 5
    # A stage still running (no arch_state entry yet) is drawn with the switches it ran with.
    partial = [r for r in records if r["stage"] <= 2]
    state = runs.read_arch_state(run_dir)
    state["stages"] = state["stages"][:1]
    assert runs.search_stage_switches(state, 2) == switches[:2]          # the paper's pruning
    assert runs.search_stage_switches(state, 2, switches[1]) == switches[:2]  # its checkpoint's
    assert len(plots.alphas_figure(partial, switches[:2]).axes) == 4

    # On demand, as PNG.
    assert plots.main(plots.parse_args([run_dir])) == 0
    for name in ("alphas.png", "curves.png"):
        _check_image(os.path.join(run_dir, name), PNG)

    rc, out, _ = _report([run_dir, "--json"], capsys)
    assert rc == 0
    (search,) = json.loads(out)["search_runs"]
    genotype = load_genotype_file(os.path.join(run_dir, "genotype.json"))
    assert search["finished"] and search["seed"] == 3
    assert search["skip_connects"] == sum(op == "skip_connect" for op, _ in genotype.normal)
    assert search["collapse_stages"] == sorted(collapsed_stages)
    assert 1e6 < search["params"] < 5e6 and search["multiply_adds"] > 1e8
    freq = json.loads(out)["op_frequency"]
    assert sum(map(sum, freq["normal"])) == 8 and sum(map(sum, freq["reduce"])) == 8


def test_collapse_warns_once_per_stage_after_the_warmup():
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append((record.levelno, record.getMessage()))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        switches = all_on_switches()
        skip_heavy = torch.full((NUM_EDGES, 8), 0.05)
        skip_heavy[:, SKIP] = 0.65      # every edge prefers skip_connect: 8 of 8 parameter-free
        monitor = CollapseMonitor(stage=2, warmup_epochs=3)
        assert monitor.check(2, switches, skip_heavy) == {
            "normal_param_free": None, "normal_skip_connects": None, "collapse": None}
        assert not messages
        assert monitor.check(3, switches, skip_heavy) == {
            "normal_param_free": 8, "normal_skip_connects": 8, "collapse": True}
        monitor.check(4, switches, skip_heavy)
        warnings = [m for lvl, m in messages if lvl == logging.WARNING]
        assert len(warnings) == 1 and "stage 2 epoch 3" in warnings[0] and "8 of 8 edges" in warnings[0]
        # A cell of convolutions is not flagged.
        conv = torch.full((NUM_EDGES, 8), 0.05)
        conv[:, 4] = 0.65
        assert CollapseMonitor(1, 0).check(0, switches, conv)["collapse"] is False
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------
# A tiny training run without matplotlib, then its plots on demand
# ---------------------------------------------------------------------------------------

def test_training_run_without_matplotlib_finishes_and_says_plots_are_skipped(cifar10_dir, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    save = str(tmp_path / "runs") + "/"
    assert run_script(train_cifar, ["--tmp_data_dir", cifar10_dir, "--save", save, *TINY_TRAIN]) == 0
    close_logging()
    run_dir = _only(save + "eval-*")
    assert _log(run_dir).count("plots skipped") == 1
    assert not glob.glob(os.path.join(run_dir, "curves.*"))
    assert len(read_metrics(run_dir)) == 2

    monkeypatch.undo()
    assert plots.plot_run(run_dir) == [os.path.join(run_dir, "curves.png")]
    _check_image(os.path.join(run_dir, "curves.png"), PNG)
    assert len(plots.train_curves_figure(read_metrics(run_dir)).axes) == 4


def test_a_plotting_failure_never_fails_the_run(tmp_path):
    run_dir = tmp_path / "search-x-1"
    run_dir.mkdir()   # a record whose alphas cover 1 edge instead of 14
    (run_dir / "metrics.jsonl").write_text(json.dumps(
        {"stage": 1, "epoch": 0, "alphas_normal_softmax": [[1.0]], "alphas_reduce_softmax": [[1.0]]}) + "\n")
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        assert plots.plot_run_safely(str(run_dir), "png") == []
    finally:
        logger.removeHandler(handler)
    assert any("could not draw the plots" in m for m in messages)
    assert plots.plot_run_safely(str(run_dir), "none") == []


# ---------------------------------------------------------------------------------------
# report.py over generated run folders
# ---------------------------------------------------------------------------------------

def _training_folder(root, name, accs, epochs, seed, **recipe):
    """A run folder as train_cifar.py leaves it: metrics.jsonl and checkpoint.pt."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for epoch, acc in enumerate(accs):
            f.write(json.dumps({"epoch": epoch, "lr": 0.01, "drop_path_prob": 0.0, "train_loss": 1.0,
                                "train_acc": 50.0, "train_top5": 90.0, "test_loss": 1.0,
                                "test_acc": acc, "test_top5": 99.0, "best_acc_on_test": max(accs),
                                "epoch_time": 60.0}) + "\n")
    save_atomic({"format": TRAIN_FORMAT, "epoch": len(accs),
                 "args": {"epochs": epochs, "seed": seed, "arch": "PDARTS", "cutout": False,
                          "workers": seed, **recipe},   # workers: a run-time flag
                 "network": network_info("cifar", "cifar10", 8, 5, 10, False),
                 "genotype": genotype_to_dict(PDARTS), "last_acc": accs[-1], "last_top5": 99.0},
                os.path.join(run_dir, "checkpoint.pt"))
    return run_dir


def test_report_mean_and_sample_std_over_finished_runs(tmp_path, capsys):
    root = str(tmp_path / "runs")
    # The best epoch (99.0) is never the result: the final epoch's accuracy is.
    for seed, final in ((0, 90.0), (1, 92.0), (2, 97.0)):
        _training_folder(root, f"eval-seed{seed}-20260101-000000", [99.0, final], 2, seed)
    _training_folder(root, "eval-seed3-20260101-000000", [10.0], 2, 3)       # stopped after 1 of 2
    _training_folder(root, "eval-seed5-20260101-000000", [99.0, 50.0], 2, 5, cutout=True)  # other recipe
    os.makedirs(os.path.join(root, "eval-seed4-20260101-000000"))            # died before epoch 0 ended
    with open(os.path.join(root, "eval-seed4-20260101-000000", "log.txt"), "w") as f:
        f.write("args = {}\n")

    rc, out, _ = _report([os.path.join(root, "eval-seed*")], capsys)
    assert rc == 0
    os.makedirs(os.path.join(root, "notes"))                # not a run: a glob skips it
    rc, out_json, _ = _report([os.path.join(root, "*"), "--json"], capsys)
    assert rc == 0
    result = json.loads(out_json)
    assert len(result["training_runs"]) == 6
    summary, other = result["training_summary"]
    assert other["runs"] == 1 and other["test_acc_mean"] == 50.0 and other["test_acc_std"] is None
    assert other["setting"] == summary["setting"] + " (variant 2)"
    assert summary["runs"] == 3 and sorted(summary["seeds"]) == [0, 1, 2]
    assert summary["test_acc_mean"] == pytest.approx(93.0)
    assert summary["test_acc_std"] == pytest.approx(math.sqrt(13.0))      # ddof=1
    assert (summary["test_acc_min"], summary["test_acc_max"]) == (90.0, 97.0)
    assert summary["params"] > 0 and summary["multiply_adds"] > 0
    unfinished = {r["run"].split(os.sep)[-1]: r for r in result["training_runs"] if not r["finished"]}
    assert set(unfinished) == {"eval-seed3-20260101-000000", "eval-seed4-20260101-000000"}
    assert unfinished["eval-seed3-20260101-000000"]["status"] == "unfinished (1 of 2 epochs)"
    assert all(r["test_acc"] is None for r in unfinished.values())

    assert "93.00 ± 3.61" in out and "sample standard deviation (ddof=1)" in out
    assert out.count("unfinished") == 2 and "| 90.00 | 97.00 |" in out and "50.00 ± -" in out

    rc, out_plots, _ = _report([root, "--plots", str(tmp_path / "figs")], capsys)   # a folder of runs
    assert rc == 0 and "## Training runs (6)" in out_plots
    _check_image(str(tmp_path / "figs" / "accuracy.png"), PNG)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "no such folder"),
    (lambda d: d / "nothing-*", "matches no folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "is not a run folder"),
])
def test_report_bad_input_is_one_line(tmp_path, capsys, make, message):
    rc, out, err = _report([str(make(tmp_path))], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_cell_diagrams_use_the_op_colours_of_the_plots(tmp_path):
    import visualize
    from genotypes import OP_COLORS

    if not visualize.graphviz_available():
        pytest.skip("graphviz 'dot' is not installed")
    normal, _ = visualize.draw_genotype(PDARTS, str(tmp_path), "svg")
    with open(normal) as f:
        svg = f.read().lower()
    for op in ("skip_connect", "sep_conv_3x3", "dil_conv_3x3", "dil_conv_5x5"):   # PDARTS's normal ops
        assert OP_COLORS[op].lower() in svg, op
    assert OP_COLORS["max_pool_3x3"].lower() not in svg


def test_report_lists_an_unfinished_search_without_counting_its_cell(tmp_path, capsys):
    run_dir = tmp_path / "search-stopped-20260101-000000"
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for epoch, collapse in ((0, None), (1, True)):
            f.write(json.dumps({"stage": 1, "epoch": epoch, "epoch_time_s": 30.0, "collapse": collapse,
                                "normal_param_free": None if collapse is None else 6}) + "\n")
        f.write('{"stage": 1, "epoch": 2, "epoch_ti')              # torn by a kill
    rc, out, _ = _report([str(run_dir), "--json"], capsys)
    assert rc == 0
    result = json.loads(out)
    (search,) = result["search_runs"]
    assert not search["finished"] and search["status"].startswith("unfinished (stage 1 epoch 2 of")
    assert search["collapse_stages"] == [1] and search["time_s"] == 60.0
    assert result["finished_searches"] == 0 and sum(map(sum, result["op_frequency"]["normal"])) == 0
    rc, out, _ = _report([str(run_dir)], capsys)
    assert "| unfinished (stage 1 epoch 2 of ?) |" in out and "Final cells" not in out


# ---------------------------------------------------------------------------------------
# Issue 23: bad run folders and unwritable outputs (items 3, 4, 5, 15)
# ---------------------------------------------------------------------------------------

def _warnings():
    """Collect the project logger's messages (plots.py and report.py warn through it)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    return messages, handler


def _spoil_metrics(run_dir, lines_before_last):
    """Put bad lines between the first and the last metrics line."""
    path = os.path.join(run_dir, "metrics.jsonl")
    good = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join([good[0], *lines_before_last, *good[1:]]) + "\n")
    return path


def test_plots_skip_bad_metrics_lines_with_one_warning(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = _training_folder(str(tmp_path), "eval-x-1", [50.0, 60.0], 2, 0)
    path = _spoil_metrics(run_dir, ['{"epoch": 1, "test_acc": "abc"}', "[1, 2]", "null", "{oops"])
    messages, handler = _warnings()
    logger.addHandler(handler)
    try:
        assert run_script(plots, [run_dir]) == 0
        rc, out, err = _report([run_dir, "--json"], capsys)
    finally:
        logger.removeHandler(handler)
    _check_image(os.path.join(run_dir, "curves.png"), PNG)
    skipped = [m for m in messages if "skipped" in m]
    assert skipped == [f"warning: {path}: skipped lines 2, 3, 4, 5, not a metrics record (line 2: "
                       "'test_acc' is \"abc\", not a number)"]                 # once, for both tools
    assert [r["epoch"] for r in runs.read_metrics(run_dir)] == [0, 1]
    # Issue 23, item 15: a finished run with bad lines is finished.
    (run,) = json.loads(out)["training_runs"]
    assert rc == 0 and run["status"] == "finished" and run["test_acc"] == 60.0


def test_report_takes_the_final_accuracy_from_the_checkpoint_when_its_line_is_bad(tmp_path, capsys):
    run_dir = _training_folder(str(tmp_path), "eval-x-1", [50.0, 60.0], 2, 0)
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).read().splitlines()
    open(path, "w").write(lines[0] + "\n" + '{"epoch": 1, "test_acc": "abc"}\n')
    messages, handler = _warnings()
    logger.addHandler(handler)
    try:
        rc, out, _ = _report([run_dir, "--json"], capsys)
    finally:
        logger.removeHandler(handler)
    (run,) = json.loads(out)["training_runs"]
    assert rc == 0 and run["status"] == "finished" and run["finished"] and run["test_acc"] == 60.0
    assert any("no good line for the final epoch 1; its test accuracy is taken from checkpoint.pt"
               in m for m in messages)


@pytest.mark.parametrize("stages, message", [
    ([1, 2], "stage 1 is 1, not a JSON object"),
    ([{"switches_normal": [[True] * 7] * 14}], "stage 1 needs 'switches_normal' as 14 rows of 8 "
                                               "true/false values"),
    ([{"switches_normal": [[True] * 8] * 14, "switches_reduce": [[True] * 8] * 14,
       "alphas_normal": [[0.0] * 7] * 14, "alphas_reduce": [[0.0] * 8] * 14}],
     "stage 1 needs 'alphas_normal' as 14 rows, one number per op switched on"),
])
def test_plots_of_a_search_with_a_bad_arch_state_is_one_line(tmp_path, capsys, stages, message):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "search-x-1"
    run_dir.mkdir()
    (run_dir / "arch_state.json").write_text(json.dumps({"stages": stages}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"stage": 2, "epoch": 0}) + "\n")
    capsys.readouterr()
    assert run_script(plots, [str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir / 'arch_state.json'}: {message}") and err.count("\n") == 1


def test_plots_into_a_read_only_run_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """Issue 23, item 4: a run folder on a read-only file system (simulated: as root a
    chmod'ed folder stays writable)."""
    pytest.importorskip("matplotlib")
    run_dir = _training_folder(str(tmp_path), "eval-x-1", [50.0, 60.0], 2, 0)

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dst)

    monkeypatch.setattr(os, "replace", read_only)
    capsys.readouterr()
    assert run_script(plots, [run_dir]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err == (f"error: cannot write the plot {os.path.join(run_dir, 'curves.png')}: the folder "
                   f"{os.path.abspath(run_dir)} is on a read-only file system; copy the run folder "
                   "somewhere writable and run plots.py on the copy\n")
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "metrics.jsonl"]   # no temporary left


def test_report_plots_into_a_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = _training_folder(str(tmp_path), "eval-x-1", [50.0, 60.0], 2, 0)
    (tmp_path / "file").write_text("in the way")
    rc, out, err = _report([run_dir, "--plots", str(tmp_path / "file" / "figs")], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: cannot write the plot ") and "choose another --plots folder" in err


def test_training_curves_of_a_short_run_have_whole_epochs_and_legends_beside_the_panels():
    pytest.importorskip("matplotlib")
    records = [{"epoch": e, "lr": 0.025 - 0.01 * e, "drop_path_prob": 0.1 * e,
                "train_loss": 2.0 - e / 2, "test_loss": 2.1 - e / 2, "train_acc": 20.0 + 10 * e,
                "test_acc": 15.0 + 10 * e, "train_top5": None, "test_top5": None}
               for e in range(2)]
    fig = plots.train_curves_figure(records)
    ticks = [t for t in fig.axes[3].get_xticks() if -0.01 <= t <= 1.01]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks     # 0, 1: no 0.5
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1    # right of the panel
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert labels == ["train top-1", "test top-1"]                 # no top-5 lines when null
