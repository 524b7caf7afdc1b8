"""``vitrim export``: the command line of :func:`vitrim.export_onnx`."""
from __future__ import annotations

import argparse
import sys

from ..checks import positive_int, writable_file
from ..export import DEFAULT_OPSET, check_onnx, export_onnx, verify_onnx
from .common import add_model_args, build_models, input_shape

__all__ = ["add_export_parser", "cmd_export"]


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``vitrim export`` (same model and method flags as ``vitrim flops``)."""
    p = subparsers.add_parser(
        "export", help="export a (reduced) model to ONNX with static shapes",
        description="Export the model with the method applied to ONNX (opset >= 17, static shapes); "
                    "--verify compares onnxruntime (CPU) with PyTorch on a random input.")
    add_model_args(p)
    p.add_argument("--output", "-o", required=True, metavar="PATH", help="the .onnx file to write")
    p.add_argument("--batch-size", type=int, default=1, help="batch size fixed in the graph (default: 1)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--verify", action="store_true", help="run the graph in onnxruntime and report the max abs difference")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    """``vitrim export``: build the model as ``vitrim flops`` does, export it, report the graph."""
    writable_file(args.output, "ONNX file", (".onnx",))  # before the model is built
    positive_int(args.batch_size, "--batch-size")
    base, reduced, options = build_models(args)
    model = reduced if reduced is not None else base
    size = (args.batch_size, *input_shape(model, args.img_size))
    path = export_onnx(model, args.output, input_size=size, opset=args.opset, check=False)
    summary = check_onnx(path, input_size=size)
    label = args.method if reduced is not None else "none"
    print(f"wrote {path}: {args.model} method={label} {options or ''} input={size} "
          f"opset={summary['opset']} nodes={summary['nodes']}")
    if args.verify:
        diff = verify_onnx(model, path)
        print(f"onnxruntime vs PyTorch: max abs difference {diff:.3e}")
        if not diff <= 1e-4:
            print("vitrim: warning: the difference exceeds 1e-4", file=sys.stderr)
            return 1
    return 0

