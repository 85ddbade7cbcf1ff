"""The search as a list of stage plans (issue 31): --num_to_keep sets the stages, 1- and
4-stage plans end to end, the random-space control, DARTS in the same code, each stage's
cell trainable, --derive of any plan, and a resume that keeps its plan."""
import json
import os

import pytest
from helpers import (
    SEARCH_TINY,
    TRAIN_TINY,
    only_run_dir,
    only_search_dir,
    read_metrics,
    run_script,
    search,
    tiny,
)

import train_cifar
import train_search as ts
from checkpoint import resume_search
from config import SEARCH_PLANS, SearchConfig
from derivation import NONE, random_space_switches
from errors import UserError
from genotypes import load_genotype_file

# A search on 8-pixel images with one weights-only and one alpha epoch per stage.
QUICK = tiny(SEARCH_TINY, image_size=8, add_layers=None)


def _stages(run_dir):
    with open(os.path.join(run_dir, "arch_state.json")) as f:
        return json.load(f)["stages"]


def test_num_to_keep_sets_the_number_of_stages_and_their_ops():
    cfg = ts.parse_args([])
    assert [(s.ops, s.keep) for s in cfg.stages] == [(8, 5), (5, 3), (3, 1)]   # the paper's
    one = ts.parse_args(["--num_to_keep", "1", "--dropout_rate", "0.2"])
    assert [(s.layers, s.ops, s.keep, s.dropout_rate) for s in one.stages] == [(5, 8, 1, 0.2)]
    four = ts.parse_args("--num_to_keep 6 --num_to_keep 4 --num_to_keep 2 --num_to_keep 1 "
                         "--add_layers 1 --add_layers 2 --add_layers 3 --dropout_rate 0 "
                         "--dropout_rate 0.1 --dropout_rate 0.2 --dropout_rate 0.3".split())
    assert [(s.layers, s.ops, s.keep) for s in four.stages] == [(5, 8, 6), (6, 6, 4), (7, 4, 2), (8, 2, 1)]
    assert four.add_width == (0, 0, 0, 0)


@pytest.mark.parametrize("argv, says", [
    ("--num_to_keep 5 --num_to_keep 3", "the last value is what the final derivation keeps"),
    ("--num_to_keep 9 --num_to_keep 1", "stage 1 runs 8 ops per edge and cannot keep 9"),
    ("--num_to_keep 3 --num_to_keep 5 --num_to_keep 1", "stage 2 runs 3 ops per edge and cannot keep 5"),
    ("--num_to_keep 5 --num_to_keep 1", "--add_layers: the plan has 2 stage(s)"),
    ("--num_to_keep 5 --num_to_keep 1 --add_layers 4", "--dropout_rate: the plan has 2 stage(s)"),
    ("--num_to_keep 1 --dropout_rate 0.1 --dropout_rate 0.2", "--dropout_rate was given 2 time(s)"),
    ("--random_space --num_to_keep 8 --num_to_keep 1 --num_to_keep 1 --add_layers 0 --add_layers 0 "
     "--dropout_rate 0 --dropout_rate 0 --dropout_rate 0", "--random_space: the last stage of the plan"),
])
def test_a_plan_that_does_not_fit_is_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as stop:
        ts.parse_args(argv.split())
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 2 and says in err[0], err


def test_darts_is_its_authors_first_order_search():
    d = ts.parse_args(["--plan", "darts"])
    assert [(s.layers, s.init_channels, s.ops, s.keep, s.dropout_rate) for s in d.stages] == \
        [(8, 16, 8, 1, 0.0)]
    assert (d.epochs, d.arch_warmup_epochs, d.batch_size, d.learning_rate, d.learning_rate_min) == \
        (50, 0, 64, 0.025, 0.001)
    assert (d.arch_learning_rate, d.arch_weight_decay, d.momentum, d.weight_decay, d.max_skip,
            d.train_portion) == (3e-4, 1e-3, 0.9, 3e-4, -1, 0.5)
    # The paper's "regularisation applied to DARTS": flags given override the plan.
    r = ts.parse_args("--plan darts --dropout_rate 0.3 --max_skip 2".split())
    assert (r.stages[0].dropout_rate, r.max_skip, r.epochs) == (0.3, 2, 50)
    # --demo scales it down, keeping one stage and no warm-up.
    demo = ts.parse_args(["--plan", "darts", "--demo"])
    assert [(s.layers, s.ops) for s in demo.stages] == [(5, 8)] and demo.arch_warmup_epochs == 0
    assert set(SEARCH_PLANS) == {"paper", "darts"}


def test_random_space_is_reproducible_for_a_seed_and_differs_between_seeds():
    a, b, c = random_space_switches(3, 2), random_space_switches(3, 2), random_space_switches(3, 5)
    assert a == b and a != c
    for cell in a:
        assert all(row[NONE] and sum(row) == 3 for row in cell)
    # Independent per edge and per cell type: not every edge (or both cells) alike.
    normal, reduce = a
    assert len({tuple(r) for r in normal}) > 1 and normal != reduce
    cfg = ts.parse_args(["--random_space"])
    assert [(s.layers, s.ops, s.dropout_rate, s.space) for s in cfg.stages] == [(17, 3, 0.7, "random")]


def test_one_and_four_stage_plans_run_end_to_end(cifar10_dir, tmp_path, capsys):
    save1, save4 = str(tmp_path / "one") + "/", str(tmp_path / "four") + "/"
    rc, lines = search(["--tmp_data_dir", cifar10_dir, "--save", save1, *QUICK,
                        "--num_to_keep", "1", "--dropout_rate", "0.1"], capsys)
    assert rc == 0 and lines[-1].startswith("Genotype(")
    run1 = only_search_dir(save1)
    assert [(s["ops_per_edge"], s["layers"]) for s in _stages(run1)] == [(8, 3)]
    assert {(r["stage"], r["ops_per_edge"]) for r in read_metrics(run1)} == {(1, 8)}
    assert "plan paper: 1 stage(s)" in open(os.path.join(run1, "log.txt")).read()

    rc, lines = search(["--tmp_data_dir", cifar10_dir, "--save", save4, *QUICK,
                        *"--num_to_keep 6 --num_to_keep 4 --num_to_keep 2 --num_to_keep 1".split(),
                        *"--add_layers 1 --add_layers 1 --add_layers 2".split(),
                        *"--dropout_rate 0 --dropout_rate 0.1 --dropout_rate 0.2 --dropout_rate 0.3".split(),
                        "--dropout_decay", "0.5"], capsys)
    assert rc == 0
    run4 = only_search_dir(save4)
    stages = _stages(run4)
    assert [s["ops_per_edge"] for s in stages] == [8, 6, 4, 2]
    assert [sum(stages[k]["switches_normal"][0]) for k in range(4)] == [8, 6, 4, 2]
    assert all(s["dropout_decay"] == 0.5 for s in stages) and "space" not in stages[0]
    log = open(os.path.join(run4, "log.txt")).read()
    assert "stage 4: 5 cells, C=4, 2 ops per edge -> keeps 1" in log
    assert "=== stage 4/4: 5 cells, C=4, 2 ops per edge" in log
    records = read_metrics(run4)
    assert sorted({(r["stage"], r["ops_per_edge"], r["layers"]) for r in records}) == \
        [(1, 8, 3), (2, 6, 4), (3, 4, 4), (4, 2, 5)]
    # The decay the stage used: after the warm-up epoch, rate * exp(-(1 - 1) * 0.5) = rate.
    assert [r["skip_dropout"] for r in records if r["epoch"] == 1] == [0.0, 0.1, 0.2, 0.3]
    # Every stage's cell, in genotype.json's format; the last stage's is the final cell.
    cells = [load_genotype_file(os.path.join(run4, f"stage{k}_genotype.json")) for k in (1, 2, 3, 4)]
    assert cells[-1] == load_genotype_file(os.path.join(run4, "genotype.json"))
    with open(os.path.join(run4, "stage2_genotype.json")) as f:
        assert json.load(f)["metadata"]["stage"] == 2

    # --derive replays the 4-stage plan from the file, at the run's own budget.
    capsys.readouterr()
    assert run_script(ts, ["--derive", os.path.join(run4, "arch_state.json")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2] == "final cell at max_skip 2 (the run's):" and out[-1] == lines[-1]

    # A resume refuses another plan.
    with pytest.raises(UserError, match=r"--num_to_keep \[5, 3, 1\] \(the run's: \[6, 4, 2, 1\]\)"):
        resume_search(ts.parse_args(["--resume", run4, "--num_to_keep", "5", "--num_to_keep", "3",
                                     "--num_to_keep", "1"]))


def test_random_space_runs_only_the_last_stage_and_its_cell_trains(cifar10_dir, tmp_path, capsys):
    save = str(tmp_path / "r") + "/"
    rc, lines = search(["--tmp_data_dir", cifar10_dir, "--save", save, *QUICK, "--random_space",
                        "--seed", "4", "--add_layers", "1", "--add_layers", "2"], capsys)
    assert rc == 0
    run_dir = only_search_dir(save)
    (stage,) = _stages(run_dir)
    assert stage["space"] == "random" and stage["ops_per_edge"] == 3 and stage["layers"] == 5
    assert (stage["switches_normal"], stage["switches_reduce"]) == random_space_switches(3, 4)
    assert {r["stage"] for r in read_metrics(run_dir)} == {1}
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "only its last stage is run, on a search space drawn at random (seed 4)" in log
    capsys.readouterr()
    assert run_script(ts, ["--derive", os.path.join(run_dir, "arch_state.json"), "--max_skip",
                           "-1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2] == "final cell at max_skip none (given):"
    # The stage's cell trains with train_cifar.py --arch, as the paper's Figure 3 cells.
    tsave = str(tmp_path / "t") + "/"
    assert run_script(train_cifar, ["--tmp_data_dir", cifar10_dir, "--save", tsave,
                                    "--arch", os.path.join(run_dir, "stage1_genotype.json"),
                                    *tiny(TRAIN_TINY, epochs=1)]) == 0
    assert read_metrics(only_run_dir(tsave))[0]["epoch"] == 0


def test_a_saved_plan_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit together"):
        SearchConfig(num_to_keep=(5, 1))
