"""``vitrim train``, ``vitrim eval`` and ``vitrim data``: fine-tuning, evaluation, the embedded dataset."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

from .. import api
from ..api import flops
from ..checks import non_negative_int, positive_int, resolve_device
from ..errors import VitrimError
from ..train.data import ensure_digits
from ..zoo import EMBEDDED_MODEL, is_digits_model
from .common import add_model_args, is_no_method, label, literal, method_options

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
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (default: a bar on a terminal, a line every 30 s in a log)")
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
    p.add_argument("--no-progress", action="store_true",
                   help="no progress (default: a bar on a terminal, a line every 10 s in a log)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="build the embedded digits dataset (ImageFolder) offline")
    p.add_argument("--output", help="a new or empty folder, or a digits dataset built earlier (it is replaced; "
                                    "nothing else is ever deleted); default: $VITRIM_HOME/digits64 or "
                                    "~/.cache/vitrim/digits64")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    from ..train.data import build_digits, check_digits_output, default_digits_root

    out = args.output or str(default_digits_root())
    non_negative_int(args.seed, "--seed")
    check_digits_output(out)  # before the 10 s of drawing: a folder vitrim did not write is never replaced
    root = build_digits(out, seed=args.seed)
    print(f"wrote the digits canvases (64x64, 10 classes) to {root}/train and {root}/val")
    return 0


def _config_keys(args: argparse.Namespace) -> set[str]:
    """The options that came from ``--config`` (the command line overrides them)."""
    keys = getattr(args, "_config_keys", None)
    if keys is not None:
        return set(keys)
    if not getattr(args, "config", None):
        return set()
    from . import _load_yaml

    return set(_load_yaml(args.config))


def _recipe_overrides(args: argparse.Namespace) -> dict:
    """The recipe fields given by flags, ``--set`` and the config file; one field given twice on the
    command line (a flag and ``--set``, or ``--set`` twice) is refused."""
    flags = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None}
    from_config = _config_keys(args)
    sets: dict = {}
    for item in args.set or []:
        if not isinstance(item, str) or "=" not in item:
            raise VitrimError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        value = literal(value)
        if key in sets:
            raise VitrimError(f"recipe field {key} given twice by --set ({key}={sets[key]!r} and {key}={value!r}); "
                              f"give it once")
        if key in flags and key not in from_config:
            raise VitrimError(f"recipe field {key} given twice: --{key.replace('_', '-')} {flags[key]!r} and --set "
                              f"{key}={value!r}; give it once")
        sets[key] = value
    return {**flags, **sets}


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.engine import TrainConfig, train
    from ..train.recipes import get_recipe, recipe_names

    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        raise VitrimError(f"--model-kwargs must be a dict literal of timm.create_model arguments, e.g. "
                          f"\"{{'depth': 2, 'embed_dim': 32}}\", got {args.model_kwargs!r}")
    embedded = args.model is None or is_digits_model(args.model)
    model = args.model or EMBEDDED_MODEL
    if args.recipe is None:
        if args.data is not None:
            raise VitrimError(f"choose a --recipe for your data (one of {', '.join(recipe_names())}); "
                              f"see `vitrim recipes`")
        args.recipe = "digits" if embedded and args.method in (None, "none") else "digits-finetune"
    if not isinstance(args.recipe, str):
        raise VitrimError(f"--recipe must be a recipe name, got {args.recipe!r}; accepted: {', '.join(recipe_names())}")
    recipe = get_recipe(args.recipe).replace(**_recipe_overrides(args))
    method = args.method or "none"
    args.method = method
    options = method_options(args)
    # a reduced embedded model starts from the shipped weights, unless its architecture was changed
    pretrained = args.pretrained or (embedded and args.checkpoint is None and method != "none"
                                     and not args.model_kwargs)
    output = args.output or os.path.join("runs", f"{model}-{method}")
    cfg = TrainConfig(model=model, data=args.data, output=output, recipe=recipe, method=method, method_options=options,
                      pretrained=pretrained, checkpoint=args.checkpoint, resume=args.resume, overwrite=args.overwrite,
                      num_classes=args.num_classes, img_size=args.img_size, model_kwargs=args.model_kwargs or {},
                      seed=args.seed, workers=args.workers,
                      device=args.device, progress=not args.no_progress)
    row = train(cfg)  # data None: the embedded digits, built (once) after every other check
    if row:
        print(json.dumps({"output": output, "epoch": row["epoch"], "val_top1": row["val"]["top1"]}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..models import create_model, load_checkpoint, read_checkpoint, state_dict_of
    from ..train.data import build_eval_loader, check_classes, eval_transform, image_dataset, resolve_split
    from ..train.evaluate import evaluate

    positive_int(args.batch_size, "--batch-size")
    non_negative_int(args.workers, "--workers")
    if args.img_size is not None:
        positive_int(args.img_size, "--img-size")
    device = resolve_device(args.device)
    saved, state, saved_classes = {}, {}, None
    if args.checkpoint:  # read once: the run's config (vitrim train) and the weights
        stored = read_checkpoint(args.checkpoint)
        saved = (stored.get("config") if isinstance(stored, dict) else None) or {}
        if isinstance(stored, dict) and isinstance(stored.get("classes"), list):
            saved_classes = [str(c) for c in stored["classes"]]
        state = state_dict_of(stored, args.checkpoint)
    model_name = args.model or saved.get("model") or EMBEDDED_MODEL
    if args.method is None:
        args.method = saved.get("method", "none") if saved else "none"
        for k, v in (saved.get("method_options") or {}).items():
            if getattr(args, f"opt_{k}", None) is None:
                setattr(args, f"opt_{k}", v)
    options = method_options(args)
    folder = resolve_split(args.data, "val") if args.data else None  # a user's folder: checked before the build
    embedded = is_digits_model(model_name)
    pretrained = args.pretrained or (embedded and not args.checkpoint)
    extra = dict(saved.get("model_kwargs") or {})
    if saved.get("num_classes"):
        extra["num_classes"] = saved["num_classes"]
    img_size = args.img_size if args.img_size is not None else extra.pop("img_size", saved.get("img_size"))
    extra.pop("img_size", None)
    base = create_model(model_name, pretrained=pretrained, img_size=img_size, **extra)
    if folder is None:
        folder = resolve_split(ensure_digits(), "val")
    check_classes(folder, base, "data", names=saved_classes)
    if not (pretrained or args.checkpoint):
        print(f"note: {model_name} has random weights (no --pretrained or --checkpoint): accuracy is not "
              f"meaningful", file=sys.stderr)
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
    dataset = image_dataset(folder, transform=eval_transform(base, img_size))
    loader = build_eval_loader(dataset, args.batch_size, args.workers)
    results = {}
    for name, m in models.items():
        m.to(device)
        results[name] = {**evaluate(m, loader, device, amp=args.amp, progress=not args.no_progress,
                                    desc=name).to_dict(), "gmacs": flops(m, img_size)}
    if args.json:
        print(json.dumps({"data": str(folder), "results": results}, indent=2))
    else:
        print(f"{'model':<48} {'top1':>7} {'top5':>7} {'GMACs':>8} {'img/s':>9}  images={len(dataset)} ({folder})")
        for name, r in results.items():
            print(f"{name:<48} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['gmacs']:>8.4f} {r['img_per_s']:>9.1f}")
    return 0
