"""What the pruning family (EViT, DynamicViT, eTPS, dTPS) shares: option parsing (keep rates,
locations), the per-stage record that losses and pictures read (:class:`~vitrim.ops.prune.PruneRecord`),
and the block pieces (attention residual with the block's own modules, masked-attention block for
fixed-shape training).

Rules: ``docs/methods/pruning.md``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import OptionError
from ..ops.attention import attend, project, split_qkv
from ..ops.prune import PruneRecord, attend_with_policy, prune_records
from ..state import ForwardState
from .base import ModelInfo, ReductionMethod, is_int, is_real

__all__ = ["PruneRecord", "PruningMethod", "parse_locations", "parse_keep_rate", "prune_records",
           "attention_residual", "mlp_residual", "masked_block_forward"]

Rates = Union[float, Sequence[float]]


def default_locations(depth: int) -> tuple[int, ...]:
    """The papers' locations as a depth rule: blocks ``depth/4, 2 depth/4, 3 depth/4`` (rounded down):
    (3, 6, 9) for 12 blocks (DeiT), (4, 8, 12) for 16 (LV-ViT-S), (5, 10, 15) for 20 (LV-ViT-M)."""
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))


def parse_locations(locations: Any, depth: int) -> tuple[int, ...]:
    """Validated 0-based block indices: a sorted sequence of distinct ints in ``[0, depth - 1]``;
    ``None``: :func:`default_locations`."""
    if locations is None:
        locations = default_locations(depth)
    accepted = (f"accepted: a strictly increasing sequence of distinct 0-based block indices in "
                f"[0, {depth - 1}] (e.g. (3, 6, 9) or range(3, 12, 3)), or () for none")
    if is_int(locations):
        locations = (locations,)
    if not isinstance(locations, (list, tuple, range)) or not all(is_int(v) for v in locations):
        raise OptionError(f"locations={locations!r} is not a sequence of ints; {accepted}")
    locs = tuple(int(v) for v in locations)
    bad = [v for v in locs if not 0 <= v < depth]
    if bad:
        raise OptionError(f"locations {bad} out of range for a model with {depth} blocks; {accepted}")
    if len(set(locs)) != len(locs):
        raise OptionError(f"locations {list(locs)} contain duplicates; {accepted}")
    if list(locs) != sorted(locs):
        raise OptionError(f"locations {list(locs)} are not sorted; {accepted}")
    return locs


def parse_keep_rate(keep_rate: Any, num_locations: int, cumulative: bool) -> tuple[Union[float, tuple[float, ...]], tuple[float, ...]]:
    """``(normalised keep_rate, per-stage rates)``.

    A single rate ``r`` gives ``r`` at every stage (``cumulative=False``: EViT's rate on the current
    count) or ``r ** s`` (``cumulative=True``: DynamicViT's ratio of the original count). A list
    gives the per-stage values directly; cumulative ratios must not increase.
    """
    forms = ("accepted: a keep rate in (0, 1], or a list of one rate in (0, 1] per location"
             + (" (ratios of the input patch count, non-increasing)" if cumulative else ""))
    if is_real(keep_rate):
        r = float(keep_rate)
        if not 0.0 < r <= 1.0:
            raise OptionError(f"keep_rate={keep_rate!r} is outside (0, 1]; {forms}")
        return r, tuple(r ** s if cumulative else r for s in range(1, num_locations + 1))
    if isinstance(keep_rate, (list, tuple)) and all(is_real(v) for v in keep_rate):
        rates = tuple(float(v) for v in keep_rate)
        if len(rates) != num_locations:
            raise OptionError(f"keep_rate has {len(rates)} entries for {num_locations} locations; {forms}")
        if not all(0.0 < r <= 1.0 for r in rates):
            raise OptionError(f"keep_rate={list(keep_rate)!r} has entries outside (0, 1]; {forms}")
        if cumulative and any(b > a for a, b in zip(rates, rates[1:])):
            raise OptionError(f"keep_rate={list(keep_rate)!r} increases; these ratios are of the input "
                              f"patch count, so a later stage cannot keep more; {forms}")
        return rates, rates
    raise OptionError(f"keep_rate={keep_rate!r} is not a number or a list of numbers; {forms}")


class PruningMethod(ReductionMethod):
    """Base of the pruning family: validated ``keep_rate`` / ``locations`` and stage records.

    Subclasses implement ``_configure(**options)`` (validate every option first, then set the
    attributes, so a failed :meth:`update` leaves the method unchanged), ``block_forward`` and
    ``block_tokens``. Pruned tokens leave the sequence in score order, so only models whose
    head reads the class token or pools every token are supported.
    """

    #: keep counts relative to the current count (EViT, eTPS) or the original one (DynamicViT, dTPS)
    cumulative_rates: ClassVar[bool] = False
    #: pruned tokens are squeezed into their nearest kept token (TPS) instead of dropped or fused
    squeeze: ClassVar[bool] = False
    strength = "keep_rate"
    sweep = (0.9, 0.7, 0.5)
    #: the method can score and pool a model without a class token (average-token query, mean pooling)
    scores_without_class_token: ClassVar[bool] = False

    def __init__(self, info: ModelInfo) -> None:
        super().__init__(info)
        if not info.has_class_token and not self.scores_without_class_token:
            raise OptionError(
                f"method {self.name!r} needs a class token (its query scores the tokens and its head reads "
                f"it); this model has none. Accepted: models with a class token (deit_*, vit_*), or use "
                f"'tome' for class-token-free models")

    def _configure_common(self, keep_rate: Any, locations: Any) -> dict[str, Any]:
        locs = parse_locations(locations, self.info.depth)
        rate, stage_rates = parse_keep_rate(keep_rate, len(locs), self.cumulative_rates)
        return {"keep_rate": rate, "locations": locs, "stage_rates": stage_rates,
                "_stage_of": {loc: s for s, loc in enumerate(locs)}}

    def _configure(self, **options: Any) -> None:
        raise NotImplementedError

    def update(self, **options: Any) -> None:
        """Change options between forwards, validated as in ``apply``; learned weights are kept."""
        self.check_option_names(options)
        self._configure(**{**self.options(), **options})

    def _set(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            setattr(self, k, v)

    # ------------------------------------------------------------------ records
    def _record(self, state: ForwardState, block: int, stage: int, kept: int, **fields: Any) -> ForwardState:
        """Append this stage's :class:`PruneRecord` (``stage`` 0-based here, 1-based in the record)."""
        return self.record_stage(state, block, kept, stage=stage + 1, target=self._target(stage),
                                 absorbs=self.squeeze, **fields)

    def _target(self, stage: int) -> float:
        return self.stage_rates[stage]

    # ------------------------------------------------------------------ heads
    def pool_weights(self, state: ForwardState) -> Optional[torch.Tensor]:
        """Average pooling over alive tokens only in the masked form (``None``: plain pooling)."""
        return state.policy


# ---------------------------------------------------------------------- block pieces
def attention_residual(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x + drop_path1(ls1(attn(norm1(x))))`` with the block's own modules and kernel.

    ``x: [B, T, C]`` -> ``(x_out [B, T, C], x_normed [B, T, C], keys [B, H, T, d])``; the normed
    input and keys let a caller score tokens by class attention without the full attention map.
    """
    attn = block.attn
    xn = block.norm1(x)
    q, k, v = split_qkv(attn, xn)
    out = project(attn, attend(attn, q, k, v), xn)
    return x + block.drop_path1(block.ls1(out)), xn, k


def mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + drop_path2(ls2(mlp(norm2(x))))`` (``x: [B, T, C]``)."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def masked_block_forward(block: nn.Module, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """One block in the masked fixed-shape form: attention ignores dead keys, the MLP runs on all rows.

    ``x: [B, T, C]``, ``policy: [B, T, 1]`` (1 = alive) -> ``[B, T, C]``.
    """
    attn = block.attn
    xn = block.norm1(x)
    q, k, v = split_qkv(attn, xn)
    out = project(attn, attend_with_policy(attn, q, k, v, policy), xn)
    return mlp_residual(block, x + block.drop_path1(block.ls1(out)))

