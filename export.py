"""Export a trained network for deployment: ONNX (onnxruntime, TensorRT, OpenVINO, mobile
runtimes) or TorchScript, checked against PyTorch before the file is written::

    python export.py --model_path RUN_DIR                        # RUN_DIR/network.onnx
    python export.py --model_path RUN_DIR --format torchscript   # RUN_DIR/network.torchscript.pt
    python export.py --model_path cifar10_model.pt --auxiliary --out pdarts.onnx
        # the authors' checkpoints, read as test.py reads them (--arch when not PDARTS)

The network is rebuilt exactly as test.py rebuilds it (``engine.resolve_trained_network``)
and exported in eval mode: batch-norm running statistics, no drop path, no auxiliary head.
The one input is ``input``, float32 ``[batch, 3, S, S]`` with S the training size (32 on
CIFAR, 224 on ImageNet, the run's ``--image_size`` for an image folder) and the batch
dimension free; the one output is ``logits``, ``[batch, classes]`` (no softmax). Images
are RGB, scaled to [0, 1] and normalised per channel with the mean and std the network
was trained with; these, the input shape and the classes are printed and stored in the
file (ONNX ``metadata_props``; TorchScript ``_extra_files["pdarts.json"]``).

Before writing, the exported model and the PyTorch model run on the same random batches
(the traced batch size and another, which proves the batch dimension free); the largest
absolute difference of the logits is printed and must stay within ``--tolerance`` x
max(1, largest |logit|), else nothing is written. The last line is JSON for machines.

ONNX needs the optional packages ``onnx`` and ``onnxruntime`` (``pip install onnx
onnxruntime``); TorchScript needs nothing beyond torch.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import sys
import warnings
from typing import Any

import torch
import torch.nn as nn

from checkpoint import checkpoint_genotype
from engine import TrainedNetwork, load_trained_network, resolve_trained_network
from errors import StorageError, UserError, special_path, write_bytes_atomic
from flags import ArgumentParser, HelpFormatter, int_at_least, positive_float
from genotypes import check_same_cell, format_genotype, genotype_to_dict
from run_files import CHECKPOINT
from runs import run_main, setup_logging
from utils import logger

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_FILE = "pdarts.json"     # TorchScript: the metadata's name among _extra_files
# Opset 17 is read by every current runtime (onnxruntime >= 1.13, TensorRT >= 8.6) and has
# every operator these networks use; the torch.export-based exporter starts at 18.
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
# float32 logits of the same network computed by two runtimes differ by rounding only:
# other summation orders in convolutions, batch norm folded into them. That is ~1e-7 of
# the logits' scale per layer, ~1e-6 after the ~100 layers of a 20-cell network; 1e-4
# leaves two orders of margin, while a real export fault (training-mode batch norm, a
# wrong padding or stride, a dropped operation) moves the logits by ~1e-1 of their scale.
TOLERANCE = 1e-4
TRACE_BATCH = 2      # the batch size traced; not 1, which a tracer may treat as a constant
CHECK_BATCH = 3      # another batch size: the exported file must accept it


class ExportError(UserError):
    """The exporter failed, or the exported model does not compute what PyTorch does."""


class Logits(nn.Module):
    """The deployed computation: the network's logits alone (eval mode: no auxiliary
    output, no drop path)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[0]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Export a trained network to ONNX or TorchScript (eval mode, fixed image "
                    "size, free batch size), checked against PyTorch before it is written.",
        formatter_class=HelpFormatter)
    p.add_argument("--model_path", type=str, default=None,
                   help="a train_cifar.py / train_imagenet.py run folder or checkpoint.pt, or a "
                        "state dict (weights.pt, the authors' checkpoints)")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="file format")
    p.add_argument("--out", type=str, default=None,
                   help="file to write (default: beside the checkpoint, network.onnx or "
                        "network.torchscript.pt for a run, else the checkpoint's name)")
    p.add_argument("--opset", type=int_at_least(7), default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET['torchscript']}, "
                        f"{DEFAULT_OPSET['dynamo']} with --dynamo)")
    p.add_argument("--dynamo", action="store_true",
                   help="ONNX through torch.export (torch.onnx.export(dynamo=True); needs "
                        "pip install onnxscript) instead of the TorchScript-based exporter")
    p.add_argument("--tolerance", type=positive_float, default=TOLERANCE,
                   help="largest allowed |exported - PyTorch| of the logits, times "
                        "max(1, largest |logit|)")
    # What test.py needs to rebuild a bare state dict; this project's checkpoints need none.
    p.add_argument("--dataset", choices=["cifar10", "cifar100", "demo", "imagenet"], default=None,
                   help="a state dict's dataset: sets the network kind, classes, image size and "
                        "normalisation (default: the checkpoint's, else read from the weights)")
    p.add_argument("--cifar100", action="store_true", help="the release's --dataset cifar100")
    p.add_argument("--arch", type=str, default=None,
                   help="cell name (any case), genotype JSON file or search run folder (default: "
                        "the checkpoint's, else PDARTS)")
    p.add_argument("--auxiliary", action="store_true", default=None,
                   help="the checkpoint has an auxiliary head (default: read from it; never "
                        "exported)")
    p.add_argument("--init_channels", type=int_at_least(2), default=None,
                   help="C (default: read from the checkpoint)")
    p.add_argument("--layers", type=int_at_least(2), default=None,
                   help="cells (default: read from the checkpoint)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def default_out(trained: TrainedNetwork, fmt: str) -> str:
    """A run's ``network.<ext>`` beside its checkpoint.pt; a state dict's own name with
    the format's extension (``weights.pt`` -> ``weights.onnx``)."""
    folder = os.path.dirname(trained.path)
    if trained.ours and os.path.basename(trained.path) == CHECKPOINT:
        return os.path.join(folder, "network" + FORMATS[fmt])
    name = os.path.basename(trained.path)
    for suffix in (".pth.tar", ".tar", ".pth", ".pt"):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return os.path.join(folder, name + FORMATS[fmt])


def check_out(out: str) -> None:
    """``--out`` must be a regular file (replaced) or a new path: the file is written
    beside it and renamed over it, which would replace a device (``/dev/full``), a FIFO or
    a symbolic link by a regular file."""
    what = special_path(out)
    if what is None and os.path.islink(out):
        what = f"a symbolic link to {os.readlink(out)}"
    if what is not None:
        raise UserError(f"--out {out} is {what}; export.py writes only a regular file or a new "
                        "path (it never replaces a device, a pipe, a folder or a link): give "
                        "another --out" + (f", or the link's target {os.path.realpath(out)}"
                                           if os.path.islink(out) else ""))


def preprocessing(trained: TrainedNetwork) -> str:
    """How an image becomes the network's input, in words (as the test transforms do)."""
    size = trained.image_size
    if trained.info["kind"] == "imagenet":
        geometry = f"resize the shorter side to 256, centre-crop {size}x{size}"
    elif trained.dataset == "folder":
        geometry = f"resize the shorter side to {size}, centre-crop {size}x{size}"
    else:
        geometry = f"{size}x{size} images as they are"
    return (f"{geometry}; RGB, channels first (NCHW), values scaled to [0, 1], then "
            "(x - mean) / std per channel")


def metadata(trained: TrainedNetwork, fmt: str, opset: int | None, source: str) -> dict[str, Any]:
    """What a deployment needs to feed the network and read its output."""
    size, info = trained.image_size, trained.info
    classes = trained.data_info.get("classes") if trained.data_info else None
    return {
        "producer": "P-DARTS export.py", "source": source, "format": fmt, "opset": opset,
        "input_name": INPUT_NAME, "input_shape": ["batch", 3, size, size], "input_dtype": "float32",
        "output_name": OUTPUT_NAME, "output_shape": ["batch", info["num_classes"]],
        "output": "logits (no softmax)",
        "mean": list(trained.mean), "std": list(trained.std),
        "preprocessing": preprocessing(trained), "dataset": trained.dataset, "classes": classes,
        "network": {**info, "auxiliary": False}, "genotype": genotype_to_dict(trained.genotype),
    }


def require_onnx():
    """onnx and onnxruntime, or one line saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(f"--format onnx needs the optional packages onnx and onnxruntime ({e}): "
                        "pip install onnx onnxruntime (or use --format torchscript)") from None
    return onnx, onnxruntime


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


@contextlib.contextmanager
def quiet_tracing():
    """Silence what tracing says on every call and does not concern this export: the
    deprecation of torch.jit and of the TorchScript-based ONNX exporter (torch 2.9+), and
    the tracer's note that a shape comparison becomes a constant (FactorizedReduce's
    odd-size padding, which depends on the image size only: fixed here, as it must be)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def export_onnx(module: nn.Module, example: torch.Tensor, opset: int, dynamo: bool):
    """The ONNX model (a ModelProto), batch dimension free."""
    onnx, _ = require_onnx()
    export = torch.onnx.export
    if dynamo:
        try:
            import onnxscript  # noqa: F401 - the torch.export-based exporter needs it
        except ImportError:
            raise UserError("--dynamo needs the package onnxscript: pip install onnxscript "
                            "(or leave out --dynamo)") from None
        kwargs = {"dynamo": True, "dynamic_shapes": ({0: torch.export.Dim("batch")},),
                  "verbose": False}
    else:
        kwargs = {"dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}}
        if "dynamo" in inspect.signature(export).parameters:   # torch >= 2.5
            kwargs["dynamo"] = False
    buffer = io.BytesIO()
    try:
        with quiet_tracing():
            result = export(module, (example,), None if dynamo else buffer,
                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                            opset_version=opset, **kwargs)
    except Exception as e:  # noqa: BLE001 - any exporter failure: one line, and the way out
        if "opset" in _first_line(e).lower():   # --dynamo cannot write it either
            raise ExportError(f"the ONNX export failed ({_first_line(e)}): "
                              f"{opset_advice(opset, dynamo)}") from None
        raise ExportError(f"the ONNX export failed ({_first_line(e)}); try --format "
                          f"torchscript{'' if dynamo else ' or --dynamo'}") from None
    return result.model_proto if dynamo else onnx.load_from_string(buffer.getvalue())


def opset_advice(opset: int, dynamo: bool) -> str:
    """Which opsets this torch's exporter writes, as far as it says (a private constant of
    torch.onnx: without it, only the default is named)."""
    exporter = "torch.export-based" if dynamo else "TorchScript-based"
    default = DEFAULT_OPSET["dynamo" if dynamo else "torchscript"]
    try:
        from torch.onnx import _constants as c
        low = DEFAULT_OPSET["dynamo"] if dynamo else c.ONNX_MIN_OPSET
        high = c.ONNX_MAX_OPSET if dynamo else c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except (ImportError, AttributeError):
        return (f"the {exporter} exporter of this torch does not write opset {opset}; use a "
                f"lower --opset (default {default})")
    return (f"the {exporter} exporter of this torch writes opsets {low} to {high}, not {opset}; "
            f"use --opset {low}..{high} (default {default})")


def set_onnx_metadata(proto, meta: dict) -> None:
    """Every field as JSON under ``pdarts``; the fields a runtime needs first also on their
    own (each JSON too). Then the ONNX checker."""
    onnx, _ = require_onnx()
    props = {"pdarts": json.dumps(meta)}
    props.update({k: json.dumps(meta[k]) for k in ("input_shape", "mean", "std", "classes")})
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)


def onnx_opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def run_onnx(data: bytes):
    """A function: a float32 batch -> the ONNX model's logits, run by onnxruntime."""
    _, ort = require_onnx()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def export_torchscript(module: nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    """The traced module saved with the metadata as ``_extra_files[METADATA_FILE]``."""
    try:
        with quiet_tracing():
            traced = torch.jit.trace(module, (example,), check_trace=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the TorchScript trace failed ({_first_line(e)}); try --format onnx") from None
    buffer = io.BytesIO()
    with quiet_tracing():
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: json.dumps(meta)})
    return buffer.getvalue()


def run_torchscript(data: bytes):
    """A function: a float32 batch -> the TorchScript model's logits."""
    with quiet_tracing():
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return lambda x: loaded(x)


def largest_difference(module: nn.Module, run_exported, image_size: int) -> tuple[float, float]:
    """(largest |exported - PyTorch|, largest |logit|) over random batches of the traced
    size and another size (inputs ~ N(0, 1), the scale of normalised images)."""
    g = torch.Generator().manual_seed(0)
    diff, scale = 0.0, 0.0
    for batch in (TRACE_BATCH, CHECK_BATCH):
        x = torch.randn(batch, 3, image_size, image_size, generator=g)
        with torch.no_grad():
            expected = module(x)
            got = run_exported(x)
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportError(f"the exported model gives logits of shape {list(got.shape)} for a "
                              f"batch of {batch}, PyTorch {list(expected.shape)}; nothing written")
        diff = max(diff, (got.double() - expected.double()).abs().max().item())
        scale = max(scale, expected.abs().max().item())
    return diff, scale


def main(args: argparse.Namespace) -> int:
    setup_logging(None)
    if not args.model_path:
        raise UserError("--model_path is required (a training run folder or a checkpoint file)")
    if args.format == "onnx":
        require_onnx()          # before reading anything
    elif args.dynamo or args.opset is not None:
        raise UserError(f"--{'dynamo' if args.dynamo else 'opset'} is for --format onnx")
    trained = resolve_trained_network(
        args.model_path, dataset=args.dataset, cifar100=args.cifar100, arch=args.arch,
        init_channels=args.init_channels, layers=args.layers, auxiliary=args.auxiliary,
        purpose="export.py exports")
    if args.arch and trained.ours:   # the run records its cell: another wiring loads, and is wrong
        check_same_cell(trained.genotype, checkpoint_genotype(trained.checkpoint, trained.path),
                        args.arch, trained.path)
    out = args.out or default_out(trained, args.format)
    check_out(out)
    network = load_trained_network(trained)
    network.drop_auxiliary_head()
    network.drop_path_prob = 0.0
    module = Logits(network).eval()
    size = trained.image_size
    example = torch.randn(TRACE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    logger.info("model %s: %s", trained.path, json.dumps(trained.info))
    logger.info("genotype = %s", format_genotype(trained.genotype))

    opset = None
    if args.format == "onnx":
        proto = export_onnx(module, example, args.opset or DEFAULT_OPSET[
            "dynamo" if args.dynamo else "torchscript"], args.dynamo)
        opset = onnx_opset(proto)       # the file's own, whatever was asked
        meta = metadata(trained, args.format, opset, trained.path)
        set_onnx_metadata(proto, meta)
        data = proto.SerializeToString()
        run_exported = run_onnx(data)
        runtime = "onnxruntime"
    else:
        meta = metadata(trained, args.format, None, trained.path)
        data = export_torchscript(module, example, meta)
        run_exported = run_torchscript(data)
        runtime = "torch.jit.load"
    diff, scale = largest_difference(module, run_exported, size)
    allowed = args.tolerance * max(1.0, scale)
    check = (f"{runtime} vs PyTorch on random batches of {TRACE_BATCH} and {CHECK_BATCH}: "
             f"largest absolute difference of the logits {diff:.3g} (allowed {allowed:.3g} = "
             f"{args.tolerance:g} x max(1, largest |logit| {scale:.3g}))")
    if not diff <= allowed:     # NaN fails too
        raise ExportError(f"the exported model does not match PyTorch: {check}; nothing written")
    check_out(out)   # again: the export took a while
    try:
        write_bytes_atomic(data, out, f"the {args.format} file")
    except StorageError as e:   # its advice names the training scripts' flag
        raise StorageError(str(e).replace("--save", "--out")) from None

    shape = f"[batch, 3, {size}, {size}]"
    print(f"wrote {out} ({args.format}{f', opset {opset}' if opset else ''}, "
          f"{len(data) / 1e6:.2f} MB)")
    print(f"input '{INPUT_NAME}': float32 {shape}, batch size free; output '{OUTPUT_NAME}': "
          f"[batch, {trained.info['num_classes']}] logits (no softmax)")
    print(f"preprocessing: {meta['preprocessing']}")
    print(f"normalisation: mean ({', '.join(f'{v:.6g}' for v in trained.mean)}) "
          f"std ({', '.join(f'{v:.6g}' for v in trained.std)})")
    print(f"check: {check}")
    where = ("metadata_props (key 'pdarts': JSON)" if args.format == "onnx"
             else f"_extra_files['{METADATA_FILE}']")
    print(f"stored in the file's {where}: input shape, normalisation, preprocessing, classes, "
          "network and genotype")
    print(json.dumps({"out": out, "format": args.format, "opset": opset,
                      "input_shape": [None, 3, size, size], "mean": list(trained.mean),
                      "std": list(trained.std), "max_abs_diff": diff, "allowed": allowed}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
