"""benchmarks/gpu_check.py: the command prepared for a lent GPU runs end to end on the CPU
(--tiny), writes every part into results.json / results.md, and a part that overruns its
time box is killed and recorded while the parts after it still run."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402

STATUSES = {"ok", "skipped", "failed"}


def _untracked() -> set[str] | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


def _check_figures(figures: dict, where: str) -> None:
    for name, value in figures.items():
        assert value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)), \
            f"{where}: {name} = {value!r}"


def test_tiny_cpu_run_records_every_part(tmp_path, capsys):
    out = tmp_path / "gc"
    before = _untracked()
    rc = gpu_check.main(["--out", str(out), "--device", "cpu", "--tiny"])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    parts = {p["name"]: p for p in results["parts"]}
    failed = {n: (p["error"], [r.get("error") for r in p["rows"] if r["status"] == "failed"])
              for n, p in parts.items() if p["status"] == "failed"}
    assert rc == 0 and not failed, failed

    assert results["format"] == "pdarts-gpu-check" and results["version"] == 1
    assert results["device"] == "cpu" and results["tiny"] is True
    assert results["environment"]["torch"] and results["environment"]["python"]
    assert [p["id"] for p in results["parts"]] == [pid for pid, _, _ in gpu_check.PARTS]
    for p in results["parts"]:
        assert p["status"] in STATUSES, p["name"]
        _check_figures(p["summary"], p["name"])
        for row in p["rows"]:
            assert row["status"] in STATUSES and row["label"], (p["name"], row)
            assert row["command"], (p["name"], row["label"])
            _check_figures(row["figures"], f"{p['name']}: {row['label']}")
            if row["status"] == "ok":
                assert row["figures"], (p["name"], row["label"])
            else:
                assert row.get("reason") or row.get("error"), (p["name"], row["label"])
    # On a CPU the parts that need CUDA are skipped, saying why; the rest ran.
    assert parts["cuda_tests"]["status"] == "skipped" and "CUDA" in parts["cuda_tests"]["reason"]
    assert parts["nccl"]["status"] == "skipped" and "2 CUDA GPUs" in parts["nccl"]["reason"]
    equivalence = parts["equivalence_tests"]
    assert equivalence["status"] == "ok" and equivalence["summary"]["passed"] == 1
    assert "PDARTS_TEST_DEVICE=cpu" in equivalence["command"]

    search = {r["label"]: r for r in parts["search_step"]["rows"]}
    for stage in (1, 2, 3):
        for path in gpu_check.SEARCH_PATHS:
            assert search[f"stage {stage}, {path}"]["figures"]["images_per_sec"] > 0
        assert search[f"stage {stage}, default"]["figures"]["vs_plain"] > 0
        assert search[f"stage {stage}, memory estimate"]["figures"]["needed_mib"] > 0
        assert search[f"stage {stage}, default+compile"]["status"] == "skipped"   # --tiny
    projection = parts["projection"]["summary"]
    assert projection["total_minutes"] > 0 and projection["epochs"] == 25
    assert projection["arch_warmup_epochs"] == 10 and projection["validation_epochs"] == 4
    assert [r["label"] for r in parts["projection"]["rows"]] == ["stage 1", "stage 2", "stage 3"]
    train = {r["label"]: r for r in parts["train_step"]["rows"]}
    assert train["cifar, default"]["figures"]["images_per_sec"] > 0
    assert train["imagenet, default"]["figures"]["images_per_sec"] > 0
    assert parts["checkpoint_cells"]["summary"]["time_ratio"] > 0
    assert parts["checkpoint_cells"]["summary"]["estimate_activations_ratio"] > 1

    md = (out / "results.md").read_text()
    for pid, _, _ in gpu_check.PARTS:
        assert f"## Part {pid}:" in md
    assert "stage 2, default+channels_last" in md and "`python benchmarks/gpu_check.py" in md
    assert "gpu_check: cpu" in printed and "[skipped] 1a cuda_tests" in printed
    # Nothing left behind: the scratch folder (caches, pytest's tmp_path) is removed and
    # no new file appeared in the repository.
    assert not (out / "tmp").exists()
    assert (out / "logs" / "worker.log").exists()
    if before is not None:
        assert _untracked() == before


FAKE_WORKER = textwrap.dedent("""
    # Emulates the worker: part 3 (a 1-s time box) hangs in its second measurement, part 5
    # finishes.
    import sys, time
    sys.path.insert(0, {bench!r})
    import gpu_check
    out, end = sys.argv[1], float(sys.argv[4])
    pending, selected = sys.argv[2].split(","), sys.argv[3].split(",")
    for name in pending:
        part = gpu_check.start_part(out, name, selected, end, 1.0 if name == "projection" else None)
        part.measure("quick", "cmd", lambda: {{"x": 1.0}})
        if name == "projection":
            part.measure("hangs", "cmd", lambda: time.sleep(120))
        part.finish({{"y": 2}})
""")


def test_a_part_past_its_time_box_is_killed_and_the_next_parts_run(tmp_path):
    out = tmp_path / "gc"
    for sub in ("parts", "logs"):
        (out / sub).mkdir(parents=True)
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER.format(bench=os.path.join(ROOT, "benchmarks")))
    args = SimpleNamespace(out=str(out), device="cpu", tiny=True)
    selected = ["projection", "checkpoint_cells"]

    def command(args, pending, selected, end):
        return [sys.executable, str(script), args.out, ",".join(pending), ",".join(selected), repr(end)]

    t0 = time.time()
    gpu_check.run_worker_parts(selected, selected, args, dict(os.environ), time.time() + 60,
                               grace=1.0, command=command)
    assert time.time() - t0 < 30
    hung = json.loads((out / "parts" / "projection.json").read_text())
    assert hung["status"] == "failed"
    assert re.search(r"timed out after \d+ s \(time box 1 s \+ 1 s grace\), killed during 'hangs'",
                     hung["error"]), hung["error"]
    assert [(r["label"], r["status"]) for r in hung["rows"]] == [("quick", "ok"), ("hangs", "failed")]
    assert hung["rows"][0]["figures"] == {"x": 1.0}
    after = json.loads((out / "parts" / "checkpoint_cells.json").read_text())
    assert after["status"] == "ok" and after["summary"] == {"y": 2.0}
    assert after["rows"][0]["status"] == "ok"      # a fresh worker, the time left as its box
    assert "== part 5 checkpoint_cells" in (out / "logs" / "worker.log").read_text()


def test_every_cuda_only_test_is_run_by_the_check():
    """A new test that skips without CUDA must be in gpu_check.CUDA_TESTS."""
    found = set()
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not name.endswith(".py"):
            continue
        text = open(os.path.join(ROOT, "tests", name), encoding="utf-8").read()
        for m in re.finditer(r"skipif\(not torch\.cuda\.is_available\(\).*?\ndef (\w+)", text, re.S):
            found.add(f"tests/{name}::{m.group(1)}")
    assert found and found == set(gpu_check.CUDA_TESTS)


def test_time_boxes_share_the_time_left():
    order = gpu_check.ORDER
    assert sum(gpu_check.SHARES.values()) == 480
    # At the start every part gets its share of the 480 s ...
    assert gpu_check.box_seconds("search_step", order, 0.0, 480.0) == pytest.approx(150)
    # ... and time left unused by earlier parts goes to the later ones in proportion.
    assert gpu_check.box_seconds("cuda_tests", order, 300.0, 480.0) == pytest.approx(180)
    assert gpu_check.box_seconds("nccl", order, 470.0, 480.0) == 0
