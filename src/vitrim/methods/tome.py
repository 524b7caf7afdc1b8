"""ToMe: Token Merging (Bolya et al., ICLR 2023). Spec: ``specs/tome.md``.

In each block with ``r_l > 0``: attention (with the ``log(size)`` key bias when proportional
attention is on), residual, then bipartite soft matching on the head-averaged keys that this
attention used, a size-weighted merge of the residual stream, then the MLP on the reduced
tokens. No parameters; works off the shelf.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import OptionError
from ..ops.attention import attention_with_key_bias, log_size_bias
from ..ops.merge import bipartite_soft_matching, clamp_r, merge_source, merge_wavg
from ..state import ForwardState
from .base import BlockTokens, ModelInfo, ReductionMethod, is_int, register_method

__all__ = ["ToMe", "parse_schedule"]

Schedule = Union[int, Sequence[int], tuple[int, float]]

_SCHEDULE_FORMS = ("an int r >= 0 (the same r in every block), a list of per-block ints >= 0 "
                   "no longer than the depth (padded with zeros), or a tuple (r, inflect) with "
                   "r >= 0 and -1 <= inflect <= 1 (linear ramp)")


def parse_schedule(r: Schedule, depth: int) -> list[int]:
    """Per-block tokens to remove, ``[r_0, ..., r_{L-1}]`` (tome.md §8).

    >>> parse_schedule((16, -1), 12)
    [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    """
    if is_int(r):
        if r < 0:
            raise OptionError(f"r must be >= 0, got {r}; accepted: {_SCHEDULE_FORMS}")
        return [r] * depth
    if isinstance(r, tuple) and len(r) == 2 and is_int(r[0]) and isinstance(r[1], (int, float)) \
            and not isinstance(r[1], bool):
        base, inflect = r[0], float(r[1])
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
        return list(r) + [0] * (depth - len(r))
    raise OptionError(f"r={r!r} is not a schedule; accepted: {_SCHEDULE_FORMS}")


@register_method
class ToMe(ReductionMethod):
    """Token Merging.

    Args:
        r: tokens merged away per block: int, per-block list, or ``(r, inflect)``.
        prop_attn: add ``log(size)`` to the attention logits of each key (proportional
            attention); recommended for supervised models off the shelf, off for MAE.
        trace_source: track the ``[B, T, T0]`` provenance of every token; the last forward's
            map is then available as ``model.vitrim.source``.
    """

    name = "tome"

    def __init__(self, info: ModelInfo, r: Schedule = 0, prop_attn: bool = True,
                 trace_source: bool = False) -> None:
        super().__init__(info)
        for opt, val in (("prop_attn", prop_attn), ("trace_source", trace_source)):
            if not isinstance(val, bool):
                raise OptionError(f"{opt} must be True or False, got {val!r}")
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.r = r
        self.source: Optional[torch.Tensor] = None

    @property
    def r(self) -> Schedule:
        return self._r

    @r.setter
    def r(self, value: Schedule) -> None:
        self.schedule = parse_schedule(value, self.info.depth)
        self._r = value

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
            x, size = merge_wavg(decision, x, size)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, state.replace(size=size, source=source)

    def finish(self, state: ForwardState) -> None:
        if self.trace_source:
            self.source = state.source

    # ------------------------------------------------------------------ accounting
    def block_tokens(self, num_tokens: int) -> list[BlockTokens]:
        out, t = [], num_tokens
        for r in self.schedule:
            t_next = t - clamp_r(r, t, self.info.num_prefix_tokens)
            out.append(BlockTokens(q=t, kv=t, mlp=t_next))
            t = t_next
        return out
