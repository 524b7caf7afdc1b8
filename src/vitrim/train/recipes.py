"""Named training recipes: the papers' hyperparameters as the specs give them.

Every field can be overridden from the command line or a YAML config. Learning rates follow
each paper's rule: ``lr_base_batch`` set means ``lr = lr * total_batch / lr_base_batch``
(linear scaling); ``None`` means the value is used as given. Loss weights left at ``None``
take the method's own weights (see :mod:`vitrim.train.objective`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional

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
    # losses (None = the method's own weight, ReductionMethod.loss_weights)
    kd_weight: Optional[float] = None
    ratio_weight: Optional[float] = None
    token_weight: Optional[float] = None
    cut_weight: Optional[float] = None
    feature_weight: Optional[float] = None
    loss_weights: dict = field(default_factory=dict)  # any term's weight by name (a method's own terms too)
    distill: bool = True               # teacher = frozen unreduced copy of the starting model
    cut_loss_layers: str = "all"       # IdleViT: "alternate" reproduces the official loop (docs/methods/idlevit.md, "Losses")
    # EViT keep-rate warm-up (docs/training.md, "EViT"): rate 1 before shrink_start, ramp over shrink_epochs
    shrink_start_epoch: int = 0
    shrink_epochs: int = 0
    faithful: bool = False             # TPS: the PyTorch scripts' backbone-LR handling (docs/training.md, "TPS")

    def total_lr(self, total_batch: int) -> float:
        return self.lr if self.lr_base_batch is None else self.lr * total_batch / self.lr_base_batch

    def replace(self, **changes: Any) -> "Recipe":
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise OptionError(f"unknown recipe field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



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
}
RECIPES["tps"] = dataclasses.replace(RECIPES["dtps"], name="tps")


def recipe_names() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise OptionError(f"unknown recipe {name!r}; accepted: {', '.join(recipe_names())}")
    return RECIPES[name]
