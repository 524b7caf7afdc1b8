"""Adapter for timm's ``VisionTransformer`` family (DeiT, distilled DeiT, ViT, registers, ...).

Installing a method swaps the model's class for a generated subclass whose forward threads a
:class:`~vitrim.state.ForwardState` through the blocks and hands each block to the method.
Everything else is the model's own code: ``patch_embed``, ``_pos_embed`` (class, distillation
and register tokens, dynamic image size, ``no_embed_class``), ``patch_drop``, ``norm_pre``,
``norm`` and ``forward_head``; blocks and their modules are not touched. ``remove`` restores the
original class, so the state dict and behaviour are exactly the original ones.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..measure.flops import CostPlan, linear_macs, price_blocks
from ..methods.base import ModelInfo, ReductionMethod
from ..state import ForwardState
from .base import Adapter, install_reduced_class, overrides, register_adapter, run_block, runs_own_forward

try:  # timm >= 1.0
    from timm.layers import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # pragma: no cover - guarded by the dependency pin
    TimmAttention = TimmBlock = VisionTransformer = None

__all__ = ["TimmViTAdapter"]


@register_adapter
class TimmViTAdapter(Adapter):
    """Validates a timm ViT and installs/removes a method on it."""

    family = "timm-vit"
    label = "timm VisionTransformer"
    accepts = ("timm VisionTransformer models (deit_*, deit_*_distilled, vit_* with class token or global-pool "
               "head, register tokens, qk-norm, LayerScale, fused or non-fused attention, dynamic image size)")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return VisionTransformer is not None and isinstance(model, VisionTransformer)

    # ------------------------------------------------------------------ checks
    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        for fn in ("forward_features", "forward"):
            if overrides(model, VisionTransformer, fn):
                raise UnsupportedModelError(
                    f"{name} overrides VisionTransformer.{fn}; vitrim reduces timm VisionTransformer models "
                    f"whose feature forward is timm's own (deit_*, deit_*_distilled, vit_*), so it cannot "
                    f"keep {name}'s behaviour. Accepted: timm VisionTransformer and subclasses that only "
                    f"override _pos_embed/forward_head (e.g. VisionTransformerDistilled).")
        for i, block in enumerate(model.blocks):
            if not runs_own_forward(block, TimmBlock):
                raise UnsupportedModelError(
                    f"{name}.blocks[{i}] is a {type(block).__name__}; vitrim supports timm's "
                    f"vision_transformer.Block (pre-norm: attention, LayerScale, drop_path, MLP). "
                    f"Blocks such as ResPostBlock or ParallelScalingBlock are not supported.")
            attn = block.attn
            if not runs_own_forward(attn, TimmAttention):
                raise UnsupportedModelError(
                    f"{name}.blocks[{i}].attn is a {type(attn).__name__}; vitrim supports timm.layers.Attention "
                    f"(fused or explicit, qk-norm, scale-norm, gate). RoPE or other attention is not supported.")

    # ------------------------------------------------------------------ facts
    def info(self) -> ModelInfo:
        m = self.model
        pool = "map" if getattr(m, "attn_pool", None) is not None else (m.global_pool or "")
        return ModelInfo(
            family=self.family,
            family_label=self.label,
            depth=len(m.blocks),
            embed_dim=m.embed_dim,
            num_heads=m.blocks[0].attn.num_heads,
            num_prefix_tokens=m.num_prefix_tokens,
            num_patches=m.patch_embed.num_patches,
            global_pool=pool,
            has_class_token=bool(getattr(m, "has_class_token", m.cls_token is not None)),
        )

    def default_img_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.img_size)

    def num_patches(self, img_size: Optional[tuple[int, int]] = None) -> int:
        pe = self.model.patch_embed
        if img_size is None:
            return pe.num_patches
        h, w = img_size
        if not (getattr(self.model, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True)):
            if (h, w) != tuple(pe.img_size):
                raise ValueError(f"img_size {h}x{w} does not match this model's fixed input size "
                                 f"{pe.img_size[0]}x{pe.img_size[1]}; create the model with dynamic_img_size=True "
                                 f"to run other sizes")
        ph, pw = pe.patch_size
        if getattr(pe, "dynamic_img_pad", False):
            return math.ceil(h / ph) * math.ceil(w / pw)
        return (h // ph) * (w // pw)

    def grid_size(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        pe = self.model.patch_embed
        if img_size is None:
            return tuple(pe.grid_size)
        return img_size[0] // pe.patch_size[0], img_size[1] // pe.patch_size[1]

    # ------------------------------------------------------------------ FLOPs
    def cost_plan(self, img_size: tuple[int, int], method: Optional[ReductionMethod] = None) -> CostPlan:
        """Blocks priced by :func:`~vitrim.measure.flops.block_macs` at the method's plan; the patch
        embedding (its convolution, or linear, per patch); the head(s) and an attention pool."""
        m = self.model
        num_patches = self.num_patches(img_size)
        proj = m.patch_embed.proj
        per_patch = proj.weight.numel() if isinstance(proj, nn.Conv2d) else linear_macs(proj)
        heads = [getattr(m, "head", None), getattr(m, "head_dist", None), getattr(m, "attn_pool", None)]
        head = sum(linear_macs(h) for h in heads if isinstance(h, nn.Module))  # a pool: its linears on one row
        return price_blocks(m.blocks, method, num_patches + m.num_prefix_tokens, per_patch * num_patches, head)

    # ------------------------------------------------------------------ install
    def install(self, method: ReductionMethod) -> None:
        install_reduced_class(self.model, method, self.family, {
            "forward_tokens": _forward_tokens,
            "forward_features": _forward_features,
            "forward": _forward,
            "forward_with_state": _forward_with_state,
            "forward_head_with_state": _forward_head_with_state,
        })


# ---------------------------------------------------------------------- reduced forward
def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Image ``[B, 3, H, W]`` -> final normed tokens ``[B, T, C]`` and the forward's state."""
    method: ReductionMethod = self.vitrim
    x = self.patch_embed(x)
    x = self._pos_embed(x)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    state = method.new_state(x)
    use_ckpt = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
    for i, block in enumerate(self.blocks):
        x, state = run_block(method, block, i, x, state, use_ckpt)
    x = self.norm(x)
    method.finish(state)
    return x, state


def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
    return self.forward_tokens(x)[0]


def _pool_weighted(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """timm's global pooling with average terms weighted by token sizes (docs/methods/tome.md, "Pooling")."""
    pool = self.global_pool
    if not self.pool_include_prefix:
        x, weights = x[:, self.num_prefix_tokens:], weights[:, self.num_prefix_tokens:]
    w = weights.to(x.dtype)
    mean = (x * w).sum(dim=1) / w.sum(dim=1)
    if pool == "avg":
        return mean
    if pool == "avgmax":
        return 0.5 * (x.amax(dim=1) + mean)
    return x.amax(dim=1)  # max: unweighted, a merged token's max is its mean's max


def _forward_head_with_state(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
    """The model's head on reduced tokens: its own ``forward_head`` for token pooling, average
    terms weighted by the method's pooling weights (token sizes) otherwise."""
    weights = self.vitrim.pool_weights(state)
    if weights is None or self.global_pool in ("token", ""):
        return self.forward_head(x)
    x = _pool_weighted(self, x, weights)
    x = self.fc_norm(x)
    x = self.head_drop(x)
    return self.head(x)


def _forward_with_state(self, x: torch.Tensor):
    """Logits (as ``forward``) and the forward's state, for losses that need more than logits."""
    x, state = self.forward_tokens(x)
    return self.forward_head_with_state(x, state), state


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.forward_with_state(x)[0]
