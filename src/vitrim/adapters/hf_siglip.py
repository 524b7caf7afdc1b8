"""Adapter for Hugging Face SigLIP vision towers: ``SiglipVisionModel`` and ``SiglipForImageClassification``,
under every method (docs/models/hf.md).

A ``SiglipEncoderLayer`` has CLIP's layout (``self_attn`` with ``q/k/v/out_proj``, ``layer_norm1/2``,
``mlp``), shown to the methods through :mod:`vitrim.adapters.hf`'s CLIP façade. There is no class token
(``num_prefix_tokens = 0``): ToMe merges every token; EViT, eTPS and IdleViT score with the
average-token query and DynamicViT and dTPS with their predictors' live-token mean (the class-token-free
rules, a [vitrim extension] for the first three), exactly as on timm's ``vit_*_siglip_*``.

The vision model's pooled output is its attention-pool head (``SiglipMultiheadAttentionPoolingHead``: a
learned probe attends over the final tokens through ``nn.MultiheadAttention``, then a residual MLP). On
reduced tokens it runs with its own weights through :func:`vitrim.ops.attention.latent_pool`, each key
standing for what its token stands for: ToMe adds ``log(size)`` to the pool's logits (proportional
attention: a merged token pools as the patches it holds), the pruning methods pool the tokens that remain
(masked training: the live ones). Where every token stands for one, the head is the model's own call.
``SiglipForImageClassification`` classifies the mean of the final tokens, weighted after a reduction by
what each token stands for.

Inputs of another size than the model's interpolate its position table (as ``interpolate_pos_encoding=True``);
``interpolate_pos_encoding`` given explicitly is passed on to the embeddings as the model does.
``Siglip2VisionModel`` (NaFlex: variable patch counts with padding masks) and the dual-tower ``SiglipModel``
are refused with what to use instead.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..measure.flops import attention_pool_macs, conv_macs, linear_macs
from ..methods.base import ModelInfo, ReductionMethod
from ..ops.attention import latent_pool
from ..state import ForwardState
from .base import register_adapter, runs_own_forward
from .hf import _clip_block, _pair, _transformers_class
from .hf_trunk import HFTrunkAdapter, classifier_forward, weighted_mean

__all__ = ["HFSiglipAdapter", "SiglipPool"]

_IDENTITY = nn.Identity()
_REFUSED_CLASSES = ("Siglip2VisionModel", "Siglip2ForImageClassification", "Siglip2Model", "SiglipModel")


class _InProjRows:
    """Rows ``[start, stop)`` of an ``nn.MultiheadAttention``'s packed ``in_proj`` seen as a linear layer
    (``weight [stop - start, C]``, ``bias`` or ``None``), read from the live parameters at each call."""

    def __init__(self, mha: nn.MultiheadAttention, start: int, stop: int) -> None:
        self.mha, self.start, self.stop = mha, start, stop

    @property
    def weight(self) -> torch.Tensor:
        return self.mha.in_proj_weight[self.start:self.stop]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        b = self.mha.in_proj_bias
        return None if b is None else b[self.start:self.stop]

    @property
    def macs(self) -> int:
        """MACs per row."""
        return (self.stop - self.start) * self.mha.embed_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C] -> [B, T, stop - start]``."""
        return F.linear(x, self.weight, self.bias)


class SiglipPool:
    """A ``SiglipMultiheadAttentionPoolingHead`` presented as timm's ``AttentionPoolLatent`` (what
    :func:`~vitrim.ops.attention.latent_pool` reads): the probe is the one latent, ``q`` / ``kv`` the rows of
    the attention's packed input projection, ``proj`` its output projection, then the head's own
    ``layernorm`` and ``mlp`` as the residual MLP, and the latent row as the output."""

    pos_embed = None
    latent_len = 1
    pool = "token"
    q_norm = k_norm = proj_drop = _IDENTITY

    def __init__(self, head: nn.Module, config: Any) -> None:
        mha: nn.MultiheadAttention = head.attention
        c = mha.embed_dim
        self.config, self.latent = config, head.probe
        self.q, self.kv = _InProjRows(mha, 0, c), _InProjRows(mha, c, 3 * c)
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.scale = mha.head_dim ** -0.5
        self.proj, self.norm, self.mlp = mha.out_proj, head.layernorm, head.mlp

    @property
    def fused_attn(self) -> bool:
        """SDPA unless the model runs ``attn_implementation="eager"`` (read live, as the layers' façades)."""
        return getattr(self.config, "_attn_implementation", None) not in ("eager", None)

    def macs(self, num_tokens: int) -> int:
        """MACs of the head pooling ``num_tokens`` tokens (``docs/flops.md``, attention-pool heads)."""
        return attention_pool_macs(1, num_tokens, self.q.macs, self.kv.macs, self.num_heads * self.head_dim,
                                   linear_macs(self.proj) + linear_macs(self.mlp))


def siglip_pool(trunk: nn.Module, x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The vision model's attention-pool head on final tokens ``x: [B, T, C]`` whose keys stand for
    ``weights [B, T, 1]`` tokens (``None``: one each, the head's own forward) -> ``[B, C]``."""
    if weights is None:
        return trunk.head(x)
    return latent_pool(SiglipPool(trunk.head, trunk.config), x, weights)


@register_adapter
class HFSiglipAdapter(HFTrunkAdapter):
    """Validates a transformers SigLIP vision model and installs a method on it."""

    family = "hf-siglip"
    label = "Hugging Face SigLIP"
    classes = {"SiglipVisionModel": "", "SiglipForImageClassification": "vision_model"}
    layer_classes = ("SiglipEncoderLayer",)
    accepts = "Hugging Face transformers SiglipVisionModel, SiglipForImageClassification"
    embed_inputs = ("interpolate_pos_encoding",)
    outer_forwards = {"SiglipForImageClassification": classifier_forward("ImageClassifierOutput", "pixel_values")}

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return super().supports(model) or any(
            (k := _transformers_class(n)) is not None and isinstance(model, k) for n in _REFUSED_CLASSES)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        for refused in _REFUSED_CLASSES:
            klass = _transformers_class(refused)
            if klass is None or not isinstance(model, klass):
                continue
            if refused.startswith("Siglip2"):
                raise UnsupportedModelError(
                    f"{name} (Hugging Face SigLIP2, NaFlex) is not supported: it runs variable patch counts with "
                    f"padding masks (pixel_attention_mask, spatial_shapes), which reduced blocks do not take. "
                    f"Accepted: timm's fixed-resolution vit_*_siglip_* models (SigLIP2 weights included), "
                    f"{cls.accepts}")
            raise UnsupportedModelError(
                f"{name} holds a text and a vision tower; vitrim reduces the vision tower: apply it to "
                f"model.vision_model (a SiglipVisionModel). Accepted: {cls.accepts}")
        super().check(model)

    @classmethod
    def check_family(cls, model: nn.Module, trunk: nn.Module) -> None:
        if not getattr(trunk, "use_head", False):
            return
        from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead as head_cls

        mha = getattr(trunk.head, "attention", None)
        if not runs_own_forward(trunk.head, head_cls) or not runs_own_forward(mha, nn.MultiheadAttention) \
                or not mha._qkv_same_embed_dim or not mha.batch_first or mha.bias_k is not None \
                or mha.add_zero_attn or mha.dropout != 0.0:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s attention-pool head is a {type(trunk.head).__name__}"
                f"{'' if mha is None else f' with a {type(mha).__name__}'} that vitrim cannot run with a key bias; "
                f"accepted: transformers' SiglipMultiheadAttentionPoolingHead over its own nn.MultiheadAttention "
                f"(batch_first, one input projection, no bias_k/bias_v, add_zero_attn or dropout), or "
                f"vision_use_head=False")

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def layers(trunk: nn.Module) -> Optional[nn.ModuleList]:
        return getattr(getattr(trunk, "encoder", None), "layers", None)

    make_block = staticmethod(_clip_block)  # SiglipEncoderLayer has CLIPEncoderLayer's layout

    @classmethod
    def embed(cls, trunk: nn.Module, inputs: torch.Tensor, bool_masked_pos: Optional[torch.Tensor],
              interpolate_pos_encoding: Optional[bool] = None) -> torch.Tensor:
        """The model's own embeddings, ``[B, C, H, W] -> [B, N, C]``; the position table is interpolated when
        asked, or (not said) when the input is not the model's own size."""
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = tuple(inputs.shape[-2:]) != _pair(trunk.config.image_size)
        return trunk.embeddings(inputs, interpolate_pos_encoding=bool(interpolate_pos_encoding))

    @classmethod
    def finish(cls, trunk: nn.Module, x: torch.Tensor,
               state: ForwardState) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``post_layernorm``, then the attention-pool head (its keys weighted by the method's
        ``pool_weights``) as ``pooler_output`` (``None`` with ``vision_use_head=False``)."""
        x = trunk.post_layernorm(x)
        if not trunk.use_head:
            return x, None
        return x, siglip_pool(trunk, x, trunk.vitrim.pool_weights(state))

    @classmethod
    def head(cls, model: nn.Module, tokens: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """Classifier: ``classifier(weighted mean)``; vision model: its attention-pool head, or the weighted
        mean of the tokens without one."""
        weights = model.vitrim.pool_weights(state)
        classifier = getattr(model, "classifier", None)
        if classifier is not None:
            return classifier(weighted_mean(tokens, weights))
        return siglip_pool(model, tokens, weights) if model.use_head else weighted_mean(tokens, weights)

    # ------------------------------------------------------------------ facts
    def _pools_with_head(self) -> bool:
        return self.trunk.use_head and getattr(self.model, "classifier", None) is None

    def info(self) -> ModelInfo:
        cfg = self.trunk.config
        return ModelInfo(family=self.family, family_label=self.label, depth=len(self.layers(self.trunk)),
                         embed_dim=cfg.hidden_size, num_heads=cfg.num_attention_heads, num_prefix_tokens=0,
                         num_patches=self.num_patches(), global_pool="map" if self._pools_with_head() else "avg",
                         has_class_token=False, weighted_attention_pool=bool(self.trunk.use_head))

    def embed_macs(self, num_patches: int) -> int:
        return conv_macs(self.trunk.embeddings.patch_embedding, num_patches)

    def head_macs(self, num_tokens: int, method: Optional[ReductionMethod] = None) -> int:
        """The classifier, and the attention-pool head on the tokens the method leaves (it runs for the
        classifier too, whose forward computes the vision model's pooled output)."""
        macs = super().head_macs(num_tokens, method)
        if self.trunk.use_head:
            final = num_tokens if method is None else method.final_tokens(num_tokens)
            macs += SiglipPool(self.trunk.head, self.trunk.config).macs(final)
        return macs
