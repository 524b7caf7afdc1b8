"""What every reduction method provides, and the registry ``vitrim.apply`` looks names up in.

A method is an ``nn.Module`` attached to the model as ``model.vitrim``: parameter-free methods
(ToMe) add nothing to the state dict, learned ones (predictors) get stable names under
``vitrim.``. The method never holds references to the model's modules; the adapter passes
each block in, so the model's own modules and weights do the work.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..errors import OptionError
from ..state import ForwardState

__all__ = ["ModelInfo", "BlockTokens", "ReductionMethod", "register_method", "get_method_class", "method_names",
           "is_int", "is_real"]


def is_int(v: Any) -> bool:
    """An ``int`` option value (``bool`` is not one)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """An ``int`` or ``float`` option value (``bool`` is not one)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ModelInfo:
    """What a method needs to know about the model it is applied to (from the adapter)."""

    family: str
    depth: int
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int
    num_patches: int  # at the model's default input size
    global_pool: str
    has_class_token: bool = True  # class token at index 0 (class-attention scoring needs its query)


@dataclass(frozen=True)
class BlockTokens:
    """Token counts one block computes with, for analytic FLOPs.

    ``q``: query rows (and the attention output projection); ``kv``: key/value rows;
    ``mlp``: rows through the MLP; ``extra_macs``: method-specific matmuls counted by its spec.
    """

    q: int
    kv: int
    mlp: int
    extra_macs: int = 0


_REGISTRY: dict[str, type["ReductionMethod"]] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type["ReductionMethod"]) -> type["ReductionMethod"]:
    """Class decorator: make ``cls`` available to ``vitrim.apply`` under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type["ReductionMethod"]:
    if not isinstance(name, str):
        raise OptionError(f"method must be a name (str), got {type(name).__name__}; accepted: {', '.join(method_names())}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise OptionError(f"unknown method {name!r}; accepted: {', '.join(method_names())}"
                          + (f" (aliases: {', '.join(sorted(_ALIASES))})" if _ALIASES else ""))
    return _REGISTRY[key]


class ReductionMethod(nn.Module):
    """Base class of a token-reduction method.

    Subclasses set ``name`` and take their options as keyword arguments of ``__init__``
    after ``info`` (validated there, so every option error surfaces at ``apply`` time), and
    implement :meth:`block_forward` and :meth:`block_tokens`.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: model pooling types the method can keep correct (``""`` = no pooling / raw tokens).
    supported_pools: ClassVar[tuple[str, ...]] = ("token", "avg", "avgmax", "max", "")

    def __init__(self, info: ModelInfo) -> None:
        super().__init__()
        self.info = info

    # ----------------------------------------------------------------- options
    @classmethod
    def option_names(cls) -> list[str]:
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD]

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    @classmethod
    def create(cls, info: ModelInfo, **options: Any) -> "ReductionMethod":
        cls.check_option_names(options)
        return cls(info, **options)

    @classmethod
    def check_option_names(cls, options: dict[str, Any]) -> None:
        """Raise :class:`OptionError` naming the accepted options if ``options`` has others."""
        accepted = cls.option_names()
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise OptionError(f"unknown option(s) {', '.join(unknown)} for method {cls.name!r}; "
                              f"accepted: {', '.join(accepted) or 'none'}")

    def options(self) -> dict[str, Any]:
        """Current option values (what ``apply`` would need to rebuild this method)."""
        return {name: getattr(self, name) for name in self.option_names()}

    def update(self, **options: Any) -> None:
        """Change options between forwards without re-applying (validated like ``apply``)."""
        fresh = type(self).create(self.info, **{**self.options(), **options})
        for name in self.option_names():
            setattr(self, name, getattr(fresh, name))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())

    # ----------------------------------------------------------------- forward
    def new_state(self, x: torch.Tensor) -> ForwardState:
        """The state of one forward, from the tokens entering block 0 (``x: [B, T0, C]``)."""
        k = self.info.num_prefix_tokens
        return ForwardState(num_prefix_tokens=k, num_patches=x.shape[1] - k)

    def block_forward(self, block: nn.Module, index: int, x: torch.Tensor,
                      state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        raise NotImplementedError

    def finish(self, state: ForwardState) -> None:
        """Called once after the last block (e.g. to expose provenance to the user)."""

    # ----------------------------------------------------------------- accounting
    def block_tokens(self, num_tokens: int) -> list[BlockTokens]:
        """Per-block token counts for an input of ``num_tokens`` tokens (prefix included)."""
        raise NotImplementedError

    def extra_macs(self, num_tokens: int) -> int:
        """Method-level MACs outside the blocks that its spec counts (e.g. predictors)."""
        return 0

    def final_tokens(self, num_tokens: int) -> int:
        return self.block_tokens(num_tokens)[-1].mlp

    def pool_weights(self, state: ForwardState) -> Optional[torch.Tensor]:
        """``[B, T, 1]`` weights for average pooling of the final tokens (``None``: uniform)."""
        return state.size
