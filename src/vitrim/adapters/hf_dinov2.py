"""Adapter for Hugging Face DINOv2: ``Dinov2Model``, ``Dinov2WithRegistersModel`` and their
``*ForImageClassification`` heads, under every method (docs/models/hf.md).

A ``Dinov2Layer`` is timm's pre-norm block with LayerScale (``layer_scale1/2``) and stochastic depth
(one ``drop_path`` for both residuals) and an MLP or SwiGLU feed-forward; its façade
(:class:`HFScaledBlock`) shows these modules under the block contract's names. The class token and
the register tokens are the prefix (kept first, never merged or pruned); position embeddings are
interpolated by the model's own embeddings for any input size that is a multiple of the patch.

The classification heads read ``concat(class token, mean of the patch tokens)``: after a reduction
the mean is weighted by what each token stands for (ToMe: its size), so merged duplicates pool as
the patches they replace.

HF ``DINOv3ViTModel`` is refused: its layers rotate queries and keys with rotary embeddings computed
for the full patch grid, which these façades do not carry through merged or pruned tokens; timm's
``vit_*_dinov3`` models (the same architecture) are reduced with every method by the ``Eva`` adapter.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..measure.flops import conv_macs
from ..methods.base import ModelInfo
from ..state import ForwardState
from .base import register_adapter
from .hf import FusedQKV, HFAttention, HFBlock, ProbDropout, _transformers_class
from .hf_trunk import HFTrunkAdapter, classifier_forward, weighted_mean

__all__ = ["HFDinov2Adapter", "HFScaledBlock"]

_IDENTITY = nn.Identity()
_REFUSED_CLASSES = ("DINOv3ViTModel", "DINOv3ViTBackbone", "Dinov2Backbone", "Dinov2WithRegistersBackbone")


class HFScaledBlock(HFBlock):
    """An HF layer with LayerScale and stochastic depth presented as a timm ``Block``."""

    def __init__(self, layer: nn.Module, norm1: nn.Module, attn: HFAttention, norm2: nn.Module, mlp: nn.Module,
                 ls1: nn.Module, ls2: nn.Module, drop_path: nn.Module) -> None:
        super().__init__(layer, norm1, attn, norm2, mlp)
        self.ls1, self.ls2 = ls1, ls2
        self.drop_path1 = self.drop_path2 = drop_path


def dinov2_block(layer: nn.Module, config: Any) -> HFScaledBlock:
    """Façade of a ``Dinov2Layer`` / ``Dinov2WithRegistersLayer``."""
    att = layer.attention
    attn = HFAttention(att, config, FusedQKV(att.q_proj, att.k_proj, att.v_proj), att.o_proj, _IDENTITY,
                       ProbDropout(att, "attention_dropout"), att.num_attention_heads, att.head_dim, att.scaling)
    return HFScaledBlock(layer, layer.norm1, attn, layer.norm2, layer.mlp, layer.layer_scale1, layer.layer_scale2,
                         layer.drop_path)


def _cls_and_patch_mean(model: nn.Module, tokens: torch.Tensor, state: ForwardState) -> torch.Tensor:
    """``classifier(concat(x[:, 0], weighted mean of the patch tokens))``: the classifiers' own rule."""
    start = state.num_prefix_tokens
    weights = model.vitrim.pool_weights(state)
    mean = weighted_mean(tokens[:, start:], None if weights is None else weights[:, start:])
    return model.classifier(torch.cat([tokens[:, 0], mean], dim=1))


@register_adapter
class HFDinov2Adapter(HFTrunkAdapter):
    """Validates a transformers DINOv2 model (with or without registers) and installs a method on it."""

    family = "hf-dinov2"
    label = "Hugging Face DINOv2"
    classes = {"Dinov2Model": "", "Dinov2ForImageClassification": "dinov2",
               "Dinov2WithRegistersModel": "", "Dinov2WithRegistersForImageClassification": "dinov2_with_registers"}
    layer_classes = ("Dinov2Layer", "Dinov2WithRegistersLayer")
    accepts = f"Hugging Face transformers {', '.join(classes)}"
    takes_masked_pos = True  # mask tokens replace patches in place: the token count is unchanged
    outer_forwards = {"Dinov2ForImageClassification": classifier_forward("ImageClassifierOutput", "pixel_values"),
                      "Dinov2WithRegistersForImageClassification":
                          classifier_forward("ImageClassifierOutput", "pixel_values")}

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return super().supports(model) or any(
            (k := _transformers_class(n)) is not None and isinstance(model, k) for n in _REFUSED_CLASSES)

    @classmethod
    def check_family(cls, model: nn.Module, trunk: nn.Module) -> None:
        if getattr(trunk.embeddings, "position_embeddings", None) is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no position embeddings; accepted: DINOv2 "
                                        f"models with learned absolute position embeddings")

    @classmethod
    def check(cls, model: nn.Module) -> None:
        for name in _REFUSED_CLASSES:
            klass = _transformers_class(name)
            if klass is not None and isinstance(model, klass):
                if name.startswith("DINOv3"):
                    raise UnsupportedModelError(
                        f"{type(model).__name__} (Hugging Face DINOv3) is not supported: its layers rotate queries "
                        f"and keys with rotary position embeddings computed for the whole patch grid, and vitrim's "
                        f"Hugging Face façades do not carry those rows through merged or pruned tokens. Accepted: "
                        f"timm's vit_*_dinov3 models (the same architecture and weights layout), which vitrim "
                        f"reduces with every method; {cls.accepts}")
                raise UnsupportedModelError(
                    f"{type(model).__name__} is not supported: a backbone returns feature maps of every patch, "
                    f"which reduced tokens no longer form (use vitrim.forward_dense for dense features); "
                    f"accepted: {cls.accepts}")
        super().check(model)

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def layers(trunk: nn.Module) -> nn.ModuleList:
        return trunk.encoder.layer

    make_block = staticmethod(dinov2_block)

    @classmethod
    def embed(cls, trunk: nn.Module, inputs: torch.Tensor, bool_masked_pos: Optional[torch.Tensor]) -> torch.Tensor:
        return trunk.embeddings(inputs, bool_masked_pos=bool_masked_pos)

    @classmethod
    def finish(cls, trunk: nn.Module, x: torch.Tensor,
               state: ForwardState) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = trunk.layernorm(x)
        return x, x[:, 0, :]

    @classmethod
    def head(cls, model: nn.Module, tokens: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if getattr(model, "classifier", None) is not None:
            return _cls_and_patch_mean(model, tokens, state)
        return tokens[:, 0, :]

    # ------------------------------------------------------------------ facts
    def info(self) -> ModelInfo:
        cfg = self.trunk.config
        return ModelInfo(
            family="hf-dinov2", family_label=self.label, depth=len(self.layers(self.trunk)),
            embed_dim=cfg.hidden_size, num_heads=cfg.num_attention_heads,
            num_prefix_tokens=1 + int(getattr(cfg, "num_register_tokens", 0) or 0),
            num_patches=self.num_patches(),
            # the classifiers average the patch tokens (weighted after a reduction); the base model reads the class token
            global_pool="avg" if getattr(self.model, "classifier", None) is not None else "token",
            has_class_token=True)

    def embed_macs(self, num_patches: int) -> int:
        return conv_macs(self.trunk.embeddings.patch_embeddings.projection, num_patches)
