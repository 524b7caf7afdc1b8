"""Adapter for Hugging Face AST (Audio Spectrogram Transformer): ``ASTModel`` and
``ASTForAudioClassification``, the audio transformer ToMe reports on (docs/models/hf.md).

The input is a log-mel spectrogram ``[B, time, freq]`` (``max_length`` frames of ``num_mel_bins``
bins); a convolution cuts it into (overlapping, by default) ``patch_size`` squares at strides
``frequency_stride`` / ``time_stride``, giving a ``(f', t')`` grid ordered frequency first. A class
token and a distillation token lead the sequence: both are the prefix, kept and never merged or
pruned, and the model's pooled output is their average (the classifier reads it), so every method's
class-token rule carries over (EViT, eTPS, DynamicViT, dTPS score with the class token as on DeiT).

The layers are ViT layers in transformers 5's layout (``q/k/v/o_proj``, one dropout), shown to the
methods through :mod:`vitrim.adapters.hf`'s ViT façade. The position table is fixed: the model runs
at its own ``(max_length, num_mel_bins)`` only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..measure.flops import conv_macs
from ..methods.base import ModelInfo
from ..state import ForwardState
from .base import register_adapter
from .hf import _vit_block
from .hf_trunk import HFTrunkAdapter

__all__ = ["HFASTAdapter"]


@register_adapter
class HFASTAdapter(HFTrunkAdapter):
    """Validates a transformers AST model and installs a method on it."""

    family = "hf-ast"
    label = "Hugging Face Audio Spectrogram Transformer"
    classes = {"ASTModel": "", "ASTForAudioClassification": "audio_spectrogram_transformer"}
    layer_classes = ("ASTLayer",)
    accepts = "Hugging Face transformers ASTModel, ASTForAudioClassification"
    input_name = "input_values"

    @classmethod
    def check_family(cls, model: nn.Module, trunk: nn.Module) -> None:
        emb = trunk.embeddings
        if emb.position_embeddings.shape[1] != cls._grid(trunk.config)[0] * cls._grid(trunk.config)[1] + 2:
            raise UnsupportedModelError(f"{type(model).__name__}'s position table does not match its patch grid")
        if getattr(emb, "distillation_token", None) is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no distillation token; accepted: {cls.accepts}")

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def layers(trunk: nn.Module) -> nn.ModuleList:
        return trunk.layers

    make_block = staticmethod(_vit_block)

    @classmethod
    def embed(cls, trunk: nn.Module, inputs: torch.Tensor, bool_masked_pos: Optional[torch.Tensor]) -> torch.Tensor:
        return trunk.embeddings(inputs)

    @classmethod
    def finish(cls, trunk: nn.Module, x: torch.Tensor,
               state: ForwardState) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = trunk.layernorm(x)
        return x, (x[:, 0] + x[:, 1]) / 2

    @classmethod
    def head(cls, model: nn.Module, tokens: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """``classifier((class + distillation) / 2)``, or that average for the base model."""
        pooled = (tokens[:, 0] + tokens[:, 1]) / 2
        head = getattr(model, "classifier", None)
        return pooled if head is None else head(pooled)

    # ------------------------------------------------------------------ facts
    @staticmethod
    def _grid(cfg) -> tuple[int, int]:
        f = (cfg.num_mel_bins - cfg.patch_size) // cfg.frequency_stride + 1
        t = (cfg.max_length - cfg.patch_size) // cfg.time_stride + 1
        return f, t

    def info(self) -> ModelInfo:
        cfg = self.trunk.config
        return ModelInfo(family="hf-ast", family_label=self.label, depth=len(self.layers(self.trunk)),
                         embed_dim=cfg.hidden_size, num_heads=cfg.num_attention_heads, num_prefix_tokens=2,
                         num_patches=self.num_patches(), global_pool="token", has_class_token=True)

    def default_img_size(self) -> tuple[int, int]:
        """``(max_length, num_mel_bins)``: the spectrogram's (time, frequency) size, as the input is laid out."""
        cfg = self.trunk.config
        return int(cfg.max_length), int(cfg.num_mel_bins)

    def grid_size(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """``(f', t')``: frequency rows by time columns, the token order."""
        size = self.default_img_size()
        if img_size is not None and tuple(img_size) != size:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} runs on {size[0]} frames x {size[1]} mel bins only (its position "
                f"table is fixed); got {img_size[0]}x{img_size[1]}")
        return self._grid(self.trunk.config)

    def input_shape(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, ...]:
        """``(time, freq)`` of one spectrogram."""
        self.num_patches(img_size)
        return self.default_img_size()

    def embed_macs(self, num_patches: int) -> int:
        return conv_macs(self.trunk.embeddings.patch_embeddings.projection, num_patches)
