"""The training loop: one process or many (PyTorch DDP via torchrun), any vitrim method.

Per epoch: ``sampler.set_epoch`` and ``scheduler.step(epoch)`` (so a resumed run sees the same
data order and learning rates), train with the method's objective, evaluate top-1 on the
validation split, then write ``last.pt`` atomically (model, optimiser, scheduler, scaler,
epoch, RNG states) and ``best.pt`` when top-1 improves. ``--resume`` continues exactly.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import api
from ..adapters import get_adapter
from ..checks import non_negative_int, positive_int, resolve_device, writable_dir
from ..errors import VitrimError
from ..methods.base import ReductionMethod
from ..progress import Progress
from .checkpoint import atomic_save, read_run_checkpoint, rng_state, set_rng_state
from .data import (build_eval_loader, build_train_loader, check_classes, ensure_digits, eval_transform,
                   image_dataset, resolve_split, train_transform)
from .evaluate import evaluate
from .objective import Objective, StudentOutput
from .recipes import Recipe

__all__ = ["TrainConfig", "train", "StudentForward", "prepare_model"]


@dataclass
class TrainConfig:
    model: str
    data: Optional[str]                    # None: the embedded digits canvases (built after the other checks)
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
    measure_unreduced: bool = True   # time the unreduced model's training step once at start-up

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


class StudentForward(nn.Module):
    """What DDP wraps: the model's forward returning logits, final tokens, the state and, with
    ``heads=True``, the head's parts from the model's adapter (``Adapter.head_parts``; else ``None``)."""

    def __init__(self, model: nn.Module, heads: bool = False) -> None:
        super().__init__()
        self.model = model
        self._adapter = get_adapter(model) if heads else None

    def forward(self, x: torch.Tensor):
        m = self.model
        if api.is_reduced(m):
            tokens, state = m.forward_tokens(x)
            logits = m.forward_head_with_state(tokens, state)
        else:
            tokens, state = m.forward_features(x), None
            logits = m.forward_head(tokens)
        parts = self._adapter.head_parts(tokens, state) if self._adapter is not None else None
        return logits, tokens, state, parts


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


#: what a resumed run must share with the run that wrote its last.pt (the weights only fit that model)
RESUME_KEYS = ("model", "method", "method_options", "model_kwargs", "num_classes", "img_size")


@dataclass
class _Inputs:
    """What :func:`_check_inputs` found: the splits, and the training state to resume (read once)."""

    train_dir: Path
    val_dir: Path
    resume: Optional[dict] = None


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: a config read back from a checkpoint compares equal to the run's."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _check_optimization(recipe: Recipe) -> None:
    """Build the optimiser and the scheduler once on a dummy parameter: timm's own errors for a
    combination it cannot build (an optimiser that needs CUDA or a package, a scheduler's bounds) come
    now, before the model and the data."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    param = nn.Parameter(torch.zeros(1))
    try:
        optimizer = create_optimizer_v2([{"params": [param], "lr_scale": 1.0, "weight_decay": recipe.weight_decay}],
                                        opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                        eps=recipe.opt_eps, betas=recipe.opt_betas)
    except Exception as err:
        raise VitrimError(f"optimiser {recipe.opt!r} cannot be built here ({type(err).__name__}: {err}); "
                          f"accepted: a name in timm.optim.list_optimizers() that runs on this machine, e.g. adamw") \
            from None
    try:
        create_scheduler_v2(optimizer, sched=recipe.sched, num_epochs=recipe.epochs, min_lr=recipe.min_lr,
                            warmup_lr=recipe.warmup_lr, warmup_epochs=recipe.warmup_epochs)
    except Exception as err:
        raise VitrimError(f"scheduler {recipe.sched!r} cannot be built for {recipe.epochs} epochs "
                          f"({type(err).__name__}: {err})") from None


def _check_model_kwargs(cfg: TrainConfig) -> None:
    kw = cfg.model_kwargs
    if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
        raise VitrimError(f"model_kwargs (--model-kwargs) must be a dict of timm.create_model arguments, e.g. "
                          f"\"{{'depth': 2}}\", got {kw!r}")
    for key, own, flag in (("img_size", cfg.img_size, "--img-size"), ("num_classes", cfg.num_classes, "--num-classes")):
        if key in kw and own is not None and kw[key] != own:
            raise VitrimError(f"{key} given twice: {kw[key]!r} in --model-kwargs and {own!r} by {flag}; give it once")
    if "img_size" in kw and kw["img_size"] is not None:
        positive_int(kw["img_size"], "img_size in --model-kwargs")
    rate = kw.get("drop_path_rate")
    if rate is not None and cfg.recipe.drop_path and rate != cfg.recipe.drop_path:
        raise VitrimError(f"drop path given twice: drop_path_rate={rate!r} in --model-kwargs and drop_path="
                          f"{cfg.recipe.drop_path!r} by the recipe; give one (--drop-path sets the recipe's)")


def _check_resume(cfg: TrainConfig) -> dict:
    """The resume file, read and matched against this run."""
    ckpt = read_run_checkpoint(cfg.resume)
    saved = ckpt["config"]
    mine = cfg.to_dict()
    wrong = [f"{k}: the run used {saved.get(k)!r}, this one asks for {mine.get(k)!r}"
             for k in RESUME_KEYS if k in saved and _plain(saved.get(k)) != _plain(mine.get(k))]
    if wrong:
        raise VitrimError(f"--resume {cfg.resume!r} was made by a different run ({'; '.join(wrong)}); resume with "
                          f"the same model and method arguments, or start a new run with --checkpoint")
    rng = ckpt["rng"]
    saved_world = len(rng) if isinstance(rng, list) else 1
    world = _dist_env()[1]
    if saved_world != world:
        print(f"note: --resume {cfg.resume!r} was saved by {saved_world} process(es), this run has {world}: "
              f"training continues, but the data order and augmentation differ from an uninterrupted run",
              file=sys.stderr)
    return ckpt


def _check_inputs(cfg: TrainConfig) -> _Inputs:
    """Every user error is reported before any work starts (before the model is built or the data scanned,
    except what needs them: class counts, the batch size against the training set)."""
    from ..methods.base import get_method_class

    if not isinstance(cfg.recipe, Recipe):
        raise VitrimError(f"recipe must be a vitrim.train.recipes.Recipe, got {type(cfg.recipe).__name__}")
    if cfg.recipe.epochs is not None and isinstance(cfg.recipe.epochs, int) and cfg.recipe.epochs < 1:
        raise VitrimError(f"epochs must be >= 1, got {cfg.recipe.epochs}")
    cfg.recipe.check()
    for name in ("model", "data", "output"):
        value = getattr(cfg, name)
        if name == "data" and value is None:
            continue
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise VitrimError(f"{name} must be a non-empty string, got {value!r}")
    if cfg.method not in ("none", ""):
        get_method_class(cfg.method)  # an unknown name: OptionError listing the methods
    if not isinstance(cfg.method_options, dict):
        raise VitrimError(f"method_options must be a dict, got {cfg.method_options!r}")
    if cfg.num_classes is not None:
        positive_int(cfg.num_classes, "num_classes (--num-classes)")
    if cfg.img_size is not None:
        positive_int(cfg.img_size, "img_size (--img-size)")
    non_negative_int(cfg.workers, "workers (--workers)")
    non_negative_int(cfg.seed, "seed (--seed)")
    _check_model_kwargs(cfg)
    if cfg.device:
        resolve_device(cfg.device)
    _check_optimization(cfg.recipe)
    out = Path(cfg.output).expanduser()
    if out.exists() and not out.is_dir():
        writable_dir(out, "run folder (--output)")  # the error for an existing file
    if cfg.resume is None and not cfg.overwrite and (out / "last.pt").exists():
        raise VitrimError(f"{str(out)!r} already holds a run (last.pt); pass --resume {out / 'last.pt'} to continue "
                          f"it, --overwrite to replace it, or another --output")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise VitrimError(f"checkpoint {cfg.checkpoint!r} does not exist or is not a file")
    if cfg.data is None:  # the embedded digits canvases, built on first use once everything else is checked
        cfg.data = str(ensure_digits())
    train_dir = resolve_split(cfg.data, "train")
    val_dir = resolve_split(cfg.data, "val")
    if train_dir == val_dir:
        raise VitrimError(f"data {str(cfg.data)!r} is one folder of classes without train/ and val/: validation "
                          f"would use the training images; accepted: a root with train/ and val/ (each holding "
                          f"class folders)")
    resume = _check_resume(cfg) if cfg.resume is not None else None
    if resume is None or resume["epoch"] + 1 < cfg.recipe.epochs:
        writable_dir(out, "run folder (--output)")  # last: it creates the folder
    return _Inputs(train_dir, val_dir, resume)


def _create(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """The starting model (pretrained or ``cfg.checkpoint`` weights, new head) and the checkpoint's
    ``vitrim.*`` weights (a reduced run's learned parts), loaded after the method is applied."""
    from ..models import create_model, load_checkpoint, read_checkpoint, state_dict_of

    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    img_size = kwargs.pop("img_size", None) if cfg.img_size is None else cfg.img_size
    kwargs.pop("img_size", None)
    if cfg.recipe.drop_path:
        kwargs["drop_path_rate"] = cfg.recipe.drop_path
    state: dict = {}
    if cfg.checkpoint is not None:
        state = state_dict_of(read_checkpoint(cfg.checkpoint), cfg.checkpoint)
    model = create_model(cfg.model, pretrained=cfg.pretrained and cfg.checkpoint is None, img_size=img_size,
                         **kwargs)
    if cfg.checkpoint is not None:
        # a reduced run's checkpoint (best.pt, last.pt) also holds the method's learned parts (vitrim.*)
        load_checkpoint(model, state, ignore_prefix="vitrim.", path=cfg.checkpoint)
    if cfg.num_classes is not None and cfg.num_classes != model.num_classes:
        model.reset_classifier(cfg.num_classes)
    return model, {k: v for k, v in state.items() if k.startswith("vitrim.")}


def prepare_model(cfg: TrainConfig, num_classes: Optional[int] = None) -> tuple[nn.Module, Optional[nn.Module]]:
    """Student (reduced) and teacher (frozen unreduced copy of the starting model).

    ``num_classes``: the data's class count, checked against the model's head (``None``: not checked).
    """
    from ..models import load_checkpoint

    model, learned = _create(cfg)
    if num_classes is not None and model.num_classes != num_classes:
        raise VitrimError(f"{cfg.model} has {model.num_classes} classes but the data has {num_classes}; pass "
                          f"--num-classes {num_classes} to train a new head (the teacher then has it too)")
    teacher = None
    if cfg.recipe.distill and cfg.method not in ("none", ""):
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.method not in ("none", ""):
        api.apply(model, cfg.method, **cfg.method_options)
        if learned:
            load_checkpoint(model, {**model.state_dict(), **learned}, path=cfg.checkpoint)
    elif learned:
        print(f"note: the {len(learned)} vitrim.* weights of {cfg.checkpoint} (a reduced run's learned parts) are "
              f"not used: this run has no method", file=sys.stderr)
    return model, teacher


def _check_data(cfg: TrainConfig, model: nn.Module, inputs: _Inputs, train_set, val_set) -> list[str]:
    """The training classes fit the head (count, and names where the model knows them, unless a new head
    was asked for), and the validation split has the same classes; returns the class names."""
    train_classes = sorted(train_set.reader.class_to_idx, key=train_set.reader.class_to_idx.get)
    check_classes(inputs.train_dir, model, "training data", classes=train_classes,
                  match_names=cfg.num_classes is None)
    val_classes = sorted(val_set.reader.class_to_idx, key=val_set.reader.class_to_idx.get)
    if val_classes != train_classes:
        missing = sorted(set(train_classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(train_classes))
        parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
                ([f"extra {', '.join(extra[:5])}"] if extra else [])
        raise VitrimError(f"the validation classes in {str(inputs.val_dir)!r} differ from the training classes in "
                          f"{str(inputs.train_dir)!r} ({'; '.join(parts) or 'another order'}); ImageFolder labels "
                          f"classes by sorted folder name, so both splits need the same class folders")
    return train_classes


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
        if not new and backbone_scale == 0:  # scale 0: the backbone is frozen, only the method's parts learn
            p.requires_grad_(False)
            continue
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
        device = resolve_device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = resolve_device(f"cuda:{local_rank}")  # one GPU per process under torchrun
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

    lr, warmup_lr, min_lr = recipe.schedule_lrs(recipe.batch_size * run.world)
    optimizer = create_optimizer_v2(_param_groups(model, recipe), opt=recipe.opt, lr=lr,
                                    weight_decay=recipe.weight_decay, eps=recipe.opt_eps, betas=recipe.opt_betas)
    scheduler, _ = create_scheduler_v2(optimizer, sched=recipe.sched, num_epochs=recipe.epochs, min_lr=min_lr,
                                       warmup_lr=warmup_lr, warmup_epochs=recipe.warmup_epochs)
    use_amp = recipe.amp and run.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                      switch_prob=recipe.mixup_switch_prob, mode=recipe.mixup_mode, label_smoothing=recipe.smoothing,
                      num_classes=num_classes)
    return _Optimization(optimizer, scheduler, scaler, mixup, use_amp)


def _resume(ckpt: Optional[dict], model: nn.Module, opt: _Optimization, rank: int) -> tuple[int, float]:
    """``(first epoch, best top-1 so far)``: from the last.pt read by :func:`_check_inputs`, or a fresh start."""
    if ckpt is None:
        return 0, -1.0
    model.load_state_dict(ckpt["model"])
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    opt.scheduler.load_state_dict(ckpt["scheduler"])
    opt.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    set_rng_state(rng[rank % len(rng)] if isinstance(rng, list) else rng)
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
    """One epoch of steps; returns ``(summed terms weighted by batch size, images seen, seconds)``.

    Progress: a bar on a terminal, a plain line at most every 30 s in a log."""
    recipe = cfg.recipe
    student.train()
    sums: dict[str, float] = {}
    seen, t0 = 0, time.perf_counter()
    bar = Progress(loader, total=len(loader), desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   enabled=cfg.progress and _is_main(), every=30.0)
    for step, (images, targets) in enumerate(bar):
        if method is not None:
            method.training_step(epoch * len(loader) + step, len(loader), recipe)
        images, targets = images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
        if opt.mixup is not None:
            images, targets = opt.mixup(images, targets)
        with torch.autocast(run.device.type, dtype=torch.float16, enabled=opt.use_amp):
            teacher_out = objective.run_teacher(images)
            logits, tokens, state, heads = student(images)
            loss, terms = objective(StudentOutput(logits, tokens, state, heads), targets, teacher_out)
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
        bar.set_postfix_str(f"loss {sums['loss'] / seen:.4f}  img/s {seen * run.world / (time.perf_counter() - t0):.0f}")
    return sums, seen, time.perf_counter() - t0


def _unreduced_speed(cfg: TrainConfig, model: nn.Module, img_size: Any, num_classes: int, run: _Run,
                     use_amp: bool) -> Optional[float]:
    """Training img/s of the unreduced model (a copy without the reduction, its own AdamW), measured
    once on rank 0 with the run's batch size and precision, for the per-epoch log to stand next to.
    The RNG states are restored afterwards, so the run (and its resume) is unchanged."""
    from ..measure.bench import benchmark_training

    if not (cfg.measure_unreduced and _is_main() and api.is_reduced(model)):
        return None
    method_params = {id(p) for p in model.vitrim.parameters()}
    if not any(p.requires_grad for p in model.parameters() if id(p) not in method_params):  # backbone_lr_scale=0
        print("unreduced model: training speed not measured (the backbone is frozen, so the unreduced model has "
              "no parameter to train)", flush=True)
        return None
    plain = api.remove(copy.deepcopy(model))
    h, w = api.resolve_img_size(plain, img_size)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        res = benchmark_training({"unreduced": plain}, batch_size=cfg.recipe.batch_size, input_size=(3, h, w),
                                 num_classes=num_classes, device=run.device, precision="fp16" if use_amp else "fp32",
                                 warmup=1, repeats=3, iters=1)
    del plain
    speed = res.timings[0].img_per_s
    print(f"unreduced model: {speed:.1f} img/s per process in training (batch {cfg.recipe.batch_size}, "
          f"median of 3 steps)", flush=True)
    return speed


def _end_epoch(cfg: TrainConfig, epoch: int, model: nn.Module, val_loader, opt: _Optimization, run: _Run,
               output: Path, sums: dict, seen: int, seconds: float, best_top1: float,
               classes: list[str], unreduced_img_per_s: Optional[float] = None) -> tuple[dict, float]:
    """Evaluate (rank 0), write last.pt (and best.pt when top-1 improves) atomically, log the epoch."""
    row: dict = {}
    result = ckpt = None
    best = False
    if _is_main():
        result = evaluate(model, val_loader, run.device, progress=cfg.progress, desc="val")
        group = max(opt.optimizer.param_groups, key=lambda g: g.get("lr_scale", 1.0))
        row = {"epoch": epoch, "lr": group["lr"] / group.get("lr_scale", 1.0),
               "train": {k: v / max(seen, 1) for k, v in sums.items()},
               "train_img_per_s": seen * run.world / seconds, "val": result.to_dict(), "time_s": seconds}
        if unreduced_img_per_s is not None:
            row["unreduced_train_img_per_s"] = unreduced_img_per_s * run.world
        best = result.top1 > best_top1
        best_top1 = max(best_top1, result.top1)
        ckpt = {"model": model.state_dict(), "optimizer": opt.optimizer.state_dict(),
                "scheduler": opt.scheduler.state_dict(), "scaler": opt.scaler.state_dict(), "epoch": epoch,
                "best_top1": best_top1, "config": cfg.to_dict(), "metrics": row, "classes": classes}
    rngs = [None] * run.world
    if run.distributed:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if _is_main():
        ckpt["rng"] = rngs if run.distributed else rngs[0]
        with _interrupt_held():  # last.pt, best.pt and the logs always describe the same epoch
            atomic_save(ckpt, output / "last.pt")
            if best:
                atomic_save({"model": model.state_dict(), "epoch": epoch, "top1": result.top1,
                             "config": cfg.to_dict(), "classes": classes}, output / "best.pt")
            _log(output, row)
            versus = ("" if unreduced_img_per_s is None
                      else f" (unreduced {row['unreduced_train_img_per_s']:.0f})")
            print(f"epoch {epoch + 1}/{cfg.recipe.epochs}  loss {row['train']['loss']:.4f}  "
                  f"img/s {row['train_img_per_s']:.0f}{versus}  val top1 {result.top1:.2f}  top5 {result.top5:.2f}  best {best_top1:.2f}", flush=True)
    return row, best_top1


@contextlib.contextmanager
def _interrupt_held():
    """Ctrl-C (SIGINT) during the block is held until the block is done, then raised as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except (ValueError, OSError):  # pragma: no cover - no signal handling here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


@dataclass
class _Saved:
    """The last complete epoch on disk, for the message of an interrupted run."""

    path: Optional[Path] = None
    epoch: Optional[int] = None


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns the last epoch's metrics.

    Every input is checked first (:func:`_check_inputs`). A ``resume`` of a run that already finished its
    epochs trains nothing: it says so and returns ``{}``. Ctrl-C says where the
    last complete epoch is saved and raises ``KeyboardInterrupt`` again.
    """
    inputs = _check_inputs(cfg)
    saved = _Saved()
    if inputs.resume is not None:
        saved = _Saved(Path(cfg.resume), inputs.resume["epoch"])
        done = inputs.resume["epoch"] + 1
        if done >= cfg.recipe.epochs:
            if _is_main():
                print(f"--resume {cfg.resume!r}: the run already finished {done} of {cfg.recipe.epochs} epoch(s); "
                      f"nothing to train (its best top-1 is {inputs.resume['best_top1']:.2f}). To train further, "
                      f"pass --epochs N with N > {done}", file=sys.stderr)
            return {}
    try:
        return _train(cfg, inputs, saved)
    except KeyboardInterrupt:
        if _is_main():
            print(_interrupted(cfg, saved), file=sys.stderr, flush=True)
        raise


def _interrupted(cfg: TrainConfig, saved: _Saved) -> str:
    if saved.path is None:
        return f"interrupted before the first epoch completed: nothing was saved in {cfg.output}"
    return (f"interrupted: the last complete epoch ({saved.epoch + 1}/{cfg.recipe.epochs}) is saved in {saved.path} "
            f"(resume with --resume {saved.path})")


def _train(cfg: TrainConfig, inputs: _Inputs, saved: _Saved) -> dict:
    run = _setup_process(cfg)
    recipe = cfg.recipe

    model, teacher = prepare_model(cfg)  # before the data scan: model errors come first
    img_size = cfg.img_size or cfg.model_kwargs.get("img_size")
    transform = train_transform(model, recipe, img_size)  # an unknown auto_augment string fails here
    train_set = image_dataset(inputs.train_dir, transform=transform)  # scanned once
    val_set = image_dataset(inputs.val_dir, transform=eval_transform(model, img_size))
    classes = _check_data(cfg, model, inputs, train_set, val_set)
    num_classes = len(classes)
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
    start_epoch, best_top1 = _resume(inputs.resume, model, opt, run.rank)
    inputs.resume = None  # the optimiser state is loaded: free the file's copy
    output = _prepare_output(cfg)

    unreduced_speed = _unreduced_speed(cfg, model, img_size, num_classes, run, opt.use_amp)
    student = StudentForward(model, heads=objective.uses_heads)
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
        row, best_top1 = _end_epoch(cfg, epoch, model, val_loader, opt, run, output, sums, seen, seconds, best_top1,
                                    classes, unreduced_speed)
        saved.path, saved.epoch = output / "last.pt", epoch
        if run.distributed:
            dist.barrier()
    if run.distributed:
        dist.destroy_process_group()
    return row
