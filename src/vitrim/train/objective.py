"""The training objective of each method: cross-entropy plus the spec's extra terms and weights.

``Objective(method, recipe, teacher)(student_out, images, targets)`` returns the total loss and
each weighted term separately (for logging). The teacher is a frozen unreduced copy of the
starting model; it is run once per step and its logits / tokens feed every distillation term.
Method-specific terms are registered with :func:`register_terms` by method name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..losses import kl_logit_distillation
from ..state import ForwardState

__all__ = ["StudentOutput", "TeacherOutput", "Objective", "register_terms", "SPEC_WEIGHTS"]


@dataclass
class StudentOutput:
    logits: torch.Tensor
    tokens: torch.Tensor                 # final post-norm tokens [B, T, C]
    state: Optional[ForwardState]


@dataclass
class TeacherOutput:
    logits: torch.Tensor
    tokens: torch.Tensor                 # final post-norm tokens [B, T0, C]


# Spec weights per method (recipe fields left at None take these).
SPEC_WEIGHTS: dict[str, dict[str, float]] = {
    "none": {"kd_weight": 0.0},
    "tome": {"kd_weight": 0.0},
    "evit": {"kd_weight": 0.0},
    "etps": {"kd_weight": 0.5},
    "dynamicvit": {"kd_weight": 0.5, "ratio_weight": 2.0, "token_weight": 0.5},
    "dtps": {"kd_weight": 0.5, "ratio_weight": 2.0, "token_weight": 0.5},
    "idle": {"kd_weight": 10.0, "cut_weight": 20.0, "feature_weight": 1000.0},
}

TermFn = Callable[["Objective", StudentOutput, Optional[TeacherOutput]], dict[str, torch.Tensor]]
_TERMS: dict[str, TermFn] = {}


def register_terms(method: str) -> Callable[[TermFn], TermFn]:
    """Decorator: extra loss terms (already weighted) for ``method``."""
    def wrap(fn: TermFn) -> TermFn:
        _TERMS[method] = fn
        return fn
    return wrap


class Objective:
    def __init__(self, method: str, recipe, teacher: Optional[nn.Module], mixup_active: bool, method_module=None):
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.method = method
        self.method_module = method_module
        self.recipe = recipe
        spec = SPEC_WEIGHTS.get(method, {})
        self.weights = {name: (getattr(recipe, name) if getattr(recipe, name) is not None else spec.get(name, 0.0))
                        for name in ("kd_weight", "ratio_weight", "token_weight", "cut_weight", "feature_weight")}
        self.teacher = teacher if recipe.distill else None
        if mixup_active:
            self.criterion = SoftTargetCrossEntropy()  # label smoothing is folded into the Mixup targets
        elif recipe.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=recipe.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    @property
    def needs_teacher(self) -> bool:
        return self.teacher is not None and any(
            self.weights[k] > 0 for k in ("kd_weight", "token_weight", "feature_weight"))

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
        terms = {"ce": self.criterion(logits, targets)}
        if teacher is not None and self.weights["kd_weight"] > 0:
            terms["kd"] = self.weights["kd_weight"] * kl_logit_distillation(logits, teacher.logits)
        if self.method in _TERMS:
            terms.update(_TERMS[self.method](self, student, teacher))
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}


def _weighted(obj: "Objective", name: str, value: torch.Tensor) -> torch.Tensor:
    return obj.weights[name] * value


@register_terms("dynamicvit")
@register_terms("dtps")
def _pruning_terms(obj: Objective, s: StudentOutput, t: Optional[TeacherOutput]) -> dict[str, torch.Tensor]:
    """Keep-ratio loss on the cumulative decisions, token distillation at kept positions
    (DynamicViT on DeiT: MSE; dTPS: channel KL), dynamicvit.md §6, tps.md §5."""
    from ..losses.pruning import final_keep_mask, keep_ratio_loss, pruning_decisions, token_distillation

    out: dict[str, torch.Tensor] = {}
    decisions, targets = pruning_decisions(s.state)
    if obj.weights["ratio_weight"] > 0 and decisions:
        out["ratio"] = _weighted(obj, "ratio_weight", keep_ratio_loss(decisions, targets))
    if t is not None and obj.weights["token_weight"] > 0 and s.tokens.shape == t.tokens.shape:
        k = s.state.num_prefix_tokens
        mode = "kl" if obj.method == "dtps" else "mse"
        out["token"] = _weighted(obj, "token_weight", token_distillation(
            s.tokens[:, k:], t.tokens[:, k:], final_keep_mask(s.state), mode))
    return out


@register_terms("idle")
def _idle_terms(obj: Objective, s: StudentOutput, t: Optional[TeacherOutput]) -> dict[str, torch.Tensor]:
    """Token cut loss over the idle layers, L2-normalised class-feature MSE (idlevit.md §6-7)."""
    from ..losses.idle import idle_cut_loss, idle_feature_loss

    out: dict[str, torch.Tensor] = {}
    if obj.weights["cut_weight"] > 0:
        out["cut"] = _weighted(obj, "cut_weight", idle_cut_loss(s.state, layers=obj.recipe.cut_loss_layers)
                               .to(s.tokens.device))
    if t is not None and obj.weights["feature_weight"] > 0:
        out["feature"] = _weighted(obj, "feature_weight", idle_feature_loss(s.tokens[:, 0], t.tokens[:, 0]))
    return out
