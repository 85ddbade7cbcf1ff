"""export.py: tiny networks trained by the training scripts (CIFAR-10, ImageNet, an image
folder) exported to ONNX and TorchScript; the files run in onnxruntime / torch.jit.load on
a batch size other than the traced one and give PyTorch's logits within the stated
tolerance; the metadata says the input shape and normalisation; a failed check writes
nothing; bad input is one line and exit status 2."""
import json
import os

import pytest
import torch
from helpers import only_run_dir, run_script, write_cifar_folder, write_colour_folder, write_image_folder

import export
import train_cifar
import train_imagenet
from data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from engine import load_trained_network, resolve_trained_network
from genotypes import PDARTS, genotype_to_dict
from runs import close_logging

TOLERANCE = export.TOLERANCE   # x max(1, largest |logit|); see export.py for why


@pytest.fixture(autouse=True)
def _close_logs():
    yield
    close_logging()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny training run of each kind, trained once for the whole module."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    cifar = write_cifar_folder(str(root / "cifar"), 10, per_file=4)
    imagenet = root / "imagenet"
    write_image_folder(str(imagenet / "imagenet" / "train"), num_classes=3, per_class=2, size=40)
    write_image_folder(str(imagenet / "imagenet" / "val"), num_classes=3, per_class=1, size=40)
    tree = write_colour_folder(str(root / "tree"), num_classes=3, per_class=10)
    common = ["--epochs", "1", "--workers", "0", "--device", "cpu", "--batch_size", "6",
              "--plot_format", "none"]
    assert run_script(train_cifar, ["--tmp_data_dir", cifar, "--save", str(root / "c-"), *common,
                                    "--layers", "2", "--init_channels", "4", "--auxiliary"]) == 0
    assert run_script(train_imagenet, ["--tmp_data_dir", str(imagenet), "--save", str(root / "i-"),
                                       *common, "--layers", "3", "--init_channels", "4",
                                       "--auxiliary", "--lr_scheduler", "cosine"]) == 0
    assert run_script(train_cifar, ["--dataset", "folder", "--tmp_data_dir", tree, "--save",
                                    str(root / "f-"), *common, "--layers", "2",
                                    "--init_channels", "4", "--image_size", "12"]) == 0
    close_logging()
    return {kind: only_run_dir(str(root / f"{kind[0]}-")) for kind in ("cifar", "imagenet", "folder")}


def run_export(argv, capsys):
    """export.py argv: (exit status, its last-line JSON or None, stdout, stderr)."""
    capsys.readouterr()
    rc = run_script(export, argv)
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else None), out, err


def pytorch_logits(model_path, x):
    """The trained network's logits, rebuilt independently of the export (eval mode)."""
    model = load_trained_network(resolve_trained_network(model_path)).eval()
    with torch.no_grad():
        return model(x)[0]


def assert_close(got, expected):
    assert got.shape == expected.shape
    diff = (got.double() - expected.double()).abs().max().item()
    assert diff <= TOLERANCE * max(1.0, expected.abs().max().item()), diff


EXPECTED = {  # kind: (image size, classes, mean, std, class names)
    "cifar": (32, 10, CIFAR10_MEAN, CIFAR10_STD, None),
    "imagenet": (224, 3, IMAGENET_MEAN, IMAGENET_STD, None),
    "folder": (12, 3, None, None, ["class_0", "class_1", "class_2"]),
}


def expected_for(kind, run_dir):
    size, classes, mean, std, names = EXPECTED[kind]
    if kind == "folder":   # the run's own statistics, kept in its checkpoint
        stats = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["data"]["stats"]
        mean, std = stats["mean"], stats["std"]
    return size, classes, list(mean), list(std), names


@pytest.mark.parametrize("kind", ["cifar", "imagenet", "folder"])
def test_onnx_export_runs_in_onnxruntime_like_pytorch(kind, runs, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    run_dir = runs[kind]
    size, classes, mean, std, names = expected_for(kind, run_dir)
    rc, summary, out, _ = run_export(["--model_path", run_dir], capsys)
    assert rc == 0
    path = os.path.join(run_dir, "network.onnx")
    assert summary["out"] == path and summary["opset"] == export.DEFAULT_OPSET["torchscript"]
    assert summary["input_shape"] == [None, 3, size, size]
    assert summary["mean"] == pytest.approx(mean) and summary["std"] == pytest.approx(std)
    assert summary["max_abs_diff"] <= summary["allowed"]
    assert f"[batch, 3, {size}, {size}]" in out and "largest absolute difference" in out

    proto = onnx.load(path)
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, size, size]
    assert outp.type.tensor_type.shape.dim[1].dim_value == classes
    assert not any("auxiliary" in t.name for t in proto.graph.initializer)
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["pdarts"])
    assert json.loads(props["mean"]) == pytest.approx(mean) and json.loads(props["std"]) == pytest.approx(std)
    assert json.loads(props["input_shape"]) == ["batch", 3, size, size]
    assert meta["classes"] == names and meta["opset"] == summary["opset"]
    assert meta["genotype"] == genotype_to_dict(PDARTS) and meta["network"]["auxiliary"] is False

    # A batch of 5, not the traced 2: the batch dimension is free.
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(7))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["pdarts"] == props["pdarts"]
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert_close(got, pytorch_logits(run_dir, x))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["cifar", "imagenet", "folder"])
def test_torchscript_export_loads_and_matches_pytorch(kind, runs, tmp_path, capsys):
    run_dir = runs[kind]
    size, _, mean, std, names = expected_for(kind, run_dir)
    out = str(tmp_path / "net.pt")
    rc, summary, _, _ = run_export(["--model_path", run_dir, "--format", "torchscript",
                                    "--out", out], capsys)
    assert rc == 0 and summary["out"] == out and summary["opset"] is None
    files = {export.METADATA_FILE: ""}
    loaded = torch.jit.load(out, map_location="cpu", _extra_files=files)
    meta = json.loads(files[export.METADATA_FILE])
    assert meta["input_shape"] == ["batch", 3, size, size] and meta["classes"] == names
    assert meta["mean"] == pytest.approx(mean) and meta["std"] == pytest.approx(std)
    assert not any("auxiliary" in k for k in loaded.state_dict())
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close(loaded(x), pytorch_logits(run_dir, x))


def test_a_bare_state_dict_exports_beside_itself(runs, capsys):
    """weights.pt (a plain state dict, as the authors' checkpoints): sizes read from the
    tensors, written as weights.torchscript.pt."""
    weights = os.path.join(runs["cifar"], "weights.pt")
    rc, summary, _, _ = run_export(["--model_path", weights, "--format", "torchscript"], capsys)
    assert rc == 0 and summary["out"] == os.path.join(runs["cifar"], "weights.torchscript.pt")
    assert summary["mean"] == pytest.approx(list(CIFAR10_MEAN))


def test_the_dynamo_exporter_when_onnxscript_is_installed(runs, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = str(tmp_path / "dynamo.onnx")
    rc, summary, _, _ = run_export(["--model_path", runs["cifar"], "--dynamo", "--out", out], capsys)
    assert rc == 0 and summary["opset"] >= 18
    x = torch.randn(5, 3, 32, 32)
    got = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert_close(torch.from_numpy(got), pytorch_logits(runs["cifar"], x))


def test_a_mismatch_fails_in_one_line_and_writes_nothing(runs, tmp_path, monkeypatch, capsys):
    """The check itself: an exported model that computes something else is refused."""
    real = export.run_torchscript
    monkeypatch.setattr(export, "run_torchscript", lambda data: (lambda x: real(data)(x) + 1e-2))
    out = str(tmp_path / "bad.pt")
    rc, _, _, err = run_export(["--model_path", runs["cifar"], "--format", "torchscript",
                                "--out", out], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "does not match PyTorch" in err and "nothing written" in err
    assert not os.path.exists(out)


def test_missing_onnx_packages_say_how_to_install(runs, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)   # import fails
    rc, _, _, err = run_export(["--model_path", runs["cifar"]], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "pip install onnx onnxruntime" in err


def fake_search_run(folder, with_checkpoint=True) -> str:
    os.makedirs(folder, exist_ok=True)
    if with_checkpoint:
        torch.save({"kind": "pdarts-search", "version": 1, "model": {"w": torch.ones(1)}},
                   os.path.join(folder, "checkpoint.pt"))
    with open(os.path.join(folder, "genotype.json"), "w") as f:
        json.dump(genotype_to_dict(PDARTS), f)
    return str(folder)


@pytest.mark.parametrize("what,message", [
    ("search_run", "is a train_search.py checkpoint"),
    ("search_checkpoint", "is a train_search.py checkpoint"),
    ("search_run_without_checkpoint", "is a search run folder"),
    ("genotype", "is a genotype JSON file"),
    ("missing", "checkpoint not found"),
])
def test_bad_input_is_one_line_and_exit_2(what, message, tmp_path, capsys):
    search = tmp_path / "search"
    path = {"search_run": lambda: fake_search_run(search),
            "search_checkpoint": lambda: os.path.join(fake_search_run(search), "checkpoint.pt"),
            "search_run_without_checkpoint": lambda: fake_search_run(search, False),
            "genotype": lambda: os.path.join(fake_search_run(search, False), "genotype.json"),
            "missing": lambda: str(tmp_path / "nowhere" / "checkpoint.pt")}[what]()
    rc, _, _, err = run_export(["--model_path", path, "--format", "torchscript"], capsys)
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    if what != "missing":   # what to do instead: train the cell first
        assert "train_cifar.py --arch" in err and "export.py exports a trained network" in err
