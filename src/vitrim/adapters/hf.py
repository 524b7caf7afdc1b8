"""Adapter for Hugging Face ``transformers`` vision transformers: ViT, DeiT (distilled too) and CLIP's
vision tower.

The methods speak timm's block vocabulary (``block.norm1``, ``block.attn.qkv``, ``block.ls1``, ...;
see :mod:`vitrim.ops.attention`). Each HF layer is shown to them through a small façade,
:class:`HFBlock` / :class:`HFAttention`, whose attributes *are* the layer's own modules (layer
norms, output projection, MLP, dropouts); the only composite is ``attn.qkv``, the HF ``q/k/v``
projections seen as one linear in timm's ``[q; k; v]`` layout, whose weight and bias are
concatenated from the live parameters at every access (no copy that could go stale after
training, ``load_state_dict`` or ``.to()``). Calling the façade runs the layer's own forward, so
blocks a method leaves alone are the original computation, bit for bit.

Installing swaps two classes for generated subclasses (the original names are kept, so
``save_pretrained`` writes the original architecture):

* the **trunk** (``ViTModel`` / ``DeiTModel`` / CLIP's vision transformer): its ``forward`` runs the
  model's own embeddings (class, distillation tokens, position interpolation, mask tokens), CLIP's
  ``pre_layrnorm``, then threads a :class:`~vitrim.state.ForwardState` through the façades, then the
  model's own final layer norm and pooler, and returns the same output type as before
  (``BaseModelOutputWithPooling``, or its tuple with ``return_dict=False``);
* the model the user passed (e.g. ``ViTForImageClassification``), which keeps its own ``forward``
  (classifier heads, losses, output types) and gains ``forward_tokens`` / ``forward_with_state`` /
  ``forward_head_with_state`` as timm models do.

``vitrim.remove`` restores both classes; modules, weights and the state dict are never touched.
Supported with transformers 4.40+ (``encoder.layer`` / ``attention.attention.query`` layout) and 5.x
(``layers`` / ``attention.q_proj`` layout).
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError, VitrimError
from ..measure.flops import CostPlan, linear_macs, price_blocks
from ..methods.base import ModelInfo, ReductionMethod
from ..state import ForwardState
from .base import Adapter, make_reduced_class, register_adapter, run_block

__all__ = ["HFAdapter", "HFBlock", "HFAttention", "hf_blocks", "SUPPORTED_CLASSES"]

#: model classes vitrim.apply accepts -> attribute holding the trunk ("" = the model itself)
SUPPORTED_CLASSES = {
    "ViTModel": "",
    "ViTForImageClassification": "vit",
    "DeiTModel": "",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",
    "CLIPVisionModel": "vision_model",  # transformers 4.x; 5.x CLIPVisionModel is its own trunk
}
_LAYER_CLASSES = ("ViTLayer", "DeiTLayer", "CLIPEncoderLayer")
_IDENTITY = nn.Identity()
_REDUCED_CLASSES: dict[tuple[type, str], type] = {}


def _transformers_class(name: str) -> Optional[type]:
    """``transformers.<name>`` if transformers is already imported (an HF model implies it is)."""
    mod = sys.modules.get("transformers")
    if mod is None:
        return None
    try:
        return getattr(mod, name)
    except (AttributeError, ImportError):  # lazy module without this model
        return None


def _supported_base(model: nn.Module) -> Optional[str]:
    """Name of the supported transformers class ``model`` is an instance of (``None``: not one)."""
    for name in SUPPORTED_CLASSES:
        cls = _transformers_class(name)
        if cls is not None and isinstance(model, cls):
            return name
    return None


# ---------------------------------------------------------------------- façades
class FusedQKV:
    """Three HF projections ``q, k, v: C -> A`` seen as timm's ``qkv: C -> 3A`` (rows ``[q; k; v]``).

    ``weight`` / ``bias`` are concatenated from the live parameters at each access, so slicing them
    (``class_attention_logits``) or calling the façade always uses the current weights.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        self.parts = (q, k, v)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def weight(self) -> torch.Tensor:
        """``[3A, C]``."""
        return torch.cat([p.weight for p in self.parts], dim=0)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """``[3A]``, or ``None`` when no projection has a bias (zeros stand in for a missing one)."""
        if all(p.bias is None for p in self.parts):
            return None
        return torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in self.parts])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C] -> [B, T, 3A]``: one matmul, as timm's fused ``qkv``."""
        return F.linear(x, self.weight, self.bias)


class ProbDropout:
    """Attention-probability dropout of an HF attention that stores its rate as a float attribute
    (transformers 5.x ``attention_dropout``, CLIP ``dropout``); follows the module's train/eval mode."""

    def __init__(self, module: nn.Module, attr: str) -> None:
        self.module, self.attr = module, attr

    @property
    def p(self) -> float:
        return float(getattr(self.module, self.attr))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.module.training)


class HFAttention:
    """An HF self-attention module presented as a timm ``Attention`` (what :mod:`vitrim.ops.attention` reads)."""

    q_norm = k_norm = norm = _IDENTITY  # HF ViT / DeiT / CLIP have no qk-norm or scale-norm
    gate = None

    def __init__(self, module: nn.Module, config: Any, qkv: FusedQKV, proj: nn.Linear, proj_drop: nn.Module,
                 attn_drop: Callable[[torch.Tensor], torch.Tensor], num_heads: int, head_dim: int,
                 scale: float) -> None:
        self.module, self.config = module, config
        self.qkv, self.proj, self.proj_drop, self.attn_drop = qkv, proj, proj_drop, attn_drop
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.attn_dim = num_heads * head_dim

    @property
    def training(self) -> bool:
        return self.module.training

    @property
    def fused_attn(self) -> bool:
        """SDPA unless the model was loaded with ``attn_implementation="eager"`` (read live)."""
        return getattr(self.config, "_attn_implementation", None) not in ("eager", None)


class HFBlock:
    """An HF encoder layer presented as a timm ``Block``; calling it runs the layer's own forward."""

    ls1 = ls2 = drop_path1 = drop_path2 = _IDENTITY  # no LayerScale or stochastic depth in these models

    def __init__(self, layer: nn.Module, norm1: nn.Module, attn: HFAttention, norm2: nn.Module,
                 mlp: nn.Module) -> None:
        self.layer, self.norm1, self.attn, self.norm2, self.mlp = layer, norm1, attn, norm2, mlp
        # HF layers take masks positionally (CLIP 4.x: attention_mask, causal_attention_mask)
        params = list(inspect.signature(type(layer).forward).parameters.values())[2:]
        self._nones = (None,) * sum(1 for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty)

    @property
    def training(self) -> bool:
        return self.layer.training

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C] -> [B, T, C]``: the layer's own forward without a mask, as the model calls it."""
        out = self.layer(x, *self._nones)
        return out[0] if isinstance(out, tuple) else out


class _ViT4MLP(nn.Module):
    """transformers 4.x ViT/DeiT MLP: ``intermediate`` (fc1 + act) then ``output.dense`` and its dropout
    (``output.forward`` also adds the residual, which the methods add themselves)."""

    def __init__(self, intermediate: nn.Module, output: nn.Module) -> None:
        super().__init__()
        self.intermediate, self.output = intermediate, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dropout(self.output.dense(self.intermediate(x)))


def _vit_block(layer: nn.Module, config: Any) -> HFBlock:
    """Façade of a ``ViTLayer`` / ``DeiTLayer`` (transformers 5.x or 4.x layout)."""
    att = layer.attention
    if hasattr(att, "q_proj"):  # 5.x: q/k/v/o projections on the attention, one dropout on the layer
        attn = HFAttention(att, config, FusedQKV(att.q_proj, att.k_proj, att.v_proj), att.o_proj, layer.dropout,
                           ProbDropout(att, "attention_dropout"), att.num_attention_heads, att.head_dim, att.scaling)
        mlp = nn.Sequential(layer.mlp, layer.dropout)
    else:  # 4.x: attention.attention (query/key/value) + attention.output (dense, dropout)
        sa = att.attention
        head_dim = sa.attention_head_size
        attn = HFAttention(sa, config, FusedQKV(sa.query, sa.key, sa.value), att.output.dense, att.output.dropout,
                           sa.dropout, sa.num_attention_heads, head_dim, head_dim ** -0.5)
        mlp = _ViT4MLP(layer.intermediate, layer.output)
    return HFBlock(layer, layer.layernorm_before, attn, layer.layernorm_after, mlp)


def _clip_block(layer: nn.Module, config: Any) -> HFBlock:
    """Façade of a ``CLIPEncoderLayer`` (same layout in 4.x and 5.x)."""
    sa = layer.self_attn
    attn = HFAttention(sa, config, FusedQKV(sa.q_proj, sa.k_proj, sa.v_proj), sa.out_proj, _IDENTITY,
                       ProbDropout(sa, "dropout"), sa.num_heads, sa.head_dim, sa.scale)
    return HFBlock(layer, layer.layer_norm1, attn, layer.layer_norm2, layer.mlp)


# ---------------------------------------------------------------------- model layout
def _trunk(model: nn.Module) -> nn.Module:
    """The module holding embeddings, layers and final norm (the model itself for base models)."""
    attr = SUPPORTED_CLASSES.get(_supported_base(model) or "", "")
    sub = model._modules.get(attr) if attr else None
    return sub if sub is not None else model


def _is_clip(trunk: nn.Module) -> bool:
    return hasattr(trunk, "pre_layrnorm")


def _layers(trunk: nn.Module) -> nn.ModuleList:
    if _is_clip(trunk):
        return trunk.encoder.layers
    if "layers" in trunk._modules:  # transformers 5.x
        return trunk.layers
    return trunk.encoder.layer


def hf_blocks(trunk: nn.Module) -> list[HFBlock]:
    """The façades of a trunk's layers, in order."""
    build = _clip_block if _is_clip(trunk) else _vit_block
    return [build(layer, trunk.config) for layer in _layers(trunk)]


def _patch_conv(trunk: nn.Module) -> nn.Conv2d:
    emb = trunk.embeddings
    return emb.patch_embedding if _is_clip(trunk) else emb.patch_embeddings.projection


def _num_prefix_tokens(trunk: nn.Module) -> int:
    return 2 if getattr(trunk.embeddings, "distillation_token", None) is not None else 1


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _head_modules(model: nn.Module) -> list[nn.Module]:
    """Linear layers the model applies to one pooled row per image (classifiers, ViT pooler)."""
    trunk = _trunk(model)
    heads = [getattr(model, name, None) for name in ("classifier", "cls_classifier", "distillation_classifier")]
    pooler = getattr(trunk, "pooler", None)
    return [h for h in heads + [pooler] if isinstance(h, nn.Module)]


# ---------------------------------------------------------------------- the adapter
@register_adapter
class HFAdapter(Adapter):
    """Validates a transformers ViT / DeiT / CLIP vision model and installs/removes a method on it
    (its own class cache and removal: the swapped classes keep HF's names for ``save_pretrained``)."""

    family = "hf"
    label = "Hugging Face transformers"
    accepts = f"Hugging Face transformers {', '.join(SUPPORTED_CLASSES)}"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _supported_base(model) is not None

    def __init__(self, model: nn.Module, check: bool = True) -> None:
        super().__init__(model, check)
        self.trunk = _trunk(model)

    # ------------------------------------------------------------------ checks
    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        base = _transformers_class(_supported_base(model))
        trunk = _trunk(model)
        trunk_base = _transformers_class(_supported_base(trunk) or "") or type(trunk)
        for obj, cls in ((model, base), (trunk, trunk_base)):
            if type(obj).forward is not cls.forward:
                raise UnsupportedModelError(
                    f"{type(obj).__name__} overrides {cls.__name__}.forward; vitrim reduces transformers' own "
                    f"{', '.join(SUPPORTED_CLASSES)}, so it cannot keep {type(obj).__name__}'s behaviour")
        for i, layer in enumerate(_layers(trunk)):
            layer_cls = next((c for c in type(layer).__mro__ if c.__name__ in _LAYER_CLASSES), None)
            if layer_cls is None or type(layer).forward is not layer_cls.forward:
                raise UnsupportedModelError(
                    f"{name} layer {i} is a {type(layer).__name__}; vitrim supports transformers' "
                    f"{', '.join(_LAYER_CLASSES)} (pre-norm attention and MLP)")
        impl = getattr(trunk.config, "_attn_implementation", None)
        if impl not in (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"):
            raise UnsupportedModelError(f"{name} uses attn_implementation={impl!r}; vitrim runs reduced blocks with "
                                        f"SDPA or eager attention (accepted: eager, sdpa, flash_attention_*, flex_attention)")

    # ------------------------------------------------------------------ facts
    def blocks(self) -> list[HFBlock]:
        return hf_blocks(self.trunk)

    def info(self) -> ModelInfo:
        trunk, cfg = self.trunk, self.trunk.config
        family = "hf-clip" if _is_clip(trunk) else ("hf-deit" if _num_prefix_tokens(trunk) == 2 else "hf-vit")
        return ModelInfo(
            family=family,
            family_label=self.label,
            depth=len(_layers(trunk)),
            embed_dim=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_prefix_tokens=_num_prefix_tokens(trunk),
            num_patches=self.num_patches(),
            global_pool="token",  # every supported head reads the class (and distillation) token
            has_class_token=True,
        )

    def default_img_size(self) -> tuple[int, int]:
        return _pair(self.trunk.config.image_size)

    def patch_size(self) -> tuple[int, int]:
        return _pair(self.trunk.config.patch_size)

    def grid_size(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        h, w = self.default_img_size() if img_size is None else img_size
        ph, pw = self.patch_size()
        return h // ph, w // pw

    def num_patches(self, img_size: Optional[tuple[int, int]] = None) -> int:
        h, w = self.grid_size(img_size)
        return h * w

    # ------------------------------------------------------------------ FLOPs
    def cost_plan(self, img_size: tuple[int, int], method: Optional[ReductionMethod] = None) -> CostPlan:
        """Analytic MACs in timm's convention, so an HF model and the timm model with the same shapes
        report the same numbers: blocks priced by ``block_macs`` on the façades, the patch-embedding
        convolution, and the linears applied to the pooled row (classifier(s); the ViT pooler's dense layer)."""
        num_patches = self.num_patches(img_size)
        num_tokens = num_patches + _num_prefix_tokens(self.trunk)
        head = sum(linear_macs(h) for h in _head_modules(self.model))
        return price_blocks(self.blocks(), method, num_tokens, _patch_conv(self.trunk).weight.numel() * num_patches,
                            head)

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
        """The generated subclass of ``original`` (cached, picklable); it keeps the original's name, so
        ``save_pretrained`` writes the original architecture. ``variant``: ``"trunk"`` (the reduced trunk
        forward), ``"outer"`` (vitrim's entry points on the model the user holds) or both."""
        key = (original, variant)
        if key not in _REDUCED_CLASSES:
            attrs: dict[str, Any] = {"__qualname__": original.__qualname__, "__doc__": original.__doc__}
            if "trunk" in variant:
                attrs.update(forward=_trunk_forward, _vitrim_trunk_tokens=_trunk_tokens)
            if "outer" in variant:
                attrs.update(forward_tokens=_forward_tokens, forward_with_state=_forward_with_state,
                             forward_head_with_state=_forward_head_with_state)
            _REDUCED_CLASSES[key] = make_reduced_class(original, original.__name__, attrs, (cls.family, variant))
        return _REDUCED_CLASSES[key]

    @staticmethod
    def uninstall(model: nn.Module) -> None:
        if model.__dict__.get("_vitrim_owned"):
            raise VitrimError(f"this {type(model).__name__} was reduced through the model that contains it; "
                              f"call vitrim.remove on that model")
        trunk = _trunk(model)
        for m in {id(model): model, id(trunk): trunk}.values():
            m.__class__ = type(m)._vitrim_original_class
            for key in ("vitrim", "_vitrim_blocks", "_vitrim_owned"):
                m.__dict__.pop(key, None)
        del model.vitrim


# ---------------------------------------------------------------------- reduced forward (trunk)
def _embed(self, pixel_values: torch.Tensor, bool_masked_pos: Optional[torch.Tensor],
           interpolate_pos_encoding: Optional[bool]) -> torch.Tensor:
    """The model's own embeddings: ``[B, 3, H, W] -> [B, P + N, C]`` (CLIP: after ``pre_layrnorm``)."""
    if _is_clip(self):
        if bool_masked_pos is not None:
            raise VitrimError("CLIP vision models take no bool_masked_pos")
        return self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding)))
    dtype = self.embeddings.patch_embeddings.projection.weight.dtype
    if pixel_values.dtype != dtype:  # as the HF forward does
        pixel_values = pixel_values.to(dtype)
    return self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos,
                           interpolate_pos_encoding=interpolate_pos_encoding)


def _use_checkpointing(self) -> bool:
    if not self.training:
        return False
    encoder = getattr(self, "encoder", None)
    return bool(getattr(encoder, "gradient_checkpointing", False)) or any(
        getattr(layer, "gradient_checkpointing", False) for layer in _layers(self))


def _run_blocks(self, x: torch.Tensor, keep_hidden: bool) -> tuple[torch.Tensor, ForwardState, tuple]:
    """Thread the state through the layer façades: ``[B, T0, C] -> [B, T, C]``, the state and,
    with ``keep_hidden``, every layer's input and the last output (HF's ``hidden_states``)."""
    method: ReductionMethod = self.vitrim
    state = method.new_state(x)
    hidden = (x,) if keep_hidden else ()
    use_ckpt = _use_checkpointing(self)
    for i, block in enumerate(self._vitrim_blocks):
        x, state = run_block(method, block, i, x, state, use_ckpt)
        if keep_hidden:
            hidden = hidden + (x,)
    method.finish(state)
    return x, state, hidden


def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The model's own final norm and pooler: ``(last_hidden_state, pooler_output)``."""
    if _is_clip(self):  # CLIP normalises the pooled class token only
        return x, self.post_layernorm(x[:, 0, :])
    x = self.layernorm(x)
    pooler = getattr(self, "pooler", None)
    return x, (pooler(x) if pooler is not None else None)


def _trunk_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """``[B, 3, H, W]`` -> ``last_hidden_state`` ``[B, T, C]`` and the forward's state; position
    embeddings are interpolated when the input size is not the model's own (as timm's dynamic size)."""
    interpolate = tuple(pixel_values.shape[-2:]) != _pair(self.config.image_size)
    x, state, _ = _run_blocks(self, _embed(self, pixel_values, None, interpolate), False)
    return _outputs(self, x)[0], state


_REFUSED = {"output_attentions": "attention maps are not materialised by reduced blocks",
            "head_mask": "reduced blocks take no head mask",
            "attention_mask": "reduced blocks take no attention mask (every token is real: no padding)"}


def check_kwargs(self, kwargs: dict) -> None:
    """Refuse the inputs a reduced forward cannot honour, with why (any other keyword given is a TypeError)."""
    for key, value in kwargs.items():
        if key in _REFUSED and not (value is None or value is False):  # `in` would compare a tensor elementwise
            raise VitrimError(f"{key} is not supported on a vitrim-reduced model: {_REFUSED[key]}; "
                              f"vitrim.remove(model) restores the original behaviour")
        if key not in _REFUSED and value is not None:
            raise TypeError(f"{type(self).__name__}.forward() got an unexpected keyword argument {key!r}")
    if getattr(self.config, "output_attentions", False) and kwargs.get("output_attentions") is None:
        raise VitrimError(f"config.output_attentions=True is not supported on a vitrim-reduced model: "
                          f"{_REFUSED['output_attentions']}")


def _trunk_forward(self, pixel_values: Optional[torch.Tensor] = None, bool_masked_pos: Optional[torch.Tensor] = None,
                   interpolate_pos_encoding: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                   return_dict: Optional[bool] = None, **kwargs: Any):
    """The reduced trunk forward; same inputs and output type as the model's own.

    ``output_hidden_states=True`` returns every layer's input plus the last layer's output, each with
    its own token count. ``output_attentions``, ``head_mask`` and ``attention_mask`` are refused.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if pixel_values is None:
        raise ValueError("You have to specify pixel_values")
    check_kwargs(self, kwargs)
    if output_hidden_states is None:
        output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
    x = _embed(self, pixel_values, bool_masked_pos, interpolate_pos_encoding)
    x, _, hidden = _run_blocks(self, x, bool(output_hidden_states))
    last, pooled = _outputs(self, x)
    out = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled,
                                     hidden_states=hidden if output_hidden_states else None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


# ---------------------------------------------------------------------- reduced model methods (outer)
def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Image ``[B, 3, H, W]`` -> the trunk's ``last_hidden_state`` ``[B, T, C]`` (ViT / DeiT: after the
    final layer norm; CLIP: before ``post_layernorm``, as CLIP returns it) and the forward's state."""
    return _trunk(self)._vitrim_trunk_tokens(x)


def _forward_head_with_state(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
    """The model's own head on the final tokens ``[B, T, C]``: classifier logits (distilled DeiT: the
    mean of both heads, as its forward); for base models, the pooled output (or the class token)."""
    if getattr(self, "cls_classifier", None) is not None:
        return (self.cls_classifier(x[:, 0, :]) + self.distillation_classifier(x[:, 1, :])) / 2
    if getattr(self, "classifier", None) is not None:
        return self.classifier(x[:, 0, :])
    trunk = _trunk(self)
    if _is_clip(trunk):
        return trunk.post_layernorm(x[:, 0, :])
    pooler = getattr(trunk, "pooler", None)
    return pooler(x) if pooler is not None else x[:, 0, :]


def _forward_with_state(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Logits (or the pooled output of a base model) and the forward's state."""
    tokens, state = self.forward_tokens(x)
    return self.forward_head_with_state(tokens, state), state
