"""Bipartite soft matching (ToMe) as pure, batched tensor functions.

A matching returns a :class:`MergeDecision`: small closures that apply one decision to any
per-token tensor ``[B, T, *]`` (features, sizes, provenance), so that every tensor a method
tracks goes through the same gather/scatter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .provenance import source_owners

__all__ = [
    "MergeDecision",
    "bipartite_soft_matching",
    "merge_wavg",
    "merge_source",
    "clamp_r",
    "unmerge_from_source",
]

MergeFn = Callable[[torch.Tensor, str], torch.Tensor]


def _identity_merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def _identity_unmerge(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class MergeDecision:
    """One matching decision, applicable to any tensor with the matched token layout.

    ``merge(x, mode)``: ``[B, T, C] -> [B, T - r, C]`` with ``mode`` in ``sum | mean | amax``.
    ``unmerge(y)``: ``[B, T - r, C] -> [B, T, C]`` in the pre-merge order; merged-away tokens
    receive a copy of the token they were merged into.
    """

    merge: MergeFn
    unmerge: Callable[[torch.Tensor], torch.Tensor]
    r: int


IDENTITY = MergeDecision(_identity_merge, _identity_unmerge, 0)


def clamp_r(r: int, num_tokens: int, num_prefix_tokens: int) -> int:
    """Tokens one block can remove: ``max(0, min(r, (T - k) // 2))`` (docs/methods/tome.md, "Schedules")."""
    return max(0, min(int(r), (num_tokens - num_prefix_tokens) // 2))


def _prefix_order(num_prefix_tokens: int) -> list[int]:
    """Index into ``cat([A-prefix, Bs-prefix])`` that restores the original prefix order.

    Prefix position p sits in the A set (even p, at p // 2) or the Bs set (odd p).
    """
    ka = (num_prefix_tokens + 1) // 2
    return [p // 2 if p % 2 == 0 else ka + p // 2 for p in range(num_prefix_tokens)]


def bipartite_soft_matching(
        metric: torch.Tensor,
        r: int,
        num_prefix_tokens: int = 0,
        eps: float = 1e-6,
) -> MergeDecision:
    """Match the ``r`` most similar tokens of the alternating set A into set Bs.

    Args:
        metric: ``[B, T, d]`` similarity features (ToMe: keys averaged over heads).
        r: tokens to remove; clamped to ``(T - k) // 2``.
        num_prefix_tokens: ``k`` protected tokens at the front (class, distillation, registers):
            never merged away, never merged into, and kept first in their original order.
        eps: floor of the L2 norm, so a zero metric row does not produce NaN.

    Returns:
        A :class:`MergeDecision`; the decision itself is computed without gradient, applying it
        (gather, scatter-reduce) is differentiable.
    """
    k = num_prefix_tokens
    B, T, _ = metric.shape
    r = clamp_r(r, T, k)
    if r <= 0:
        return IDENTITY

    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(eps)
        scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # [B, |A|, |Bs|]
        ka, kb = (k + 1) // 2, k // 2
        if ka:
            scores[:, :ka, :] = -math.inf  # prefix tokens in A never move
        if kb:
            scores[:, :, :kb] = -math.inf  # nothing merges into prefix tokens in Bs
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[:, r:]  # [B, |A| - r, 1]
        src_idx = edge_idx[:, :r]  # [B, r, 1]
        dst_idx = node_idx[..., None].gather(1, src_idx)  # [B, r, 1]
        if k > 0:
            unm_idx = unm_idx.sort(dim=1).values
    num_a = (T + 1) // 2
    num_unm = num_a - r
    prefix_order = _prefix_order(k) if k > 1 else None

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, c = x.shape[0], x.shape[-1]
        unm = src.gather(1, unm_idx.expand(n, num_unm, c))
        moved = src.gather(1, src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), moved, reduce=mode)
        if prefix_order is None:  # k <= 1: the class token (if any) is unm[:, 0]
            return torch.cat([unm, dst], dim=1)
        prefix = torch.cat([unm[:, :ka], dst[:, :kb]], dim=1)[:, prefix_order]
        return torch.cat([prefix, unm[:, ka:], dst[:, kb:]], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        n, c = y.shape[0], y.shape[-1]
        if prefix_order is None:
            unm, dst = y[:, :num_unm], y[:, num_unm:]
        else:
            prefix = y[:, :k]
            unm = torch.cat([prefix[:, 0::2], y[:, k:k + num_unm - ka]], dim=1)
            dst = torch.cat([prefix[:, 1::2], y[:, k + num_unm - ka:]], dim=1)
        moved = dst.gather(1, dst_idx.expand(n, r, c))
        out = y.new_zeros(n, T, c)
        out[:, 1::2] = dst
        out.scatter_(1, (2 * unm_idx).expand(n, num_unm, c), unm)
        out.scatter_(1, (2 * src_idx).expand(n, r, c), moved)
        return out

    return MergeDecision(merge, unmerge, r)


def merge_wavg(
        decision: MergeDecision,
        x: torch.Tensor,
        size: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge: every merged token is the mean of the original patches it holds.

    Args:
        x: ``[B, T, C]`` tokens.
        size: ``[B, T, 1]`` patch counts per token (float32); ``None`` means all ones.

    Returns:
        ``(x, size)`` after the merge, ``x`` in its input dtype, ``size`` in float32.
    """
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
    # Reduced precision sums lose mass; accumulate in fp32 and cast back.
    acc = x if x.dtype in (torch.float32, torch.float64) else x.float()
    merged = decision.merge(acc * size.to(acc.dtype), "sum")
    size = decision.merge(size, "sum")
    return (merged / size.to(acc.dtype)).to(x.dtype), size


def merge_source(
        decision: MergeDecision,
        x: torch.Tensor,
        source: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Provenance: ``source[b, j, i] = 1`` iff current token j contains original token i.

    ``source`` is ``[B, T, T0]``; ``None`` starts from the identity of the current tokens.
    """
    if source is None:
        B, T = x.shape[:2]
        source = torch.eye(T, device=x.device, dtype=x.dtype)[None].expand(B, T, T).contiguous()
    return decision.merge(source, "amax")


def unmerge_from_source(y: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Multi-layer unmerge: every original token gets the value of the final token holding it.

    Args:
        y: ``[B, T, C]`` final tokens.
        source: ``[B, T, T0]`` binary provenance.

    Returns:
        ``[B, T0, C]`` with ``out[b, i] = y[b, j]`` where ``source[b, j, i] == 1``.
    """
    owner = source_owners(source)  # [B, T0]
    return y.gather(1, owner[..., None].expand(-1, -1, y.shape[-1]))
