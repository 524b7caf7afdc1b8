"""IdleViT's training losses (``docs/methods/idlevit.md``, "Losses"): the token cut loss and the total loss.

The model side: an IdleViT model in training mode records, for every idle layer, the computed-row
mask and the head mean of the scaled, unmasked attention logits
(:class:`~vitrim.ops.idle.IdleRecord` in ``state.records``, from ``vitrim.forward_with_state``).
These functions never modify their inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .distill import kl_logit_distillation

__all__ = ["token_cut_loss", "idle_cut_loss", "idle_feature_loss", "idle_total_loss", "idle_records",
           "CUT_LOSS_TYPES", "CUT_LOSS_LAYERS"]

CUT_LOSS_TYPES = ("both", "inter", "intra", "none")
CUT_LOSS_LAYERS = ("all", "alternate")


def token_cut_loss(logits: torch.Tensor, mask: torch.Tensor, kind: str = "both") -> torch.Tensor:
    """Token cut loss of one idle layer ("Losses").

    ``W = softmax(logits)`` over keys; with ``m`` the mask (class token = 1):
    ``c_i = sum_{j>=1} |m_i - m_j| W_ij`` (mass sent to the other group, the class key column
    excluded), ``a_i = sum_j m_i m_j W_ij`` (mass a computed row keeps inside the computed set);
    ``inter = mean(c^2)``, ``intra = mean((a - m)^2)`` over the ``B * T`` rows.

    Args:
        logits: ``[B, T, T]`` head mean of the scaled, unmasked attention logits (``[B, H, T, T]``
            per-head logits are averaged over heads first: one softmax of the head mean).
        mask: ``[B, T]`` bool or 0/1, 1 for computed rows (prefix included).
        kind: ``"both"`` (inter + intra, the official default), ``"inter"``, ``"intra"`` or ``"none"``.

    Returns:
        Scalar.
    """
    if kind not in CUT_LOSS_TYPES:
        raise ValueError(f"kind must be one of {', '.join(CUT_LOSS_TYPES)}, got {kind!r}")
    if logits.ndim == 4:
        logits = logits.mean(dim=1)
    if kind == "none":
        return logits.new_zeros(())
    w = logits.softmax(dim=-1)                                             # [B, T, T]
    m = mask.to(w.dtype)                                                   # [B, T]
    # per-row mass on computed / idle keys; the class column is excluded from the cut term
    to_sel = (w * m[:, None, :]).sum(-1)                                   # [B, T]
    to_sel_no_cls = to_sel - w[..., 0] * m[:, :1]
    to_idle_no_cls = w[..., 1:].sum(-1) - to_sel_no_cls
    c = m * to_idle_no_cls + (1 - m) * to_sel_no_cls                       # sum_{j>=1} |m_i - m_j| W_ij
    a = m * to_sel
    loss = logits.new_zeros(())
    if kind in ("both", "inter"):
        loss = loss + (c * c).mean()
    if kind in ("both", "intra"):
        loss = loss + ((a - m) ** 2).mean()
    return loss


def idle_records(state_or_records) -> list:
    """The idle-layer records carrying cut-loss inputs (``mask`` and ``logits``), in layer order."""
    records = getattr(state_or_records, "records", state_or_records)
    return [r for r in records if getattr(r, "logits", None) is not None and getattr(r, "mask", None) is not None]


def idle_cut_loss(state_or_records, layers: str = "all", kind: str = "both",
                  num_idle_layers: Optional[int] = None) -> torch.Tensor:
    """Mean token cut loss over the idle layers ("Losses").

    Args:
        state_or_records: a ``ForwardState`` (from ``vitrim.forward_with_state`` in training
            mode) or its ``records``.
        layers: ``"all"`` (vitrim's default: every idle layer, divided by their count) or
            ``"alternate"`` (faithful to the official loop: list positions 0, 2, 4, ... only,
            still divided by the number of idle layers).
        kind: see :func:`token_cut_loss`.
        num_idle_layers: divisor override (default: the number of recorded idle layers).

    Returns:
        Scalar (0 when no layer idled, e.g. ``keep_rate=1``).
    """
    if layers not in CUT_LOSS_LAYERS:
        raise ValueError(f"layers must be one of {', '.join(CUT_LOSS_LAYERS)}, got {layers!r}")
    recs = idle_records(state_or_records)
    if not recs:
        return torch.zeros(())
    n = len(recs) if num_idle_layers is None else num_idle_layers
    used = recs if layers == "all" else recs[0::2]
    return sum(token_cut_loss(r.logits, r.mask, kind) for r in used) / n


def idle_feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, normalize: str = "channels") -> torch.Tensor:
    """Feature distillation: MSE between L2-normalised student and teacher features.

    Args:
        student_features, teacher_features: ``[B, C]`` (DeiT: the class token after the final norm)
            or ``[B, T, C]`` (LV-ViT: the whole final token map); the teacher is detached. Averaged
            over all elements.
        mask: ``[B, T, 1]`` applied to both before normalising (LV-ViT: the last idle layer's
            selection, class token 1); ``None``: no mask.
        normalize: ``"channels"`` (each token over its channels) or ``"tokens"`` (each channel over
            the token axis, as the official LV-ViT code does; ``[B, T, C]`` only).
    """
    if normalize not in ("channels", "tokens"):
        raise ValueError(f"normalize must be 'channels' or 'tokens', got {normalize!r}")
    if normalize == "tokens" and student_features.dim() != 3:
        raise ValueError("normalize='tokens' needs [B, T, C] features")
    teacher_features = teacher_features.detach()
    if mask is not None:
        student_features, teacher_features = student_features * mask, teacher_features * mask
    dim = -1 if normalize == "channels" else 1
    s = F.normalize(student_features, dim=dim)
    t = F.normalize(teacher_features, dim=dim)
    return F.mse_loss(s, t)


def _classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if targets.dtype.is_floating_point and targets.shape == logits.shape:  # Mixup / CutMix soft targets
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def idle_total_loss(
        student_logits: torch.Tensor,
        targets: torch.Tensor,
        state_or_records,
        teacher_logits: Optional[torch.Tensor] = None,
        student_features: Optional[torch.Tensor] = None,
        teacher_features: Optional[torch.Tensor] = None,
        cut_weight: float = 20.0,
        kd_weight: float = 10.0,
        feature_weight: Optional[float] = None,
        cut_loss_layers: str = "all",
        cut_loss_type: str = "both",
        label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """IdleViT's training loss ("Losses"): ``CE + 20 * cut + 10 * KL + 1000 * MSE`` with the README weights.

    Args:
        student_logits: ``[B, classes]``; targets: class indices ``[B]`` or soft targets
            ``[B, classes]`` (Mixup / CutMix with label smoothing folded in: soft-target CE).
        state_or_records: the student's ``ForwardState`` (training mode) for the cut loss.
        teacher_logits: the frozen unreduced teacher's logits (KL term skipped when ``None``).
        student_features, teacher_features: final-norm class-token features ``[B, C]`` (feature
            term skipped when ``None``).
        cut_weight: ``lambda_cut`` (20); kd_weight: ``lambda_kd`` (10 in the README command).
        feature_weight: weight of the feature MSE (default ``100 * kd_weight``).
        cut_loss_layers, cut_loss_type: see :func:`idle_cut_loss`.
        label_smoothing: for integer targets only.

    Returns:
        ``{"loss": total, "ce": ..., "cut": ..., "kl": ..., "feature": ...}`` (terms unweighted,
        the total weighted; absent terms are 0).
    """
    fw = 100.0 * kd_weight if feature_weight is None else feature_weight
    zero = student_logits.new_zeros(())
    ce = _classification_loss(student_logits, targets, label_smoothing)
    cut = idle_cut_loss(state_or_records, cut_loss_layers, cut_loss_type).to(student_logits.device)
    kl = zero if teacher_logits is None else kl_logit_distillation(student_logits, teacher_logits)
    feat = zero if student_features is None or teacher_features is None \
        else idle_feature_loss(student_features, teacher_features)
    total = ce + cut_weight * cut + kd_weight * kl + fw * feat
    return {"loss": total, "ce": ce, "cut": cut, "kl": kl, "feature": feat}
