"""IdleViT: dynamic token idling (Xu et al., AJCAI 2023). Rules: ``docs/methods/idlevit.md``.

In each idle layer the prefix tokens plus the top-``K`` patch tokens, ranked by this layer's
head-averaged pre-softmax class logits, go through attention and MLP; the other tokens pass
through unchanged and are ranked again by the next idle layer. No token is dropped, so every
token reaches the final norm. No parameters: works on any pretrained timm ViT (fine-tuning with
the token cut loss, ``vitrim.losses.idle``, recovers the accuracy).

Keep counts compound by stage against the input patch count ``N0``: the idle layers, in order,
form three consecutive groups of ``ceil(n / 3)`` layers (the last may be shorter) computing
``floor(N0 * r)``, ``floor(N0 * r^2)`` and ``floor(N0 * r^3)`` patch tokens. Default idle layers:
blocks ``depth // 4 .. depth - 1``, i.e. 3..11 on 12-block DeiT (the official ``infer.py``),
4..15 / 5..19 on 16 / 20-block models (the LV-ViT configurations). ``layers=range(4, 12)``
reproduces the published ``main.py`` (ratios r, r, r, r², r², r², r³, r³).

On pyramid models (the adapter reports stages; PVT-v2, experimental, not from the paper): default idle
blocks are every block after the first stage, each computing ``floor(N_stage * r)`` tokens (a
constant rate, as the author's Swin prototype); see ``docs/methods/idlevit.md``. On windowed models
(Swin) each window computes its top ``K = max(1, floor(M * r))`` of its ``M`` slots, ranked by the
window-mean query score (``score="attention"``, no parameters) or by a learned predictor per idle
block (``score="predictor"``: the author's prototype's rule, trained with a straight-through Gumbel
mask and the keep-ratio loss; new ``vitrim.predictors.<block>.*`` parameters).

In training mode (``model.train()``: the blocks' own flag decides) idle layers of ViTs run the
training form (the masked form's loss and gradients; values, attention, projection and MLP of the
selected rows only, queries and keys of all rows for the logits; pyramid blocks: the masked form) and record, per idle layer, the mask and the head-mean attention logits
(:class:`~vitrim.ops.idle.IdleRecord` in ``state.records``) for the token cut loss; in eval mode
they run the gather/scatter form (real savings) and record the computed indices.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import OptionError, UnsupportedModelError, VitrimError
from ..losses.idle import idle_cut_loss, idle_feature_loss
from ..losses.pruning import keep_ratio_loss
from ..ops.idle import (IdleRecord, idle_block_gather, idle_block_train, keep_count, pvt_idle_block_gather,
                        pvt_idle_block_masked)
from ..ops.prune import gumbel_softmax_hard
from ..state import ForwardState
from .base import BlockTokens, HeadParts, ModelInfo, ReductionMethod, TokenMap, is_int, register_method
from .dynamicvit import ScorePredictor

SCORES = ("attention", "predictor")

__all__ = ["IdleViT", "default_idle_layers"]


def default_idle_layers(info: ModelInfo) -> tuple[int, ...]:
    """ViT: blocks ``depth // 4 .. depth - 1`` (3..11 / 4..15 / 5..19 for depth 12 / 16 / 20);
    pyramid models: every block after the first stage."""
    if info.stage_depths:
        return tuple(range(info.stage_depths[0], info.depth))
    return tuple(range(info.depth // 4, info.depth))


@register_method
class IdleViT(ReductionMethod):
    """Token idling.

    Args:
        keep_rate: base keep ratio ``r`` in (0, 1]. ViT: idle layers compute ``floor(N0 * r^s)``
            patch tokens in their ``s``-th group (s = 1, 2, 3); PVT-v2: ``floor(N * r)`` in every
            idle block. ``1`` runs the original blocks (bit-identical).
        layers: 0-based indices of the idle blocks, strictly increasing (any sequence or range);
            ``None``: the default rule (see the module docstring).
        score: windowed models (Swin) only: ``"attention"`` (the window-mean query score, no
            parameters) or ``"predictor"`` (a learned predictor per idle block; needs training).
    """

    name = "idle"
    order = 60
    aliases = ("idlevit",)
    summary = "IdleViT: each idle layer computes only its top-K tokens; the rest pass through unchanged"
    removes_tokens = False  # every token reaches the final norm: pyramid models too
    strength = "keep_rate"
    sweep = (0.9, 0.7, 0.5)
    color = "tab:brown"
    reduced_verb = "idle"
    loss_weights = {"kd": 10.0, "cut": 20.0, "feature": 1000.0}
    teacher_terms = ("feature",)
    #: without a class token the average patch token's query ranks the tokens [vitrim extension]
    scores_without_class_token = True

    def __init__(self, info: ModelInfo, keep_rate: float = 0.7,
                 layers: Optional[Sequence[int]] = None, score: str = "attention") -> None:
        super().__init__(info)
        if score not in SCORES:
            raise OptionError(f"score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")
        if score == "predictor" and not info.windowed:
            raise OptionError(f"score='predictor' is implemented for windowed models (Swin Transformer) only, not "
                              f"for {info.family_label or info.family}; accepted here: score='attention'")
        stage_rates = self._stage_rates(keep_rate, info)  # pyramids: one rate per stage [vitrim extension]
        if stage_rates is not None:
            keep_rate = min(stage_rates)
            if layers is None:  # the blocks of the stages whose rate is < 1
                starts = np.cumsum((0,) + tuple(info.stage_depths))
                layers = [i for s, r in enumerate(stage_rates) if r < 1 for i in range(starts[s], starts[s + 1])]
                layers = layers or None
        elif isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < keep_rate <= 1.0:
            raise OptionError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}; accepted: "
                              f"0 < keep_rate <= 1 (e.g. 0.7; 1 = the unmodified model)")
        self.keep_rate = float(keep_rate)
        self.stage_rates = stage_rates
        self.layers = self._check_layers(layers, info)
        self.score = score
        if score == "predictor":  # one predictor per idle block, on the block input (trunc-normal 0.02)
            self.predictors = nn.ModuleDict({str(i): ScorePredictor(info.stage_dims[info.stage_of(i)])
                                             for i in self.layers})
        if not info.stage_depths:
            empty = [i for i, k in enumerate(self.keep_counts()) if k == 0]
            if empty:
                deepest = max(self._exponent.values())
                smallest = (1.0 / info.num_patches) ** (1.0 / deepest)
                raise OptionError(f"keep_rate={keep_rate!r} leaves no patch token computed in idle layers {empty} "
                                  f"(floor({info.num_patches} * {keep_rate}^s) = 0); accepted: keep_rate >= "
                                  f"{math.ceil(smallest * 1000) / 1000} on this model")

    def options(self) -> dict[str, Any]:
        out = super().options()
        if self.stage_rates is not None:
            out["keep_rate"] = self.stage_rates
        return out

    def update(self, **options: Any) -> None:
        fresh = type(self).create(self.info, **{**self.options(), **options})
        if (fresh.score == "predictor" or self.score == "predictor") and \
                (fresh.score != self.score or fresh.layers != self.layers):
            raise OptionError(f"score={self.score!r} on layers {list(self.layers)}: with learned predictors the score "
                              f"and the idle layers are fixed when applied (one predictor per idle block); accepted: "
                              f"keep_rate changes; for other layers or scores, vitrim.remove(model) and apply again")
        super().update(**options)

    def extensions(self) -> list[str]:
        out = []
        if self.info.windowed:
            out.append("windowed stages (Swin): per-window top-K, ranked by the window-mean query "
                       f"({'a learned predictor' if self.score == 'predictor' else 'no parameters'}; "
                       "docs/methods/idlevit.md)")
        elif self.info.stage_depths:
            out.append("pyramid stages: per-stage keep rates, the average token's query (docs/methods/idlevit.md)")
        elif self.info.num_prefix_tokens == 0 or not self.info.has_class_token:
            out.append("no class token: tokens ranked by the average patch token's query (docs/methods/idlevit.md)")
        return out

    @staticmethod
    def _stage_rates(keep_rate, info: ModelInfo) -> Optional[tuple[float, ...]]:
        """One keep rate per stage of a pyramid model, or ``None`` when ``keep_rate`` is a number."""
        if not isinstance(keep_rate, (list, tuple)):
            return None
        n = len(info.stage_depths)
        ok = n > 0 and len(keep_rate) == n and all(
            not isinstance(r, bool) and isinstance(r, (int, float)) and 0.0 < r <= 1.0 for r in keep_rate)
        if not ok:
            raise OptionError(f"keep_rate must be a number in (0, 1] or, on pyramid models, one such number per "
                              f"stage ({n} stages here), got {keep_rate!r}")
        return tuple(float(r) for r in keep_rate)

    @staticmethod
    def _check_layers(layers, info: ModelInfo) -> tuple[int, ...]:
        default = default_idle_layers(info)
        if layers is None:
            return default
        example = default or (info.depth // 4, info.depth - 1)  # the family's default, as an example
        accepted = (f"accepted: None (default idle layers) or a strictly increasing sequence of block indices "
                    f"in 0..{info.depth - 1}, e.g. range({example[0]}, {example[-1] + 1})")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, range)):
            raise OptionError(f"layers must be a sequence of block indices, got {layers!r}; {accepted}")
        layers = tuple(layers)
        if not layers:
            raise OptionError(f"layers is empty; {accepted}")
        if not all(is_int(i) for i in layers):
            raise OptionError(f"layers must hold ints, got {layers!r}; {accepted}")
        bad = [i for i in layers if not 0 <= i < info.depth]
        if bad:
            raise OptionError(f"layers {bad} out of range for a model with {info.depth} blocks; {accepted}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise OptionError(f"layers must be strictly increasing without duplicates, got {list(layers)}; {accepted}")
        return layers

    @property
    def layers(self) -> tuple[int, ...]:
        return self._layers

    @layers.setter
    def layers(self, value: tuple[int, ...]) -> None:
        self._layers = tuple(value)
        if self.info.stage_depths:  # pyramid: a constant rate of each stage's tokens
            self._exponent = {layer: 1 for layer in self._layers}
        else:  # three consecutive groups of ceil(n / 3): r, r^2, r^3
            group = math.ceil(len(self._layers) / 3)
            self._exponent = {layer: pos // group + 1 for pos, layer in enumerate(self._layers)}

    # ------------------------------------------------------------------ plan
    def keep(self, index: int, num_patches: int) -> Optional[int]:
        """``K`` of block ``index`` when ``num_patches`` patch tokens enter it (ViT: the input's
        ``N0``; pyramid models: the stage's ``H * W``); ``None`` when the block runs in full."""
        s = self._exponent.get(index)
        if s is None:
            return None
        rate = self.keep_rate if self.stage_rates is None else self.stage_rates[self.info.stage_of(index)]
        k = keep_count(num_patches, rate, s)
        if self.info.windowed:  # a window's slots: at least one computed per window
            k = max(1, k)
        return None if k >= num_patches else k

    def keep_at_rates(self) -> bool:
        """With ``score="predictor"``: bias each predictor towards its block's computed fraction
        ``r^s`` (``K = floor(M r^s)`` at inference), so that its training sample keeps about that share;
        a fresh predictor's sample keeps about half. Nothing to set with the attention score."""
        if self.score != "predictor":
            return False
        for index, predictor in self.predictors.items():
            i = int(index)
            rate = self.keep_rate if self.stage_rates is None else self.stage_rates[self.info.stage_of(i)]
            predictor.set_keep_prior(rate ** self._exponent[i])
        return True

    def keep_counts(self, num_patches: Optional[int] = None) -> list[Optional[int]]:
        """Per-block ``K`` (``None`` = full block) for ``num_patches`` input patches (default: the
        model's own). ViT only; for pyramid models use :meth:`keep` with each stage's token count."""
        n = self.info.num_patches if num_patches is None else num_patches
        return [self.keep(i, n) for i in range(self.info.depth)]

    # ------------------------------------------------------------------ forward
    def block_forward(self, block: nn.Module, index: int, x: torch.Tensor,
                      state: ForwardState) -> tuple[torch.Tensor, ForwardState]:
        # a family that selects per unit (Swin: per window of M slots) hands its own idle forms
        forms = getattr(block, "idle_forms", None)
        keep = self.keep(index, getattr(block, "idle_slots", None) or state.num_patches)
        if keep is None:
            return block(x), state  # the model's own forward: bit-identical
        if forms is not None:
            stage_grid = tuple(x.shape[1:3])  # these blocks take the [B, H, W, C] map
            if self.score == "predictor":
                B, H, W, C = x.shape
                logp = self.predictors[str(index)](x.reshape(B, H * W, C))       # [B, H*W, 2]: keep, idle
                if block.training:  # a straight-through Gumbel sample per token: any count per window
                    m = gumbel_softmax_hard(logp)[..., 0].reshape(B, H, W)
                    x, idx, mask = forms[1](x, keep, mask=m)
                else:               # the top-K of each window by the keep log-probability
                    x, idx, mask = forms[0](x, keep, scores=logp[..., 0])
            else:
                x, idx, mask = forms[1](x, keep) if block.training else forms[0](x, keep)
            return x, state.add_record(IdleRecord(index, keep, idx, mask, grid=stage_grid))
        feat_size = getattr(block, "feat_size", None)  # a pyramid block: its H x W map stays complete
        if feat_size is not None:
            if block.training:
                x, idx, mask = pvt_idle_block_masked(block, x, keep, feat_size)
                return x, state.add_record(IdleRecord(index, keep, idx, mask, grid=tuple(feat_size)))
            x, idx = pvt_idle_block_gather(block, x, keep, feat_size)
            return x, state.add_record(IdleRecord(index, keep, idx, grid=tuple(feat_size)))
        p = state.num_prefix_tokens
        mean_query = not self.info.has_class_token or p == 0  # the average patch token's query [vitrim extension]
        if block.training:
            # the masked form's loss and gradients, computing idle rows' queries and keys only
            x, idx, mask, logits = idle_block_train(block, x, keep, p, mean_query)
            return x, state.add_record(IdleRecord(index, keep, idx, mask, logits))
        x, idx = idle_block_gather(block, x, keep, p, mean_query)
        return x, state.add_record(IdleRecord(index, keep, idx))

    # ------------------------------------------------------------------ accounting
    def plan_block(self, index: int, tokens_in: int, num_patches: int) -> BlockTokens:
        """An idle block computes Q, V, attention, projection and MLP on ``S = p + K`` rows; every
        token leaves it. ``extra_macs`` is the selection: with a class token the paper's count (the keys
        of the ``T - S`` idle rows, the class query ``C^2`` and the class logits ``T C``; without qk-norm
        the forward ranks without per-token keys and executes ``(T - S - 1) C^2`` fewer MACs per idle
        layer, which ``vitrim.traced_flops`` shows); without one (pyramids) the mean-token query
        ``C^2``, ``W_k^T q`` ``C^2`` and the ``N C`` logits (:func:`~vitrim.ops.idle.pvt_scores`)."""
        k = self.keep(index, num_patches)
        if k is None:
            return BlockTokens(tokens_in, tokens_in, tokens_in)
        s = k + self.info.num_prefix_tokens
        if self.info.stage_depths:
            c = self.info.stage_dims[self.info.stage_of(index)]
            if self.score == "predictor":  # the block's predictor on every slot (windowed: tokens_in = M)
                extra = tokens_in * self.predictors[str(index)].macs_per_token()
            else:
                extra = 2 * c * c + tokens_in * c
        else:
            c = self.info.embed_dim
            extra = (tokens_in - s) * c * c + c * c + tokens_in * c
        return BlockTokens(q=s, kv=s, mlp=s, extra_macs=extra, out=tokens_in)

    # ------------------------------------------------------------------ training
    def loss_terms(self, state: ForwardState, tokens: torch.Tensor, teacher_tokens: Optional[torch.Tensor],
                   weights: Mapping[str, float], recipe: Any, *, heads: Optional[HeadParts] = None,
                   teacher_heads: Optional[HeadParts] = None) -> dict[str, torch.Tensor]:
        """Token cut loss over the idle layers; L2-normalised feature MSE against the teacher: of the
        class token (``recipe.feature_target == "class_token"``, DeiT), or of the whole final token map
        masked by the last idle layer's computed rows (``"tokens"``, LV-ViT), normalised over
        ``recipe.feature_norm`` (``"channels"``, or ``"tokens"``: the official LV-ViT token axis); with
        ``score="predictor"`` the keep-ratio loss ``mean_l mean_b (mean_i m_bi - r_l)^2`` over the idle blocks'
        straight-through masks."""
        out: dict[str, torch.Tensor] = {}
        if self.score == "predictor" and weights.get("ratio", 0.0) > 0:
            recs = [r for r in state.records if isinstance(r, IdleRecord) and r.mask is not None
                    and r.mask.is_floating_point()]
            if recs:
                out["ratio"] = weights["ratio"] * keep_ratio_loss([r.mask.flatten(1) for r in recs],
                                                                  [self.rate_of(r.layer) for r in recs])
        if not self.info.has_class_token:  # no cut or feature loss without a class token (pyramids)
            return out
        if weights.get("cut", 0.0) > 0:
            layers = getattr(recipe, "cut_loss_layers", "all")
            out["cut"] = weights["cut"] * idle_cut_loss(state, layers=layers).to(tokens.device)
        if teacher_tokens is not None and weights.get("feature", 0.0) > 0:
            target = getattr(recipe, "feature_target", "class_token")
            norm = getattr(recipe, "feature_norm", "channels")
            if target == "tokens":
                loss = idle_feature_loss(tokens, teacher_tokens, self._last_mask(state, tokens), normalize=norm)
            else:
                loss = idle_feature_loss(tokens[:, 0], teacher_tokens[:, 0], normalize=norm)
            out["feature"] = weights["feature"] * loss
        return out

    @staticmethod
    def _last_mask(state: ForwardState, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """``[B, T, 1]`` computed rows of the last idle layer (prefix 1) as ``tokens``' dtype, or ``None``
        when no layer idled (every row computed)."""
        masks = [r.mask for r in state.records if isinstance(r, IdleRecord) and r.mask is not None]
        if not masks:
            return None
        if masks[-1].shape != tokens.shape[:2]:
            raise VitrimError(f"idle: feature_target='tokens' masks the final tokens {tuple(tokens.shape[:2])} with "
                              f"the last idle layer's rows {tuple(masks[-1].shape)}, which differ (a pyramid "
                              f"model's stage); accepted: feature_target='class_token' on this model")
        return masks[-1].to(tokens.dtype).unsqueeze(-1)

    def rate_of(self, index: int) -> float:
        """The keep rate of block ``index`` (its stage's with per-stage rates)."""
        return self.keep_rate if self.stage_rates is None else self.stage_rates[self.info.stage_of(index)]

    def begin_training(self, recipe: Any) -> None:
        if not self.info.has_class_token:
            given = [f"{t}_weight={getattr(recipe, t + '_weight')}" for t in ("cut", "feature")
                     if getattr(recipe, t + "_weight", None)]
            if given:
                raise OptionError(f"recipe sets {', '.join(given)}, but idle has no token cut loss or class-feature "
                                  f"loss on {self.info.family_label or self.info.family} (no class token); accepted: "
                                  f"cut_weight=0 and feature_weight=0 (e.g. --recipe swin-idle on Swin)")
        if self.score == "predictor" and not (getattr(recipe, "ratio_weight", None) or
                                              (getattr(recipe, "loss_weights", None) or {}).get("ratio")):
            raise OptionError("score='predictor' trains its predictors with the keep-ratio loss, but the recipe's "
                              "ratio weight is 0 or unset; accepted: ratio_weight > 0 (e.g. --recipe swin-idle)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a backbone checkpoint (timm, or a model saved before apply) has no predictor key: keep the current ones
        if not any(key.startswith(prefix) for key in state_dict):
            for name, value in self.state_dict(keep_vars=True).items():
                state_dict[prefix + name] = value.detach()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ pictures
    def token_maps(self, run: Callable[[], ForwardState], grid: tuple[int, int],
                   layers: Optional[Sequence[int]] = None) -> list[TokenMap]:
        """The idle tokens of each idle layer in ``layers`` (default: up to four, evenly spaced)."""
        recs = [r for r in run().records if isinstance(r, IdleRecord)]
        if layers is None and len(recs) > 4:
            recs = [recs[round(i * (len(recs) - 1) / 3)] for i in range(4)]
        p = self.info.num_prefix_tokens
        maps = []
        for rec in recs:
            if layers is not None and rec.layer not in layers:
                continue
            idx = rec.index[0].cpu().numpy()
            own = tuple(rec.grid) if rec.grid is not None else tuple(grid)  # a pyramid stage counts on its own map
            status = np.ones(own[0] * own[1], dtype=np.int64)
            status[idx[idx >= p] - p] = 0
            computed, idle = int((status == 0).sum()), int(status.sum())
            label = f"block {rec.layer}: {computed} computed, {idle} idle"
            status = status.reshape(own)
            if own != tuple(grid):  # drawn on the input's patch grid: each stage token covers a square of patches
                if grid[0] % own[0] or grid[1] % own[1]:
                    raise UnsupportedModelError(f"cannot draw block {rec.layer}: its {own[0]}x{own[1]} token map "
                                                f"does not tile the {grid[0]}x{grid[1]} patch grid (padded input); "
                                                f"use an image size that is a multiple of the model's total stride")
                status = np.kron(status, np.ones((grid[0] // own[0], grid[1] // own[1]), dtype=np.int64))
                label = f"block {rec.layer} ({own[0]}x{own[1]}): {computed} in, {idle} idle"
            maps.append(TokenMap(label, state=status, block=rec.layer))
        return maps

    def picture_legend(self) -> str:
        return "tinted: idle tokens (not computed in this block, passed on unchanged)"
