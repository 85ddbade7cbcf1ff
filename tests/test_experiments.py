"""docs/experiments.md's try-outs work: every `bash try-out` block of the page, run in
order in one folder as a user would, each command at a smaller scale still (the flags
below are added to it), each ending with exit status 0."""
import glob
import os
import re
import shlex
import subprocess
import sys

from helpers import ROOT

from visualize import graphviz_available

PAGE = os.path.join(ROOT, "docs", "experiments.md")
# Added to a try-out's command line (later flags win): fewer epochs, images and cells.
SMALLER = {
    "train_search.py": ["--epochs", "2", "--arch_warmup_epochs", "1", "--subset_per_class", "4", "4",
                        "--batch_size", "8", "--image_size", "8", "--plot_format", "none"],
    "train_cifar.py": ["--epochs", "1", "--layers", "2", "--init_channels", "4", "--plot_format", "none"],
    "train_imagenet.py": ["--epochs", "1", "--layers", "2", "--init_channels", "4", "--plot_format",
                          "none"],
}


def try_out_commands() -> list[str]:
    with open(PAGE, encoding="utf-8") as f:
        blocks = re.findall(r"^```bash try-out\n(.*?)^```", f.read(), re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_page_has_a_try_out_per_experiment():
    commands = try_out_commands()
    assert len(commands) >= 12
    for needed in ("--random_space", "--plan darts", "stage1_genotype.json", "--max_skip -1",
                   "--dropout_rate 0.6", "bench_memory.py", "train_imagenet.py"):
        assert any(needed in c for c in commands), needed


def _expand(arg: str, cwd: str) -> str:
    if "*" not in arg:
        return arg
    found = glob.glob(os.path.join(cwd, arg))
    assert len(found) == 1, (arg, found)
    return os.path.relpath(found[0], cwd)


def test_every_try_out_runs(tmp_path):
    cwd = str(tmp_path)
    for command in try_out_commands():
        words = shlex.split(command)
        assert words[0] == "python", command
        script = words[1]
        if script == "visualize.py" and not graphviz_available():
            continue        # diagrams need graphviz's dot (tests/test_visualize.py covers it)
        args = [_expand(a, cwd) for a in words[2:]]
        if "--derive" not in args:
            args += SMALLER.get(os.path.basename(script), [])
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
    assert os.path.isfile(os.path.join(cwd, "runs", "before.json"))
    assert len(glob.glob(os.path.join(cwd, "runs", "search-*"))) == 6
