"""Losses of the learned pruning methods (DynamicViT, dTPS): keep ratio and token distillation.

Wiring (the logit term is :func:`vitrim.losses.kl_logit_distillation`)::

    tokens, state = vitrim.forward_tokens(model, x)            # model.train(): masked form
    logits = model.forward_head_with_state(tokens, state)
    decisions, targets = pruning_decisions(state)
    p = model.num_prefix_tokens
    with torch.no_grad():
        t_tokens = teacher.forward_features(x)                 # unreduced teacher, eval mode
        t_logits = teacher.forward_head(t_tokens)
    loss = (ce(logits, y) + 2.0 * keep_ratio_loss(decisions, targets)
            + 0.5 * kl_logit_distillation(logits, t_logits)
            + 0.5 * token_distillation(tokens[:, p:], t_tokens[:, p:], final_keep_mask(state)))

Rules: ``docs/methods/pruning.md``, "Training losses".
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..ops.prune import prune_records
from ..state import ForwardState

__all__ = ["keep_ratio_loss", "token_distillation", "pruning_decisions", "final_keep_mask"]


def pruning_decisions(state: ForwardState) -> tuple[list[torch.Tensor], list[float]]:
    """Per-stage cumulative keep decisions ``[B, N]`` and their target ratios from a masked-form
    forward (``model.train()``), in stage order. Empty in the gather form (nothing to train)."""
    recs = [r for r in prune_records(state) if r.keep is not None]
    return [r.keep for r in recs], [r.target for r in recs]


def final_keep_mask(state: ForwardState) -> Optional[torch.Tensor]:
    """``[B, N]`` final cumulative keep decision over the patch positions (masked form), or
    ``None`` when the forward ran no masked stage."""
    if state.policy is None:
        return None
    return state.policy[:, state.num_prefix_tokens:, 0]


def keep_ratio_loss(decisions: Sequence[torch.Tensor], targets: Sequence[float]) -> torch.Tensor:
    """DynamicViT's keep-ratio loss: ``(1/S) sum_s mean_b (mean_i keep_s[b, i] - rho_s)^2``.

    Args:
        decisions: per stage, ``[B, N]`` cumulative 0/1 keep masks over all patch positions (they
            carry the straight-through gradient to the predictors).
        targets: per stage, the kept fraction to reach (``rho^s``; see :func:`pruning_decisions`).

    Returns:
        Scalar, before the weight (``lambda_ratio = 2``; 5 for DeiT-B).
    """
    if len(decisions) != len(targets):
        raise ValueError(f"{len(decisions)} decisions but {len(targets)} targets")
    if not decisions:
        raise ValueError("keep_ratio_loss needs at least one stage; run the model in train mode (masked form)")
    losses = [(d.float().mean(dim=1) - t).pow(2).mean() for d, t in zip(decisions, targets)]
    return torch.stack(losses).mean()


def token_distillation(student: torch.Tensor, teacher: torch.Tensor, keep: Optional[torch.Tensor],
                       mode: str = "mse") -> torch.Tensor:
    """Distillation of the final patch tokens at the positions the student kept.

    Args:
        student, teacher: ``[B, N, C]`` final (post-norm) patch tokens, aligned position by
            position (the masked training form keeps every position); the teacher is detached.
        keep: ``[B, N]`` the student's final cumulative keep mask (:func:`final_keep_mask`);
            ``None`` = every position.
        mode: ``"mse"`` (DynamicViT on DeiT: mean over the kept tokens and channels) or ``"kl"``
            (TPS and DynamicViT on LV-ViT: ``KL(teacher || student)`` of the channel
            log-softmax, summed over channels, divided by the number of kept tokens).

    Returns:
        Scalar; 0 when nothing is kept or when the student equals the teacher.
    """
    if mode not in ("mse", "kl"):
        raise ValueError(f"mode must be 'mse' or 'kl', got {mode!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student tokens {tuple(student.shape)} and teacher tokens {tuple(teacher.shape)} differ; "
                         f"pass patch tokens of the masked (training) form, which keeps every position")
    teacher = teacher.detach()
    selected = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device) if keep is None else keep > 0
    if mode == "mse":
        per_token = (student - teacher).pow(2).mean(dim=-1)
    else:
        per_token = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1),
                             reduction="none", log_target=True).sum(dim=-1)
    # the mask selects (no gradient through it, as in the papers' boolean indexing); where()
    # rather than a product, so a dead position's value never reaches the loss
    total = torch.where(selected, per_token, torch.zeros_like(per_token)).sum()
    return total / selected.sum().clamp_min(1).to(total.dtype)
