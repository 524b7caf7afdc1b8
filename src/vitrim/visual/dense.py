"""Dense features from a reduced model: one feature per original patch, ``[B, H/ps, W/ps, C]``.

Token reduction leaves fewer (merged, pruned, reordered) tokens than patches; dense-prediction
heads need the full grid back. :func:`restore_grid` finds, for every original patch, the final token
that carries it (its *owner*) and gathers it. Each method leaves a different trail:

=====================  ==================================================  ==================================
method                 a patch's feature                                   provenance read from the state
=====================  ==================================================  ==================================
tome                   the final token of its merge group (groups are      ``state.source`` (ToMe's
                       broadcast: multi-layer unmerge)                     ``trace_source``)
evit (``fuse=True``)   kept: its own token; pruned: the fused token it     ``PruneRecord.index`` per stage
                       was folded into (or the one that token was later
                       folded into)
etps, dtps             kept: its own token; pruned: its host, the kept     ``PruneRecord.index`` and
                       token it was squeezed into (followed through later  ``PruneRecord.hosts``
                       stages)
dynamicvit, evit       kept: its own token; pruned (dropped): the final    ``PruneRecord.index`` and
(``fuse=False``)       token of the nearest surviving patch on the grid    ``positions``
                       (squared Euclidean distance; ties: the survivor
                       listed first). No paper defines a dense rule for
                       dropped tokens; this one is vitrim's own.
idle                   its own token: idle tokens stay in place, as they   none
                       are (also masked training forms and zero reduction)
=====================  ==================================================  ==================================

The rule is the method's own (``ReductionMethod.patch_owners``): the base class follows any stage
recorded with ``record_stage`` (kept, squeezed, fused, dropped), ToMe reads its source map, so a new
method gets dense features without code here. ToMe keeps provenance only with ``trace_source=True``:
:func:`forward_dense` asks the method to keep it for its own forward (``ReductionMethod.provenance``),
so ``vitrim.forward_dense(model, x)`` works for every method without the user remembering it;
:func:`restore_grid` on a state from an ordinary forward of a ToMe model without ``trace_source``
raises an error saying so.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..adapters import get_adapter
from ..api import get_method
from ..errors import OptionError, VitrimError
from ..ops.provenance import stage_patch_owners
from ..state import ForwardState

__all__ = ["restore_grid", "forward_dense"]


def _grid_size(model: nn.Module, state: ForwardState, grid_size: Optional[tuple[int, int]]) -> tuple[int, int]:
    """``(h, w)``: the given size, the model's own output grid (pyramids: the last stage's map), or a square."""
    if grid_size is None:
        grid = tuple(get_adapter(model).output_grid())
        if grid[0] * grid[1] == state.num_patches:
            grid_size = grid
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


def restore_grid(model: Optional[nn.Module], tokens: torch.Tensor, state: ForwardState,
                 grid_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """One feature per original patch from a reduced model's final tokens.

    Args:
        model: the reduced model (its method's rule, its patch grid); ``None``: the rule of the
            stages recorded in ``state`` (then pass ``grid_size``).
        tokens: ``[B, T, C]`` final tokens (``vitrim.forward_tokens``).
        state: the same forward's :class:`ForwardState`.
        grid_size: ``(h, w)`` patch grid; default: the model's own output grid when the patch count
            matches it (pyramids: the last stage's map), else a square.

    Returns:
        ``[B, h, w, C]``; see the module docstring for each method's rule. At zero reduction it is
        the model's own patch tokens, reshaped.
    """
    grid = _grid_size(model, state, grid_size)
    if model is None:  # no method to ask: the recorded stages decide
        owner = stage_patch_owners(state, tokens.shape[1], grid)
    else:
        owner = get_method(model).patch_owners(state, tokens.shape[1], grid)
    owner = owner.to(tokens.device).expand(tokens.shape[0], -1)
    out = tokens.gather(1, owner.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return out.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])


def forward_dense(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense features of a batch through a reduced model: one feature per patch of the input.

    Images ``x: [B, 3, H, W]`` -> ``[B, H/ps, W/ps, C]``; a video clip ``[B, T, C, H, W]`` (VideoMAE)
    -> ``[B, T', h, w, C]`` (``T'`` tubelet steps); a spectrogram ``[B, time, freq]`` (AST) -> ``[B, f', t', C]``,
    the adapter's patch grid. Runs ``vitrim.forward_tokens`` with the provenance the method needs kept
    for this forward only (``ReductionMethod.provenance``; ToMe: ``trace_source``, set back afterwards,
    so do not run other forwards of the same model concurrently), then :func:`restore_grid`.

    Example:
        >>> model = vitrim.apply(timm.create_model("deit_small_patch16_224"), "tome", r=13)
        >>> vitrim.forward_dense(model, torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 14, 14, 384])
    """
    method = get_method(model)
    adapter = get_adapter(model)
    sample = tuple(adapter.input_shape())
    if not isinstance(x, torch.Tensor) or x.ndim != len(sample) + 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        kind = {3: "images [B, 3, H, W]", 4: "video clips [B, T, C, H, W]", 2: "spectrograms [B, time, freq]"}
        raise OptionError(f"forward_dense takes a batch of {kind.get(len(sample), f'samples {sample}')} for this "
                          f"model (one sample: {sample}), got {got}"
                          + ("; add the batch dimension with x[None] for one sample"
                             if isinstance(x, torch.Tensor) and x.ndim == len(sample)
                             and tuple(x.shape[:-2]) == sample[:-2] else ""))
    with method.provenance():
        tokens, state = model.forward_tokens(x)
    out = restore_grid(model, tokens, state, tuple(adapter.output_grid(tuple(x.shape[-2:]))))
    steps = adapter.frames()
    return out if steps == 1 else out.view(out.shape[0], steps, out.shape[1] // steps, *out.shape[2:])
