"""Adapter for Hugging Face VideoMAE: ``VideoMAEModel`` and ``VideoMAEForVideoClassification``, the
video transformers ToMe reports on (docs/models/hf.md).

The input is a clip ``[B, T, C, H, W]``; a ``Conv3d`` cuts it into tubelets of ``tubelet_size``
frames by ``patch_size`` pixels, one token each, ``T / tubelet_size`` time steps of an ``h x w`` grid,
ordered time first, then rows, then columns. Every token is a patch token: there is no class token
(``num_prefix_tokens = 0``), so ToMe merges across space and time alike, and the pruning methods score
with the average-token query (the class-token-free rule, a [vitrim extension]; IdleViT ranks with it too),
DynamicViT and dTPS with their predictors' live-token mean.

The grid the methods and pictures see is ``(T' * h, w)``: the time steps stacked along the height,
which is exactly the token order, so a merge group spanning frames is a group spanning tiles
(``vitrim visualize`` draws the tiles side by side).

``VideoMAEForVideoClassification`` averages the final tokens, then ``fc_norm`` and the classifier;
after a reduction the average is weighted by what each token stands for (ToMe: its size), so the
pooled feature stays the mean over the patches. A classifier without mean pooling reads token 0, a
patch token that merging moves: refused. MAE pre-training masks (``bool_masked_pos``) drop tokens
before the first layer and are refused on a reduced model.
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
from .hf import FusedQKV, HFAttention, HFBlock, ProbDropout, _pair, _ViT4MLP
from .hf_trunk import HFTrunkAdapter, classifier_forward, weighted_mean

__all__ = ["HFVideoMAEAdapter"]


def videomae_block(layer: nn.Module, config: Any) -> HFBlock:
    """Façade of a ``VideoMAELayer`` (``attention.attention`` q/k/v, ``attention.output``, ViT-style MLP)."""
    sa, out = layer.attention.attention, layer.attention.output
    attn = HFAttention(sa, config, FusedQKV(sa.query, sa.key, sa.value), out.dense, out.dropout,
                       ProbDropout(sa, "dropout_prob"), sa.num_attention_heads, sa.attention_head_size, sa.scaling)
    return HFBlock(layer, layer.layernorm_before, attn, layer.layernorm_after, _ViT4MLP(layer.intermediate, layer.output))


@register_adapter
class HFVideoMAEAdapter(HFTrunkAdapter):
    """Validates a transformers VideoMAE model and installs a method on it."""

    family = "hf-videomae"
    label = "Hugging Face VideoMAE"
    classes = {"VideoMAEModel": "", "VideoMAEForVideoClassification": "videomae"}
    layer_classes = ("VideoMAELayer",)
    accepts = "Hugging Face transformers VideoMAEModel, VideoMAEForVideoClassification (mean pooling)"
    trunk_output = "BaseModelOutput"
    outer_forwards = {"VideoMAEForVideoClassification": classifier_forward("ImageClassifierOutput", "pixel_values")}

    @classmethod
    def check_family(cls, model: nn.Module, trunk: nn.Module) -> None:
        if hasattr(model, "classifier") and getattr(model, "fc_norm", None) is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} with use_mean_pooling=False classifies token 0, which is a patch token "
                f"(VideoMAE has no class token) that merging and pruning move; accepted: VideoMAE classifiers with "
                f"mean pooling (use_mean_pooling=True, the released checkpoints), or VideoMAEModel")
        if trunk.embeddings.position_embeddings.shape[1] != trunk.embeddings.patch_embeddings.num_patches:
            raise UnsupportedModelError(f"{type(model).__name__}'s position table does not match its tubelet grid")

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def layers(trunk: nn.Module) -> nn.ModuleList:
        return trunk.encoder.layer

    make_block = staticmethod(videomae_block)

    @classmethod
    def embed(cls, trunk: nn.Module, inputs: torch.Tensor, bool_masked_pos: Optional[torch.Tensor]) -> torch.Tensor:
        return trunk.embeddings(inputs, None)

    @classmethod
    def finish(cls, trunk: nn.Module, x: torch.Tensor,
               state: ForwardState) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return (trunk.layernorm(x) if trunk.layernorm is not None else x), None

    @classmethod
    def head(cls, model: nn.Module, tokens: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """Classifier: ``classifier(fc_norm(weighted mean))``; base model: the weighted mean of the tokens."""
        pooled = weighted_mean(tokens, model.vitrim.pool_weights(state))
        if getattr(model, "classifier", None) is None:
            return pooled
        return model.classifier(model.fc_norm(pooled))

    # ------------------------------------------------------------------ facts
    def info(self) -> ModelInfo:
        cfg = self.trunk.config
        return ModelInfo(family="hf-videomae", family_label=self.label, depth=len(self.layers(self.trunk)),
                         embed_dim=cfg.hidden_size, num_heads=cfg.num_attention_heads, num_prefix_tokens=0,
                         num_patches=self.num_patches(), global_pool="avg", has_class_token=False)

    def frames(self) -> int:
        """Time steps of the token grid (``num_frames // tubelet_size``)."""
        cfg = self.trunk.config
        return int(cfg.num_frames) // int(cfg.tubelet_size)

    def grid_size(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """``(T' * h, w)``: the tubelet grid with its time steps stacked along the height (the token order)."""
        size = self.default_img_size()
        if img_size is not None and tuple(img_size) != size:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} runs at {size[0]}x{size[1]} only (its patch embedding refuses other "
                f"sizes and its sinusoidal position table is fixed); got {img_size[0]}x{img_size[1]}")
        ph, pw = _pair(self.trunk.config.patch_size)
        return self.frames() * (size[0] // ph), size[1] // pw

    def input_shape(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, ...]:
        """``(T, C, H, W)`` of one clip."""
        self.num_patches(img_size)
        cfg = self.trunk.config
        return (int(cfg.num_frames), int(cfg.num_channels), *self.default_img_size())

    def embed_macs(self, num_patches: int) -> int:
        return conv_macs(self.trunk.embeddings.patch_embeddings.projection, num_patches)
