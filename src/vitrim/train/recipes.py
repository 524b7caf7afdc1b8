"""Named training recipes: the papers' hyperparameters as the specs give them.

Every field can be overridden from the command line or a YAML config. Learning rates follow
each paper's rule: ``lr_base_batch`` set means ``lr = lr * total_batch / lr_base_batch``
(linear scaling); ``None`` means the value is used as given. Loss weights left at ``None``
take the method's own weights (see :mod:`vitrim.train.objective`).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from ..errors import OptionError

__all__ = ["Recipe", "RECIPES", "get_recipe", "recipe_names"]


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    # schedule and optimisation
    epochs: int = 30
    batch_size: int = 128              # per process
    lr: float = 5e-4
    lr_base_batch: Optional[int] = None  # linear scaling reference; None = lr used as given
    min_lr: float = 1e-5
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    scale_schedule_lrs: bool = False   # warmup_lr and min_lr follow lr's linear scaling too (Swin's rule)
    sched: str = "cosine"
    opt: str = "adamw"
    opt_eps: float = 1e-8
    opt_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    backbone_lr_scale: float = 1.0     # pretrained weights at lr * scale, new (vitrim.*) parameters at lr
    frozen: tuple[str, ...] = ()       # parameter names excluded from the optimiser
    clip_grad: Optional[float] = None
    # regularisation and augmentation (DeiT recipe by default)
    drop_path: float = 0.0
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    repeated_aug: int = 3              # repeats per sample (timm RepeatAugSampler); <= 1 = off
    interpolation: str = "bicubic"
    # precision and memory
    amp: bool = True                   # autocast + GradScaler on CUDA (ignored on CPU)
    grad_checkpointing: bool = False
    # losses (None = the method's own weight, ReductionMethod.loss_weights; cross-entropy: 1)
    ce_weight: Optional[float] = None
    kd_weight: Optional[float] = None
    ratio_weight: Optional[float] = None
    token_weight: Optional[float] = None
    cut_weight: Optional[float] = None
    feature_weight: Optional[float] = None
    loss_weights: dict = field(default_factory=dict)  # any term's weight by name (a method's own terms too)
    distill: bool = True               # teacher = frozen unreduced copy of the starting model
    kd_norm: str = "batch"             # KL of the logits per sample ("batch"), or per sample and class ("batch-classes", DeiT's)
    cut_loss_layers: str = "all"       # IdleViT: "alternate" reproduces the official loop (docs/methods/idlevit.md, "Losses")
    # what the losses compare (docs/training.md, "Loss targets"); the model's adapter gives the head's parts
    logits_from: str = "output"        # CE and KD on "output" (the model's logits) or "class_head" (the class head
    #                                    alone: LV-ViT's head(cls) without the aux max; the output elsewhere)
    token_target: str = "tokens"       # token distillation on "tokens" (final patch tokens) or "token_logits" (the
    #                                    per-token head's class logits, KL over classes: LV-ViT's aux_head)
    feature_target: str = "class_token"  # IdleViT feature MSE on "class_token" ([B, C]) or "tokens" (the whole
    #                                    [B, T, C] map masked by the last idle layer's computed rows)
    feature_norm: str = "channels"     # feature L2 normalisation: "channels" (each token) or "tokens" (each channel
    #                                    over the token axis, the official LV-ViT code; feature_target="tokens" only)
    # EViT keep-rate warm-up (docs/training.md, "EViT"): rate 1 before shrink_start, ramp over shrink_epochs
    shrink_start_epoch: int = 0
    shrink_epochs: int = 0
    faithful: bool = False             # TPS: the PyTorch scripts' backbone-LR handling (docs/training.md, "TPS")

    def total_lr(self, total_batch: int, value: Optional[float] = None) -> float:
        """``lr`` (or ``value``) at ``total_batch``: scaled by ``total_batch / lr_base_batch`` when that is set."""
        v = self.lr if value is None else value
        return v if self.lr_base_batch is None else v * total_batch / self.lr_base_batch

    def schedule_lrs(self, total_batch: int) -> tuple[float, float, float]:
        """``(lr, warmup_lr, min_lr)`` at ``total_batch``; the last two scaled like ``lr`` if ``scale_schedule_lrs``."""
        scale = self.scale_schedule_lrs
        return (self.total_lr(total_batch), self.total_lr(total_batch, self.warmup_lr) if scale else self.warmup_lr,
                self.total_lr(total_batch, self.min_lr) if scale else self.min_lr)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with ``changes``; every value is checked against its field's type (ints refuse
        ``'abc'`` and ``2.5``, floats take ints and numeric strings such as YAML's ``5e-4``, tuples take
        lists, ``Optional`` fields take ``None``) and converted."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise OptionError(f"unknown recipe field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}")
        hints = _field_types()
        return dataclasses.replace(self, **{k: coerce_field(k, v, hints[k]) for k, v in changes.items()})

    def check(self) -> "Recipe":
        """Every field of the right type and in range, the optimiser and the scheduler known to timm,
        or an :class:`~vitrim.errors.OptionError` naming the field; returns ``self``."""
        hints = _field_types()
        for f in fields(self):
            coerce_field(f.name, getattr(self, f.name), hints[f.name])
        _check_ranges(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- field checks
_BOUNDS: dict[str, tuple[str, float]] = {
    # field: (rule, bound); "ge": >= bound, "gt": > bound
    "epochs": ("ge", 1), "batch_size": ("ge", 1), "lr": ("gt", 0), "lr_base_batch": ("ge", 1), "min_lr": ("ge", 0),
    "warmup_epochs": ("ge", 0), "warmup_lr": ("ge", 0), "opt_eps": ("gt", 0), "weight_decay": ("ge", 0),
    "backbone_lr_scale": ("ge", 0), "clip_grad": ("gt", 0), "drop_path": ("ge", 0), "smoothing": ("ge", 0),
    "mixup": ("ge", 0), "cutmix": ("ge", 0), "mixup_prob": ("ge", 0), "mixup_switch_prob": ("ge", 0),
    "color_jitter": ("ge", 0), "reprob": ("ge", 0), "recount": ("ge", 1), "hflip": ("ge", 0),
    "repeated_aug": ("ge", 0), "ce_weight": ("ge", 0), "kd_weight": ("ge", 0), "ratio_weight": ("ge", 0), "token_weight": ("ge", 0),
    "cut_weight": ("ge", 0), "feature_weight": ("ge", 0), "shrink_start_epoch": ("ge", 0), "shrink_epochs": ("ge", 0),
}
_AT_MOST_ONE = ("drop_path", "smoothing", "mixup_prob", "mixup_switch_prob", "reprob", "hflip")
#: schedulers timm's create_scheduler_v2 builds that the loop can step per epoch without a metric
SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "poly", "wsd", "rsqrt")
_CHOICES = {"mixup_mode": ("batch", "pair", "elem"), "remode": ("pixel", "rand", "const"),
            "cut_loss_layers": ("all", "alternate"), "logits_from": ("output", "class_head"),
            "token_target": ("tokens", "token_logits"), "feature_target": ("class_token", "tokens"),
            "feature_norm": ("channels", "tokens"),
            "kd_norm": ("batch", "batch-classes"),
            "interpolation": ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random")}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Recipe)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or None"
    if origin is tuple:
        plural = {int: "ints", float: "numbers", str: "strings"}.get(args[0], str(args[0]))
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural}"
        return f"a list of {len(args)} {plural}"
    if tp is bool:
        return "True or False"
    return {int: "an int", float: "a number", str: "a string", dict: "a dict"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce_field(name: str, value: Any, tp: Any) -> Any:
    """``value`` converted to the recipe field type ``tp``, or an OptionError naming the field."""
    def fail() -> OptionError:
        return OptionError(f"recipe field {name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            try:
                return coerce_field(name, value, inner[0])
            except OptionError:
                raise fail() from None
        raise fail()  # pragma: no cover - no such field today
    if origin is tuple:
        items = (value,) if isinstance(value, str) and args and args[0] is str else value
        if not isinstance(items, (list, tuple)):
            raise fail()
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(items) != len(args):
            raise fail()
        kinds = args if fixed else (args[0],) * len(items)
        try:
            return tuple(coerce_field(name, v, k) for v, k in zip(items, kinds))
        except OptionError:
            raise fail() from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise fail()
    return value  # pragma: no cover - any other annotation is taken as given


def _check_ranges(recipe: Recipe) -> None:
    for name, (rule, bound) in _BOUNDS.items():
        v = getattr(recipe, name)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise OptionError(f"recipe field {name} must be a finite number, got {v!r}")
        if (rule == "ge" and v < bound) or (rule == "gt" and v <= bound):
            raise OptionError(f"recipe field {name} must be {'>=' if rule == 'ge' else '>'} {bound:g}, got {v!r}")
    for name in _AT_MOST_ONE:
        if getattr(recipe, name) > 1:
            raise OptionError(f"recipe field {name} must be between 0 and 1, got {getattr(recipe, name)!r}")
    if (recipe.mixup > 0 or recipe.cutmix > 0) and recipe.batch_size % 2:
        raise OptionError(f"recipe field batch_size must be even when Mixup / CutMix is on (timm mixes pairs), got "
                          f"{recipe.batch_size}; set an even batch size or mixup=0 and cutmix=0")
    if any(not (0 <= b < 1) for b in recipe.opt_betas):
        raise OptionError(f"recipe field opt_betas must be two numbers in [0, 1), got {recipe.opt_betas!r}")
    if recipe.scale[0] <= 0 or recipe.scale[0] > recipe.scale[1] or recipe.scale[1] > 1:
        raise OptionError(f"recipe field scale must be (low, high) with 0 < low <= high <= 1, got {recipe.scale!r}")
    for name, accepted in _CHOICES.items():
        if getattr(recipe, name) not in accepted:
            raise OptionError(f"recipe field {name} must be one of {', '.join(accepted)}; got {getattr(recipe, name)!r}")
    if recipe.feature_norm == "tokens" and recipe.feature_target != "tokens":
        raise OptionError("recipe field feature_norm='tokens' normalises each channel over the token axis, which "
                          f"needs feature_target='tokens' (got {recipe.feature_target!r}); accepted: "
                          "feature_norm='channels', or feature_target='tokens'")
    for term, w in recipe.loss_weights.items():
        if not isinstance(term, str) or isinstance(w, bool) or not isinstance(w, (int, float)) \
                or not math.isfinite(w) or w < 0:
            raise OptionError(f"recipe field loss_weights must map term names to weights >= 0, got "
                              f"{term!r}: {w!r}")
    _check_optimizer_names(recipe)


def _check_optimizer_names(recipe: Recipe) -> None:
    import difflib

    from timm.optim import list_optimizers

    known = list_optimizers()
    opt = recipe.opt.lower()
    base = opt[len("lookahead_"):] if opt.startswith("lookahead_") else opt
    if base not in known:
        close = difflib.get_close_matches(base, known, n=5)
        raise OptionError(f"recipe field opt: unknown optimiser {recipe.opt!r}"
                          + (f" (close: {', '.join(close)})" if close else "")
                          + "; accepted: a name in timm.optim.list_optimizers(), e.g. adamw, sgd, lamb")
    if recipe.sched not in SCHEDULERS:
        hint = " (plateau needs a validation metric per step, which the loop does not pass)" \
            if recipe.sched == "plateau" else ""
        raise OptionError(f"recipe field sched: unknown or unsupported scheduler {recipe.sched!r}{hint}; accepted: "
                          f"{', '.join(SCHEDULERS)}")


RECIPES: dict[str, Recipe] = {
    "idlevit": Recipe(
        name="idlevit", description="IdleViT 30-epoch fine-tune: lr 1e-5 x batch/512 (4e-5 at 2048), "
        "no warm-up, frozen cls_token/pos_embed, cut 20, KL 10, feature MSE 1000",
        epochs=30, batch_size=1024, lr=1e-5, lr_base_batch=512, min_lr=1e-6, warmup_epochs=0, warmup_lr=1e-6,
        weight_decay=0.05, frozen=("cls_token", "pos_embed"), drop_path=0.0, grad_checkpointing=True,
        cut_weight=20.0, kd_weight=10.0, feature_weight=1000.0),
    "evit": Recipe(
        name="evit", description="EViT 30-epoch fine-tune: lr 2e-5 x batch/512 (8e-5 at 2048), "
        "min lr 2e-6, wd 1e-6, no warm-up, keep rate fixed from step 0, CE only",
        epochs=30, batch_size=256, lr=2e-5, lr_base_batch=512, min_lr=2e-6, warmup_epochs=0, weight_decay=1e-6,
        drop_path=0.0, distill=False, shrink_start_epoch=0, shrink_epochs=0),
    "evit-scratch": Recipe(
        name="evit-scratch", description="EViT from scratch: DeiT recipe, 300 epochs, lr 5e-4 x batch/512, "
        "drop path 0.1, keep-rate warm-up from epoch 10 over 100 epochs, CE only",
        epochs=300, batch_size=128, lr=5e-4, lr_base_batch=512, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05,
        drop_path=0.1, distill=False, shrink_start_epoch=10, shrink_epochs=100),
    "dynamicvit": Recipe(
        name="dynamicvit", description="DynamicViT fine-tune: 30 epochs, batch 1024, lr 1e-3 as given, "
        "5 warm-up epochs, min lr 1e-6, backbone lr x0.01, fp32, ratio 2, KL 0.5, token MSE 0.5",
        epochs=30, batch_size=128, lr=1e-3, lr_base_batch=None, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
        backbone_lr_scale=0.01, drop_path=0.0, amp=False, repeated_aug=0,
        ratio_weight=2.0, kd_weight=0.5, token_weight=0.5),
    "dtps": Recipe(
        name="dtps", description="dTPS fine-tune: 30 epochs, total batch 1024, lr 2.5e-4 as given, 5 warm-up epochs "
        "from 1e-6, min lr 1e-5, backbone lr x0.01 (faithful=True: x1), ratio 2, KL 0.5 + token KL 0.5",
        epochs=30, batch_size=128, lr=2.5e-4, lr_base_batch=None, min_lr=1e-5, warmup_epochs=5, warmup_lr=1e-6,
        weight_decay=0.05, backbone_lr_scale=0.01, drop_path=0.0, ratio_weight=2.0, kd_weight=0.5, token_weight=0.5),
    "etps": Recipe(
        name="etps", description="eTPS fine-tune: the dTPS schedule, no ratio loss, CE + 0.5 logit KL",
        epochs=30, batch_size=128, lr=2.5e-4, lr_base_batch=None, min_lr=1e-5, warmup_epochs=5, warmup_lr=1e-6,
        weight_decay=0.05, drop_path=0.0, kd_weight=0.5),
    "tome": Recipe(
        name="tome", description="ToMe-trained DeiT: the DeiT recipe the released checkpoints used "
        "[inferred: 300 epochs, lr 5e-4 x batch/512, drop path 0.1]; CE, optional KL via kd_weight",
        epochs=300, batch_size=128, lr=5e-4, lr_base_batch=512, min_lr=1e-5, warmup_epochs=5, weight_decay=0.05,
        drop_path=0.1, kd_weight=0.0),
    "digits": Recipe(
        name="digits", description="The embedded default: a 12-block ViT from scratch on the bundled digits canvases "
        "(CPU, minutes); light augmentation, no Mixup",
        epochs=30, batch_size=32, lr=5e-4, lr_base_batch=None, min_lr=1e-5, warmup_epochs=3, weight_decay=0.05,
        mixup=0.0, cutmix=0.0, auto_augment=None, color_jitter=0.0, reprob=0.0, scale=(0.85, 1.0), hflip=0.0,
        repeated_aug=0, smoothing=0.1, drop_path=0.0, distill=False, kd_weight=0.0),
    "digits-finetune": Recipe(
        name="digits-finetune", description="Short fine-tune of a reduced embedded model on the digits canvases "
        "with the method's training losses (distillation from the unreduced model)",
        epochs=3, batch_size=32, lr=1e-4, lr_base_batch=None, min_lr=1e-5, warmup_epochs=0, weight_decay=0.05,
        mixup=0.0, cutmix=0.0, auto_augment=None, color_jitter=0.0, reprob=0.0, scale=(0.85, 1.0), hflip=0.0,
        repeated_aug=0, smoothing=0.1, drop_path=0.0),
    "swin-idle": Recipe(
        name="swin-idle", description="IdleViT on Swin (score='predictor', experimental): 30 epochs, 5 warm-up, "
        "lr 5e-4 x batch/512 (warm-up and min lr scaled alike), AdamW, clip 5, drop path 0.2, "
        "0.5 CE + 0.5 KD (per class) + keep-ratio loss",
        epochs=30, batch_size=256, lr=5e-4, lr_base_batch=512, warmup_lr=1e-6, min_lr=1e-5, scale_schedule_lrs=True,
        warmup_epochs=5, weight_decay=0.05, clip_grad=5.0, drop_path=0.2, amp=True,
        auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, reprob=0.25, smoothing=0.1, repeated_aug=0,
        ce_weight=0.5, kd_weight=0.5, kd_norm="batch-classes", ratio_weight=1.0, cut_weight=0.0, feature_weight=0.0),
}
RECIPES["tps"] = dataclasses.replace(RECIPES["dtps"], name="tps")
# LV-ViT (docs/models/lvvit.md, "Training"): the papers' schedules, with LV-ViT's loss targets
RECIPES["dynamicvit-lvvit"] = dataclasses.replace(
    RECIPES["dynamicvit"], name="dynamicvit-lvvit", description="DynamicViT on LV-ViT: the dynamicvit schedule; "
    "CE and KL 0.5 on head(cls), token KL 0.5 over the aux-head logits of the kept tokens, ratio 2",
    logits_from="class_head", token_target="token_logits")
RECIPES["idlevit-lvvit"] = dataclasses.replace(
    RECIPES["idlevit"], name="idlevit-lvvit", description="IdleViT on LV-ViT: the idlevit schedule; CE and KL 10 "
    "on the combined output, cut 20, feature MSE 1000 on the whole token map masked by the last idle layer, "
    "normalised over channels (feature_norm=tokens: the official token axis)",
    feature_target="tokens", feature_norm="channels")


def recipe_names() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise OptionError(f"unknown recipe {name!r}; accepted: {', '.join(recipe_names())}")
    return RECIPES[name]
