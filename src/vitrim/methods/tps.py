"""TPS: joint token pruning and squeezing (Wei et al., CVPR 2023). Rules: ``docs/methods/pruning.md``.

Prune, then **squeeze**: every pruned token picks its most similar kept token (cosine similarity
of the full features, unidirectional nearest neighbour) and each host becomes the e-anchored
similarity-weighted mixture of itself and what it absorbed (``vitrim.ops.prune.squeeze_gather``);
a host that absorbs nothing is unchanged. No extra token, so a stage leaves ``prefix + kept``.

* ``dtps``: DynamicViT's learned predictors **before** each location (``int(N0 rho^s)`` kept;
  masked fixed-shape training with Gumbel decisions, squeezing in the masked form).
* ``etps``: EViT's class-attention ranking **inside** each location block, after the attention
  residual and before the MLP (``ceil(rho n)`` of the current count; gather in training too).
  Only eTPS's squeezing was released; this scoring and placement are vitrim's reconstruction
  [inferred], supported by the FLOPs of the paper's figure.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from ..ops.prune import gather_tokens, squeeze_gather
from .base import ModelInfo, register_method
from .dynamicvit import DynamicViT
from .evit import EViT

__all__ = ["DTPS", "ETPS"]


@register_method
class DTPS(DynamicViT):
    """dTPS: DynamicViT's predictor and Gumbel training, plus squeezing of the pruned tokens.

    Args:
        keep_rate: base ratio ``rho``; stage ``s`` keeps ``int(N0 * rho^s)`` of the input's ``N0``
            patch tokens; or a list of per-stage ratios of ``N0`` (non-increasing).
        locations: 0-based blocks before which a predictor prunes and squeezes.
    """

    name = "dtps"
    order = 40
    summary = "dTPS: DynamicViT's learned pruning, pruned tokens squeezed into their nearest kept token"
    squeeze = True
    color = "tab:red"
    reduced_verb = "squeezed"
    token_distillation_mode = "kl"


@register_method
class ETPS(EViT):
    """eTPS: EViT-style class-attention pruning inside the block, squeezing instead of a fused token.

    Args:
        keep_rate: kept fraction of the current patch tokens at each location,
            ``ceil(keep_rate * n)`` (the rounding is [unverified]); or one rate per location.
        locations: 0-based blocks that prune and squeeze between their attention and MLP.
    """

    name = "etps"
    order = 30
    summary = "eTPS: EViT-style class-attention pruning, pruned tokens squeezed into their nearest kept token"
    squeeze = True
    color = "tab:green"
    reduced_verb = "squeezed"
    loss_weights = {"kd": 0.5}

    def __init__(self, info: ModelInfo, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Optional[Sequence[int]] = None) -> None:
        super().__init__(info, keep_rate=keep_rate, locations=locations, fuse=False)

    def _configure(self, keep_rate: Any, locations: Any, fuse: Any = False, tokens: Any = None) -> None:
        super()._configure(keep_rate=keep_rate, locations=locations, fuse=False, tokens=None)

    def _reorganise(self, x: torch.Tensor, keep_index: torch.Tensor, rest_index: torch.Tensor,
                    scores: torch.Tensor, num_prefix_tokens: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        kept = gather_tokens(x, keep_index, num_prefix_tokens)
        pruned = gather_tokens(x[:, num_prefix_tokens:], rest_index)
        return squeeze_gather(kept, pruned, num_protected=num_prefix_tokens, return_hosts=True)

    def _reduction_macs(self, n: int, k: int) -> int:
        return 2 * (n - k) * k * self.info.embed_dim  # squeeze: similarity and fusion

    def begin_training(self, recipe) -> None:
        """eTPS's recipe has no keep-rate warm-up: the target rate holds from the first step."""
        self._shrink_target = None
