"""Checkpoint saving/loading and compatibility with the authors' checkpoint layouts."""
import json
import os

import pytest
import torch

from checkpoint import CheckpointError, extract_state_dict, load_file, load_weights, save_atomic
from genotypes import DARTS_V2, PDARTS
from model import NetworkCIFAR, NetworkImageNet


def _fixture(fixtures_dir, name):
    with open(os.path.join(fixtures_dir, name)) as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


def _state_from_shapes(shapes):
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            assert shape == ()
            state[k] = torch.tensor(0, dtype=torch.long)
        else:
            state[k] = torch.randn(shape, generator=g)
    return state


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


NETS = {
    "statedict_cifar_pdarts.json": lambda: NetworkCIFAR(36, 10, 20, True, PDARTS),
    "statedict_imagenet_pdarts.json": lambda: NetworkImageNet(48, 1000, 14, True, PDARTS),
}


@pytest.mark.parametrize("fixture", sorted(NETS))
def test_state_dict_matches_authors_layout(fixtures_dir, fixture):
    expected = _fixture(fixtures_dir, fixture)
    got = _shapes(NETS[fixture]())
    assert set(got) == set(expected), (sorted(set(got) ^ set(expected))[:10])
    assert got == expected


@pytest.mark.parametrize("layout", ["plain", "module", "wrapped"])
@pytest.mark.parametrize("fixture", sorted(NETS))
def test_authors_checkpoint_layouts_load(fixtures_dir, fixture, layout):
    state = _state_from_shapes(_fixture(fixtures_dir, fixture))
    if layout == "module":
        obj = {"module." + k: v for k, v in state.items()}
    elif layout == "wrapped":
        obj = {"state_dict": state, "epoch": 249, "best_acc_top1": 75.6}
    else:
        obj = state
    net = NETS[fixture]()
    load_weights(net, obj)
    loaded = net.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_load_through_a_file(tmp_path):
    src = NetworkCIFAR(4, 10, 5, True, PDARTS)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    path = str(tmp_path / "weights.pt")
    save_atomic({"model": src.state_dict(), "epoch": 3}, path)
    dst = NetworkCIFAR(4, 10, 5, True, PDARTS)
    load_weights(dst, load_file(path), source=path)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def _mismatch(src, dst):
    with pytest.raises(CheckpointError) as info:
        load_weights(dst, src.state_dict(), source="ckpt.pt")
    return str(info.value)


def test_missing_auxiliary_head_is_explained():
    msg = _mismatch(NetworkCIFAR(36, 10, 20, False, PDARTS), NetworkCIFAR(36, 10, 20, True, PDARTS))
    assert "missing" in msg and "auxiliary_head." in msg
    assert "--auxiliary" in msg and "ckpt.pt" in msg


def test_unexpected_auxiliary_head_is_explained():
    msg = _mismatch(NetworkCIFAR(36, 10, 20, True, PDARTS), NetworkCIFAR(36, 10, 20, False, PDARTS))
    assert "unexpected" in msg and "auxiliary_head." in msg and "--auxiliary" in msg


def test_wrong_number_of_classes_is_explained():
    msg = _mismatch(NetworkCIFAR(36, 100, 20, True, PDARTS), NetworkCIFAR(36, 10, 20, True, PDARTS))
    assert "classes" in msg and "classifier" in msg and "[100, 768]" in msg


def test_wrong_init_channels_is_explained():
    msg = _mismatch(NetworkCIFAR(16, 10, 20, True, PDARTS), NetworkCIFAR(36, 10, 20, True, PDARTS))
    assert "--init_channels" in msg and "shape" in msg


def test_wrong_arch_is_explained():
    msg = _mismatch(NetworkCIFAR(36, 10, 20, True, DARTS_V2), NetworkCIFAR(36, 10, 20, True, PDARTS))
    assert "--arch" in msg


@pytest.mark.parametrize("layers", [14, 8])
def test_fewer_layers_is_explained(layers):
    msg = _mismatch(NetworkCIFAR(36, 10, layers, True, PDARTS),
                    NetworkCIFAR(36, 10, 20, True, PDARTS))
    assert "--layers" in msg and "--arch" not in msg


def test_cifar_checkpoint_into_imagenet_net_is_explained():
    msg = _mismatch(NetworkCIFAR(36, 10, 20, True, PDARTS),
                    NetworkImageNet(48, 1000, 14, True, PDARTS))
    assert "dataset" in msg


def test_failed_load_leaves_network_untouched():
    dst = NetworkCIFAR(4, 10, 5, True, PDARTS)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    src = NetworkCIFAR(4, 100, 5, True, PDARTS)
    with pytest.raises(CheckpointError):
        load_weights(dst, src.state_dict())
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_extract_state_dict_layouts_and_garbage():
    t = torch.zeros(1)
    assert extract_state_dict({"module.a": t, "module.b": t}).keys() == {"a", "b"}
    assert extract_state_dict({"model": {"a": t}, "epoch": 1}).keys() == {"a"}
    assert extract_state_dict({"state_dict": {"module.a": t}}).keys() == {"a"}
    # a prefix on only some keys is not DataParallel's: leave it
    assert extract_state_dict({"module.a": t, "b": t}).keys() == {"module.a", "b"}
    for bad in ([t], {}, {"epoch": 3}, "weights", {"a": 1.0}):
        with pytest.raises(CheckpointError):
            extract_state_dict(bad)


def test_corrupt_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_file(str(path))


def test_truncated_file_raises_checkpoint_error(tmp_path):
    path = str(tmp_path / "ok.pt")
    save_atomic({"w": torch.randn(100, 100)}, path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_file(path)


def test_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_file(str(tmp_path / "nope.pt"))


class Payload:
    """An arbitrary pickled object: weights_only loading must refuse it."""

    def __init__(self):
        self.x = 1


def test_arbitrary_objects_are_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    save_atomic({"obj": Payload()}, path)
    with pytest.raises(CheckpointError, match="Python objects beyond tensors") as info:
        load_file(path)
    assert "Payload" in str(info.value) and "weights_only=False" not in str(info.value)


GENOTYPE_JSON = json.dumps({"normal": [["sep_conv_3x3", 0]], "normal_concat": [2],
                            "reduce": [["max_pool_3x3", 1]], "reduce_concat": [2]})


@pytest.mark.parametrize("name,content,says", [
    ("genotype.json", GENOTYPE_JSON.encode(), "is a genotype JSON file"),
    ("other.json", b'{"epoch": 1}', "is a JSON file"),
    ("log.txt", b"2024-01-01 12:00:00 args = ...\nmore\n", "is a text file (it begins '2024-01-01"),
    ("alphas.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "is a PNG image"),
    ("random.bin", bytes(range(256)) * 4, "corrupt, truncated or not a PyTorch checkpoint"),
])
def test_a_file_that_is_not_a_checkpoint_is_named_and_torch_s_advice_is_not_relayed(
        tmp_path, name, content, says):
    """torch.load's error suggests weights_only=False: wrong advice for an image or a JSON
    file, and unsafe for a real file. The message says what the file is instead."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_file(str(path), genotype_hint="give it as --arch")
    message = str(info.value)
    assert says in message and "weights_only" not in message and "\n" not in message
    assert ("give it as --arch" in message) == name.startswith("genotype")


def test_save_atomic_round_trip_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 7, "lr": 0.025,
           "note": "x", "ints": [1, 2]}
    save_atomic(obj, path)
    save_atomic({**obj, "epoch": 8}, path)  # overwrite in place
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    back = load_file(path)
    assert back["epoch"] == 8 and back["lr"] == 0.025 and back["ints"] == [1, 2]
    assert torch.equal(back["model"]["w"], obj["model"]["w"])


def test_save_atomic_failure_leaves_no_temp_and_keeps_old(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_atomic({"epoch": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_atomic({"f": lambda: None}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_file(path) == {"epoch": 1}
