"""Provenance: which final token carries each original patch, read from what a forward recorded.

Pure, batched functions on the records methods leave in a ``ForwardState``: the ``[B, T, T0]``
source map of merging (ToMe) and the per-stage :class:`~vitrim.ops.prune.PruneRecord` of pruning
(kept rows, squeezed rows and their hosts, EViT's fused token). Dense features
(``vitrim.forward_dense``) and pictures (``vitrim visualize``) are both built on these, so each
rule is written once.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import VitrimError
from .prune import PruneRecord, rank_tokens

__all__ = ["source_owners", "stage_rows", "chain_owners", "nearest_survivor", "gather_stages", "stage_patch_owners"]


def source_owners(source: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Row of the current tokens that holds each input token.

    Args:
        source: ``[B, T, T0]`` binary provenance (each column holds exactly one 1).
        num_prefix_tokens: leading input columns (prefix tokens) left out of the result.

    Returns:
        ``[B, T0 - num_prefix_tokens]`` long indices into the ``T`` current rows.
    """
    return source[:, :, num_prefix_tokens:].argmax(dim=1)


def gather_stages(records: Sequence) -> list[PruneRecord]:
    """The gather-form pruning stages among ``records``, in order: every record with the kept rows
    (``index``) and the surviving positions (``positions``) of a :class:`~vitrim.ops.prune.PruneRecord`."""
    return [r for r in records if getattr(r, "index", None) is not None and getattr(r, "positions", None) is not None]


def _rest_index(rec: PruneRecord) -> torch.Tensor:
    """``[B, n - k]`` rows pruned at a stage, in the order of its ``hosts``: ``rec.rest`` if recorded,
    else the ranking order (the rest of :func:`~vitrim.ops.prune.rank_tokens`)."""
    rest = getattr(rec, "rest", None)
    return rest if rest is not None else rank_tokens(rec.scores, rec.index.shape[1])[1]


def stage_rows(rec: PruneRecord, num_in: int) -> torch.Tensor:
    """Where each of the ``num_in`` patch rows entering a stage goes.

    Kept rows go to their own row among the leaving patch rows; squeezed rows to their host's row;
    with a token appended after the kept ones (EViT's fused token) every pruned row goes to it;
    otherwise a pruned row is dropped (``-1``).

    Returns:
        ``[B, num_in]`` long rows among the patch rows leaving the stage, ``-1`` for a dropped token.

    Raises:
        ValueError: the stage absorbs its pruned tokens (``rec.absorbs``) but recorded no hosts.
    """
    index = rec.index
    B, k = index.shape
    num_out = rec.positions.shape[1]
    rows = torch.full((B, num_in), -1, dtype=torch.long, device=index.device)
    if num_out > k:  # a token appended after the kept ones holds every pruned token
        rows.fill_(k)
    hosts = getattr(rec, "hosts", None)
    if hosts is not None:
        rows.scatter_(1, _rest_index(rec), hosts.long())
    elif getattr(rec, "absorbs", False) and k < num_in:
        raise ValueError(f"stage at block {rec.block} of {rec.method!r} squeezes its pruned tokens into hosts "
                         f"but recorded no host index (PruneRecord.hosts, [B, n - k])")
    rows.scatter_(1, index, torch.arange(k, device=index.device).expand(B, k))
    return rows


def chain_owners(stages: Sequence[PruneRecord], num_patches: int) -> tuple[torch.Tensor, int]:
    """Follow every input patch through the gather stages of one forward.

    Returns:
        ``(owner [B, N0], n)``: the row among the ``n`` final patch rows that carries each patch
        (``-1`` where the patch was dropped), and ``n``.
    """
    B = stages[0].index.shape[0]
    owner = torch.arange(num_patches, device=stages[0].index.device).expand(B, num_patches)
    n = num_patches
    for rec in stages:
        rows = stage_rows(rec, n)
        owner = torch.where(owner >= 0, rows.gather(1, owner.clamp_min(0)), owner)  # dropped stay -1
        n = rec.positions.shape[1]
    return owner, n


def nearest_survivor(positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """For every patch, the row of the nearest surviving patch token on the grid.

    ``positions: [B, n]`` original patch index of each final patch row (``-1``: not a patch, e.g.
    a fused token) -> ``[B, N0]`` rows (squared Euclidean grid distance; ties: the lower row).
    """
    h, w = grid
    cells = torch.arange(h * w, device=positions.device)
    py, px = (cells // w).float(), (cells % w).float()                        # [N0]
    pos = positions.clamp_min(0)
    sy, sx = (pos // w).float(), (pos % w).float()                            # [B, n]
    d = (py[None, :, None] - sy[:, None, :]) ** 2 + (px[None, :, None] - sx[:, None, :]) ** 2
    d = d.masked_fill(positions[:, None, :] < 0, math.inf)
    return d.argmin(dim=-1)


def stage_patch_owners(state, num_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """Row of the final tokens that carries each original patch, from the gather stages a forward recorded.

    Kept rows carry themselves, squeezed rows go to their hosts, every pruned row to a fused token
    appended after the kept ones; a dropped patch takes the final token of the nearest surviving
    patch on the grid [vitrim extension]. With no stage recorded the tokens are the patches in order.

    Args:
        state: the ``ForwardState`` of the forward.
        num_tokens: ``T``, rows of the final tokens (prefix included).
        grid: ``(h, w)`` patch grid, ``h * w = state.num_patches``.

    Returns:
        ``[B, N0]`` long indices into the ``T`` final rows (prefix rows never own a patch), or
        ``[1, N0]`` when nothing moved.
    """
    P, N0 = state.num_prefix_tokens, state.num_patches
    stages = gather_stages(state.records)
    if stages:
        try:
            owner, n = chain_owners(stages, N0)
        except ValueError as err:
            raise VitrimError(f"dense features fill a squeezed patch from its host (the kept token it was "
                              f"squeezed into), but {err}") from None
        if num_tokens != P + n:
            raise VitrimError(f"{num_tokens} final tokens, but the pruning records leave {P} prefix + {n} patch tokens")
        owner = torch.where(owner >= 0, owner, nearest_survivor(stages[-1].positions, grid))
        return owner + P
    if num_tokens != P + N0:
        raise VitrimError(f"{num_tokens} final tokens for {P} prefix + {N0} patches, and the state records no "
                          f"reduction that explains the difference")
    return torch.arange(P, P + N0).unsqueeze(0)
