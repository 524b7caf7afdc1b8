"""The public entry points: ``apply``, ``remove``, ``update``, ``methods``, ``forward_tokens``, ``flops``."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from .adapters import attach, get_adapter, is_reduced, resolve_img_size
from .errors import AlreadyReducedError, NotReducedError, VitrimError
from .measure.flops import FlopsReport, count_traced, model_name
from .methods.base import ReductionMethod, method_names
from .solve import solve
from .state import ForwardState

__all__ = ["apply", "remove", "update", "methods", "get_method", "is_reduced", "forward_tokens", "forward_with_state",
           "flops", "flops_report", "traced_flops", "resolve_img_size"]

ImgSize = Union[int, tuple[int, int], None]  # an int is a square input


def methods() -> list[str]:
    """Names of the available reduction methods."""
    return method_names()


def get_method(model: nn.Module) -> ReductionMethod:
    """The method installed on ``model`` (its options can be read and changed there)."""
    if not is_reduced(model):
        raise NotReducedError(f"{type(model).__name__} carries no vitrim reduction; use vitrim.apply(model, ...) first")
    return model.vitrim


def apply(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Install a token-reduction method on ``model`` in place and return it.

    Args:
        model: a supported model (timm ``VisionTransformer`` family, PVT-v2 for idle, Hugging Face ViT / DeiT / CLIP).
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
        options = solve(model, method, **budget, **options)
    attach(model, method, **options)
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


# ---------------------------------------------------------------------- FLOPs
def flops_report(model: nn.Module, img_size: ImgSize = None) -> FlopsReport:
    """Per-layer analytic GMACs of ``model`` as reduced now (or unreduced), at batch 1."""
    adapter = get_adapter(model)
    size = resolve_img_size(model, img_size)
    method: Optional[ReductionMethod] = getattr(model, "vitrim", None) if is_reduced(model) else None
    plan = adapter.cost_plan(size, method)
    return FlopsReport(**vars(plan), model=model_name(model), method=None if method is None else method.name,
                       options={} if method is None else method.options(), img_size=size)


def flops(model: nn.Module, img_size: ImgSize = None) -> float:
    """Analytic GMACs of ``model`` as reduced now, in the papers' convention (batch 1).

    >>> import timm, vitrim
    >>> m = timm.create_model("deit_small_patch16_224")
    >>> round(vitrim.flops(m), 2), round(vitrim.flops(vitrim.apply(m, "tome", r=13)), 2)
    (4.6, 2.7)
    """
    return flops_report(model, img_size).gmacs


def traced_flops(model: nn.Module, img_size: ImgSize = None, detail: bool = False):
    """GMACs measured by ``FlopCounterMode`` (FLOPs / 2) on one forward at batch 1.

    If the model calls a fused attention kernel the counter has no formula for, the count is
    repeated with explicit attention (see :func:`vitrim.measure.flops.count_traced`).

    Returns GMACs, or ``(GMACs, info dict)`` with ``detail=True``.
    """
    size = resolve_img_size(model, img_size)
    param = next(model.parameters(), None)
    if param is None:
        raise VitrimError(f"{type(model).__name__} has no parameters to trace a forward with")
    adapter = get_adapter(model)
    x = torch.zeros(1, *adapter.input_shape(size), device=param.device, dtype=param.dtype)
    gmacs, info = count_traced(model, x, adapter.explicit_attention)
    return (gmacs, info) if detail else gmacs
