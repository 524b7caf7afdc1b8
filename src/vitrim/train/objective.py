"""The training objective: cross-entropy, logit distillation, and the method's own terms.

``Objective(method, recipe, teacher, mixup_active)(student_out, targets, teacher_out)`` returns the
total loss and each weighted term separately (for logging). The method says which terms it adds
and their weights (``ReductionMethod.loss_weights`` and ``loss_terms``); a recipe field
``<term>_weight`` (e.g. ``kd_weight``) or an entry of ``recipe.loss_weights`` overrides a weight. The
teacher is a frozen unreduced copy of the starting model, always run in eval mode; it is run once
per step and its logits / tokens feed every distillation term.

What the terms compare is the recipe's (``docs/training.md``, "Loss targets"): ``logits_from``
picks the logits of cross-entropy and KD (the model's output, or its class head alone), and the
methods' terms read ``token_target`` / ``feature_target`` / ``feature_norm``. The head's parts
(class head, per-token head) are asked of the model's adapter (``Adapter.head_parts``), for the
student and the teacher alike, only when the recipe reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..errors import OptionError, VitrimError
from ..losses import kl_logit_distillation
from ..measure.bench import output_logits
from ..methods.base import HeadParts, ReductionMethod, get_method_class
from ..state import ForwardState

__all__ = ["StudentOutput", "TeacherOutput", "Objective", "loss_weights", "needs_head_parts"]

MethodArg = Union[None, str, type[ReductionMethod], ReductionMethod]


@dataclass
class StudentOutput:
    logits: torch.Tensor
    tokens: torch.Tensor                 # final post-norm tokens [B, T, C]
    state: Optional[ForwardState]
    heads: Optional[HeadParts] = None    # the head's parts, when the recipe reads them (needs_head_parts)


@dataclass
class TeacherOutput:
    logits: torch.Tensor
    tokens: torch.Tensor                 # final post-norm tokens [B, T0, C]
    heads: Optional[HeadParts] = None


def needs_head_parts(recipe) -> bool:
    """Whether a term of ``recipe`` reads the head's parts (class head alone, per-token logits)."""
    return getattr(recipe, "logits_from", "output") == "class_head" \
        or getattr(recipe, "token_target", "tokens") == "token_logits"


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
        self.uses_heads = needs_head_parts(recipe)
        info = getattr(self.method, "info", None)
        if getattr(recipe, "token_target", "tokens") == "token_logits" and info is not None \
                and not info.has_token_head:
            raise OptionError(f"recipe field token_target='token_logits' distils the class logits of a per-token "
                              f"head (LV-ViT's aux_head); this {info.family_label or info.family} model has none. "
                              f"Accepted: token_target='tokens' (recipes without the -lvvit suffix), or an LV-ViT")
        self._teacher_adapter = None
        if self.teacher is not None and self.uses_heads:
            from ..adapters import get_adapter
            self._teacher_adapter = get_adapter(self.teacher)
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
        """The teacher's logits, final tokens and (when the recipe reads them) head parts, in eval mode
        (its BatchNorm, if any, normalises with its running statistics)."""
        if not self.needs_teacher:
            return None
        if self.teacher.training:
            self.teacher.eval()
        tokens = self.teacher.forward_features(images)
        heads = self._teacher_adapter.head_parts(tokens) if self._teacher_adapter is not None else None
        return TeacherOutput(self.teacher.forward_head(tokens), tokens, heads)

    def _logits(self, out) -> torch.Tensor:
        """The logits cross-entropy and KD compare: the output, or the class head alone (``logits_from``)."""
        if getattr(self.recipe, "logits_from", "output") == "class_head":
            if out.heads is None:
                raise VitrimError("recipe field logits_from='class_head' needs the head's parts; run the student "
                                  "through StudentForward(model, heads=True) (vitrim train does)")
            logits = out.heads.class_logits
        else:
            logits = out.logits
        return output_logits(logits)  # distilled DeiT in distilled-training mode: the heads averaged

    def __call__(self, student: StudentOutput, targets: torch.Tensor,
                 teacher: Optional[TeacherOutput]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self._logits(student)
        ce = self.criterion(logits, targets)
        terms = {"ce": ce if self.weights["ce"] == 1.0 else self.weights["ce"] * ce}
        if teacher is not None and self.weights["kd"] > 0:
            kd = kl_logit_distillation(logits, self._logits(teacher))
            if getattr(self.recipe, "kd_norm", "batch") == "batch-classes":  # DeiT's: sum / (B * classes)
                kd = kd / logits.shape[-1]
            terms["kd"] = self.weights["kd"] * kd
        if self.method is not None and student.state is not None:
            terms.update(self.method.loss_terms(
                student.state, student.tokens, None if teacher is None else teacher.tokens, self.weights, self.recipe,
                heads=student.heads, teacher_heads=None if teacher is None else teacher.heads))
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}
