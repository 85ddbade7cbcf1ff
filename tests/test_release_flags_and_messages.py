"""The release's command lines (issue 32): its --gpu, test.py's --cutout/--cutout_length and
a float --report_freq accepted, each flag without effect named in the log; prefix matching
off (``--epoch 1`` refused, with the flag meant); and the messages a newcomer meets: a
class-folder tree given as CIFAR, RUN/weights.pt of an image-folder run, the advice to
pass --skip_bad_images once it is given, the colours of the ops, report.py's help, and a
torchvision built for another torch."""
import os
import subprocess
import sys

import pytest
from helpers import ROOT, load_test_script, only_run_dir, run_script, run_test_script, write_colour_folder

import flags
import train_cifar
import train_imagenet
import train_search
from errors import torchvision_error_line
from runs import close_logging

SCRIPTS = {"search": train_search, "cifar": train_cifar, "imagenet": train_imagenet}


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    close_logging()


def _parse(script, argv):
    return (load_test_script() if script == "test" else SCRIPTS[script]).parse_args(argv)


@pytest.mark.parametrize("script", ["search", "cifar", "imagenet", "test"])
def test_the_release_s_gpu_and_float_report_freq_are_accepted(script):
    args = _parse(script, ["--gpu", "0", "--report_freq", "50.0"])
    assert args.report_freq == 50 and isinstance(args.report_freq, int)
    assert _no_effect(args) == [f"--gpu 0 has no effect here: {flags.NO_EFFECT['gpu']}"]
    assert _no_effect(_parse(script, [])) == []


def _no_effect(args) -> list[str]:
    """The no-effect lines a script logs: a run's config holds them, test.py's flags tell."""
    return list(args.no_effect) if hasattr(args, "no_effect") else flags.no_effect_lines(args)


@pytest.mark.parametrize("script", ["search", "cifar", "imagenet", "test"])
@pytest.mark.parametrize("argv, says", [
    (["--epoch", "1"], "unrecognized arguments: --epoch 1 (--epoch: did you mean --epochs?)"),
    (["--report_freq", "12.5"], "argument --report_freq: must be an integer >= 1"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
])
def test_prefixes_and_misspelt_flags_are_refused(script, argv, says, capsys):
    if script == "test" and argv[0] == "--epoch":
        argv, says = ["--model_pat", "x"], "(--model_pat: did you mean --model_path?)"
    with pytest.raises(SystemExit) as info:
        _parse(script, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and says in err[0], err


def test_test_py_takes_the_release_s_cutout_flags_and_says_they_do_nothing(cifar10_dir, tmp_path,
                                                                            capsys):
    save = str(tmp_path / "runs") + os.sep
    assert run_script(train_cifar, ["--tmp_data_dir", cifar10_dir, "--epochs", "1", "--layers", "2",
                                    "--init_channels", "4", "--batch_size", "50", "--workers", "0",
                                    "--save", save, "--device", "cpu", "--gpu", "0"]) == 0
    run_dir = only_run_dir(save)
    assert "--gpu 0 has no effect here" in open(os.path.join(run_dir, "log.txt")).read()
    capsys.readouterr()
    assert run_script(load_test_script(), [
        "--model_path", run_dir, "--data", cifar10_dir, "--gpu", "0", "--cutout",
        "--cutout_length", "16", "--report_freq", "50.0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert '"images": 20' in out.splitlines()[-1]
    assert "--gpu 0 has no effect here" in out
    assert "--cutout has no effect here: evaluation takes the images as they are" in out
    assert "--cutout_length 16 has no effect here" in out


def test_a_class_folder_tree_given_as_cifar_says_to_add_dataset_folder(tmp_path, capsys):
    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=2, per_class=2)
    for module in (train_cifar, train_search):
        capsys.readouterr()
        assert run_script(module, ["--tmp_data_dir", tree, "--save", str(tmp_path / "r-"),
                                   "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "looks like an image folder" in err[0]
        assert "add --dataset folder" in err[0]
    # An empty or unrelated folder keeps the plain message.
    (tmp_path / "empty").mkdir()
    assert run_script(train_cifar, ["--tmp_data_dir", str(tmp_path / "empty"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "image folder" not in err and "--download" in err


def test_weights_pt_of_a_folder_run_points_to_the_run_folder(tmp_path, capsys):
    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=3, per_class=10)
    save = str(tmp_path / "runs") + os.sep
    assert run_script(train_cifar, ["--dataset", "folder", "--tmp_data_dir", tree, "--epochs", "1",
                                    "--layers", "2", "--init_channels", "4", "--batch_size", "8",
                                    "--image_size", "12", "--workers", "0", "--save", save,
                                    "--device", "cpu"]) == 0
    run_dir = only_run_dir(save)
    rc, _, err = run_test_script(["--model_path", os.path.join(run_dir, "weights.pt"),
                                  "--data", str(tmp_path / "nowhere"), "--device", "cpu"], capsys)
    err = err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cifar10 not found" in err[0]
    assert f"give the run folder instead (--model_path {os.path.abspath(run_dir)})" in err[0]
    rc, result, _ = run_test_script(["--model_path", run_dir, "--device", "cpu"], capsys)
    assert rc == 0 and result["dataset"] == "folder"


def test_left_out_images_are_not_followed_by_the_advice_to_leave_them_out(tmp_path):
    from data import drop_unreadable, read_image, scan_folder
    tree = write_colour_folder(str(tmp_path / "tree"), num_classes=2, per_class=3)
    bad = os.path.join(tree, "class_1", "zz.jpg")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(Exception) as info:
        read_image(bad)
    assert "pass --skip_bad_images" in str(info.value)      # not given yet: say it
    kept, reasons = drop_unreadable(scan_folder(tree))
    assert len(kept) == 6 and len(reasons) == 1
    assert reasons[0].startswith(f"cannot read image {bad}: ") and "--skip_bad_images" not in reasons[0]


def test_every_op_of_the_search_space_has_a_hue_of_its_own():
    import colorsys
    import itertools

    from genotypes import OP_COLORS, PRIMITIVES

    hues, greys = {}, []
    for op in PRIMITIVES:
        rgb = [int(OP_COLORS[op][i:i + 2], 16) / 255 for i in (1, 3, 5)]
        hue, _, saturation = colorsys.rgb_to_hls(*rgb)
        (greys.append(op) if saturation < 0.15 else hues.__setitem__(op, hue * 360))
    assert greys == ["none"]
    for a, b in itertools.combinations(hues, 2):     # the old greens were 11 degrees apart
        gap = abs(hues[a] - hues[b])
        assert min(gap, 360 - gap) >= 25, (a, b)


def test_report_help_says_its_first_sentence_once(capsys):
    import report
    with pytest.raises(SystemExit):
        report.parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.count("Summarise many runs") == 1 and "python report.py runs/" in out


def test_a_torchvision_built_for_another_torch_is_one_line():
    error = RuntimeError("operator torchvision::nms does not exist")
    line = torchvision_error_line(error, "2.5.1+cpu", "0.21.0")
    assert line.startswith("torchvision 0.21.0 is built for torch 2.6, not for the installed torch "
                           "2.5.1+cpu (import torchvision failed: RuntimeError: operator "
                           "torchvision::nms does not exist)")
    assert "pip install torchvision==0.20.1" in line and "\n" not in line
    assert "--index-url https://download.pytorch.org/whl/cpu" in line
    assert "pip install -r requirements.txt" in torchvision_error_line(
        ModuleNotFoundError("No module named 'torchvision'"), "2.5.1", None)
    same = torchvision_error_line(OSError("libc10.so: cannot open"), "2.5.1", "0.20.1")
    assert "cannot be imported with torch 2.5.1" in same and "torchvision==0.20.1" in same


def test_a_script_stops_with_that_line_when_torchvision_does_not_import(tmp_path):
    """A fake torchvision 0.99.0 that fails as a mismatched wheel does: the script prints one
    line and exits with status 2, no traceback (every script imports torchvision first
    through data.py)."""
    fake = tmp_path / "site"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    (fake / "torchvision-0.99.0.dist-info").mkdir()
    (fake / "torchvision-0.99.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    for script in ("train_cifar.py",):
        done = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1, done.stderr
        assert err[0].startswith("error: torchvision 0.99.0 is built for torch 2.84")
        assert "pip install torchvision==" in err[0]
