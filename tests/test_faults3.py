"""Faults, third battery (issue 33): odd image files and folders, edited arch states, an
--arch other than the run's, diverging losses, export onto devices and links, runs given
twice to report.py, a resume without its metrics, deep JSON and huge integers, broken
consoles, and the hints that named the wrong cause. Each case gives one ``error:`` line
(exit 2), a warning, or the right result."""
import errno
import glob
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, SEARCH_TINY, run_script, run_test_script, write_cifar_folder, write_colour_folder
from helpers import only_search_dir as only_run_dir
from PIL import Image

import checkpoint
import console
import data
import distributed
import divergence
import errors
import export
import genotypes
import report
import runs
import train_cifar
import train_search as ts
from derivation import NUM_EDGES, OPS_PER_STAGE
from genotypes import PDARTS, PRIMITIVES, save_genotype


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    runs.close_logging()


# ---------------------------------------------------------------------------------------
# 1: image folders
# ---------------------------------------------------------------------------------------

def _save_16bit(path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")   # what Pillow opens a 16-bit PNG as


def test_a_16_bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path):
    values = np.linspace(0, 65535, 12 * 10).reshape(12, 10)
    _save_16bit(tmp_path / "g16.png", values)
    got = np.asarray(data.read_image(str(tmp_path / "g16.png")))
    assert got.shape == (12, 10, 3) and (got[..., 0] == got[..., 2]).all()
    # The high byte, as Pillow reads 16-bit colour PNGs (Pillow's own RGB conversion
    # clipped these at 255: a white image).
    assert (got[..., 0] == values.astype(np.uint32) >> 8).all()
    assert got.mean() == pytest.approx(127.5, abs=1)


def test_exif_orientation_is_applied_wherever_images_are_read(tmp_path):
    """A photo taken with the camera turned (EXIF orientation 6) is read upright, as a
    viewer shows it: training, evaluation and the statistics all read it this way."""
    tree = tmp_path / "tree"
    for c in ("a", "b"):
        (tree / c).mkdir(parents=True)
        img = Image.new("RGB", (30, 10), (200, 30, 30))
        img.paste((30, 30, 200), (0, 0, 15, 10))        # left half blue
        exif = Image.Exif()
        exif[data.EXIF_ORIENTATION] = 6                  # stored turned: rotate 90 clockwise
        img.save(tree / c / "photo.jpg", exif=exif, quality=95)
    read = data.read_image(str(tree / "a" / "photo.jpg"))
    assert read.size == (10, 30)                                   # upright: 10 wide, 30 high
    top, bottom = np.asarray(read)[2, 5], np.asarray(read)[27, 5]
    assert top[2] > 150 and bottom[0] > 150                        # blue on top, red below
    dataset = data.scan_folder(str(tree))
    assert dataset[0][0].size == (10, 30)                          # what training decodes
    geometry = data.folder_transforms(False, 8, (0.5,) * 3, (0.5,) * 3)
    assert tuple(geometry(dataset[0][0]).shape) == (3, 8, 8)
    mean, _, _ = data.image_stats(dataset, 8)
    # The statistics read the upright image too (a 90-degree turn keeps them here; this
    # checks they come from the same reader without error).
    assert len(mean) == 3


def _odd_tree(root) -> str:
    """Classes a and b (8 images each) with a symlink loop in a, GIFs, hidden files and a
    hidden folder of images in b, a hidden folder and a file at the top."""
    write_colour_folder(str(root), num_classes=2, per_class=8)
    os.rename(root / "class_0", root / "a")
    os.rename(root / "class_1", root / "b")
    os.symlink(".", root / "a" / "loop")                    # a/loop -> .
    for k in range(2):
        Image.new("RGB", (14, 14), (9, 9, 9)).save(root / "b" / f"anim_{k}.gif")
    Image.new("RGB", (14, 14), (9, 9, 9)).save(root / "b" / ".hidden.png")
    for d in (root / ".cache", root / "b" / ".thumbs"):
        d.mkdir()
        Image.new("RGB", (14, 14), (9, 9, 9)).save(d / "x.png")
    (root / "README.txt").write_text("my images\n")
    return str(root)


def test_a_tree_with_a_link_loop_hidden_names_and_gifs_is_read_once_and_said(tmp_path):
    tree = _odd_tree(tmp_path / "tree")
    dataset = data.scan_folder(tree)
    assert dataset.classes == ["a", "b"]                    # .cache/ is no class
    assert len(dataset) == 16                               # a's 8 once, not 41 times
    assert len({os.path.realpath(p) for p, _ in dataset.samples}) == 16
    [note] = dataset.notes
    assert note.startswith(f"7 entries of {tree} not read: 2 .gif (e.g. b/anim_0.gif, b/anim_1.gif)")
    assert "not a file type read here (.jpg" in note
    assert "3 hidden (.cache/, b/.thumbs/, b/.hidden.png): names starting with '.' are skipped" in note
    assert "1 beside the class folders (README.txt)" in note
    assert "1 folder link(s) to a folder already read (a/loop -> ." in note


def test_the_scan_lists_an_ordinary_tree_exactly_as_torchvision(tmp_path):
    """The search's and training's image lists (and so their splits) are unchanged for
    trees without links, hidden names or other file types."""
    from torchvision import datasets

    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=3)
    for sub in ("class_1/sub", "class_1/sub/deep", "class_1/sub b", "class_2/Z"):
        os.makedirs(os.path.join(tree, sub))
        for name in ("b.png", "A.JPG", "a b.jpeg"):
            Image.new("RGB", (9, 9)).save(os.path.join(tree, sub, name), format="PNG")
    ours = data.scan_folder(tree)
    theirs = datasets.ImageFolder(tree, loader=lambda p: None)
    assert ours.samples == theirs.samples and ours.classes == theirs.classes
    assert ours.notes == []


def test_a_search_of_an_odd_tree_logs_what_it_did_not_read(tmp_path, capsys, monkeypatch):
    """End to end, with the console broken (the reader went away) and every loss counted as
    diverged: the search finishes, log.txt holds everything, no logging traceback."""
    tree = _odd_tree(tmp_path / "tree")
    monkeypatch.setattr(divergence, "DIVERGED_FACTOR", 0.0)

    class GoneReader:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", GoneReader())
    argv = ["--dataset", "folder", "--tmp_data_dir", tree, "--save", str(tmp_path / "r") + "/",
            *SEARCH_TINY, "--batch_size", "4"]
    assert runs.run_main(ts.main, ts.parse_args(argv)) == 0
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err and "BrokenPipe" not in err
    run_dir = only_run_dir(str(tmp_path / "r"))
    log = open(os.path.join(run_dir, "log.txt"), encoding="utf-8").read()
    assert "16 training images, 2 classes" in log
    assert f"warning: 7 entries of {tree} not read: 2 .gif" in log
    assert log.count("the search diverged") == 3 and "(warned once per stage)" in log
    assert "--arch_learning_rate" in log
    assert "final cell" in log and os.path.isfile(os.path.join(run_dir, "genotype.json"))


def _corrupt(path) -> None:
    with open(path, "wb") as f:
        f.write(b"not an image")


def test_skip_bad_images_that_empties_a_class_is_refused(tmp_path):
    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=3)
    for name in os.listdir(os.path.join(tree, "class_2")):
        _corrupt(os.path.join(tree, "class_2", name))
    _corrupt(os.path.join(tree, "class_0", "000.png"))
    with pytest.raises(data.DataError) as e:
        data.open_training_folder(tree, 8, 0, skip_bad_images=True)
    assert str(e.value).startswith(
        f"--skip_bad_images left class(es) class_2 of {tree} without a readable image (all 3 of "
        f"its files unreadable, e.g. {os.path.join(tree, 'class_2', '000.png')}); replace the "
        "files, or remove the class folder to train without that class")
    # A class that keeps an image: the bad files are left out, as before.
    Image.new("RGB", (9, 9), (1, 2, 3)).save(os.path.join(tree, "class_2", "ok.png"))
    kept, _ = data.open_training_folder(tree, 8, 0, skip_bad_images=True)
    assert len(kept) == 2 + 3 + 1 and len(kept.skipped) == 4


def test_single_colour_images_are_warned(tmp_path):
    tree = tmp_path / "tree"
    for c, colour in enumerate([(10, 10, 10), (200, 200, 200)]):
        (tree / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), colour).save(tree / f"c{c}" / f"{i}.png")
    dataset, stats = data.open_training_folder(str(tree), 8, 0)
    [note] = dataset.notes
    assert note.startswith(f"6 of the 6 sampled training images of {tree} are a single colour")
    # Two colours: the channels still vary over the sample, so no ~0 std.
    assert "divides by ~0" not in note and min(stats["std"]) > 0.3
    for i in range(3):   # now every image alike: the std is clamped at 1e-6
        Image.new("RGB", (12, 12), (10, 10, 10)).save(tree / "c1" / f"{i}.png")
    dataset, stats = data.open_training_folder(str(tree), 8, 0)
    assert "channel(s) R, G, B hardly vary" in dataset.notes[0] and max(stats["std"]) < 1e-5
    assert data.constant_images_note(0, 10, [0.2, 0.2, 0.2], "t") is None


@pytest.mark.parametrize("folders", [["val"], ["test"], ["test", "val"]])
def test_a_tree_with_only_val_or_test_names_the_missing_train(tmp_path, folders):
    for name in folders:
        write_colour_folder(str(tmp_path / "tree" / name), num_classes=2, per_class=2)
    with pytest.raises(data.DataError) as e:
        data.folder_tree(str(tmp_path / "tree"))
    assert f"has {' and '.join(n + '/' for n in folders)} but no train/" in str(e.value)
    # Classes that happen to include a "test" folder among others stay classes.
    write_colour_folder(str(tmp_path / "tree" / "cats"), num_classes=1, per_class=2)
    assert data.folder_tree(str(tmp_path / "tree"))[0] == str(tmp_path / "tree")


def test_cifar_data_with_one_class_is_refused(tmp_path):
    root = write_cifar_folder(str(tmp_path / "data"), 10, per_file=4)
    folder = os.path.join(root, "cifar-10-batches-py")
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        batch["labels"] = [3] * len(batch["labels"])
        with open(path, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with pytest.raises(data.DataError) as e:
        data.load_cifar_arrays(root, "cifar10", train=True)
    assert "hold one class only (label 3 in all 20 images)" in str(e.value)
    x, y = data.load_cifar_arrays(root, "cifar10", train=False)   # a test set may be one class
    assert set(y) == {3}


# ---------------------------------------------------------------------------------------
# 2 and 8: arch states, deep JSON, huge integers
# ---------------------------------------------------------------------------------------

def _derive_stages():
    return [{"alphas_normal": [[0.1 * k] * n for k in range(NUM_EDGES)],
             "alphas_reduce": [[0.1] * n for _ in range(NUM_EDGES)]} for n in OPS_PER_STAGE]


def _derive(tmp_path, capsys, text: str):
    path = tmp_path / "arch_state.json"
    path.write_text(text)
    capsys.readouterr()
    rc = runs.run_main(ts.main, ts.parse_args(["--derive", str(path)]))
    return rc, capsys.readouterr()


@pytest.mark.parametrize("value, message", [
    (1e39, "row 3 holds 1e+39, beyond the float32 range the search computes in"),
    (10 ** 400, "row 3 holds an integer of 401 digits, beyond the float32 range"),
    (True, "row 3 holds true, not a number"),
    (float("inf"), "holds non-finite values (NaN or infinity, row 3)"),
])
def test_derive_refuses_alphas_out_of_range_or_not_numbers(tmp_path, capsys, value, message):
    stages = _derive_stages()
    stages[1]["alphas_reduce"][3][2] = value
    rc, captured = _derive(tmp_path, capsys, json.dumps({"stages": stages}))
    assert rc == 2
    assert f"stage 2 'alphas_reduce' {message}" in one_error_line(captured.err)
    assert "Genotype" not in captured.out       # no cell with a ('none', 0) edge


def test_derive_checks_the_files_op_list(tmp_path, capsys):
    rc, captured = _derive(tmp_path, capsys, json.dumps({"stages": _derive_stages(),
                                                         "primitives": PRIMITIVES}))
    assert rc == 0 and captured.out.strip().splitlines()[-1].startswith("Genotype(")
    swapped = list(PRIMITIVES)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    rc, captured = _derive(tmp_path, capsys, json.dumps({"stages": _derive_stages(),
                                                         "primitives": swapped}))
    assert rc == 2 and "'primitives' lists the ops in another order" in one_error_line(captured.err)
    other = PRIMITIVES[:-1] + ["conv_9x9"]
    rc, captured = _derive(tmp_path, capsys, json.dumps({"stages": _derive_stages(),
                                                         "primitives": other}))
    assert rc == 2
    assert "(ops this version lacks: conv_9x9; missing: dil_conv_5x5)" in one_error_line(captured.err)


def _one_stage_state(**change) -> dict:
    on = [[True] * len(PRIMITIVES) for _ in range(NUM_EDGES)]
    stage = {"switches_normal": on, "switches_reduce": on,
             "alphas_normal": [[0.0] * len(PRIMITIVES) for _ in range(NUM_EDGES)],
             "alphas_reduce": [[0.0] * len(PRIMITIVES) for _ in range(NUM_EDGES)]}
    return {"primitives": PRIMITIVES, "stages": [stage], **change}


def test_plots_and_reports_use_the_same_check_of_saved_alphas(tmp_path):
    run_dir = tmp_path / "search-x"
    run_dir.mkdir()
    path = run_dir / "arch_state.json"
    path.write_text(json.dumps(_one_stage_state()))
    assert runs.read_arch_state(str(run_dir))["stages"]
    state = _one_stage_state()
    state["stages"][0]["alphas_normal"][0][0] = 1e39
    path.write_text(json.dumps(state))
    with pytest.raises(runs.RunFolderError, match="row 0 holds 1e"):
        runs.read_arch_state(str(run_dir))
    state["stages"][0]["alphas_normal"][0][0] = 10 ** 400     # no OverflowError
    path.write_text(json.dumps(state))
    with pytest.raises(runs.RunFolderError, match="integer of 401 digits"):
        runs.read_arch_state(str(run_dir))
    path.write_text(json.dumps(_one_stage_state(primitives=PRIMITIVES[::-1])))
    with pytest.raises(runs.RunFolderError, match="another order"):
        runs.read_arch_state(str(run_dir))


DEEP = "[" * 100000 + "]" * 100000


def test_deeply_nested_json_is_one_line_wherever_it_is_read(tmp_path, capsys):
    rc, captured = _derive(tmp_path, capsys, DEEP)
    assert rc == 2 and "is not valid JSON (nested more than 64 levels deep" in one_error_line(captured.err)
    path = tmp_path / "deep.json"
    path.write_text(DEEP)
    with pytest.raises(genotypes.GenotypeError, match="not valid JSON .nested more than 64"):
        genotypes.get_genotype(str(path))                         # --arch
    run_dir = tmp_path / "search-x"
    run_dir.mkdir()
    (run_dir / "arch_state.json").write_text("[" * 70 + "]" * 70)   # parses, too deep to walk
    with pytest.raises(runs.RunFolderError, match="nested more than 64"):
        runs.read_arch_state(str(run_dir))
    # A metrics line nested deeply, or with a number beyond a float: skipped with a warning.
    (run_dir / "metrics.jsonl").write_text("\n".join([
        json.dumps({"stage": 1, "epoch": 0, "train_loss": 1.0}), DEEP,
        json.dumps({"stage": 1, "epoch": 1, "train_loss": 10 ** 400}),
        json.dumps({"stage": 1, "epoch": 2, "train_loss": 1.0})]) + "\n")
    assert [r["epoch"] for r in runs.read_metrics(str(run_dir))] == [0, 2]
    with pytest.raises(errors.UserError, match="line 2 is not JSON"):   # a resume: one line
        runs.read_metrics_file(str(run_dir / "metrics.jsonl"))
    with pytest.raises(json.JSONDecodeError):
        errors.parse_json("[" * 65 + "]" * 65)
    assert errors.parse_json("[" * 64 + "]" * 64)


def test_a_log_txt_folder_on_resume_warns_and_logs_to_stdout(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "log.txt").mkdir(parents=True)
    logger = runs.setup_logging(str(run_dir))
    logger.info("still logged")
    captured = capsys.readouterr()
    assert captured.err.startswith(f"warning: cannot write the log {run_dir / 'log.txt'}: it is a "
                                   "folder; the log goes on to stdout only")
    assert captured.err.count("\n") == 1 and "still logged" in captured.out


# ---------------------------------------------------------------------------------------
# 3, 6 and 10: test.py / export.py with another --arch, export targets, hints
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CIFAR training run (PDARTS, 2 cells, C 4) and its data."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    cifar = write_cifar_folder(str(root / "cifar"), 10, per_file=4)
    assert run_script(train_cifar, ["--tmp_data_dir", cifar, "--save", str(root / "c-"),
                                    "--epochs", "1", "--workers", "0", "--device", "cpu",
                                    "--batch_size", "6", "--plot_format", "none", "--layers", "2",
                                    "--init_channels", "4"]) == 0
    runs.close_logging()
    [run_dir] = glob.glob(str(root / "c-eval-*"))
    swapped = PDARTS._replace(reduce=[("avg_pool_3x3", 1), ("sep_conv_5x5", 0)] + PDARTS.reduce[2:])
    save_genotype(swapped, str(root / "swapped.json"))
    return {"run": run_dir, "data": cifar, "swapped": str(root / "swapped.json"), "root": root}


def test_test_py_refuses_an_arch_other_than_the_runs(trained, capsys):
    rc, _, err = run_test_script(["--model_path", trained["run"], "--data", trained["data"],
                                  "--arch", trained["swapped"], "--workers", "0"], capsys)
    assert rc == 2
    assert (f"--arch {trained['swapped']} is not the cell {trained['run']}/checkpoint.pt was trained "
            "with; they differ in reduce[0] ('avg_pool_3x3', 1) vs ('avg_pool_3x3', 0), reduce[1] "
            "('sep_conv_5x5', 0) vs ('sep_conv_5x5', 1) (--arch vs the checkpoint's)") in one_error_line(err)
    # Another named cell: the cause is --arch, not --layers.
    rc, _, err = run_test_script(["--model_path", trained["run"], "--data", trained["data"],
                                  "--arch", "DARTS_V2", "--workers", "0"], capsys)
    assert rc == 2 and "--arch DARTS_V2 is not the cell" in one_error_line(err) and "--layers" not in err
    # The run's own cell by name is fine.
    rc, result, _ = run_test_script(["--model_path", trained["run"], "--data", trained["data"],
                                     "--arch", "PDARTS", "--workers", "0"], capsys)
    assert rc == 0 and result["images"] == 4


def test_export_refuses_another_arch_and_targets_that_are_not_files(trained, tmp_path, capsys):
    base = ["--model_path", trained["run"], "--format", "torchscript"]
    capsys.readouterr()
    assert run_script(export, [*base, "--arch", trained["swapped"], "--out", str(tmp_path / "n.pt")]) == 2
    assert "reduce[0] ('avg_pool_3x3', 1) vs ('avg_pool_3x3', 0)" in one_error_line(capsys.readouterr().err)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "target.pt"
    target.write_bytes(b"keep")
    link = tmp_path / "link.pt"
    os.symlink(target, link)
    for out, what in [(fifo, "a FIFO (named pipe)"), ("/dev/null", "a device file"),
                      (link, f"a symbolic link to {target}"), (tmp_path, "a folder"),
                      (tmp_path / "dangling", "a symbolic link to nowhere, which does not exist")]:
        if out == tmp_path / "dangling":
            os.symlink("nowhere", out)
        assert run_script(export, [*base, "--out", str(out)]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert f"--out {out} is {what}; export.py writes only a regular file or a new path" in err
    assert os.path.islink(link) and target.read_bytes() == b"keep"   # nothing replaced
    assert not os.path.isfile(fifo) and os.path.exists("/dev/null")
    assert run_script(export, [*base, "--out", str(target)]) == 0      # a regular file: replaced
    assert target.read_bytes() != b"keep"


def test_export_opset_advice_names_the_supported_opsets():
    advice = export.opset_advice(99, dynamo=False)
    assert "writes opsets" in advice and "not 99" in advice and "--dynamo" not in advice


def test_checkpoint_and_lock_hints_name_what_is_wrong(tmp_path, capsys):
    run_dir = tmp_path / "search-x"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"stage": 1, "epoch": e}) + "\n" for e in range(8)))
    assert checkpoint.missing_checkpoint(str(run_dir)).endswith(
        "has no checkpoint.pt, although its metrics.jsonl records 8 finished epoch(s): the file "
        "was removed or moved; put it back to resume")
    (run_dir / "checkpoint.pt").mkdir()
    capsys.readouterr()
    assert runs.run_main(ts.main, ts.parse_args(["--resume", str(run_dir)])) == 2
    assert f"{run_dir / 'checkpoint.pt'} is a folder, not a checkpoint file" in one_error_line(
        capsys.readouterr().err)
    (run_dir / "checkpoint.pt").rmdir()
    os.symlink("elsewhere.pt", run_dir / "checkpoint.pt")
    assert ("is a symbolic link to elsewhere.pt, which does not exist"
            in checkpoint.missing_checkpoint(str(run_dir)))
    with pytest.raises(errors.CheckpointError, match="is a symbolic link to elsewhere.pt"):
        checkpoint.load_file(str(run_dir / "checkpoint.pt"))   # a training --resume
    (run_dir / "run.lock").mkdir()
    with pytest.raises(errors.UserError) as e:
        runs.lock_run_dir(str(run_dir))
    assert "run.lock is a folder, not its lock file; remove it" in str(e.value)
    assert "--save" not in str(e.value)


def test_non_finite_advice_of_the_search_names_the_alpha_rate(monkeypatch):
    monkeypatch.setitem(runs._current_run, "dir", None)
    monkeypatch.setitem(runs._current_run, "script", "train_search.py")
    assert "a lower --learning_rate or --arch_learning_rate" in runs._nonfinite_advice()
    monkeypatch.setitem(runs._current_run, "script", "train_cifar.py")
    assert "--arch_learning_rate" not in runs._nonfinite_advice()


def test_an_unreachable_rendezvous_address_is_named(monkeypatch):
    def fail(**kwargs):
        raise torch.distributed.DistNetworkError("The client socket has timed out after 1000ms "
                                                 "while trying to connect to (nohost.invalid, 29500).")

    monkeypatch.setattr(torch.distributed, "init_process_group", fail)
    for key, value in dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="nohost.invalid",
                           MASTER_PORT="29500").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(errors.UserError) as e:
        distributed.init_distributed("cpu")
    assert str(e.value).startswith("the rendezvous address nohost.invalid:29500 (MASTER_ADDR:"
                                   "MASTER_PORT) of this torchrun job cannot be reached")
    assert "another process" not in str(e.value)


# ---------------------------------------------------------------------------------------
# 5: diverged losses
# ---------------------------------------------------------------------------------------

def test_a_loss_far_above_a_uniform_guess_warns_once():
    monitor = divergence.DivergenceMonitor(10, "the search", "a lower --learning_rate")
    assert monitor.check("stage 1 epoch 0", {"training loss": 2.3, "validation loss": 50.0}) is None
    assert monitor.check("stage 1 epoch 1", {"alpha-step loss": None,
                                             "validation loss": float("nan")}) is None
    warning = monitor.check("stage 1 epoch 2", {"training loss": 3.0, "validation loss": 7e15})
    assert warning.startswith("WARNING stage 1 epoch 2: the validation loss 7e+15 is 3.04e+15 times "
                              "the loss of a uniform guess (log 10 = 2.30")
    assert monitor.check("stage 1 epoch 3", {"validation loss": 1e18}) is None   # once
    assert divergence.DivergenceMonitor(2).limit == pytest.approx(100 * np.log(2))


def test_training_warns_when_its_losses_diverge(trained, monkeypatch, capsys):
    monkeypatch.setattr(divergence, "DIVERGED_FACTOR", 0.0)
    save = str(trained["root"] / "d-")
    assert run_script(train_cifar, ["--tmp_data_dir", trained["data"], "--save", save, "--epochs", "2",
                                    "--workers", "0", "--device", "cpu", "--batch_size", "6",
                                    "--plot_format", "none", "--layers", "2", "--init_channels", "4"]) == 0
    [run_dir] = glob.glob(save + "eval-*")
    log = open(os.path.join(run_dir, "log.txt"), encoding="utf-8").read()
    assert log.count("training diverged") == 1 and "WARNING epoch 0: the training loss" in log


# ---------------------------------------------------------------------------------------
# 7: report.py over one run given twice; a resume without its metrics
# ---------------------------------------------------------------------------------------

def test_report_counts_a_run_given_twice_once(trained, tmp_path):
    link = tmp_path / "link"
    os.symlink(trained["run"], link)
    found = report.expand_run_dirs([trained["run"], str(link), trained["run"] + "/../" +
                                    os.path.basename(trained["run"])])
    assert found == [trained["run"]]


def test_a_resume_whose_metrics_are_missing_or_short_says_so(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    assert runs.missing_metrics_warning(path, 8).startswith(
        f"warning: {path} is missing, so it has no line for the 8 epoch(s) the checkpoint has "
        "done (epochs 0-7); the resumed run appends its own epochs")
    with open(path, "w") as f:
        f.writelines(json.dumps({"stage": s, "epoch": e}) + "\n"
                     for s, e in [(1, 0), (1, 1), (1, 3), (2, 0)])
    warning = runs.missing_metrics_warning(path, 1, stage=1, epochs=4)
    assert ("has lines for 4 of the 5 epochs the checkpoint has done (none for stage 1 epoch 2)"
            in warning)
    assert runs.missing_metrics_warning(path, 2, stage=0) is None
    logged = []
    monkeypatch.setattr(runs.logger, "warning", logged.append)
    runs.truncate_metrics(path, 2, stage=1, epochs=4)     # what a resume calls
    assert len(logged) == 1 and "(none for stage 1 epoch 2, stage 2 epoch 1)" in logged[0]


# ---------------------------------------------------------------------------------------
# 9: the console
# ---------------------------------------------------------------------------------------

class Failing:
    def __init__(self, err):
        self.err, self.encoding = err, "utf-8"

    def write(self, text):
        raise self.err

    def flush(self):
        raise self.err


def test_the_console_degrades_quietly(capsys):
    gone = console.Console(Failing(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    assert gone.write("x" * 10) == 10 and gone.broken
    gone.flush()
    full = console.Console(Failing(OSError(errno.ENOSPC, "No space left on device")))
    full.write("a")
    full.write("b")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: stdout cannot be written (No space "
                                                   "left on device); the console output stops here")
    closed = console.Console(None)
    assert closed.write("x") == 1 and not closed.isatty() and not console.is_tty(None)

    class Ascii:
        encoding, written = "ascii", []

        def write(self, text):
            text.encode("ascii")
            self.written.append(text)

    ascii_console = console.Console(Ascii())
    ascii_console.write("caf\u00e9 \U0001f600")
    assert Ascii.written == ["caf\\xe9 \\U0001f600"]


def _script(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", **kw.pop("env", {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, text=True,
                          capture_output=kw.pop("capture", True), timeout=300, **kw)


def test_closed_full_and_ascii_consoles_do_not_stop_an_evaluation(trained, tmp_path):
    argv = ["test.py", "--model_path", trained["run"], "--data", trained["data"], "--workers", "0",
            "--device", "cpu"]
    closed = subprocess.run([sys.executable, *argv], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.close(1), timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            result = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=full,
                                    stderr=subprocess.PIPE, text=True, timeout=300,
                                    env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("warning: stdout cannot be written (No space left on device)") == 1
    unicode_run = tmp_path / "r\u00e9sultat"
    os.symlink(trained["run"], unicode_run)
    result = _script(["test.py", "--model_path", str(unicode_run), *argv[3:]],
                     env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "r\\xe9sultat" in result.stdout and json.loads(result.stdout.splitlines()[-1])["images"] == 4


def test_report_json_into_a_reader_that_stops_early(trained):
    proc = subprocess.Popen([sys.executable, "report.py", trained["run"], "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc.stdout.close()     # the reader leaves before the report is written (head -c 0)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "Broken" not in err, err


def test_dataset_notes_reach_the_training_log(tmp_path, capsys):
    tree = _odd_tree(tmp_path / "tree")
    save = str(tmp_path / "t-")
    assert run_script(train_cifar, ["--dataset", "folder", "--tmp_data_dir", tree, "--save", save,
                                    "--epochs", "1", "--workers", "0", "--device", "cpu",
                                    "--batch_size", "6", "--plot_format", "none", "--layers", "2",
                                    "--init_channels", "4", "--image_size", "12"]) == 0
    [run_dir] = glob.glob(save + "eval-*")
    log = open(os.path.join(run_dir, "log.txt"), encoding="utf-8").read()
    assert f"data: warning: 7 entries of {tree} not read: 2 .gif" in log
