"""vitrim: token reduction for Vision Transformers (ToMe, TPS, IdleViT, EViT, DynamicViT).

>>> import timm, vitrim
>>> model = timm.create_model("deit_small_patch16_224")
>>> vitrim.apply(model, "tome", r=13)        # doctest: +ELLIPSIS
Reduced...
>>> round(vitrim.flops(model), 2)
2.7

A new method is one ``ReductionMethod`` subclass decorated with ``vitrim.register_method``; a new
model family one ``Adapter`` subclass decorated with ``vitrim.register_adapter``
(``docs/architecture.md``).
"""
from . import methods as _methods  # noqa: F401  (registers the methods)
from . import zoo as _zoo  # noqa: F401  (registers vitrim's timm models)
from .adapters import Adapter, register_adapter
from .api import (apply, flops, flops_report, forward_tokens, forward_with_state, get_method, is_reduced, methods,
                  remove, traced_flops, update)
from .errors import AlreadyReducedError, NotReducedError, OptionError, UnsupportedModelError, VitrimError
from .export import export_onnx
from .methods.base import BlockTokens, ModelInfo, ReductionMethod, TokenMap, register_method
from .ops.merge import unmerge_from_source
from .solve import solve
from .state import ForwardState
from .version import __version__
from .visual import forward_dense, restore_grid, source_to_grid

__all__ = [
    "apply", "remove", "update", "methods", "get_method", "is_reduced", "forward_tokens", "forward_with_state",
    "flops", "flops_report", "traced_flops", "source_to_grid", "unmerge_from_source", "ForwardState",
    "VitrimError", "OptionError", "UnsupportedModelError", "AlreadyReducedError", "NotReducedError",
    "export_onnx", "restore_grid", "forward_dense", "solve",
    "ReductionMethod", "register_method", "ModelInfo", "BlockTokens", "TokenMap", "Adapter", "register_adapter",
]
