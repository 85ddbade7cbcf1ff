"""Shared test setup: the project's modules importable, tests on the CPU and quick, and the
pytest fixtures every test module may use. What tests import (tiny command lines, data
writers, script runners) is in helpers.py."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))   # reference.py: the plain paths

torch.set_num_threads(1)  # tiny nets: threads only add overhead, and CI has 2 cores

from helpers import write_cifar_folder, write_image_folder  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Every test starts on one thread without deterministic algorithms and ends with
    the project's log handlers closed, whatever a script it ran set."""
    from runs import close_logging

    det = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(det)
    torch.set_num_threads(threads)
    close_logging()


# The equivalence tests run on this device: cpu (the default, CI), or cuda when
# benchmarks/gpu_check.py runs them on a lent GPU (PDARTS_TEST_DEVICE=cuda).
TEST_DEVICE_ENV = "PDARTS_TEST_DEVICE"


@pytest.fixture
def test_device():
    """The device named by $PDARTS_TEST_DEVICE (default cpu); the test skips when it is
    cuda and none is present. On CUDA, TF32 is off while the test runs (it rounds float32
    convolution inputs to 10-bit mantissas; the float64 proofs do not use it, a float32
    comparison would)."""
    name = os.environ.get(TEST_DEVICE_ENV, "cpu")
    if name not in ("cpu", "cuda"):
        pytest.fail(f"${TEST_DEVICE_ENV}={name!r}: use cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"${TEST_DEVICE_ENV}=cuda but no CUDA device is present")
    if name == "cpu":
        yield torch.device("cpu")
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def fixtures_dir():
    """The authors' checkpoint layouts, kept in the repository (tests/fixtures)."""
    return os.path.join(ROOT, "tests", "fixtures")


@pytest.fixture
def cifar10_dir(tmp_path):
    return write_cifar_folder(str(tmp_path / "data"), 10)


@pytest.fixture
def cifar100_dir(tmp_path):
    return write_cifar_folder(str(tmp_path / "data"), 100)


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(str(tmp_path / "images"))
