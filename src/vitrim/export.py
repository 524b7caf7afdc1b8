"""ONNX export of (reduced) models with static shapes, and the ``vitrim export`` subcommand.

Every method's inference path has data-independent token counts for a fixed input size, so the
exported graph is static: per-block gathers, scatters and top-k with constant sizes. The export
uses PyTorch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``) with
one addition: ``aten.sort.stable`` (ToMe's ranking and the pruning methods' ``argsort(stable=True)``)
is translated to ONNX ``TopK`` over the whole axis, which breaks ties by the lower index, i.e. is a
stable sort. The PyTorch path is unchanged.

Scatter-reduce stays within what ONNX has: ToMe's size-weighted merge scatters with ``sum``
(``ScatterElements`` ``reduction="add"``) and divides by the summed sizes; provenance uses ``amax``
(``reduction="max"``, opset 18). :func:`check_onnx` rejects any ``mean`` reduction.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .adapters import get_adapter, resolve_img_size
from .checks import writable_file
from .errors import VitrimError

__all__ = ["export_onnx", "check_onnx", "verify_onnx"]

DEFAULT_OPSET = 18
MIN_OPSET = 17
_EXTERNAL_DATA_BYTES = 1 << 30  # protobuf's 2 GB limit, with a margin


def _sort_stable(self, stable: Optional[bool] = None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` as ONNX ``TopK`` with ``k`` = the axis length (ties: lower index first)."""
    from onnxscript import opset18 as op

    size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


class _FirstOutput(nn.Module):
    """Wraps a model so the exported graph has one tensor output: the model's tensor output, or the
    first field of a Hugging Face ``ModelOutput`` (``logits``, or ``last_hidden_state`` for base models)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self.model(pixel_values))


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # transformers ModelOutput (an OrderedDict of the non-None fields)
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    raise VitrimError(f"cannot export a model whose forward returns {type(out).__name__}")


def _output_name(model: nn.Module, x: torch.Tensor) -> str:
    with torch.no_grad():
        out = model(x)
    if isinstance(out, dict):
        return next(iter(out.keys()))
    return "logits"


def _require_onnx() -> None:
    """The ONNX packages export needs, or a clear error saying how to install them."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise VitrimError(f"ONNX export needs {' and '.join(missing)}, which are not installed: "
                          f"pip install 'vitrim[onnx]' (onnx, onnxscript and onnxruntime for --verify)")


def _input_size(input_size: Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_size, (str, bytes)) or len(input_size) < 3 \
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size):
        raise VitrimError(f"input_size must be (batch, channels, height, width) positive ints (video: (batch, frames, "
                          f"channels, height, width); spectrograms: (batch, time, freq)), got {tuple(input_size)!r}")
    return tuple(input_size)


def _check_input_shape(model: nn.Module, size: tuple[int, ...]) -> None:
    """The model can run ``size``: its size (the last two dimensions) and, beyond images, its adapter's
    sample shape (``Adapter.input_shape``)."""
    resolve_img_size(model, size[-2:])  # fixed or patch-multiple sizes
    expected = tuple(get_adapter(model).input_shape(size[-2:]))
    image = len(size) == 4 and len(expected) == 3 and size[2:] == expected[1:]  # images: any channel count
    if not image and tuple(size[1:]) != expected:
        raise VitrimError(f"input_size {size} does not fit {type(model).__name__}; accepted: (batch, "
                          f"{', '.join(map(str, expected))})")


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], input_size: Sequence[int] = (1, 3, 224, 224), *,
                opset: int = DEFAULT_OPSET, check: bool = True) -> str:
    """Export ``model`` (reduced or not) to ONNX with static shapes, in eval mode.

    Args:
        model: a timm or Hugging Face model, with or without a vitrim method.
        path: the ``.onnx`` file to write (weights inline; beside it as ``<path>.data`` above 1 GB).
        input_size: ``(B, 3, H, W)`` of the one input, ``pixel_values``; fixed in the graph (other families:
            ``(B, *Adapter.input_shape())``, e.g. video ``(B, T, C, H, W)``, AST ``input_values`` ``(B, time, freq)``).
        opset: ONNX opset (>= 17; 18 by default, which also has ``ScatterElements`` ``max``).
        check: validate the written graph with :func:`check_onnx`.

    Returns:
        The path written. The graph's output is ``logits`` (``[B, classes]``) or, for models without
        a head, the model's first output (e.g. HF ``last_hidden_state``).

    Example:
        >>> model = vitrim.apply(timm.create_model("deit_small_patch16_224"), "tome", r=13)
        >>> vitrim.export_onnx(model, "deit_s_tome13.onnx", input_size=(1, 3, 224, 224))
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise VitrimError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    if "custom_translation_table" not in inspect.signature(torch.onnx.export).parameters:
        raise VitrimError(f"export_onnx needs PyTorch's dynamo ONNX exporter with custom translations "
                          f"(torch >= 2.6); this is torch {torch.__version__}")
    _require_onnx()
    size = _input_size(input_size)
    _check_input_shape(model, size)
    path = str(writable_file(path, "ONNX file", (".onnx",)))
    param = next(model.parameters())
    x = torch.randn(*size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        name = _output_name(model, x)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        torch.onnx.export(
            _FirstOutput(model).eval(), (x,), path, dynamo=True, opset_version=opset,
            input_names=[getattr(get_adapter(model), "input_name", "pixel_values")], output_names=[name],
            custom_translation_table={torch.ops.aten.sort.stable: _sort_stable},
            external_data=nbytes > _EXTERNAL_DATA_BYTES, verbose=False,
        )
    finally:
        model.train(was_training)
    if check:
        check_onnx(path, input_size=size)
    return path


def check_onnx(path: Union[str, os.PathLike], input_size: Optional[Sequence[int]] = None) -> dict:
    """Validate an exported graph: ONNX checker, opset >= 17, no scatter with ``mean`` reduction,
    and a static input shape (equal to ``input_size`` when given).

    Returns a summary: ``{"opset", "nodes", "ops" (op type -> count), "input_shape"}``.
    """
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise VitrimError(f"{path}: opset {opset} < {MIN_OPSET}")
    ops: dict[str, int] = {}
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type.startswith("Scatter"):
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction not in ("none", "add", "max", "min", "mul"):
                raise VitrimError(f"{path}: {node.op_type} node {node.name!r} uses reduction {reduction!r}")
    onnx.checker.check_model(proto)  # after the scans above, so a mean reduction is reported as such
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise VitrimError(f"{path}: input shape {shape} is not static")
    if input_size is not None and shape != tuple(input_size):
        raise VitrimError(f"{path}: input shape {shape} differs from the requested {tuple(input_size)}")
    return {"opset": opset, "nodes": len(proto.graph.node), "ops": ops, "input_shape": shape}


def verify_onnx(model: nn.Module, path: Union[str, os.PathLike], x: Optional[torch.Tensor] = None,
                providers: Sequence[str] = ("CPUExecutionProvider",)) -> float:
    """Max absolute difference between onnxruntime's output for ``path`` and ``model``'s (eval mode).

    ``x`` defaults to a standard-normal input of the graph's shape (seed 0).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise VitrimError("checking an ONNX graph needs onnxruntime: pip install 'vitrim[onnx]'") from None

    sess = ort.InferenceSession(os.fspath(path), providers=list(providers))
    inp = sess.get_inputs()[0]
    if x is None:
        x = torch.randn(*inp.shape, generator=torch.Generator().manual_seed(0))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = _first_tensor(model(x.to(device=param.device, dtype=param.dtype))).float().cpu()
    finally:
        model.train(was_training)
    out = torch.from_numpy(sess.run(None, {inp.name: x.to(param.dtype).cpu().numpy()})[0]).float()
    return (out - ref).abs().max().item()
