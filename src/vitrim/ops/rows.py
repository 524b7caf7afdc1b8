"""Row positions in flattened token tensors.

A ``[B, T, C]`` tensor (or ``[B, H, T, w]``) viewed as ``[B T, C]`` is read and written with one
``index_select`` / ``index_copy`` at flat row positions, an order of magnitude faster on CPU than
``gather`` / ``scatter`` with an index expanded over the channels.
"""
from __future__ import annotations

import torch

__all__ = ["flat_rows"]


def flat_rows(index: torch.Tensor, num_rows: int, heads: int = 1) -> torch.Tensor:
    """Positions along ``T`` -> rows of a contiguous ``[B, heads, T, w]`` tensor viewed as ``[B heads T, w]``.

    Args:
        index: ``[B, n]`` (the same positions for every head) or ``[B, heads, n]``, in ``[0, num_rows)``.
        num_rows: ``T``; heads: ``1`` for ``[B, T, C]`` tensors.

    Returns:
        ``[B * heads * n]`` flat rows, sample by sample (and head by head), each group in ``index``'s order.
    """
    B = index.shape[0]
    base = torch.arange(B * heads, device=index.device).view(B, heads, 1) * num_rows
    return ((index.unsqueeze(1) if index.ndim == 2 else index) + base).reshape(-1)
