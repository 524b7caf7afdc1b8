"""Map reduced tokens back to the patch grid (provenance helpers for pictures and dense use)."""
from __future__ import annotations

import torch

from ..errors import VitrimError
from ..ops.merge import unmerge_from_source
from ..ops.provenance import source_owners

__all__ = ["source_to_grid", "tokens_to_grid"]


def source_to_grid(source: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Which final token holds each patch.

    Args:
        source: ``[B, T, T0]`` binary provenance (``model.vitrim.source`` with ``trace_source=True``).
        grid_size: ``(H, W)`` patch grid, ``H * W = T0 - num_prefix_tokens``.
        num_prefix_tokens: leading columns of ``source`` that are prefix tokens (dropped).

    Returns:
        ``[B, H, W]`` long tensor of final-token indices (group ids).
    """
    if source is None:
        raise VitrimError("source_to_grid needs a source map, and this forward kept none: apply ToMe with "
                          "trace_source=True (or vitrim.update(model, trace_source=True)), run a forward, then pass "
                          "model.vitrim.source (or state.source); vitrim.forward_dense does all of it")
    if not isinstance(source, torch.Tensor) or source.dim() != 3:
        raise VitrimError(f"source must be a [B, T, T0] tensor, got "
                          f"{tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise VitrimError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    B, _, T0 = source.shape
    h, w = grid_size
    if h * w != T0 - num_prefix_tokens:
        raise ValueError(f"grid {h}x{w} has {h * w} patches but source covers {T0 - num_prefix_tokens} "
                         f"(T0={T0}, num_prefix_tokens={num_prefix_tokens})")
    return source_owners(source, num_prefix_tokens).reshape(B, h, w)


def tokens_to_grid(tokens: torch.Tensor, source: torch.Tensor, grid_size: tuple[int, int],
                   num_prefix_tokens: int) -> torch.Tensor:
    """Dense features: ``tokens [B, T, C] -> [B, H, W, C]``, each patch gets its group's token."""
    full = unmerge_from_source(tokens, source)[:, num_prefix_tokens:]
    return full.reshape(tokens.shape[0], grid_size[0], grid_size[1], tokens.shape[-1])
