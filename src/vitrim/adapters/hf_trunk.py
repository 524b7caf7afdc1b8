"""What the Hugging Face adapters for DINOv2, VideoMAE, AST and SigLIP share: a transformers *trunk*
(embeddings, a list of pre-norm layers, a final norm) whose forward vitrim replaces, and the model the
user holds.

The families themselves live in their own files (``hf_dinov2.py``, ``hf_video.py``, ``hf_audio.py``,
``hf_siglip.py``); each subclasses :class:`HFTrunkAdapter` and fills in its hooks: which classes it
takes, the façade of one layer (the block contract of :mod:`vitrim.adapters.base`, built from
:mod:`vitrim.adapters.hf`'s façades so the methods see the layer's own modules), the embedding, the
final norm and pooler, and the head read from the final tokens. Everything else, the reduced trunk
forward (hidden states follow the reduction, refused inputs say why), vitrim's entry points on the outer
model, the class swap that keeps HF's class names (``save_pretrained`` writes the original
architecture), pickling and removal, is here once.

This module registers no adapter.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError, VitrimError
from ..measure.flops import CostPlan, linear_macs, price_blocks
from ..methods.base import ReductionMethod
from ..state import ForwardState
from .base import Adapter, make_reduced_class, run_block
from .hf import HFBlock, _pair, _transformers_class, check_kwargs

__all__ = ["HFTrunkAdapter", "weighted_mean", "classifier_forward"]

_REDUCED: dict[tuple[type, str, str], type] = {}
_ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def weighted_mean(x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, T, C] -> [B, C]``: the mean over tokens, each weighted by what it stands for (``weights``
    ``[B, T, 1]``: ToMe's token sizes, a pruning mask; ``None``: the plain mean, bit for bit)."""
    if weights is None:
        return x.mean(dim=1)
    w = weights.to(x.dtype)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(torch.finfo(x.dtype).tiny)


class HFTrunkAdapter(Adapter):
    """A transformers model made of a trunk (embeddings, ``layers``, final norm) and, around it, the
    model the user holds (itself, or a classifier holding the trunk as an attribute)."""

    #: transformers class name -> attribute holding its trunk ("" = the model is the trunk)
    classes: ClassVar[dict[str, str]] = {}
    #: transformers layer class(es) whose own forward the façades keep
    layer_classes: ClassVar[tuple[str, ...]] = ()
    #: name of the trunk forward's input (``pixel_values``, ``input_values``)
    input_name: ClassVar[str] = "pixel_values"
    #: whether the trunk forward takes ``bool_masked_pos`` that keeps every token (DINOv2: mask tokens)
    takes_masked_pos: ClassVar[bool] = False
    #: the trunk's output class in ``transformers.modeling_outputs``
    trunk_output: ClassVar[str] = "BaseModelOutputWithPooling"
    #: outer class name -> the forward vitrim runs instead of its own (heads that pool with weights)
    outer_forwards: ClassVar[dict[str, Callable]] = {}
    #: keyword inputs of the model's forward that its embeddings take (passed on to :meth:`embed`)
    embed_inputs: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ hooks (families fill these in)
    @staticmethod
    def layers(trunk: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    @staticmethod
    def make_block(layer: nn.Module, config: Any) -> HFBlock:
        raise NotImplementedError

    @classmethod
    def embed(cls, trunk: nn.Module, inputs: torch.Tensor, bool_masked_pos: Optional[torch.Tensor],
              **options: Any) -> torch.Tensor:
        """The model's own embeddings: input -> ``[B, P + N, C]`` (``options``: the :attr:`embed_inputs` given)."""
        raise NotImplementedError

    @classmethod
    def finish(cls, trunk: nn.Module, x: torch.Tensor,
               state: ForwardState) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The model's own final norm and pooler on the final tokens ``x`` of the forward ``state`` (a pooler
        that attends over the tokens weighs them with the method's ``pool_weights``):
        ``(last_hidden_state, pooler_output or None)``."""
        raise NotImplementedError

    @classmethod
    def head(cls, model: nn.Module, tokens: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """The model's own head on the final tokens (classifier logits; a base model's pooled output)."""
        raise NotImplementedError

    @classmethod
    def check_family(cls, model: nn.Module, trunk: nn.Module) -> None:
        """Facts of the family beyond the module layout (head configuration ...)."""

    def embed_macs(self, num_patches: int) -> int:
        """MACs of the patch embedding (its convolution at every output position)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ support
    @classmethod
    def base_name(cls, model: nn.Module) -> Optional[str]:
        for name in cls.classes:
            klass = _transformers_class(name)
            if klass is not None and isinstance(model, klass):
                return name
        return None

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return cls.base_name(model) is not None

    @classmethod
    def trunk_of(cls, model: nn.Module) -> nn.Module:
        attr = cls.classes.get(cls.base_name(model) or "", "")
        sub = model._modules.get(attr) if attr else None
        return sub if sub is not None else model

    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        trunk = cls.trunk_of(model)
        accepted = ", ".join(cls.classes)
        for obj in {id(model): model, id(trunk): trunk}.values():
            base = _transformers_class(cls.base_name(obj) or "")
            if base is None:
                raise UnsupportedModelError(f"{name} holds a {type(obj).__name__} where vitrim expects one of "
                                            f"{accepted}; accepted: transformers' own {accepted}")
            if type(obj).forward is not base.forward:
                raise UnsupportedModelError(
                    f"{type(obj).__name__} overrides {base.__name__}.forward; vitrim reduces transformers' own "
                    f"{accepted}, so it cannot keep {type(obj).__name__}'s behaviour")
        layers = cls.layers(trunk)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UnsupportedModelError(f"{name} has no encoder layers; accepted: {accepted}")
        for i, layer in enumerate(layers):
            layer_cls = next((c for c in type(layer).__mro__ if c.__name__ in cls.layer_classes), None)
            if layer_cls is None or type(layer).forward is not layer_cls.forward:
                raise UnsupportedModelError(
                    f"{name} layer {i} is a {type(layer).__name__}; vitrim supports transformers' "
                    f"{', '.join(cls.layer_classes)} (pre-norm attention and MLP) in {accepted}")
        impl = getattr(trunk.config, "_attn_implementation", None)
        if impl not in _ATTN_IMPLEMENTATIONS:
            raise UnsupportedModelError(f"{name} uses attn_implementation={impl!r}; vitrim runs reduced blocks with "
                                        f"SDPA or eager attention (accepted: eager, sdpa, flash_attention_*, "
                                        f"flex_attention)")
        cls.check_family(model, trunk)

    def __init__(self, model: nn.Module, check: bool = True) -> None:
        super().__init__(model, check)
        self.trunk = self.trunk_of(model)

    # ------------------------------------------------------------------ facts
    def blocks(self) -> list[HFBlock]:
        return [self.make_block(layer, self.trunk.config) for layer in self.layers(self.trunk)]

    def default_img_size(self) -> tuple[int, int]:
        return _pair(self.trunk.config.image_size)

    def grid_size(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """``(h, w)`` patch grid of an image family whose embeddings interpolate their position table (any
        size of at least one patch); families with a fixed table refuse other sizes."""
        h, w = self.default_img_size() if img_size is None else img_size
        ph, pw = _pair(self.trunk.config.patch_size)
        if h < ph or w < pw:
            raise UnsupportedModelError(f"input {h}x{w} is smaller than one {ph}x{pw} patch; accepted: sizes of at "
                                        f"least one patch (position embeddings are interpolated)")
        return h // ph, w // pw

    def num_patches(self, img_size: Optional[tuple[int, int]] = None) -> int:
        h, w = self.grid_size(img_size)
        return h * w

    def input_shape(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, ...]:
        """One sample's input shape for ``img_size`` (images: ``(C, H, W)``)."""
        h, w = self.default_img_size() if img_size is None else img_size
        self.num_patches((h, w))
        return int(getattr(self.trunk.config, "num_channels", 3)), h, w

    def head_modules(self) -> list[nn.Module]:
        """The linears applied to one pooled row per sample (classifiers)."""
        head = getattr(self.model, "classifier", None)
        return [head] if isinstance(head, nn.Module) else []

    def head_macs(self, num_tokens: int, method: Optional[ReductionMethod] = None) -> int:
        """MACs of the head when ``num_tokens`` tokens enter the first layer and ``method`` reduces them: by
        default the linears applied to one pooled row (:meth:`head_modules`)."""
        return sum(linear_macs(h) for h in self.head_modules())

    def cost_plan(self, img_size: tuple[int, int], method: Optional[ReductionMethod] = None) -> CostPlan:
        """Analytic MACs (``docs/flops.md``): the layers priced by ``block_macs`` on the façades (attention
        projections, products, MLP, SwiGLU included), the patch embedding and the head (:meth:`head_macs`)."""
        num_patches = self.num_patches(img_size)
        num_tokens = num_patches + self.info().num_prefix_tokens
        return price_blocks(self.blocks(), method, num_tokens, self.embed_macs(num_patches),
                            self.head_macs(num_tokens, method))

    @contextlib.contextmanager
    def explicit_attention(self) -> Iterator[None]:
        """``attn_implementation="eager"`` for the forward (HF layers pick their kernel from the config)."""
        configs = {id(m.config): m.config for m in self.model.modules()
                   if hasattr(getattr(m, "config", None), "_attn_implementation")}
        saved = [(c, c._attn_implementation) for c in configs.values()]
        try:
            for c, _ in saved:
                c._attn_implementation = "eager"
            yield
        finally:
            for c, impl in saved:
                c._attn_implementation = impl

    # ------------------------------------------------------------------ install
    def install(self, method: ReductionMethod) -> None:
        model, trunk = self.model, self.trunk
        trunk.__dict__["_vitrim_blocks"] = self.blocks()
        model.vitrim = method  # registered once, on the model the user holds (state dict: vitrim.*)
        if trunk is not model:
            trunk.__dict__["vitrim"] = method  # a plain reference: no second copy in the state dict
            trunk.__dict__["_vitrim_owned"] = True
            trunk.__class__ = self.reduced_class(type(trunk), "trunk")
            model.__class__ = self.reduced_class(type(model), "outer")
        else:
            model.__class__ = self.reduced_class(type(model), "trunk+outer")

    @classmethod
    def reduced_class(cls, original: type, variant: str = "trunk+outer") -> type:
        """The generated subclass of ``original`` (cached, picklable), with the original's name so that
        ``save_pretrained`` writes the original architecture."""
        key = (original, cls.family, variant)
        if key not in _REDUCED:
            attrs: dict[str, Any] = {"__qualname__": original.__qualname__, "__doc__": original.__doc__,
                                     "_vitrim_adapter": cls}
            if "trunk" in variant:
                attrs.update(forward=_trunk_forward, _vitrim_run=_run)
            if "outer" in variant:
                attrs.update(forward_tokens=_forward_tokens, forward_with_state=_forward_with_state,
                             forward_head_with_state=_forward_head_with_state)
                own = next((f for n, f in cls.outer_forwards.items()
                            if any(c.__name__ == n for c in original.__mro__)), None)
                if own is not None:
                    attrs["forward"] = own
            _REDUCED[key] = make_reduced_class(original, original.__name__, attrs, (cls.family, variant))
        return _REDUCED[key]

    @classmethod
    def uninstall(cls, model: nn.Module) -> None:
        if model.__dict__.get("_vitrim_owned"):
            raise VitrimError(f"this {type(model).__name__} was reduced through the model that contains it; "
                              f"call vitrim.remove on that model")
        trunk = cls.trunk_of(model)
        for m in {id(model): model, id(trunk): trunk}.values():
            m.__class__ = type(m)._vitrim_original_class
            for key in ("vitrim", "_vitrim_blocks", "_vitrim_owned"):
                m.__dict__.pop(key, None)
        del model.vitrim


# ---------------------------------------------------------------------- reduced trunk
def _use_checkpointing(self) -> bool:
    if not self.training:
        return False
    encoder = getattr(self, "encoder", None)
    return bool(getattr(encoder, "gradient_checkpointing", False)) or any(
        getattr(layer, "gradient_checkpointing", False) for layer in type(self)._vitrim_adapter.layers(self))


def _run(self, inputs: torch.Tensor, keep_hidden: bool = False, bool_masked_pos: Optional[torch.Tensor] = None,
         **options: Any):
    """Embed (with the family's ``options``), thread the state through the façades, final norm and pooler:
    ``(last_hidden_state, pooler_output, hidden_states, state)``; ``hidden_states`` (with ``keep_hidden``)
    holds every layer's input and the last layer's output, each with its own token count."""
    adapter = type(self)._vitrim_adapter
    x = adapter.embed(self, inputs, bool_masked_pos, **options)
    method: ReductionMethod = self.vitrim
    state = method.new_state(x)
    hidden = (x,) if keep_hidden else ()
    use_ckpt = _use_checkpointing(self)
    for i, block in enumerate(self._vitrim_blocks):
        x, state = run_block(method, block, i, x, state, use_ckpt)
        if keep_hidden:
            hidden = hidden + (x,)
    method.finish(state)
    last, pooled = adapter.finish(self, x, state)
    return last, pooled, hidden, state


def embed_options(adapter: type, kwargs: dict) -> dict:
    """Pop the family's :attr:`~HFTrunkAdapter.embed_inputs` from a forward's ``kwargs``."""
    return {key: kwargs.pop(key) for key in adapter.embed_inputs if key in kwargs}


def hidden_flag(self, output_hidden_states: Optional[bool]) -> bool:
    if output_hidden_states is None:
        return bool(getattr(self.config, "output_hidden_states", False))
    return bool(output_hidden_states)


def dict_flag(self, return_dict: Optional[bool]) -> bool:
    return getattr(self.config, "return_dict", True) if return_dict is None else bool(return_dict)


def _trunk_forward(self, *args: Any, bool_masked_pos: Optional[torch.Tensor] = None,
                   output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs: Any):
    """The reduced trunk forward; same input and output type as the model's own. ``output_hidden_states``
    returns every layer's input and the last output, each with its own token count; attention maps,
    head and attention masks are refused."""
    from transformers import modeling_outputs

    adapter = type(self)._vitrim_adapter
    inputs = args[0] if args else kwargs.pop(adapter.input_name, None)
    if len(args) > 1:
        raise TypeError(f"{type(self).__name__}.forward() takes the {adapter.input_name} positionally; pass the "
                        f"other inputs by name")
    if inputs is None:
        raise ValueError(f"You have to specify {adapter.input_name}")
    if bool_masked_pos is not None and not adapter.takes_masked_pos:
        raise VitrimError(f"bool_masked_pos is not supported on a vitrim-reduced {type(self).__name__}: masking drops "
                          f"tokens before the first layer, so the token grid the methods rely on is gone; "
                          f"vitrim.remove(model) restores the original behaviour")
    options = embed_options(adapter, kwargs)
    check_kwargs(self, kwargs)
    keep = hidden_flag(self, output_hidden_states)
    last, pooled, hidden, _ = self._vitrim_run(inputs, keep, bool_masked_pos, **options)
    out_cls = getattr(modeling_outputs, adapter.trunk_output)
    fields = dict(last_hidden_state=last, hidden_states=hidden if keep else None)
    if "pooler_output" in out_cls.__dataclass_fields__:
        fields["pooler_output"] = pooled
    out = out_cls(**fields)
    return out if dict_flag(self, return_dict) else out.to_tuple()


# ---------------------------------------------------------------------- entry points on the outer model
def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Input -> the trunk's ``last_hidden_state`` ``[B, T, C]`` (after its final norm) and the state."""
    trunk = type(self)._vitrim_adapter.trunk_of(self)
    last, _, _, state = trunk._vitrim_run(x)
    return last, state


def _forward_head_with_state(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
    """The model's own head on the final tokens ``[B, T, C]``."""
    return type(self)._vitrim_adapter.head(self, x, state)


def _forward_with_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Logits (or the pooled output of a base model) and the forward's state."""
    tokens, state = self.forward_tokens(x)
    return self.forward_head_with_state(tokens, state), state


def classifier_forward(output_class: str, input_name: str) -> Callable:
    """A classification model's forward that pools with the method's weights (the family's ``head``),
    with the model's own loss and output type; inputs it cannot honour are refused."""

    def forward(self, *args: Any, labels: Optional[torch.Tensor] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs: Any):
        from transformers import modeling_outputs

        adapter = type(self)._vitrim_adapter
        inputs = args[0] if args else kwargs.pop(input_name, None)
        if inputs is None:
            raise ValueError(f"You have to specify {input_name}")
        options = embed_options(adapter, kwargs)
        check_kwargs(self, kwargs)
        keep = hidden_flag(self, output_hidden_states)
        trunk = adapter.trunk_of(self)
        last, _, hidden, state = trunk._vitrim_run(inputs, keep, **options)
        logits = adapter.head(self, last, state)
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        out = getattr(modeling_outputs, output_class)(loss=loss, logits=logits, hidden_states=hidden if keep else None)
        return out if dict_flag(self, return_dict) else out.to_tuple()

    forward.__doc__ = (f"The reduced classifier forward: the reduced trunk, the head pooling with the method's "
                       f"weights (token sizes), the model's own loss; returns {output_class}.")
    return forward
