"""Model adapters: one file per model family (the contract: :mod:`vitrim.adapters.base`).

Every module of this package is imported here, so a new ``adapters/<family>.py`` whose
:class:`~vitrim.adapters.base.Adapter` subclass is decorated with :func:`register_adapter` is
served without further edits.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from ..errors import OptionError, UnsupportedModelError
from ..methods.base import ReductionMethod, get_method_class, is_int
from .base import Adapter, BoundBlock, is_reduced, register_adapter, registered_adapters

__all__ = ["Adapter", "BoundBlock", "register_adapter", "registered_adapters", "get_adapter", "bind", "attach",
           "is_reduced", "resolve_img_size"]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (checked, unless it already carries a method), or a clear error
    naming what is supported."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    compiled = getattr(model, "_orig_mod", None)
    if isinstance(compiled, nn.Module):
        raise UnsupportedModelError(
            f"this is a torch.compile'd {type(compiled).__name__}: vitrim works on the model itself; call "
            f"vitrim.apply(model, ...) first and torch.compile(model) afterwards (a reduced model compiles as one graph)")
    for adapter in registered_adapters():
        if adapter.supports(model):
            return adapter(model, check=not is_reduced(model))
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported; vitrim reduces "
        + "; ".join(a.accepts for a in registered_adapters() if a.accepts))


def bind(model: nn.Module, method: str, **options: Any) -> tuple[Adapter, ReductionMethod]:
    """The adapter of ``model`` and the method ``method`` built for it with ``options`` (validated,
    moved to the model's device), not installed. Every check runs before the model is touched."""
    method_cls = get_method_class(method)
    adapter = get_adapter(model)
    info = adapter.info()
    method_cls.check_model(info)
    reducer = method_cls.create(info, **options)
    param = next(model.parameters(), None)
    if param is not None:
        reducer.to(param.device)
    return adapter, reducer


def attach(model: nn.Module, method: str, **options: Any) -> ReductionMethod:
    """Build ``method`` for ``model`` and install it (no budget solving, no already-reduced check:
    ``vitrim.apply`` does those); returns the installed method."""
    adapter, reducer = bind(model, method, **options)
    adapter.install(reducer)
    return reducer


def resolve_img_size(model: nn.Module, img_size: Any = None) -> tuple[int, int]:
    """``(H, W)`` from an int, a pair, or ``None`` (the model's default input size)."""
    if img_size is None:
        return tuple(get_adapter(model).default_img_size())
    size = (img_size, img_size) if not isinstance(img_size, (tuple, list)) else tuple(img_size)
    if len(size) != 2 or not all(is_int(v) and v >= 1 for v in size):
        raise OptionError(f"img_size must be an int >= 1 or (height, width) of ints >= 1, got {img_size!r}")
    size = (int(size[0]), int(size[1]))
    get_adapter(model).num_patches(size)  # the family refuses sizes its model cannot run
    return size


# the family that most models belong to first (its description leads the unsupported-model message)
for _name in ["timm_vit", *(i.name for i in pkgutil.iter_modules(__path__) if i.name not in ("base", "timm_vit"))]:
    importlib.import_module(f"{__name__}.{_name}")
