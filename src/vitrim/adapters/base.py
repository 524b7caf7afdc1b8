"""The adapter contract: one adapter per model family, and the block contract methods rely on.

An **adapter** knows one model family (timm ``VisionTransformer``, timm PVT-v2, Hugging Face ViT,
...). It is the only place that knows the family's module layout; methods never do. It

1. says whether it serves a model (:meth:`Adapter.supports`) and verifies the facts it relies on
   (:meth:`Adapter.check`: module types whose forward it can keep, token counts, grid), refusing
   with :class:`~vitrim.errors.UnsupportedModelError` otherwise;
2. describes the model to methods (:meth:`Adapter.info`, a :class:`~vitrim.methods.base.ModelInfo`),
   and its input grid (:meth:`default_img_size`, :meth:`grid_size`, :meth:`num_patches`);
3. gives the parts of its head on the final tokens (:meth:`Adapter.head_parts`: the class head
   alone and a per-token head where the family has one), for losses that read them separately;
4. prices the model under a method (:meth:`Adapter.cost_plan`, from the method's
   :meth:`~vitrim.methods.base.ReductionMethod.plan_block`) for ``vitrim.flops`` and budgets;
5. installs a method (:meth:`Adapter.install`: the model's class is swapped for a generated
   subclass whose forward runs the model's own modules and hands every block to
   ``method.block_forward``) and removes it (:meth:`Adapter.uninstall`, the original class back).

**The block contract.** What a method may use of the ``block`` it is handed:

* ``block(x)``: the block's own forward on ``x: [B, T, C]`` with every extra input the family
  needs (positions, feature sizes) already bound by the adapter (:class:`BoundBlock`), so methods
  never need to know the family; ``block.training``;
* its parts, each the model's own module: ``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``,
  ``mlp``, ``ls2``, ``drop_path2`` (``x + drop_path1(ls1(attn(norm1(x))))`` then the MLP residual);
* of ``attn`` (what :mod:`vitrim.ops.attention` reads): ``qkv`` (linear-like, ``weight [3A, C]`` in
  ``[q; k; v]`` order, ``bias [3A]`` or ``None``, callable), ``num_heads``, ``head_dim``,
  ``attn_dim`` (``A``), ``scale``, ``q_norm`` / ``k_norm`` (on ``[B, H, T, d]``), ``norm`` (on
  ``[B, T, A]``), ``gate`` (a linear or ``None``), ``proj``, ``proj_drop``, ``attn_drop`` (with ``.p``),
  ``fused_attn``, ``training``;
* blocks of pyramid stages (the adapter reports ``ModelInfo.stage_depths``) carry ``feat_size =
  (H, W)`` of their complete token map and timm PVT-v2's layout (``attn.q``, ``attn.kv``, ``attn.sr``,
  ``attn.pool``, ``mlp.fc1``, ``mlp.dwconv``, ``mlp.fc2``).

Adding a family: ``docs/architecture.md``, "Adding a model family".
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..measure.flops import CostPlan
from ..methods.base import HeadParts, ModelInfo, ReductionMethod
from ..state import ForwardState

__all__ = ["Adapter", "BoundBlock", "register_adapter", "registered_adapters", "make_reduced_class",
           "install_reduced_class", "uninstall_reduced_class", "overrides", "runs_own_forward", "run_block",
           "is_reduced"]

ImgSize = tuple[int, int]
_REDUCED_CLASSES: dict[tuple[type, str, str], type] = {}
_ADAPTERS: list[type["Adapter"]] = []


def register_adapter(cls: type["Adapter"]) -> type["Adapter"]:
    """Class decorator: let ``vitrim.adapters.get_adapter`` serve the models ``cls.supports``."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"register_adapter decorates Adapter subclasses, got {cls!r}")
    if cls not in _ADAPTERS:
        # a subclass of a registered adapter is asked first: its models are also its parent's
        parents = [i for i, a in enumerate(_ADAPTERS) if issubclass(cls, a)]
        _ADAPTERS.insert(parents[0], cls) if parents else _ADAPTERS.append(cls)
    return cls


def registered_adapters() -> list[type["Adapter"]]:
    """The registered adapter classes, in registration order."""
    return list(_ADAPTERS)


def is_reduced(model: nn.Module) -> bool:
    """Whether ``model`` carries a vitrim method (its class is a generated reduced subclass)."""
    return getattr(type(model), "_vitrim_original_class", None) is not None


def overrides(obj: object, base: type, name: str) -> bool:
    """Whether ``obj``'s class replaces ``base.<name>`` (behaviour an adapter could not keep)."""
    return getattr(type(obj), name) is not getattr(base, name)


def runs_own_forward(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose ``forward`` is ``cls``'s own."""
    return isinstance(module, cls) and not overrides(module, cls, "forward")


class BoundBlock:
    """A block with the extra inputs of its forward bound: ``bound(x) = block(x, *inputs)``.

    Every other attribute is the block's own (its modules, ``training``), plus the named facts
    given as keyword arguments (e.g. ``feat_size``), so a method sees one block interface whatever
    the family passes to its blocks.
    """

    def __init__(self, block: nn.Module, inputs: tuple = (), **facts: Any) -> None:
        self.__dict__.update(facts)
        self.block, self.inputs = block, inputs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, *self.inputs)

    def __getattr__(self, name: str) -> Any:  # only reached for names not set above
        return getattr(self.__dict__["block"], name)


def run_block(method: ReductionMethod, block: Any, index: int, x: torch.Tensor, state: ForwardState,
              use_checkpoint: bool) -> tuple[torch.Tensor, ForwardState]:
    """``method.block_forward`` on one block, under activation checkpointing when asked (the state is
    immutable, so the recomputation sees the block's inputs)."""
    if use_checkpoint:
        return checkpoint(method.block_forward, block, index, x, state, use_reentrant=False)
    return method.block_forward(block, index, x, state)


def _reduce_reduced(self, protocol: int):
    """Pickle (``torch.save``, ``copy.deepcopy``) a reduced model as its original class, the adapter that
    generated its reduced class and its state; unpickling regenerates the class."""
    family, variant = type(self)._vitrim_rebuild
    return _rebuild_reduced, (type(self)._vitrim_original_class, family, variant), self.__getstate__()


def _rebuild_reduced(original: type, family: str, variant: str) -> nn.Module:
    for adapter in _ADAPTERS:
        if adapter.family == family:
            cls = adapter.reduced_class(original, variant)
            return cls.__new__(cls)
    raise TypeError(f"no vitrim adapter for family {family!r} is registered; import the module that defines it "
                    f"before loading this model")


def make_reduced_class(original: type, name: str, attrs: dict[str, Any], rebuild: tuple[str, str]) -> type:
    """The generated subclass of ``original`` with ``attrs``; it can be pickled (by rebuilding it)."""
    return type(name, (original,), {**attrs, "_vitrim_original_class": original, "_vitrim_rebuild": rebuild,
                                    "__reduce_ex__": _reduce_reduced, "__module__": original.__module__})


def install_reduced_class(model: nn.Module, method: nn.Module, cls: type) -> None:
    """Attach ``method`` as ``model.vitrim`` and swap in the reduced class ``cls``."""
    model.vitrim = method
    model.__class__ = cls


def uninstall_reduced_class(model: nn.Module) -> None:
    model.__class__ = type(model)._vitrim_original_class
    del model.vitrim


class Adapter(ABC):
    """One model family: verified facts, pricing, and the reduced forward (see the module docstring)."""

    #: short identifier, e.g. ``"timm-vit"``
    family: ClassVar[str] = ""
    #: human-readable family name for messages, e.g. ``"timm VisionTransformer"``
    label: ClassVar[str] = ""
    #: what models the adapter accepts, for the unsupported-model message
    accepts: ClassVar[str] = ""
    #: the reduced forward: name -> function, set on the model's generated subclass by :meth:`install`
    entry_points: ClassVar[dict[str, Callable]] = {}

    def __init__(self, model: nn.Module, check: bool = True) -> None:
        if check:
            self.check(model)
        self.model = model

    # ------------------------------------------------------------------ support
    @classmethod
    @abstractmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (cheap: class checks only)."""

    @classmethod
    @abstractmethod
    def check(cls, model: nn.Module) -> None:
        """Raise :class:`~vitrim.errors.UnsupportedModelError` naming what is accepted unless every
        fact this adapter relies on holds for ``model``."""

    # ------------------------------------------------------------------ facts
    @abstractmethod
    def info(self) -> ModelInfo:
        """The facts methods may use (at the model's default input size)."""

    @abstractmethod
    def default_img_size(self) -> ImgSize:
        """``(H, W)`` of the model's default input."""

    @abstractmethod
    def grid_size(self, img_size: Optional[ImgSize] = None) -> ImgSize:
        """``(h, w)`` patch grid of the first block's tokens for an input of ``img_size``."""

    @abstractmethod
    def num_patches(self, img_size: Optional[ImgSize] = None) -> int:
        """Patch tokens entering the first block for an input of ``img_size`` (prefix excluded)."""

    def input_shape(self, img_size: Optional[ImgSize] = None) -> tuple[int, ...]:
        """One sample's input shape for an input of ``img_size`` (what dummy inputs of ``bench``,
        ``flops --traced`` and ``export`` are made with): images ``(3, H, W)``; other families their own
        (video ``(T, C, H, W)``, spectrograms ``(time, freq)``)."""
        h, w = self.default_img_size() if img_size is None else img_size
        return 3, int(h), int(w)

    def frames(self) -> int:
        """Time steps stacked along the height of :meth:`grid_size` (video: the tubelet steps; else 1)."""
        return 1

    def explicit_attention(self) -> "contextlib.AbstractContextManager":
        """A context in which the model computes attention with explicit matmuls (what ``traced_flops``
        re-counts with when ``FlopCounterMode`` has no formula for the fused kernel); by default every
        module's ``fused_attn`` flag is switched off."""
        from ..measure.flops import explicit_attention
        return explicit_attention(self.model)

    def output_grid(self, img_size: Optional[ImgSize] = None) -> ImgSize:
        """``(h, w)`` grid of the final patch tokens when none were removed (pyramids: the last stage)."""
        return self.grid_size(img_size)

    # ------------------------------------------------------------------ FLOPs
    @abstractmethod
    def cost_plan(self, img_size: ImgSize, method: Optional[ReductionMethod] = None) -> CostPlan:
        """Analytic MACs at batch 1 for an input of ``img_size`` under ``method`` (installed or not;
        ``None``: unreduced), in the papers' convention (``vitrim.measure.flops``)."""

    def paper_gmacs(self, img_size: ImgSize, method: Optional[ReductionMethod] = None) -> float:
        """GMACs in a family's own publication convention, where it differs from :meth:`cost_plan`'s
        (``vitrim flops --convention paper``); families without one refuse."""
        from ..errors import OptionError
        raise OptionError(f"{self.label or self.family} has no separate publication FLOPs convention; "
                          f"the protocol convention (the default) is the one its papers use")

    # ------------------------------------------------------------------ head
    def head_parts(self, tokens: torch.Tensor, state: Optional[ForwardState] = None) -> HeadParts:
        """The head's parts on the final tokens ``tokens: [B, T, C]`` (``state``: the reduced forward's,
        for its pooling weights), for losses that read them separately. Families without a per-token
        head (the default): ``class_logits`` is the model's output, ``token_logits`` is ``None``."""
        m = self.model
        if state is not None and is_reduced(m):
            return HeadParts(m.forward_head_with_state(tokens, state))
        return HeadParts(m.forward_head(tokens))

    # ------------------------------------------------------------------ install
    @classmethod
    def reduced_class(cls, original: type, variant: str = "") -> type:
        """The generated subclass of ``original`` whose entry points are :attr:`entry_points` (cached,
        picklable). ``variant`` distinguishes several generated classes of one family."""
        key = (original, cls.family, variant)
        if key not in _REDUCED_CLASSES:
            _REDUCED_CLASSES[key] = make_reduced_class(original, f"Reduced{original.__name__}", cls.entry_points,
                                                       (cls.family, variant))
        return _REDUCED_CLASSES[key]

    def install(self, method: ReductionMethod) -> None:
        """Attach ``method`` as ``model.vitrim`` and switch the model to the reduced forward."""
        install_reduced_class(self.model, method, self.reduced_class(type(self.model)))

    @staticmethod
    def uninstall(model: nn.Module) -> None:
        """Undo :meth:`install`: the original class and behaviour."""
        uninstall_reduced_class(model)
