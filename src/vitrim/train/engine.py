"""The training loop: one process or many (PyTorch DDP via torchrun), any vitrim method.

Per epoch: ``sampler.set_epoch`` and ``scheduler.step(epoch)`` (so a resumed run sees the same
data order and learning rates), train with the method's objective, evaluate top-1 on the
validation split, then write ``last.pt`` atomically (model, optimiser, scheduler, scaler,
epoch, RNG states) and ``best.pt`` when top-1 improves. ``--resume`` continues exactly.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import api
from ..errors import VitrimError
from ..methods.base import ReductionMethod
from .checkpoint import atomic_save, rng_state, set_rng_state
from .data import (build_eval_loader, build_train_loader, eval_transform, image_dataset, resolve_split,
                   train_transform)
from .evaluate import evaluate
from .objective import Objective, StudentOutput
from .recipes import Recipe

__all__ = ["TrainConfig", "train", "StudentForward", "prepare_model"]


@dataclass
class TrainConfig:
    model: str
    data: str
    output: str
    recipe: Recipe
    method: str = "none"
    method_options: dict = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: Optional[str] = None       # initial weights
    resume: Optional[str] = None
    overwrite: bool = False
    num_classes: Optional[int] = None
    img_size: Optional[int] = None
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (e.g. depth=2)
    seed: int = 0
    workers: int = 4
    device: Optional[str] = None
    progress: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


class StudentForward(nn.Module):
    """What DDP wraps: the model's forward returning logits, final tokens and the state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        m = self.model
        if api.is_reduced(m):
            tokens, state = m.forward_tokens(x)
            return m.forward_head_with_state(tokens, state), tokens, state
        tokens = m.forward_features(x)
        return m.forward_head(tokens), tokens, None


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _check_inputs(cfg: TrainConfig) -> tuple[Path, Path]:
    """Every user error is reported before any work starts."""
    if cfg.resume is not None and not Path(cfg.resume).is_file():
        raise VitrimError(f"--resume {cfg.resume!r} does not exist (expected a last.pt written by vitrim train)")
    train_dir = resolve_split(cfg.data, "train")
    val_dir = resolve_split(cfg.data, "val")
    out = Path(cfg.output)
    if cfg.resume is None and not cfg.overwrite and (out / "last.pt").exists():
        raise VitrimError(f"{str(out)!r} already holds a run (last.pt); pass --resume {out / 'last.pt'} to continue "
                          f"it, --overwrite to replace it, or another --output")
    if cfg.recipe.epochs < 1:
        raise VitrimError(f"epochs must be >= 1, got {cfg.recipe.epochs}")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise VitrimError(f"checkpoint {cfg.checkpoint!r} does not exist or is not a file")
    return train_dir, val_dir


def prepare_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, Optional[nn.Module]]:
    """Student (reduced) and teacher (frozen unreduced copy of the starting model)."""
    from ..models import create_model

    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    if cfg.recipe.drop_path:
        kwargs["drop_path_rate"] = cfg.recipe.drop_path
    model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, img_size=cfg.img_size,
                         **kwargs)
    if cfg.num_classes is not None and cfg.num_classes != model.num_classes:
        model.reset_classifier(cfg.num_classes)
    if model.num_classes != num_classes:
        raise VitrimError(f"{cfg.model} has {model.num_classes} classes but the data has {num_classes}; pass "
                          f"--num-classes {num_classes} to train a new head (the teacher then has it too)")
    teacher = None
    if cfg.recipe.distill and cfg.method not in ("none", ""):
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.method not in ("none", ""):
        api.apply(model, cfg.method, **cfg.method_options)
    return model, teacher


def _param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    frozen = tuple(recipe.frozen)
    no_wd_names = set(getattr(model, "no_weight_decay", lambda: set())())
    backbone_scale = 1.0 if recipe.faithful else recipe.backbone_lr_scale
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if any(name == f or name.startswith(f + ".") for f in frozen):
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        new = name.startswith("vitrim.")
        no_decay = (p.ndim <= 1 or name.endswith(".bias") or name in no_wd_names) and not recipe.faithful
        groups.setdefault((1.0 if new else backbone_scale, no_decay), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": 0.0 if nd else recipe.weight_decay}
            for (scale, nd), ps in groups.items()]


def _log(output: Path, row: dict) -> None:
    with open(output / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    for k, v in row.items():
        if isinstance(v, dict):
            flat.update({f"{k}_{kk}": vv for kk, vv in v.items()})
    path = output / "metrics.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat))
        if new:
            w.writeheader()
        w.writerow(flat)


@dataclass
class _Run:
    """Where this process trains: its device and place in the process group."""

    device: torch.device
    rank: int
    world: int

    @property
    def distributed(self) -> bool:
        return self.world > 1


@dataclass
class _Optimization:
    optimizer: Any
    scheduler: Any
    scaler: Any
    mixup: Any
    use_amp: bool


def _setup_process(cfg: TrainConfig) -> _Run:
    """Device, process group (torchrun) and seeds."""
    rank, world, local_rank = _dist_env()
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    return _Run(device, rank, world)


def _build_optimization(model: nn.Module, recipe: Recipe, run: _Run, num_classes: int) -> _Optimization:
    """Optimiser (scaled learning rate, parameter groups), scheduler, AMP scaler, Mixup / CutMix."""
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    lr = recipe.total_lr(recipe.batch_size * run.world)
    optimizer = create_optimizer_v2(_param_groups(model, recipe), opt=recipe.opt, lr=lr,
                                    weight_decay=recipe.weight_decay, eps=recipe.opt_eps, betas=recipe.opt_betas)
    scheduler, _ = create_scheduler_v2(optimizer, sched=recipe.sched, num_epochs=recipe.epochs, min_lr=recipe.min_lr,
                                       warmup_lr=recipe.warmup_lr, warmup_epochs=recipe.warmup_epochs)
    use_amp = recipe.amp and run.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                      switch_prob=recipe.mixup_switch_prob, mode=recipe.mixup_mode, label_smoothing=recipe.smoothing,
                      num_classes=num_classes)
    return _Optimization(optimizer, scheduler, scaler, mixup, use_amp)


def _resume(cfg: TrainConfig, model: nn.Module, opt: _Optimization, rank: int) -> tuple[int, float]:
    """``(first epoch, best top-1 so far)``: from ``cfg.resume``'s last.pt, or a fresh start."""
    if cfg.resume is None:
        return 0, -1.0
    ckpt = torch.load(cfg.resume, map_location="cpu", weights_only=False)
    saved = ckpt.get("config", {})
    for key in ("model", "method"):
        if saved.get(key) != getattr(cfg, key):
            raise VitrimError(f"--resume {cfg.resume!r} was made with {key}={saved.get(key)!r}, "
                              f"this run asks for {getattr(cfg, key)!r}")
    model.load_state_dict(ckpt["model"])
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    opt.scheduler.load_state_dict(ckpt["scheduler"])
    opt.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
    return ckpt["epoch"] + 1, ckpt["best_top1"]


def _prepare_output(cfg: TrainConfig) -> Path:
    """The run folder with this run's config; a fresh run starts new metric logs."""
    output = Path(cfg.output)
    if _is_main():
        output.mkdir(parents=True, exist_ok=True)
        if cfg.resume is None:
            for name in ("metrics.jsonl", "metrics.csv"):
                (output / name).unlink(missing_ok=True)
        (output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    return output


def _train_epoch(cfg: TrainConfig, epoch: int, student: nn.Module, loader, objective: Objective, opt: _Optimization,
                 method: Optional[ReductionMethod], model: nn.Module, run: _Run, output: Path) -> tuple[dict, int, float]:
    """One epoch of steps; returns ``(summed terms weighted by batch size, images seen, seconds)``."""
    from tqdm import tqdm

    recipe = cfg.recipe
    student.train()
    sums: dict[str, float] = {}
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not (cfg.progress and _is_main()),
               leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        if method is not None:
            method.training_step(epoch * len(loader) + step, len(loader), recipe)
        images, targets = images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        if opt.mixup is not None:
            images, targets = opt.mixup(images, targets)
        with torch.autocast(run.device.type, dtype=torch.float16, enabled=opt.use_amp):
            teacher_out = objective.run_teacher(images)
            logits, tokens, state = student(images)
            loss, terms = objective(StudentOutput(logits, tokens, state), targets, teacher_out)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise VitrimError(f"loss became {loss_value} at epoch {epoch}; terms {terms}. The last good "
                              f"checkpoint is {output / 'last.pt'}; lower the learning rate or enable clipping")
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        if recipe.clip_grad is not None:
            opt.scaler.unscale_(opt.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        n = images.shape[0]
        seen += n
        for k, v in {"loss": loss_value, **terms}.items():
            sums[k] = sums.get(k, 0.0) + v * n
        bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", img_s=f"{seen * run.world / (time.perf_counter() - t0):.0f}")
    return sums, seen, time.perf_counter() - t0


def _end_epoch(cfg: TrainConfig, epoch: int, model: nn.Module, val_loader, opt: _Optimization, run: _Run,
               output: Path, sums: dict, seen: int, seconds: float, best_top1: float) -> tuple[dict, float]:
    """Evaluate (rank 0), write last.pt (and best.pt when top-1 improves) atomically, log the epoch."""
    row: dict = {}
    result = ckpt = None
    best = False
    if _is_main():
        result = evaluate(model, val_loader, run.device, progress=cfg.progress, desc="val")
        group = opt.optimizer.param_groups[0]
        row = {"epoch": epoch, "lr": group["lr"] / group.get("lr_scale", 1.0),
               "train": {k: v / max(seen, 1) for k, v in sums.items()},
               "train_img_per_s": seen * run.world / seconds, "val": result.to_dict(), "time_s": seconds}
        best = result.top1 > best_top1
        best_top1 = max(best_top1, result.top1)
        ckpt = {"model": model.state_dict(), "optimizer": opt.optimizer.state_dict(),
                "scheduler": opt.scheduler.state_dict(), "scaler": opt.scaler.state_dict(), "epoch": epoch,
                "best_top1": best_top1, "config": cfg.to_dict(), "metrics": row}
    rngs = [None] * run.world
    if run.distributed:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if _is_main():
        ckpt["rng"] = rngs if run.distributed else rngs[0]
        atomic_save(ckpt, output / "last.pt")
        if best:
            atomic_save({"model": model.state_dict(), "epoch": epoch, "top1": result.top1,
                         "config": cfg.to_dict()}, output / "best.pt")
        _log(output, row)
        print(f"epoch {epoch + 1}/{cfg.recipe.epochs}  loss {row['train']['loss']:.4f}  "
              f"val top1 {result.top1:.2f}  top5 {result.top5:.2f}  best {best_top1:.2f}", flush=True)
    return row, best_top1


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns the last epoch's metrics."""
    train_dir, val_dir = _check_inputs(cfg)
    run = _setup_process(cfg)
    recipe = cfg.recipe

    train_set = image_dataset(train_dir)  # scanned once; its transform needs the model's data config
    num_classes = len(train_set.reader.class_to_idx)
    model, teacher = prepare_model(cfg, num_classes)
    train_set.transform = train_transform(model, recipe)
    val_set = image_dataset(val_dir, transform=eval_transform(model))
    loader = build_train_loader(train_set, recipe, recipe.batch_size, run.world, run.rank, cfg.seed, cfg.workers)
    val_loader = build_eval_loader(val_set, recipe.batch_size, cfg.workers)

    model.to(run.device)
    if teacher is not None:
        teacher.to(run.device)
    if recipe.grad_checkpointing:
        model.set_grad_checkpointing(True)
    opt = _build_optimization(model, recipe, run, num_classes)
    method = model.vitrim if api.is_reduced(model) else None
    objective = Objective(method, recipe, teacher, opt.mixup is not None)
    if method is not None:
        method.begin_training(recipe)
    start_epoch, best_top1 = _resume(cfg, model, opt, run.rank)
    output = _prepare_output(cfg)

    student = StudentForward(model)
    if run.distributed:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    row: dict = {}
    for epoch in range(start_epoch, recipe.epochs):
        loader.sampler.set_epoch(epoch + 100_003 * cfg.seed)
        opt.scheduler.step(epoch)
        sums, seen, seconds = _train_epoch(cfg, epoch, student, loader, objective, opt, method, model, run, output)
        if run.distributed:
            dist.barrier()
        row, best_top1 = _end_epoch(cfg, epoch, model, val_loader, opt, run, output, sums, seen, seconds, best_top1)
        if run.distributed:
            dist.barrier()
    if run.distributed:
        dist.destroy_process_group()
    return row
