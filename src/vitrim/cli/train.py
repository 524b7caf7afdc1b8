"""``vitrim train``, ``vitrim eval`` and ``vitrim data``: fine-tuning, evaluation, the embedded dataset."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

from .. import api
from ..api import flops
from ..errors import VitrimError
from ..train.data import ensure_digits
from ..zoo import EMBEDDED_MODEL
from .common import add_model_args, device_of, is_no_method, label, literal, method_options

__all__ = ["add_train_parsers", "cmd_train", "cmd_eval", "cmd_data", "RECIPE_FLAGS"]

RECIPE_FLAGS = ("epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay", "drop_path", "smoothing",
                "mixup", "cutmix", "kd_weight", "ratio_weight", "token_weight", "cut_weight", "feature_weight")


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a (reduced) model with the method's losses and distillation",
                       description="Train or fine-tune on an ImageFolder (train/ and val/). With no --model/--data: "
                                   "the embedded 12-block ViT on the bundled digits canvases. Several GPUs: "
                                   "torchrun --nproc_per_node N -m vitrim train ...")
    add_model_args(p, default_model=None, default_method=None)
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (default: the embedded digits canvases)")
    p.add_argument("--recipe", help="named recipe preset (see `vitrim recipes`)")
    p.add_argument("--output", help="run folder for checkpoints and logs (default: runs/<model>-<method>)")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in PATH (its last.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output")
    p.add_argument("--config", metavar="YAML", help="options from a YAML file; command-line flags override it")
    p.add_argument("--num-classes", type=int, help="new classifier head with this many classes")
    p.add_argument("--model-kwargs", type=literal, metavar="DICT",
                   help="extra timm.create_model arguments, e.g. \"{'depth': 2, 'embed_dim': 32}\"")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe field (repeatable)")
    for name in RECIPE_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int if name in ("epochs", "batch_size", "warmup_epochs") else float,
                       help=f"recipe override: {name}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data-loader processes per training process")
    p.add_argument("--device", help="cpu, cuda (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 and images/s on an ImageFolder, reduced and unreduced",
                       description="Evaluate with timm's eval transform for the model. With no arguments: the "
                                   "embedded model on the digits validation split.")
    add_model_args(p, default_model=None, default_method=None)
    p.add_argument("--data", help="ImageFolder root (or its val/ folder); default: the embedded digits canvases")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device")
    p.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--no-baseline", action="store_true", help="do not also evaluate the unreduced model")
    p.add_argument("--config", metavar="YAML", help="options from a YAML file; command-line flags override it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="build the embedded digits dataset (ImageFolder) offline")
    p.add_argument("--output", help="folder (default: $VITRIM_HOME/digits64 or ~/.cache/vitrim/digits64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    from ..train.data import build_digits, default_digits_root

    out = args.output or str(default_digits_root())
    root = build_digits(out, seed=args.seed)
    print(f"wrote the digits canvases (64x64, 10 classes) to {root}/train and {root}/val")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.engine import TrainConfig, train
    from ..train.recipes import get_recipe, recipe_names

    embedded = args.model in (None, EMBEDDED_MODEL)
    model = args.model or EMBEDDED_MODEL
    data = args.data or str(ensure_digits())
    if args.recipe is None:
        if args.data is not None:
            raise VitrimError(f"choose a --recipe for your data (one of {', '.join(recipe_names())}); "
                              f"see `vitrim recipes`")
        args.recipe = "digits" if embedded and args.method in (None, "none") else "digits-finetune"
    recipe = get_recipe(args.recipe)
    overrides = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None}
    for item in args.set or []:
        if "=" not in item:
            raise VitrimError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.replace("-", "_")] = literal(value)
    recipe = recipe.replace(**overrides)
    method = args.method or "none"
    args.method = method
    options = method_options(args)
    # a reduced embedded model starts from the shipped weights, unless its architecture was changed
    pretrained = args.pretrained or (embedded and args.checkpoint is None and method != "none"
                                     and not args.model_kwargs)
    output = args.output or os.path.join("runs", f"{model}-{method}")
    cfg = TrainConfig(model=model, data=data, output=output, recipe=recipe, method=method, method_options=options,
                      pretrained=pretrained, checkpoint=args.checkpoint, resume=args.resume, overwrite=args.overwrite,
                      num_classes=args.num_classes, img_size=args.img_size, model_kwargs=args.model_kwargs or {},
                      seed=args.seed, workers=args.workers,
                      device=args.device, progress=not args.no_progress)
    row = train(cfg)
    if row:
        print(json.dumps({"output": output, "epoch": row["epoch"], "val_top1": row["val"]["top1"]}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..models import create_model, load_checkpoint, read_checkpoint, state_dict_of
    from ..train.data import build_eval_loader, eval_transform, image_dataset, resolve_split
    from ..train.evaluate import evaluate

    saved, state = {}, {}
    if args.checkpoint:  # read once: the run's config (vitrim train) and the weights
        stored = read_checkpoint(args.checkpoint)
        saved = (stored.get("config") if isinstance(stored, dict) else None) or {}
        state = state_dict_of(stored)
    model_name = args.model or saved.get("model") or EMBEDDED_MODEL
    if args.method is None:
        args.method = saved.get("method", "none") if saved else "none"
        for k, v in (saved.get("method_options") or {}).items():
            if getattr(args, f"opt_{k}", None) is None:
                setattr(args, f"opt_{k}", v)
    options = method_options(args)
    data = args.data or str(ensure_digits())
    folder = resolve_split(data, "val")
    pretrained = args.pretrained or (model_name == EMBEDDED_MODEL and not args.checkpoint)
    extra = dict(saved.get("model_kwargs") or {})
    if saved.get("num_classes"):
        extra["num_classes"] = saved["num_classes"]
    base = create_model(model_name, pretrained=pretrained, img_size=args.img_size, **extra)
    device = device_of(args.device)
    models = {}
    if not is_no_method(args.method):
        reduced = api.apply(copy.deepcopy(base), args.method, **options)
        if args.checkpoint:
            load_checkpoint(reduced, state, path=args.checkpoint)
            if not args.no_baseline and saved.get("method") not in (None, "none"):
                # the baseline of a fine-tuned reduced model is its own weights, unreduced
                load_checkpoint(base, state, ignore_prefix="vitrim.", path=args.checkpoint)
        if not args.no_baseline:
            models[f"{model_name} (unreduced)"] = base
        models[f"{model_name} + {label(args.method, options)}"] = reduced
    else:
        if args.checkpoint:
            load_checkpoint(base, state, path=args.checkpoint)
        models[model_name] = base
    dataset = image_dataset(folder, transform=eval_transform(base))
    loader = build_eval_loader(dataset, args.batch_size, args.workers)
    results = {}
    for name, m in models.items():
        m.to(device)
        results[name] = {**evaluate(m, loader, device, amp=args.amp, progress=not args.json and sys.stderr.isatty(),
                                    desc=name).to_dict(), "gmacs": flops(m, args.img_size)}
    if args.json:
        print(json.dumps({"data": str(folder), "results": results}, indent=2))
    else:
        print(f"{'model':<48} {'top1':>7} {'top5':>7} {'GMACs':>8} {'img/s':>9}  images={len(dataset)} ({folder})")
        for name, r in results.items():
            print(f"{name:<48} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['gmacs']:>8.4f} {r['img_per_s']:>9.1f}")
    return 0
