"""What the README promises a fresh machine, checked against the files its commands use:
the first command's `pip install -r requirements.txt` brings matplotlib (the demo's plots),
in a range the test pin of requirements-dev.txt satisfies; CPU-only users are told how to
get the CPU wheels of torch before that install."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _requirements(name: str) -> dict[str, str]:
    """package -> version specifier, from a requirements file (comments and -r lines skipped)."""
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line)
        out[m.group(1).lower()] = m.group(2).strip()
    return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def test_requirements_bring_matplotlib_for_the_demo_plots():
    # README: the demo's run folder holds alphas.png and curves.png; plots.py draws them
    # only when matplotlib imports, so the first command's install must bring it.
    runtime = _requirements("requirements.txt")
    assert "matplotlib" in runtime, "requirements.txt must list matplotlib (the demo's plots)"
    spec = runtime["matplotlib"]
    assert spec.startswith(">="), f"a range, not a pin: {spec!r}"
    dev = _requirements("requirements-dev.txt")["matplotlib"]
    assert dev.startswith("==")
    assert _version(dev[2:]) >= _version(spec[2:]), "the test pin must lie in the runtime range"
    readme = (ROOT / "README.md").read_text()
    assert "alphas.png" in readme and "curves.png" in readme
    assert "matplotlib >= " + spec[2:] in readme     # the README names the range it installs


def test_readme_tells_cpu_only_users_how_to_get_the_cpu_wheels():
    readme = (ROOT / "README.md").read_text()
    line = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    assert line in readme
    # said before the sections that use the project, beside the install command
    assert readme.index(line) < readme.index("## The paper's commands")
