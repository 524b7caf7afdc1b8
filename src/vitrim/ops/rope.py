"""Rotary position embeddings under token reduction: pure functions on timm's ``cat`` rope layout.

timm's rope modules return one row per patch, ``[..., N, 2D]`` = ``cat(sin, cos)``; a rotation with
``sin = 0, cos = 1`` is the identity (a token without a position, e.g. EViT's fused token).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["gather_rope", "grid_positions", "merge_positions", "rows_from_positions"]


def gather_rope(rope: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rope rows of the current patch tokens.

    Args:
        rope: ``[N0, 2D]`` (one table for all heads), ``[H, N0, 2D]`` (per head) or ``[B, h, N0, 2D]``
            (rows already per sample), timm's layout.
        index: ``[B, n]`` index of each current patch token into the table's rows; ``-1``: no position
            (the identity rotation).

    Returns:
        ``[B, 1, n, 2D]`` or ``[B, H, n, 2D]``, broadcastable against ``q, k: [B, H, n, d]``.
    """
    B, n = index.shape
    if rope.dim() == 4:
        table = rope.expand(B, -1, -1, -1)                              # [B, h, N0, 2D]
    else:
        table = (rope if rope.dim() == 3 else rope.unsqueeze(0)).unsqueeze(0).expand(B, -1, -1, -1)
    h, two_d = table.shape[1], table.shape[-1]
    safe = index.clamp(min=0)
    rows = table.gather(2, safe[:, None, :, None].expand(B, h, n, two_d))  # [B, h, n, 2D]
    identity = torch.cat([torch.zeros_like(rows[..., :two_d // 2]), torch.ones_like(rows[..., two_d // 2:])], -1)
    return torch.where((index < 0)[:, None, :, None], identity, rows)


def grid_positions(grid: tuple[int, int], batch: int, device: torch.device) -> torch.Tensor:
    """``[B, h * w, 2]`` float ``(row, column)`` of the patch tokens in row-major order."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([rows, cols], -1).reshape(1, h * w, 2).float().expand(batch, -1, -1)


def merge_positions(decision, positions: torch.Tensor, size: Optional[torch.Tensor], num_prefix_tokens: int,
                    mode: str) -> torch.Tensor:
    """Coordinates of the tokens a ToMe merge leaves.

    Args:
        decision: the :class:`~vitrim.ops.merge.MergeDecision` applied to the tokens.
        positions: ``[B, N, 2]`` coordinates of the current patch tokens.
        size: ``[B, T, 1]`` token sizes before the merge (``None``: all ones).
        mode: ``"mean"``: the size-weighted mean of the merged coordinates (the same weighted mean as
            the features); ``"keep"``: a merged token keeps its destination's coordinates.

    Returns:
        ``[B, N - r, 2]``.
    """
    from .merge import merge_wavg  # pure op, same room

    p = num_prefix_tokens
    full = torch.cat([positions.new_zeros(positions.shape[0], p, 2), positions], dim=1)   # [B, T, 2]
    mean, _ = merge_wavg(decision, full, size)
    if mode == "mean":
        return mean[:, p:]
    # decision.merge takes sources from the even rows and destinations from the odd rows: with the
    # sources at -inf, "amax" leaves every destination its own coordinates
    src_out = full.clone()
    src_out[:, ::2] = float("-inf")
    dst = decision.merge(src_out, "amax")
    return torch.where(torch.isinf(dst), mean, dst)[:, p:]


def rows_from_positions(rope: torch.Tensor, positions: torch.Tensor, grid_w: int,
                        recompute: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Rope rows ``[B, h|1, n, 2D]`` of tokens at ``positions: [B, n, 2]``: the module's own row where a
    token sits on the grid, ``recompute(coords [M, 2]) -> [M, 2D]`` (or ``[H, M, 2D]`` for a per-head
    table ``rope: [H, N0, 2D]``; the rotation at those coordinates) elsewhere. Averaging sin/cos values
    is never done: it is not a rotation."""
    rounded = positions.round()
    on_grid = (positions == rounded).all(-1)                                          # [B, n]
    index = (rounded[..., 0] * grid_w + rounded[..., 1]).long()
    rows = gather_rope(rope, index)
    if recompute is None:
        return rows
    B, n, _ = positions.shape
    fresh = recompute(positions.reshape(B * n, 2))                                    # [(H,) B n, 2D]
    fresh = fresh.reshape(B, 1, n, -1) if fresh.dim() == 2 else fresh.reshape(-1, B, n, fresh.shape[-1]).transpose(0, 1)
    return torch.where(on_grid[:, None, :, None], rows, fresh.to(rows.dtype))
