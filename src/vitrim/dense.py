"""Dense features from a reduced model: one feature per original patch, ``[B, H/ps, W/ps, C]``.

Token reduction leaves fewer (merged, pruned, reordered) tokens than patches; dense-prediction
heads need the full grid back. :func:`restore_grid` finds, for every original patch, the final token
that carries it (its *owner*) and gathers it. Each method leaves a different trail:

=====================  ==================================================  ==================================
method                 a patch's feature                                   provenance read from the state
=====================  ==================================================  ==================================
tome                   the final token of its merge group (groups are      ``state.source`` (ToMe's
                       broadcast: multi-layer unmerge, tome.md §5)         ``trace_source``)
evit (``fuse=True``)   kept: its own token; pruned: the fused token it     ``PruneRecord.index`` per stage
                       was folded into (or the one that token was later
                       folded into)
etps, dtps             kept: its own token; pruned: its host, the kept     ``PruneRecord.index`` and
                       token it was squeezed into (followed through later  ``PruneRecord.hosts``
                       stages)
dynamicvit, evit       kept: its own token; pruned (dropped): the final    ``PruneRecord.index`` and
(``fuse=False``)       token of the nearest surviving patch on the grid    ``positions``
                       (squared Euclidean distance; ties: the survivor
                       listed first). The specs define no dense rule for
                       dropped tokens; this one is vitrim's.
idle                   its own token: idle tokens stay in place, as they   none
                       are (also masked training forms and zero reduction)
=====================  ==================================================  ==================================

ToMe keeps provenance only with ``trace_source=True``. :func:`forward_dense` turns it on for its
own forward (and restores the option), so ``vitrim.forward_dense(model, x)`` works for every method
without the user remembering it; :func:`restore_grid` on a state from an ordinary forward of a
ToMe model without ``trace_source`` raises an error saying so.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import nn

from .api import get_method
from .errors import VitrimError
from .methods.base import ReductionMethod
from .ops.prune import rank_tokens
from .state import ForwardState

__all__ = ["restore_grid", "forward_dense", "patch_owners"]

#: methods whose pruned tokens are squeezed into a host (their dense rule needs the host index)
_SQUEEZING_METHODS = ("etps", "dtps")


def _prune_stages(state: ForwardState) -> list:
    """Gather-form pruning records (``PruneRecord`` with ``index`` and ``positions``), in order."""
    return [r for r in state.records
            if getattr(r, "index", None) is not None and getattr(r, "positions", None) is not None]


def _rest_index(rec) -> torch.Tensor:
    """``[B, n - k]`` rows pruned at a stage, in the order its ``hosts`` are given: ``rec.rest`` if
    recorded, else the ranking order (the rest of :func:`~vitrim.ops.prune.rank_tokens`)."""
    rest = getattr(rec, "rest", None)
    return rest if rest is not None else rank_tokens(rec.scores, rec.index.shape[1])[1]


def _stage_map(rec, num_in: int) -> torch.Tensor:
    """Where each of the ``num_in`` patch rows entering a stage goes: ``[B, num_in]`` row among the
    patch rows leaving it, ``-1`` for a dropped token."""
    index = rec.index
    B, k = index.shape
    num_out = rec.positions.shape[1]
    inv = torch.full((B, num_in), -1, dtype=torch.long, device=index.device)
    if num_out > k:  # EViT's fused token, appended after the kept ones, holds every pruned token
        inv.fill_(k)
    hosts = getattr(rec, "hosts", None)
    if hosts is not None:
        inv.scatter_(1, _rest_index(rec), hosts.long())
    elif rec.method in _SQUEEZING_METHODS and k < num_in:
        raise VitrimError(
            f"dense features for {rec.method!r} fill a pruned patch from its host (the kept token it was "
            f"squeezed into), but this stage's record (block {rec.block}) carries no host index "
            f"(PruneRecord.hosts, [B, n - k]); this version of the method does not record it")
    inv.scatter_(1, index, torch.arange(k, device=index.device).expand(B, k))
    return inv


def _nearest_survivor(positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
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


def patch_owners(state: ForwardState, num_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """Row of the final tokens that carries each original patch.

    Args:
        state: the :class:`ForwardState` of a reduced forward.
        num_tokens: ``T``, rows of the final tokens (prefix included).
        grid: ``(h, w)`` patch grid, ``h * w = state.num_patches``.

    Returns:
        ``[B, N0]`` long indices into the ``T`` final rows (prefix rows never own a patch), or
        ``[1, N0]`` when nothing moved (broadcast over the batch).
    """
    P, N0 = state.num_prefix_tokens, state.num_patches
    stages = _prune_stages(state)
    if stages:
        B = stages[0].index.shape[0]
        owner = torch.arange(N0, device=stages[0].index.device).expand(B, N0)
        n = N0
        for rec in stages:
            inv = _stage_map(rec, n)
            owner = torch.where(owner >= 0, inv.gather(1, owner.clamp_min(0)), owner)  # dropped stay -1
            n = rec.positions.shape[1]
        if num_tokens != P + n:
            raise VitrimError(f"{num_tokens} final tokens, but the pruning records leave {P} prefix + {n} patch tokens")
        owner = torch.where(owner >= 0, owner, _nearest_survivor(stages[-1].positions, grid))
        return owner + P
    if state.source is not None:
        if state.source.shape[1] != num_tokens or state.source.shape[2] != P + N0:
            raise VitrimError(f"source map {tuple(state.source.shape)} does not match {num_tokens} final tokens "
                              f"of {P + N0} input tokens")
        return state.source[:, :, P:].argmax(dim=1)  # each column holds exactly one 1
    if state.size is not None:
        raise VitrimError("tokens were merged but the forward kept no provenance: ToMe tracks it with "
                          "trace_source=True; use vitrim.forward_dense(model, x), which turns it on for its "
                          "forward, or vitrim.update(model, trace_source=True) before the forward")
    if num_tokens != P + N0:
        raise VitrimError(f"{num_tokens} final tokens for {P} prefix + {N0} patches, and the state records no "
                          f"reduction that explains the difference")
    return torch.arange(P, P + N0).unsqueeze(0)


def _grid_size(model: nn.Module, state: ForwardState, grid_size: Optional[tuple[int, int]]) -> tuple[int, int]:
    """``(h, w)``: pyramid state's map, the given size, the model's own grid, or a square."""
    from .adapters import get_adapter

    feat = getattr(state, "feat_size", None)  # pyramid models: the last stage's map
    if feat is not None and feat[0] * feat[1] == state.num_patches:
        return tuple(feat)
    if grid_size is None:
        adapter = get_adapter(model)
        if adapter.num_patches() == state.num_patches:
            grid_size = tuple(adapter.grid_size())
        else:
            side = math.isqrt(state.num_patches)
            if side * side != state.num_patches:
                raise VitrimError(f"{state.num_patches} patches do not form the model's default grid or a square; "
                                  f"pass grid_size=(h, w)")
            grid_size = (side, side)
    h, w = int(grid_size[0]), int(grid_size[1])
    if h * w != state.num_patches:
        raise VitrimError(f"grid {h}x{w} has {h * w} cells but the forward had {state.num_patches} patches")
    return h, w


def restore_grid(model: nn.Module, tokens: torch.Tensor, state: ForwardState,
                 grid_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """One feature per original patch from a reduced model's final tokens.

    Args:
        model: the reduced model (for its patch grid).
        tokens: ``[B, T, C]`` final tokens (``vitrim.forward_tokens``).
        state: the same forward's :class:`ForwardState`.
        grid_size: ``(h, w)`` patch grid; default: the model's own grid when the patch count matches
            it (pyramids: the last stage's map), else a square.

    Returns:
        ``[B, h, w, C]``; see the module docstring for each method's rule. At zero reduction it is
        the model's own patch tokens, reshaped.
    """
    grid = _grid_size(model, state, grid_size)
    owner = patch_owners(state, tokens.shape[1], grid).to(tokens.device).expand(tokens.shape[0], -1)
    out = tokens.gather(1, owner.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return out.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])


@contextlib.contextmanager
def _provenance(method: ReductionMethod) -> Iterator[None]:
    """Ask the method to keep what :func:`restore_grid` needs for one forward (ToMe: ``trace_source``)."""
    if "trace_source" not in method.option_names() or method.trace_source:
        yield
        return
    saved = method.source
    method.trace_source = True
    try:
        yield
    finally:
        method.trace_source = False
        method.source = saved


def forward_dense(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense features of images ``x: [B, 3, H, W]`` through a reduced model: ``[B, H/ps, W/ps, C]``.

    Runs ``vitrim.forward_tokens`` with the provenance each method needs switched on for this forward
    only (ToMe: ``trace_source``; the option is set back afterwards, so do not run other forwards of
    the same model concurrently), then :func:`restore_grid`.

    Example:
        >>> model = vitrim.apply(timm.create_model("deit_small_patch16_224"), "tome", r=13)
        >>> vitrim.forward_dense(model, torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 14, 14, 384])
    """
    from .adapters import get_adapter

    method = get_method(model)
    with _provenance(method):
        tokens, state = model.forward_tokens(x)
    grid = None
    if getattr(state, "feat_size", None) is None:
        grid = tuple(get_adapter(model).grid_size(tuple(x.shape[-2:])))
    return restore_grid(model, tokens, state, grid)
