"""Per-forward state of a reduced model.

One :class:`ForwardState` is created at the start of every forward pass and threaded through
the blocks explicitly; blocks return an updated copy instead of mutating shared state, so a
forward is re-entrant, blocks can be recomputed (gradient checkpointing) and traced
(``torch.compile``, ONNX) with static per-block token counts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ForwardState"]


@dataclass(frozen=True)
class ForwardState:
    """What one forward pass tracks about its tokens.

    Attributes:
        num_prefix_tokens: protected tokens at the front (class, distillation, registers).
        num_patches: patch tokens at the input (``N0``); ``T0 = num_prefix_tokens + num_patches``.
        size: ``[B, T, 1]`` float32 count of input tokens each current token stands for;
            ``None`` until the first merge (all ones).
        source: ``[B, T, T0]`` binary provenance, only when a method traces it.
        policy: ``[B, T, 1]`` keep mask (1 = active) of masked fixed-shape training forms.
        positions: ``[B, N, 2]`` float grid coordinates ``(row, column)`` of the current patch
            tokens, for families whose blocks need them (rotary position embeddings); ``None``
            while the tokens are the input grid in order, or where no block reads positions.
        records: per-stage outputs a method exposes for losses and pictures (e.g. predictor
            decisions, attention maps, kept indices), appended as ``state.records + (rec,)``.
    """

    num_prefix_tokens: int
    num_patches: int
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    policy: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    records: tuple = ()

    def replace(self, **changes) -> "ForwardState":
        return dataclasses.replace(self, **changes)

    def add_record(self, record) -> "ForwardState":
        """A copy with ``record`` appended to :attr:`records`."""
        return dataclasses.replace(self, records=self.records + (record,))
