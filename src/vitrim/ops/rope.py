"""Rotary position embeddings under token reduction: pure functions on timm's ``cat`` rope layout.

timm's rope modules return one row per patch, ``[..., N, 2D]`` = ``cat(sin, cos)``; a rotation with
``sin = 0, cos = 1`` is the identity (a token without a position, e.g. EViT's fused token).
"""
from __future__ import annotations

import torch

__all__ = ["gather_rope"]


def gather_rope(rope: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rope rows of the current patch tokens.

    Args:
        rope: ``[N0, 2D]`` (one table for all heads) or ``[H, N0, 2D]`` (per head), timm's layout.
        index: ``[B, n]`` original patch index of each current patch token; ``-1``: no position
            (the identity rotation).

    Returns:
        ``[B, 1, n, 2D]`` or ``[B, H, n, 2D]``, broadcastable against ``q, k: [B, H, n, d]``.
    """
    table = rope if rope.dim() == 3 else rope.unsqueeze(0)              # [h, N0, 2D]
    h, _, two_d = table.shape
    B, n = index.shape
    safe = index.clamp(min=0)
    rows = table.unsqueeze(0).expand(B, -1, -1, -1).gather(
        2, safe[:, None, :, None].expand(B, h, n, two_d))                # [B, h, n, 2D]
    identity = torch.cat([torch.zeros_like(rows[..., :two_d // 2]), torch.ones_like(rows[..., two_d // 2:])], -1)
    return torch.where((index < 0)[:, None, :, None], identity, rows)
