"""vitrim: token reduction for Vision Transformers (ToMe, TPS, IdleViT, EViT, DynamicViT).

>>> import timm, vitrim
>>> model = timm.create_model("deit_small_patch16_224")
>>> vitrim.apply(model, "tome", r=13)        # doctest: +ELLIPSIS
Reduced...
>>> round(vitrim.flops(model), 2)
2.7
"""
from . import methods as _methods  # noqa: F401  (registers the methods)
from . import zoo as _zoo  # noqa: F401  (registers vitrim's timm models)
from .api import apply, forward_tokens, forward_with_state, get_method, is_reduced, methods, remove, update
from .dense import forward_dense, restore_grid
from .errors import AlreadyReducedError, NotReducedError, OptionError, UnsupportedModelError, VitrimError
from .export import export_onnx
from .solve import solve
from .measure.flops import flops, flops_report, traced_flops
from .ops.merge import unmerge_from_source
from .state import ForwardState
from .visual import source_to_grid

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "update", "methods", "get_method", "is_reduced", "forward_tokens", "forward_with_state",
    "flops", "flops_report", "traced_flops", "source_to_grid", "unmerge_from_source", "ForwardState",
    "VitrimError", "OptionError", "UnsupportedModelError", "AlreadyReducedError", "NotReducedError",
    "export_onnx", "restore_grid", "forward_dense", "solve",
]
