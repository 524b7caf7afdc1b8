"""Logit distillation from a frozen unreduced teacher (``docs/training.md``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kl_logit_distillation"]


def kl_logit_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))``, summed over classes, mean over the batch.

    Args:
        student_logits, teacher_logits: ``[B, num_classes]``; the teacher is detached.
        temperature: softening temperature (the papers use 1); the loss is scaled by ``T^2``.

    Returns:
        Scalar; 0 when the student equals the teacher.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
