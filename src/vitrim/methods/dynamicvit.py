"""DynamicViT: learned token sparsification (Rao et al., NeurIPS 2021). Rules: ``docs/methods/pruning.md``.

Before each block at a location (stage ``s``), a light MLP predictor scores the remaining patch
tokens. Inference keeps the top ``K_s = int(N0 * rho^s)`` by a real gather (score order) and runs
the following blocks unmodified. Training keeps the shape fixed: a straight-through Gumbel-softmax
samples cumulative keep decisions, which go into ``state.policy`` and mask the dropped keys of
every later block's attention ("softmax with policy"); each stage's decisions are recorded for
the keep-ratio loss (``vitrim.losses.keep_ratio_loss``).

The predictors are the method's only parameters: ``vitrim.predictors.<stage>.*`` in the model's
state dict (``norm``, ``proj``, ``head.0``, ``head.2``, ``head.4``). A timm checkpoint without
them loads into a reduced model with the predictors left as they are (see :meth:`_load_from_state_dict`).
"""
from __future__ import annotations

import math

from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError, VitrimError
from ..losses.pruning import final_keep_mask, keep_ratio_loss, pruning_decisions, token_distillation
from ..ops.prune import (gather_tokens, gumbel_softmax_hard, keep_count_original, masked_mean, rank_tokens,
                         squeeze_gather, squeeze_masked)
from ..state import ForwardState
from ._pruning import PruningMethod, masked_block_forward
from .base import BlockTokens, HeadParts, ModelInfo, register_method

__all__ = ["ScorePredictor", "DynamicViT"]


class ScorePredictor(nn.Module):
    """DynamicViT's keep/drop predictor for one stage (docs/methods/pruning.md, "DynamicViT").

    ``h = GELU(proj(norm(x)))``; the first half of ``h`` stays local, the second half is replaced by
    its mean over the alive tokens; an MLP ``C -> C/2 -> C/4 -> 2`` with GELUs and a log-softmax
    gives ``[keep, drop]`` log-probabilities (channel 0 = keep).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                  nn.Linear(dim // 4, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear weights truncated normal (std 0.02), biases 0; LayerNorm weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_keep_prior(self, rate: float) -> None:
        """Bias the last layer to ``[log r, log(1 - r)]`` (keep, drop): with the weights as initialised
        (std 0.02) the decisions then keep about ``r`` of the tokens. The weights are left as they are."""
        r = min(max(float(rate), 1e-3), 1 - 1e-3)
        bias = self.head[-1].bias
        with torch.no_grad():
            bias.copy_(torch.tensor([math.log(r), math.log(1 - r)], dtype=bias.dtype))

    def macs_per_token(self) -> int:
        """``C^2 + C^2/2 + C^2/8 + C/2`` for width ``C`` (the predictor's cost per token)."""
        return sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, num_prefix_tokens: int = 0) -> torch.Tensor:
        """Keep/drop log-probabilities of the patch tokens.

        Args:
            x: ``[B, P + N, C]`` tokens; the first ``num_prefix_tokens`` rows (class, ...) are
                neither scored nor part of the global mean. Passing the whole sequence instead
                of a slice spares the LayerNorm a copy; the rows do not interact otherwise.
            mask: ``[B, N, 1]`` alive patch tokens for the global mean (``None``: all).

        Returns:
            ``[B, N, 2]`` log-probabilities ``[keep, drop]``.
        """
        # in the predictor's own dtype: a model cast to bf16/fp16 before apply keeps fp32 predictors
        h = F.gelu(self.proj(self.norm(x.to(self.proj.weight.dtype))))          # [B, T, C]
        half = h.shape[-1] // 2
        glob = masked_mean(h[:, num_prefix_tokens:, half:], mask)               # [B, 1, C - C/2]
        # head.0 on concat(local, glob): the glob half is one row per sample, so it is applied once
        # and broadcast instead of concatenating a [B, N, C] tensor (same weights, same maths).
        # Every row (prefix included) runs until the last layer, so each matmul sees a view that
        # folds to 2-D without a copy; the prefix rows are dropped at the end.
        first = self.head[0]
        z = F.linear(h[..., :half], first.weight[:, :half].contiguous())        # contiguous: a fast GEMM
        z = z.add_(F.linear(glob, first.weight[:, half:], first.bias))          # in place: mm keeps no output for backward
        for i, layer in enumerate(self.head):
            if i:
                z = layer(z)
        return z[:, num_prefix_tokens:].log_softmax(dim=-1)


@register_method
class DynamicViT(PruningMethod):
    """DynamicViT token sparsification.

    Args:
        keep_rate: base ratio ``rho``: stage ``s`` keeps ``int(N0 * rho^s)`` patch tokens of the
            ``N0`` at the input; a list gives the per-stage ratios of ``N0`` directly
            (non-increasing).
        locations: 0-based blocks **before** which a predictor prunes (default: depth/4, depth/2,
            3 depth/4, i.e. (3, 6, 9) on 12 blocks, (4, 8, 12) on 16). One predictor per
            location; changing the number of locations needs a new ``apply``.

    Training (``model.train()``, read from the blocks' mode) uses the masked fixed-shape form
    with Gumbel decisions; evaluation uses real gathers.
    """

    name = "dynamicvit"
    order = 50
    summary = "DynamicViT: learned predictors drop tokens before blocks at 1/4, 1/2 and 3/4 of the depth (needs fine-tuning)"
    cumulative_rates = True
    #: the predictor needs no class token (its global feature is the mean of the live patch tokens)
    scores_without_class_token = True
    pools_with_weights = True  # the masked training form pools over live tokens
    supported_pools = ("token", "avg", "map", "")  # masked training pools over alive tokens; max would see dead ones
    color = "tab:purple"
    reduced_verb = "dropped"
    loss_weights = {"kd": 0.5, "ratio": 2.0, "token": 0.5}
    teacher_terms = ("token",)
    #: token distillation of the final patch tokens at kept positions: "mse" (DynamicViT on DeiT) or "kl"
    token_distillation_mode: ClassVar[str] = "mse"

    def __init__(self, info: ModelInfo, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Optional[Sequence[int]] = None) -> None:
        super().__init__(info)
        self._configure(keep_rate=keep_rate, locations=locations)
        self.predictors = nn.ModuleList(ScorePredictor(info.embed_dim) for _ in self.locations)

    def _configure(self, keep_rate: Any, locations: Any) -> None:
        values = self._configure_common(keep_rate, locations)
        predictors = getattr(self, "predictors", None)
        if predictors is not None and len(values["locations"]) != len(predictors):
            raise OptionError(
                f"{self.name} has {len(predictors)} trained predictors (one per location); locations="
                f"{values['locations']!r} needs {len(values['locations'])}. Accepted: the same number of "
                f"locations; for another number, vitrim.remove(model) and vitrim.apply(...) again")
        self._set(values)

    # ------------------------------------------------------------------ decisions
    def _keep(self, stage: int, num_patches: int) -> int:
        """``K_s`` patch tokens kept after ``stage`` for an input of ``num_patches`` (N0)."""
        return keep_count_original(num_patches, self.stage_rates[stage])

    def masked_decision(self, logp: torch.Tensor, prev: torch.Tensor, k: int) -> torch.Tensor:
        """Training decision: straight-through Gumbel sample of keep, cumulative with ``prev``.

        ``logp: [B, N, 2]``, ``prev: [B, N, 1]`` -> ``[B, N, 1]`` 0/1. ``k`` (the inference count)
        is unused here; an instance may override this to fix decisions (e.g. the top ``k``).
        """
        return gumbel_softmax_hard(logp)[..., :1] * prev

    def keep_at_rates(self) -> bool:
        """Bias each predictor's last layer to ``[log r, log(1 - r)]`` (keep, drop), ``r`` = its stage's rate
        of the tokens still alive (stage rate / previous stage rate): the straight-through samples then keep
        about ``keep_rate`` of them, as after the ratio loss has pulled the predictors there. A freshly
        initialised predictor keeps about half at every stage. The weights are left as they are."""
        previous = 1.0
        for predictor, rate in zip(self.predictors, self.stage_rates):
            predictor.set_keep_prior(rate / previous)
            previous = rate
        return len(self.predictors) > 0

    # ------------------------------------------------------------------ forward
    def block_forward(self, block: nn.Module, index: int, x: torch.Tensor,
                      state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        stage = self._stage_of.get(index)
        if stage is not None:
            if block.training:  # the model's mode (the method module itself may have been attached in another)
                x, state = self._prune_masked(stage, index, x, state)
            else:
                x, state = self._prune_gather(stage, index, x, state)
            block = self.rebind(block, state)  # tokens moved before this block: its per-token inputs follow
        if state.policy is None:
            return block(x), state
        return masked_block_forward(block, x, state.policy), state

    def _prune_gather(self, stage: int, index: int, x: torch.Tensor,
                      state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        prefix = state.num_prefix_tokens
        n = x.shape[1] - prefix
        k = self._keep(stage, state.num_patches)
        if k >= n:
            return x, state  # rate 1: nothing pruned, the predictor is not run
        scores = self.predictors[stage](x, num_prefix_tokens=prefix)[..., 0]    # keep log-probability, [B, n]
        keep_index, rest_index = rank_tokens(scores, k)
        kept = gather_tokens(x, keep_index, prefix)                             # [prefix; kept]
        if self.squeeze:
            kept, hosts = squeeze_gather(kept, gather_tokens(x[:, prefix:], rest_index), num_protected=prefix,
                                         return_hosts=True)
            return kept, self._record(state, index, stage, k, index=keep_index, scores=scores,
                                      rest=rest_index, hosts=hosts)
        return kept, self._record(state, index, stage, k, index=keep_index, scores=scores)

    def _prune_masked(self, stage: int, index: int, x: torch.Tensor,
                      state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        prefix = state.num_prefix_tokens
        B, n = x.shape[0], x.shape[1] - prefix
        prev = x.new_ones(B, n, 1) if state.policy is None else state.policy[:, prefix:]
        logp = self.predictors[stage](x, prev, num_prefix_tokens=prefix)
        k = self._keep(stage, state.num_patches)
        keep = self.masked_decision(logp, prev, k)
        if self.squeeze:
            # the prefix rows take part as rows that are neither hosts nor squeezed (both masks 0), so
            # they come back bit-identical with no slice or concatenation of x (whose backward would
            # zero-fill two [B, T, C] gradients)
            none = keep.new_zeros(B, prefix, 1)
            x = squeeze_masked(x, torch.cat([none, keep], dim=1), torch.cat([none, (1 - keep) * prev], dim=1))
        policy = torch.cat([keep.new_ones(B, prefix, 1), keep], dim=1)
        state = state.replace(policy=policy)
        return x, self._record(state, index, stage, k, keep=keep[..., 0], scores=logp[..., 0])

    # ------------------------------------------------------------------ accounting
    def _squeeze_macs(self, n: int, k: int) -> int:
        """``2 N_p N_r C``: similarity and fusion of one squeeze; 0 without squeezing."""
        return 2 * (n - k) * k * self.info.embed_dim if self.squeeze else 0

    def plan_block(self, index: int, tokens_in: int, num_patches: int) -> BlockTokens:
        """A location prunes to ``K_s`` patch tokens before its block (when that removes any)."""
        prefix = self.info.num_prefix_tokens
        stage = self._stage_of.get(index)
        if stage is not None:
            n, k = tokens_in - prefix, self._keep(stage, num_patches)
            if k < n:
                return BlockTokens(prefix + k, prefix + k, prefix + k, self._squeeze_macs(n, k))
        return BlockTokens(tokens_in, tokens_in, tokens_in)

    def extra_macs(self, num_tokens: int) -> int:
        """The predictors, on the patch tokens entering each stage that prunes."""
        prefix, total, t = self.info.num_prefix_tokens, 0, num_tokens
        for i, plan in enumerate(self.block_tokens(num_tokens)):
            stage = self._stage_of.get(i)
            if stage is not None and plan.q < t:
                total += (t - prefix) * self.predictors[stage].macs_per_token()
            t = plan.tokens_out
        return total

    # ------------------------------------------------------------------ training
    def loss_terms(self, state: ForwardState, tokens: torch.Tensor, teacher_tokens: Optional[torch.Tensor],
                   weights: Mapping[str, float], recipe: Any, *, heads: Optional[HeadParts] = None,
                   teacher_heads: Optional[HeadParts] = None) -> dict[str, torch.Tensor]:
        """Keep-ratio loss on the cumulative decisions; token distillation at the kept positions: of the
        final patch tokens (``token_distillation_mode``), or with ``recipe.token_target ==
        "token_logits"`` of the per-token head's class logits (KL over classes: DynamicViT on LV-ViT)."""
        out: dict[str, torch.Tensor] = {}
        decisions, targets = pruning_decisions(state)
        if weights.get("ratio", 0.0) > 0 and decisions:
            out["ratio"] = weights["ratio"] * keep_ratio_loss(decisions, targets)
        if teacher_tokens is None or weights.get("token", 0.0) <= 0:
            return out
        if getattr(recipe, "token_target", "tokens") == "token_logits":
            if heads is None or teacher_heads is None or heads.token_logits is None \
                    or teacher_heads.token_logits is None:
                raise VitrimError(f"{self.name}: recipe field token_target='token_logits' needs the per-token head "
                                  f"logits of the student and the teacher (HeadParts.token_logits from the model's "
                                  f"adapter); accepted: a model with a per-token head (LV-ViT), or "
                                  f"token_target='tokens'")
            student, teacher, mode = heads.token_logits, teacher_heads.token_logits, "kl"
        else:
            k = state.num_prefix_tokens
            student, teacher, mode = tokens[:, k:], teacher_tokens[:, k:], self.token_distillation_mode
        if student.shape == teacher.shape:  # the masked training form keeps every position
            out["token"] = weights["token"] * token_distillation(student, teacher, final_keep_mask(state), mode)
        return out

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A backbone checkpoint (timm, or a model saved before apply) has no key of this method:
        # keep the current predictors instead of failing on their missing keys. A checkpoint with
        # some predictor keys loads strictly, so a saved reduced model loads back exactly.
        if not any(key.startswith(prefix) for key in state_dict):
            for name, value in self.state_dict(keep_vars=True).items():
                state_dict[prefix + name] = value.detach()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
