"""Model adapters: one per model family. Each knows how to validate a model, describe it
(:class:`~vitrim.methods.base.ModelInfo`) and install/remove a method on it."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .hf import SUPPORTED_CLASSES, HFAdapter
from .pvt import PvtV2Adapter
from .timm_vit import TimmViTAdapter

__all__ = ["get_adapter", "ADAPTERS", "TimmViTAdapter", "PvtV2Adapter", "HFAdapter"]

ADAPTERS = (TimmViTAdapter, PvtV2Adapter, HFAdapter)


def get_adapter(model: nn.Module):
    """The adapter for ``model``, or a clear error naming what is supported."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    original = getattr(type(model), "_vitrim_original_class", None)
    for adapter in ADAPTERS:
        if adapter.supports(model):
            return adapter(model, check=original is None)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported; vitrim reduces timm VisionTransformer models "
        f"(deit_*, deit_*_distilled, vit_* with class token or global-pool head, register tokens, "
        f"qk-norm, LayerScale, fused or non-fused attention, dynamic image size) and, for idle only, timm "
        f"PyramidVisionTransformerV2 (pvt_v2_b0..b5, pvt_v2_b2_li), and Hugging Face transformers "
        f"{', '.join(SUPPORTED_CLASSES)}")
