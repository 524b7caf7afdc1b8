"""Installing a method on a model: swap its class for a cached generated subclass.

The subclass only overrides the forward entry points an adapter provides; modules, weights
and the state dict stay the model's own, and removal restores the original class.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..state import ForwardState

__all__ = ["AdapterBase", "install_reduced_class", "uninstall_reduced_class", "overrides", "runs_own_forward",
           "run_block"]

_REDUCED_CLASSES: dict[tuple[type, str], type] = {}


def overrides(obj: object, base: type, name: str) -> bool:
    """Whether ``obj``'s class replaces ``base.<name>`` (behaviour an adapter could not keep)."""
    return getattr(type(obj), name) is not getattr(base, name)


def runs_own_forward(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose ``forward`` is ``cls``'s own."""
    return isinstance(module, cls) and not overrides(module, cls, "forward")


def run_block(method: nn.Module, block: nn.Module, index: int, x: torch.Tensor, state: ForwardState,
              use_checkpoint: bool) -> tuple[torch.Tensor, ForwardState]:
    """``method.block_forward`` on one block, under activation checkpointing when asked (the state is
    immutable, so the recomputation sees the block's inputs)."""
    if use_checkpoint:
        return checkpoint(method.block_forward, block, index, x, state, use_reentrant=False)
    return method.block_forward(block, index, x, state)


def install_reduced_class(model: nn.Module, method: nn.Module, family: str,
                          entry_points: dict[str, Callable]) -> None:
    """Attach ``method`` as ``model.vitrim`` and swap in ``Reduced<Class>`` with ``entry_points``."""
    original = type(model)
    key = (original, family)
    if key not in _REDUCED_CLASSES:
        _REDUCED_CLASSES[key] = type(f"Reduced{original.__name__}", (original,), {
            **entry_points, "_vitrim_original_class": original, "__module__": original.__module__})
    model.vitrim = method
    model.__class__ = _REDUCED_CLASSES[key]


def uninstall_reduced_class(model: nn.Module) -> None:
    model.__class__ = type(model)._vitrim_original_class
    del model.vitrim


class AdapterBase:
    """What every adapter shares: optional validation on construction, and removal."""

    family = ""

    def __init__(self, model: nn.Module, check: bool = True) -> None:
        if check:
            self._check(model)
        self.model = model

    @staticmethod
    def _check(model: nn.Module) -> None:
        raise NotImplementedError

    @staticmethod
    def uninstall(model: nn.Module) -> None:
        uninstall_reduced_class(model)
