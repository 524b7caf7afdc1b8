"""ToMe: Token Merging (Bolya et al., ICLR 2023). Rules: ``docs/methods/tome.md``.

In each block with ``r_l > 0``: attention (with the ``log(size)`` key bias when proportional
attention is on), residual, then bipartite soft matching on the head-averaged keys that this
attention used, a size-weighted merge of the residual stream, then the MLP on the reduced
tokens. No parameters; works off the shelf.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import OptionError, VitrimError
from ..ops.attention import attention_with_key_bias, log_size_bias
from ..ops.merge import bipartite_soft_matching, clamp_r, merge_source, merge_wavg
from ..ops.provenance import source_owners
from ..ops.rope import merge_positions
from ..state import ForwardState
from .base import BlockTokens, ModelInfo, ReductionMethod, TokenMap, is_int, register_method

__all__ = ["ToMe", "parse_schedule"]

Schedule = Union[int, Sequence[int], tuple[int, float]]

_SCHEDULE_FORMS = ("an int r >= 0 (the same r in every block), a list of per-block ints >= 0 "
                   "no longer than the depth (padded with zeros), or a tuple (r, inflect) with "
                   "r >= 0 and -1 <= inflect <= 1 (linear ramp)")


def parse_schedule(r: Schedule, depth: int) -> list[int]:
    """Per-block tokens to remove, ``[r_0, ..., r_{L-1}]`` (docs/methods/tome.md, "Schedules").

    >>> parse_schedule((16, -1), 12)
    [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    """
    if is_int(r):
        if r < 0:
            raise OptionError(f"r must be >= 0, got {r}; accepted: {_SCHEDULE_FORMS}")
        return [int(r)] * depth
    if isinstance(r, tuple) and len(r) == 2 and is_int(r[0]) and isinstance(r[1], (int, float)) \
            and not isinstance(r[1], bool):
        base, inflect = int(r[0]), float(r[1])
        if base < 0 or not -1.0 <= inflect <= 1.0:
            raise OptionError(f"r=(r, inflect) needs r >= 0 and -1 <= inflect <= 1, got {r!r}; "
                              f"accepted: {_SCHEDULE_FORMS}")
        start = int(base * (1 - inflect))
        if depth == 1:
            return [start]
        end = 2 * base - start
        step = (end - start) / (depth - 1)
        return [int(start + step * i) for i in range(depth)]
    if isinstance(r, list) and all(is_int(v) for v in r):
        if len(r) > depth:
            raise OptionError(f"r has {len(r)} entries but the model has {depth} blocks; "
                              f"accepted: {_SCHEDULE_FORMS}")
        if any(v < 0 for v in r):
            raise OptionError(f"r entries must be >= 0, got {list(r)}; accepted: {_SCHEDULE_FORMS}")
        return [int(v) for v in r] + [0] * (depth - len(r))
    raise OptionError(f"r={r!r} is not a schedule; accepted: {_SCHEDULE_FORMS}")


@register_method
class ToMe(ReductionMethod):
    """Token Merging.

    Args:
        r: tokens merged away per block: int, per-block list, or ``(r, inflect)``; ``None``: the
            model's default, 0.8 of ``num_patches // depth`` (DeiT-S: 13, the embedded model: 4).
        prop_attn: add ``log(size)`` to the attention logits of each key (proportional
            attention); recommended for supervised models off the shelf, off for MAE.
        trace_source: track the ``[B, T, T0]`` provenance of every token; the last forward's
            map is then available as ``model.vitrim.source``.
        position: on models whose blocks read token positions (rotary embeddings): ``"mean"``, a
            merged token sits at the size-weighted mean of its patches' coordinates (its rotation is
            recomputed there), or ``"keep"``, it keeps its destination token's position
            [vitrim extension]. No effect on other models.
    """

    name = "tome"
    order = 10
    summary = "Token Merging: merge the r most similar token pairs per block, off the shelf (no training)"
    strength = "r"
    pools_with_weights = True
    color = "tab:blue"
    reduced_verb = "merged"
    #: ``r`` at these fractions of ``num_patches // depth`` (DeiT-S: 8, 13, 16)
    sweep_fractions: tuple[float, ...] = (0.5, 0.8, 1.0)

    def __init__(self, info: ModelInfo, r: Optional[Schedule] = None, prop_attn: bool = True,
                 trace_source: bool = False, position: str = "mean") -> None:
        super().__init__(info)
        if position not in ("mean", "keep"):
            raise OptionError(f"position must be 'mean' or 'keep', got {position!r}")
        self.position = position
        for opt, val in (("prop_attn", prop_attn), ("trace_source", trace_source)):
            if not isinstance(val, bool):
                raise OptionError(f"{opt} must be True or False, got {val!r}")
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.r = self.default_strength(info) if r is None else r
        first = clamp_r(self.schedule[0], info.num_prefix_tokens + info.num_patches, info.num_prefix_tokens)
        if first < self.schedule[0]:
            raise OptionError(f"r={self.r!r} asks block 0 to merge {self.schedule[0]} tokens, but it can merge at most "
                              f"{first} (half of the {info.num_patches} patch tokens at the model's input size); "
                              f"accepted: r <= {first} in the first block (later blocks are clamped to what is left, "
                              f"as in the paper)")
        self.source: Optional[torch.Tensor] = None

    @classmethod
    def default_strength(cls, info: ModelInfo) -> int:
        """The ``r`` used when none is given: the middle of the default sweep (DeiT-S: 13; the embedded model: 4)."""
        sweep = cls.default_sweep(info)
        return sweep[len(sweep) // 2]["r"]

    @property
    def r(self) -> Schedule:
        return self._r

    @r.setter
    def r(self, value: Schedule) -> None:
        self.schedule = parse_schedule(value, self.info.depth)
        self._r = int(value) if is_int(value) else value

    # ------------------------------------------------------------------ forward
    def block_forward(self, block: nn.Module, index: int, x: torch.Tensor,
                      state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        r = clamp_r(self.schedule[index], x.shape[1], state.num_prefix_tokens)
        if r == 0 and state.size is None:
            return block(x), state  # the model's own forward: bit-identical at r = 0
        bias = log_size_bias(state.size) if (self.prop_attn and state.size is not None) else None
        out, metric = attention_with_key_bias(block.attn, block.norm1(x), bias)
        x = x + block.drop_path1(block.ls1(out))
        size, source = state.size, state.source
        if r > 0:
            decision = bipartite_soft_matching(metric, r, state.num_prefix_tokens)
            if self.trace_source:
                source = merge_source(decision, x, source)
            if state.positions is not None:  # rotary models: positions follow the merge (docs/methods/tome.md)
                state = state.replace(positions=merge_positions(decision, state.positions, size,
                                                                state.num_prefix_tokens, self.position))
            x, size = merge_wavg(decision, x, size)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, state.replace(size=size, source=source)

    def finish(self, state: ForwardState) -> None:
        if self.trace_source:
            self.source = state.source

    # ------------------------------------------------------------------ accounting
    def plan_block(self, index: int, tokens_in: int, num_patches: int) -> BlockTokens:
        r = clamp_r(self.schedule[index], tokens_in, self.info.num_prefix_tokens)
        return BlockTokens(q=tokens_in, kv=tokens_in, mlp=tokens_in - r)

    # ------------------------------------------------------------------ strength
    @classmethod
    def strength_grid(cls, info: ModelInfo) -> list[int]:
        """Constant ``r`` from 0 to half the patch tokens."""
        return list(range(0, info.num_patches // 2 + 1))

    @classmethod
    def default_sweep(cls, info: ModelInfo) -> list[dict]:
        """``r`` at 0.5, 0.8 and 1.0 of ``num_patches // depth`` (DeiT-S: 8, 13, 16; the embedded model: 2, 4, 5)."""
        r_max = max(info.num_patches // info.depth, 1)
        return [{"r": r} for r in sorted({max(1, round(r_max * f)) for f in cls.sweep_fractions})]

    # ------------------------------------------------------------------ provenance
    @contextlib.contextmanager
    def provenance(self) -> Iterator[None]:
        """Trace the source map for the forwards inside (the option and ``self.source`` are restored)."""
        if self.trace_source:
            yield
            return
        saved = self.source
        self.trace_source = True
        try:
            yield
        finally:
            self.trace_source = False
            self.source = saved

    def patch_owners(self, state: ForwardState, num_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
        """Each patch is carried by the final token of its merge group (multi-layer unmerge)."""
        P, N0 = state.num_prefix_tokens, state.num_patches
        if state.source is not None:
            if state.source.shape[1] != num_tokens or state.source.shape[2] != P + N0:
                raise VitrimError(f"source map {tuple(state.source.shape)} does not match {num_tokens} final tokens "
                                  f"of {P + N0} input tokens")
            return source_owners(state.source, P)
        if state.size is not None:
            raise VitrimError("tokens were merged but the forward kept no provenance: ToMe tracks it with "
                              "trace_source=True; use vitrim.forward_dense(model, x), which turns it on for its "
                              "forward, or vitrim.update(model, trace_source=True) before the forward")
        return super().patch_owners(state, num_tokens, grid)

    def token_maps(self, run: Callable[[], ForwardState], grid: tuple[int, int],
                   layers: Optional[Sequence[int]] = None) -> list[TokenMap]:
        """The merge groups after each of ``layers`` (default: after 1/4, 1/2, 3/4 and all blocks).

        The source map is of the final tokens, so the picture after block ``l`` comes from a
        forward with the schedule cut after ``l`` (merges in later blocks do not change earlier ones).
        """
        depth = self.info.depth
        layers = layers or sorted({max(0, round(depth * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)})
        saved, schedule = (self.r, self.trace_source), list(self.schedule)
        maps = []
        try:
            self.trace_source = True
            for layer in layers:
                self.r = schedule[:layer + 1]
                state = run()
                if state.source is None:
                    maps.append(TokenMap(f"after block {layer}: no merges yet",
                                         groups=np.arange(grid[0] * grid[1]).reshape(grid), block=layer))
                    continue
                owner = source_owners(state.source, state.num_prefix_tokens)[0]
                maps.append(TokenMap(f"after block {layer}: {len(torch.unique(owner))} tokens",
                                     groups=owner.reshape(grid).cpu().numpy(), block=layer))
        finally:
            self.r, self.trace_source = saved
        return maps

    def picture_legend(self) -> str:
        return "each merge group filled with its mean colour, outlined in white"
