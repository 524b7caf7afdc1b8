"""The training objective: cross-entropy, logit distillation, and the method's own terms.

``Objective(method, recipe, teacher, mixup_active)(student_out, targets, teacher_out)`` returns the
total loss and each weighted term separately (for logging). The method says which terms it adds
and their weights (``ReductionMethod.loss_weights`` and ``loss_terms``); a recipe field
``<term>_weight`` (e.g. ``kd_weight``) or an entry of ``recipe.loss_weights`` overrides a weight. The
teacher is a frozen unreduced copy of the starting model; it is run once per step and its logits
/ tokens feed every distillation term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..losses import kl_logit_distillation
from ..methods.base import ReductionMethod, get_method_class
from ..state import ForwardState

__all__ = ["StudentOutput", "TeacherOutput", "Objective", "loss_weights"]

MethodArg = Union[None, str, type[ReductionMethod], ReductionMethod]


@dataclass
class StudentOutput:
    logits: torch.Tensor
    tokens: torch.Tensor                 # final post-norm tokens [B, T, C]
    state: Optional[ForwardState]


@dataclass
class TeacherOutput:
    logits: torch.Tensor
    tokens: torch.Tensor                 # final post-norm tokens [B, T0, C]


def _method_class(method: MethodArg) -> Optional[type[ReductionMethod]]:
    if method is None or method in ("none", ""):
        return None
    if isinstance(method, ReductionMethod):
        return type(method)
    if isinstance(method, type):
        return method
    return get_method_class(method)


def loss_weights(method: MethodArg, recipe) -> dict[str, float]:
    """Every term's weight: the recipe's override (``<term>_weight`` field, then ``recipe.loss_weights``),
    else the method's own (``ReductionMethod.loss_weights``), else 0 (cross-entropy ``ce``: 1). ``kd`` and
    ``ce`` are always present."""
    cls = _method_class(method)
    spec = dict(cls.loss_weights) if cls is not None else {}
    given = dict(getattr(recipe, "loss_weights", None) or {})
    names = {"kd", "ce", *spec, *given, *(f[:-len("_weight")] for f in vars(recipe) if f.endswith("_weight"))}
    out = {}
    for name in sorted(names):
        field_value = getattr(recipe, f"{name}_weight", None)
        value = field_value if field_value is not None else given.get(name, spec.get(name, 1.0 if name == "ce" else 0.0))
        out[name] = float(value)
    return out


class Objective:
    """The loss of one training step (see the module docstring).

    Args:
        method: the installed method (its terms run on the student's state), its class or its
            name (weights only), or ``None`` / ``"none"`` for an unreduced model.
        recipe: the training recipe (weights, label smoothing, method settings).
        teacher: the frozen unreduced teacher (``None``: no distillation).
        mixup_active: Mixup / CutMix soft targets (soft-target cross-entropy).
    """

    def __init__(self, method: MethodArg, recipe, teacher: Optional[nn.Module], mixup_active: bool):
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.method = method if isinstance(method, ReductionMethod) else None
        cls = _method_class(method)
        self.recipe = recipe
        self.weights = loss_weights(method, recipe)
        self.teacher_terms = ("kd", *(cls.teacher_terms if cls is not None else ()))
        self.teacher = teacher if recipe.distill else None
        if mixup_active:
            self.criterion = SoftTargetCrossEntropy()  # label smoothing is folded into the Mixup targets
        elif recipe.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=recipe.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    @property
    def needs_teacher(self) -> bool:
        return self.teacher is not None and any(self.weights.get(t, 0.0) > 0 for t in self.teacher_terms)

    @torch.no_grad()
    def run_teacher(self, images: torch.Tensor) -> Optional[TeacherOutput]:
        if not self.needs_teacher:
            return None
        tokens = self.teacher.forward_features(images)
        return TeacherOutput(self.teacher.forward_head(tokens), tokens)

    def __call__(self, student: StudentOutput, targets: torch.Tensor,
                 teacher: Optional[TeacherOutput]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = student.logits
        if isinstance(logits, tuple):  # distilled DeiT in distilled-training mode: average the heads
            logits = (logits[0] + logits[1]) / 2
        ce = self.criterion(logits, targets)
        terms = {"ce": ce if self.weights["ce"] == 1.0 else self.weights["ce"] * ce}
        if teacher is not None and self.weights["kd"] > 0:
            kd = kl_logit_distillation(logits, teacher.logits)
            if getattr(self.recipe, "kd_norm", "batch") == "batch-classes":  # DeiT's: sum / (B * classes)
                kd = kd / logits.shape[-1]
            terms["kd"] = self.weights["kd"] * kd
        if self.method is not None and student.state is not None:
            terms.update(self.method.loss_terms(student.state, student.tokens,
                                                None if teacher is None else teacher.tokens, self.weights, self.recipe))
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}
