"""The public entry points: ``apply``, ``remove``, ``update``, ``methods``, ``forward_tokens``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .errors import AlreadyReducedError, NotReducedError, OptionError
from .methods.base import ReductionMethod, get_method_class, method_names
from .state import ForwardState

__all__ = ["apply", "remove", "update", "methods", "get_method", "is_reduced", "forward_tokens", "forward_with_state"]


def methods() -> list[str]:
    """Names of the available reduction methods."""
    return method_names()


def is_reduced(model: nn.Module) -> bool:
    return getattr(type(model), "_vitrim_original_class", None) is not None


def get_method(model: nn.Module) -> ReductionMethod:
    """The method installed on ``model`` (its options can be read and changed there)."""
    if not is_reduced(model):
        raise NotReducedError(f"{type(model).__name__} carries no vitrim reduction; use vitrim.apply(model, ...) first")
    return model.vitrim


def apply(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Install a token-reduction method on ``model`` in place and return it.

    Args:
        model: a supported model (timm ``VisionTransformer`` family).
        method: one of :func:`methods` (e.g. ``"tome"``).
        **options: the method's options (ToMe: ``r``, ``prop_attn``, ``trace_source``); or a budget,
            ``target_gmacs=`` / ``target_speedup=``, that :func:`vitrim.solve` turns into the
            strength option (``r`` / ``keep_rate``) first.

    Example:
        >>> import timm, vitrim
        >>> model = vitrim.apply(timm.create_model("deit_tiny_patch16_224"), "tome", r=13)
        >>> model(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 1000])
    """
    if is_reduced(model):
        raise AlreadyReducedError(
            f"this model already carries vitrim method {model.vitrim.name!r}; call vitrim.remove(model) "
            f"first, or change its options with vitrim.update(model, ...)")
    budget = {k: v for k in ("target_gmacs", "target_speedup") if (v := options.pop(k, None)) is not None}
    if budget:
        from .solve import solve

        options = solve(model, method, **budget, **options)
    method_cls = get_method_class(method)
    adapter = get_adapter(model)
    info = adapter.info()
    if info.global_pool not in method_cls.supported_pools:
        raise OptionError(f"method {method_cls.name!r} cannot keep pooling {info.global_pool!r} correct; "
                          f"accepted pooling: {', '.join(repr(p) for p in method_cls.supported_pools)}")
    reducer = method_cls.create(info, **options)
    param = next(model.parameters(), None)
    if param is not None:
        reducer.to(param.device)
    adapter.install(reducer)
    return model


def update(model: nn.Module, **options: Any) -> nn.Module:
    """Change the installed method's options between forwards (validated as in ``apply``)."""
    get_method(model).update(**options)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the original class, modules and behaviour, in place."""
    if not is_reduced(model):
        raise NotReducedError(f"{type(model).__name__} carries no vitrim reduction; nothing to remove")
    get_adapter(model).uninstall(model)
    return model


def forward_tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Final normed tokens ``[B, T, C]`` and the forward's :class:`ForwardState` (sizes, source)."""
    get_method(model)
    return model.forward_tokens(x)


def forward_with_state(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """The model's output (logits, or ``(cls, dist)`` for distilled models in distilled training)
    and the forward's :class:`ForwardState` (sizes, source, policy, per-stage records)."""
    get_method(model)
    return model.forward_with_state(x)
