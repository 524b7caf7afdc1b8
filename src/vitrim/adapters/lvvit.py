"""Adapter for LV-ViT (:mod:`vitrim.lvvit`): the timm-ViT adapter with LV-ViT's stem and output rule.

LV-ViT is a timm ``VisionTransformer`` subclass whose blocks are timm Blocks (the ``skip_lam``
divisor sits in the LayerScale slot), so the reduced forward is the timm-ViT one. Only three facts
differ and are handled here:

* the patch embedding is the convolutional :class:`~vitrim.lvvit.LVViTStem`: accepted (its tokens
  are exactly the 16 x 16 patch grid, row-major), any other non-``PatchEmbed`` embedding is refused;
* the head: ``head(cls) + 0.5 * max`` of ``aux_head`` over the patch tokens that reach the final
  norm (kept tokens after pruning, every token with IdleViT, merged tokens with ToMe, EViT's fused
  token); in a masked training forward, tokens whose pooling weight is 0 (dropped) are excluded
  from the max;
* FLOPs: the stem's four convolutions, the class head and the aux head on every final patch token.

Losses that read the head's parts (DynamicViT's LV-ViT loss) get ``head(cls)`` and the per-token
aux logits separately from :meth:`LVViTAdapter.head_parts` (``ModelInfo.has_token_head``).
"""
from __future__ import annotations

from typing import Optional

import dataclasses

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..lvvit import LVViT, LVViTStem
from ..measure.flops import CostPlan, linear_macs, price_blocks
from ..methods.base import BlockTokens, HeadParts, ModelInfo, ReductionMethod
from ..state import ForwardState
from .base import overrides, register_adapter, runs_own_forward
from .timm_vit import TimmViTAdapter

__all__ = ["LVViTAdapter"]


@register_adapter
class LVViTAdapter(TimmViTAdapter):
    """Validates an LV-ViT and installs/removes a method on it."""

    family = "lvvit"
    label = "LV-ViT"
    accepts = "LV-ViT (lvvit_t / lvvit_s / lvvit_m / lvvit_l)"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, LVViT)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        super().check(model)
        for fn in ("forward_head", "forward_aux"):
            if overrides(model, LVViT, fn):
                raise UnsupportedModelError(
                    f"{type(model).__name__} overrides LVViT.{fn}; the LV-ViT adapter applies LV-ViT's output rule "
                    f"(head(cls) + 0.5 * max of aux_head over the tokens present) itself, so it cannot keep that "
                    f"behaviour. Accepted: lvvit_* models and LVViT subclasses that keep its head")

    @classmethod
    def check_patch_embed(cls, model: nn.Module) -> None:
        pe = model.patch_embed
        if not runs_own_forward(pe, LVViTStem):
            raise UnsupportedModelError(f"{type(model).__name__}.patch_embed is a {type(pe).__name__}; the LV-ViT "
                                        f"adapter counts tokens from LVViTStem (stride 16, row-major grid)")
        if pe.num_patches != pe.grid_size[0] * pe.grid_size[1]:
            raise UnsupportedModelError(f"{type(model).__name__}.patch_embed reports {pe.num_patches} patches for a "
                                        f"{pe.grid_size[0]}x{pe.grid_size[1]} grid; vitrim cannot count its tokens")

    def info(self) -> ModelInfo:
        return dataclasses.replace(super().info(), has_token_head=True)

    def head_parts(self, tokens: torch.Tensor, state: Optional[ForwardState] = None) -> HeadParts:
        """``head(t[:, 0])`` ``[B, K]`` and ``aux_head(t[:, 1:])`` ``[B, N, K]`` on the final tokens (every
        position present: a masked training form's dead positions too; losses mask them)."""
        cls_out, aux_out = self.model.forward_aux(tokens)
        return HeadParts(cls_out, aux_out)

    def cost_plan(self, img_size: tuple[int, int], method: Optional[ReductionMethod] = None) -> CostPlan:
        """Blocks at the method's plan; the stem's convolutions; ``head`` on the class token and
        ``aux_head`` on each patch token that reaches the final norm."""
        m = self.model
        num_tokens = self.num_patches(img_size) + m.num_prefix_tokens
        plan = price_blocks(m.blocks, method, num_tokens, m.patch_embed.conv_macs(img_size), 0)
        final = method.block_tokens(num_tokens)[-1].tokens_out if method is not None else num_tokens
        plan.head_macs = linear_macs(m.head) + (final - m.num_prefix_tokens) * linear_macs(m.aux_head)
        return plan

    def paper_gmacs(self, img_size: tuple[int, int], method: Optional[ReductionMethod] = None) -> float:
        """GMACs in LV-ViT's publication convention [inferred]: the per-token formula of LV-ViT's own
        FLOPs code (kept by DynamicViT): the stem's convolutions, and per block with ``s`` tokens
        ``s (4C^2 + 2 C mC + 2 C s + 10 H s + 22 C + 9 mC)`` (small terms: per-element charges for
        softmax, scaling, bias, residual and LayerNorm); no heads, no predictors, no final norm. A
        block's method-specific matmuls (IdleViT's keys and scoring, TPS's squeeze) are added as
        in the protocol convention."""
        m = self.model
        num_tokens = self.num_patches(img_size) + m.num_prefix_tokens
        plan = (method.block_tokens(num_tokens) if method is not None
                else [BlockTokens(num_tokens, num_tokens, num_tokens)] * len(m.blocks))
        total = m.patch_embed.conv_macs(img_size)
        for block, t in zip(m.blocks, plan):
            c, hidden, heads = block.attn.qkv.in_features, block.mlp.fc1.out_features, block.attn.num_heads
            attn = t.q * c * c + 2 * t.kv * c * c + t.q * c * c + 2 * c * t.q * t.kv + 10 * heads * t.q * t.kv
            total += attn + 11 * c * t.q + t.mlp * (2 * c * hidden + 9 * hidden + 11 * c) + t.extra_macs
        return total / 1e9


def _head(self, x: torch.Tensor, weights: Optional[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
    """LV-ViT's output rule on reduced tokens ``x: [B, T, C]``; tokens with weight 0 (``weights:
    [B, T, 1]``, dropped in a masked forward) do not enter the aux max."""
    if pre_logits:
        return x[:, 0]
    cls_out, aux_out = self.forward_aux(x)
    if weights is not None:
        aux_out = aux_out.masked_fill(weights[:, self.num_prefix_tokens:] <= 0, float("-inf"))
    return cls_out + 0.5 * aux_out.max(dim=1).values


def _forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """LV-ViT's ``forward_head`` on what ``forward_features`` returned (its pooling weights included)."""
    carried = getattr(x, "_vitrim_pool_weights", None)
    return _head(self, x, carried[0] if carried is not None else None, pre_logits)


def _forward_head_with_state(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
    return _head(self, x, self.vitrim.pool_weights(state))


LVViTAdapter.entry_points = dict(TimmViTAdapter.entry_points, forward_head=_forward_head,
                                 forward_head_with_state=_forward_head_with_state)
