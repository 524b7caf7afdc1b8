"""EViT: token reorganisation (Liang et al., ICLR 2022). Rules: ``docs/methods/pruning.md``.

In each block at a location: attention over all tokens, residual, then the head-mean
post-softmax class attention (a side computation: the class query against all keys, so the
attention itself stays on SDPA) ranks the patch tokens; the top ``ceil(r * n)`` of the current
``n`` are kept (score order) and, with ``fuse``, the rest are folded into one token, their
class-attention-weighted **sum**; the MLP runs on the shortened sequence. Training uses the
same gather path (the scores are not learned). No parameters; works off the shelf.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import OptionError, VitrimError
from ..ops.attention import class_attention_logits, mean_query_logits
from ..ops.prune import class_attention_probs, fused_token, gather_tokens, keep_count_current, rank_tokens
from ..state import ForwardState
from ._pruning import PruningMethod, attention_residual, mlp_residual
from .base import BlockTokens, ModelInfo, is_int, register_method

__all__ = ["EViT", "keep_rate_schedule"]


def keep_rate_schedule(iteration: int, iters_per_epoch: int, keep_rate: float,
                       shrink_start_epoch: int = 0, shrink_epochs: int = 0) -> float:
    """EViT's keep-rate warm-up (docs/methods/pruning.md, "EViT"): 1, then a cosine descent to ``keep_rate``.

    Args:
        iteration: global training iteration (0-based).
        iters_per_epoch: iterations per epoch.
        keep_rate: the target rate ``r``.
        shrink_start_epoch: epochs at rate 1 before shrinking (official from-scratch recipe: 10;
            fine-tuning: 0).
        shrink_epochs: epochs of cosine descent (from scratch: 100; fine-tuning: 0, the target
            rate from the first step).

    Returns:
        ``1`` before the start, ``r + (1 - r)(1 + cos(pi t / T)) / 2`` while shrinking, ``r`` after.
        Apply it with ``vitrim.update(model, keep_rate=...)``.
    """
    if not (isinstance(iters_per_epoch, int) and iters_per_epoch >= 1):
        raise OptionError(f"iters_per_epoch must be an int >= 1, got {iters_per_epoch!r}")
    if not 0.0 < keep_rate <= 1.0:
        raise OptionError(f"keep_rate must be in (0, 1], got {keep_rate!r}")
    if shrink_start_epoch < 0 or shrink_epochs < 0 or iteration < 0:
        raise OptionError("iteration, shrink_start_epoch and shrink_epochs must be >= 0")
    t = iteration - shrink_start_epoch * iters_per_epoch
    total = shrink_epochs * iters_per_epoch
    if t < 0:
        return 1.0
    if t >= total:
        return float(keep_rate)
    return keep_rate + (1.0 - keep_rate) * (1.0 + math.cos(math.pi * t / total)) / 2.0


def class_attention(block: nn.Module, x_normed: torch.Tensor, keys: torch.Tensor, num_prefix_tokens: int,
                    has_class_token: bool = True) -> torch.Tensor:
    """Head-mean post-softmax attention of the class query to each patch token: ``[B, n]``.

    Softmax over all keys (prefix included), then the patch columns; the block's attention
    dropout applies in training, as in the official code. Without a class token: the average patch
    token's query (``ops.attention.mean_query_logits``), softmax over the patch tokens [vitrim extension].
    """
    attn = block.attn
    if num_prefix_tokens == 0 or not has_class_token:
        # no class token: the average patch token's query, softmax over the patch tokens [vitrim extension]
        logits = mean_query_logits(attn, x_normed, keys, num_prefix_tokens)    # [B, H, n]
        return logits.softmax(dim=-1).mean(dim=1)
    logits = class_attention_logits(attn, x_normed, keys)                      # [B, H, T]
    if attn.training and attn.attn_drop.p > 0:
        return attn.attn_drop(logits.softmax(dim=-1)).mean(dim=1)[:, num_prefix_tokens:]
    return class_attention_probs(logits)[:, num_prefix_tokens:]


@register_method
class EViT(PruningMethod):
    """EViT token reorganisation.

    Args:
        keep_rate: kept fraction of the **current** patch tokens at each location,
            ``k = ceil(keep_rate * n)``; a list gives one rate per location.
        locations: 0-based blocks that reorganise (between their attention and MLP); default
            depth/4, depth/2, 3 depth/4 ((3, 6, 9) on 12 blocks).
        fuse: fold the inattentive tokens into one extra token (their attention-weighted sum).
        tokens: kept patch tokens instead of a rate (an int, or one per location), as the official
            ``tokens`` option; it replaces ``keep_rate`` (then reported as ``None``), and a keep rate other
            than the default given with it is refused.
    """

    name = "evit"
    scores_without_class_token = True  # average-token query [vitrim extension]
    order = 20
    summary = "EViT: keep the tokens the class token attends to most, fuse the rest into one token (off the shelf)"
    color = "tab:orange"

    #: the default keep rate (``keep_rate=None`` means it too)
    default_keep_rate = 0.7

    def __init__(self, info: ModelInfo, keep_rate: Optional[Union[float, Sequence[float]]] = 0.7,
                 locations: Optional[Sequence[int]] = None, fuse: bool = True,
                 tokens: Optional[Union[int, Sequence[int]]] = None) -> None:
        super().__init__(info)
        self._configure(keep_rate=keep_rate, locations=locations, fuse=fuse, tokens=tokens)

    def _configure(self, keep_rate: Any, locations: Any, fuse: Any = True, tokens: Any = None) -> None:
        if keep_rate is not None and tokens is not None and keep_rate != self.default_keep_rate:
            raise OptionError(f"keep_rate={keep_rate!r} and tokens={tokens!r} both set the kept tokens; accepted: "
                              f"one of them (to switch an applied method from tokens to a rate, pass tokens=None)")
        values = self._configure_common(self.default_keep_rate if keep_rate is None else keep_rate, locations)
        if tokens is not None:
            values["keep_rate"] = None  # the counts come from tokens
        if not isinstance(fuse, bool):
            raise OptionError(f"fuse must be True or False, got {fuse!r}")
        values["fuse"] = fuse
        values["tokens"], values["_tokens"] = self._parse_tokens(tokens, len(values["locations"]))
        if values["_tokens"] is not None and values["locations"] and values["_tokens"][0] >= self.info.num_patches:
            raise OptionError(f"tokens={tokens!r} keeps all {self.info.num_patches} patch tokens at the first location, "
                              f"so nothing would be pruned; accepted: tokens < {self.info.num_patches}")
        self._set(values)

    @staticmethod
    def _parse_tokens(tokens: Any, num_locations: int) -> tuple[Any, Optional[tuple[int, ...]]]:
        accepted = "accepted: None, an int >= 1 (kept patch tokens at every location) or one int >= 1 per location"
        if tokens is None:
            return None, None
        def ok(v: Any) -> bool:
            return is_int(v) and v >= 1

        if ok(tokens):
            return tokens, (tokens,) * num_locations
        if isinstance(tokens, (list, tuple)) and all(ok(v) for v in tokens):
            if len(tokens) != num_locations:
                raise OptionError(f"tokens has {len(tokens)} entries for {num_locations} locations; {accepted}")
            return tuple(tokens), tuple(tokens)
        raise OptionError(f"tokens={tokens!r} is not valid; {accepted}")

    def extensions(self) -> list[str]:
        if self.info.num_prefix_tokens == 0 or not self.info.has_class_token:
            return ["no class token: tokens ranked by the average patch token's query (docs/methods/pruning.md)"]
        return []

    # ------------------------------------------------------------------ plan
    def _keep(self, stage: int, n: int) -> int:
        """Patch tokens kept at ``stage`` from the current ``n``."""
        if self._tokens is not None:
            return min(n, self._tokens[stage])
        return keep_count_current(n, self.stage_rates[stage])

    def _extra_tokens(self) -> int:
        """Tokens added after the kept ones (EViT's fused token)."""
        return 1 if self.fuse else 0

    def _reorganise(self, x: torch.Tensor, keep_index: torch.Tensor, rest_index: torch.Tensor,
                    scores: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block's new sequence: prefix tokens, kept tokens (score order), fused token.

        ``x: [B, P + n, C]`` after the attention residual, ``keep_index: [B, k]`` and
        ``rest_index: [B, n - k]`` into the patch tokens, ``scores: [B, n]`` -> ``[B, P + k (+1), C]``,
        and the host of each pruned row when the method squeezes (``None`` here).
        """
        kept = gather_tokens(x, keep_index, num_prefix_tokens)
        if not self.fuse:
            return kept, None
        fused = fused_token(x[:, num_prefix_tokens:], scores.scatter(1, keep_index, 0.0))
        return torch.cat([kept, fused], dim=1), None

    def _reduction_macs(self, n: int, k: int) -> int:
        """Extra MACs of one reorganisation the method's rules count (EViT: none; fusion is not counted)."""
        return 0

    # ------------------------------------------------------------------ forward
    def block_forward(self, block: nn.Module, index: int, x: torch.Tensor,
                      state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        stage = self._stage_of.get(index)
        prefix = state.num_prefix_tokens
        n = x.shape[1] - prefix
        k = n if stage is None else self._keep(stage, n)
        if k >= n:
            return block(x), state  # nothing to drop: the block's own forward (bit-identical)
        x, x_normed, keys = attention_residual(block, x)
        scores = class_attention(block, x_normed, keys, prefix, self.info.has_class_token)  # [B, n]
        keep_index, rest_index = rank_tokens(scores, k)
        x, hosts = self._reorganise(x, keep_index, rest_index, scores, prefix)
        state = self._record(state, index, stage, k, index=keep_index, scores=scores,
                             extra_positions=x.shape[1] - prefix - k,
                             rest=None if hosts is None else rest_index, hosts=hosts)
        return mlp_residual(block, x), state

    # ------------------------------------------------------------------ accounting
    def plan_block(self, index: int, tokens_in: int, num_patches: int) -> BlockTokens:
        prefix = self.info.num_prefix_tokens
        n = tokens_in - prefix
        stage = self._stage_of.get(index)
        k = n if stage is None else self._keep(stage, n)
        if k >= n:
            return BlockTokens(tokens_in, tokens_in, tokens_in)
        return BlockTokens(tokens_in, tokens_in, prefix + k + self._extra_tokens(), self._reduction_macs(n, k))

    # ------------------------------------------------------------------ pictures
    @property
    def reduced_verb(self) -> str:
        return "fused" if self.fuse else "dropped"

    # ------------------------------------------------------------------ training
    def begin_training(self, recipe) -> None:
        """The keep-rate warm-up (``shrink_start_epoch`` / ``shrink_epochs`` of the recipe) needs one rate."""
        self._shrink_target = None
        if getattr(recipe, "shrink_start_epoch", 0) or getattr(recipe, "shrink_epochs", 0):
            if not isinstance(self.keep_rate, float):
                raise VitrimError("the EViT keep-rate warm-up needs a single keep_rate, not per-stage rates")
            self._shrink_target = self.keep_rate

    def training_step(self, iteration: int, iters_per_epoch: int, recipe) -> None:
        """The warm-up rate of this step, recomputed from the global iteration (a resumed run follows the
        same rates); with the fine-tune preset (0, 0) the target rate holds from step 0."""
        target = getattr(self, "_shrink_target", None)
        if target is None:
            return
        rate = keep_rate_schedule(iteration, iters_per_epoch, target, recipe.shrink_start_epoch, recipe.shrink_epochs)
        if rate != self.keep_rate:
            self.update(keep_rate=rate)
