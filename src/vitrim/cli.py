"""``vitrim`` command line: ``compare``, ``bench``, ``flops``, ``train``, ``eval``, ``visualize``, ``export``,
``data``, ``methods``, ``recipes``.

Method options are given as ``--<option> VALUE`` with Python literal values, e.g.
``--method tome --r 13``, ``--r "(16, -1)"``, ``--r "[25, 25, 25]"``, ``--prop-attn False``.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import sys
from typing import Any, Optional, Sequence

import torch

from . import api
from .adapters import get_adapter
from .errors import VitrimError
from .measure.flops import flops, flops_report, traced_flops
from .methods.base import get_method_class, method_names

DEFAULT_MODEL = "deit_small_patch16_224"
DEFAULT_METHOD_OPTIONS = {"tome": {"r": 13}}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def _all_option_names() -> list[str]:
    names: set[str] = set()
    for m in method_names():
        names.update(get_method_class(m).option_names())
    return sorted(names)


def _add_model_args(p: argparse.ArgumentParser, default_model: Optional[str] = DEFAULT_MODEL,
                    default_method: Optional[str] = "tome") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model, help=f"timm model name (default: {default_model or 'the embedded model'})")
    g.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the hub or its cache)")
    g.add_argument("--checkpoint", metavar="PATH", help="load a local state dict into the model")
    g.add_argument("--img-size", type=int, help="input resolution (default: the model's own)")
    g.add_argument("--target-gmacs", type=float, metavar="G",
                   help="solve the method's strength (r or keep rate) for this GMACs budget (vitrim.solve)")
    g.add_argument("--method", default=default_method,
                   help=f"reduction method: {', '.join(method_names())}, or 'none' (default: {default_method})")
    o = p.add_argument_group("method options (Python literals)")
    for name in _all_option_names():
        o.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", type=_literal, metavar="VALUE")


def _method_options(args: argparse.Namespace, defaults: bool = True) -> dict[str, Any]:
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    if args.method in ("none", "", None):
        if given:
            raise VitrimError(f"options {', '.join(given)} given without a method")
        return {}
    cls = get_method_class(args.method)
    accepted = cls.option_names()
    wrong = sorted(set(given) - set(accepted))
    if wrong:
        raise VitrimError(f"option(s) {', '.join('--' + w.replace('_', '-') for w in wrong)} do not apply to "
                          f"method {cls.name!r}; accepted: {', '.join('--' + a.replace('_', '-') for a in accepted)}")
    if getattr(args, "target_gmacs", None) is not None:
        return {**given, "target_gmacs": args.target_gmacs}
    return {**(DEFAULT_METHOD_OPTIONS.get(cls.name, {}) if defaults else {}), **given}


def _build(args: argparse.Namespace):
    from .models import create_model, load_checkpoint, read_checkpoint, state_dict_of

    base = create_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
    base.eval()
    options = _method_options(args)
    reduced = None
    if args.method not in ("none", ""):
        reduced = api.apply(copy.deepcopy(base), args.method, **options)
    if args.checkpoint:
        # after apply, so a checkpoint of a reduced model (with vitrim.* predictor weights) loads too
        state = state_dict_of(read_checkpoint(args.checkpoint))
        if reduced is not None:
            load_checkpoint(reduced, state, path=args.checkpoint)
        load_checkpoint(base, state, ignore_prefix="vitrim.", path=args.checkpoint)
    if not (args.pretrained or args.checkpoint):
        print(f"note: {args.model} has random weights (no --pretrained/--checkpoint): "
              f"FLOPs and speed are valid, accuracy is not", file=sys.stderr)
    return base, reduced, options


def _label(method: str, options: dict) -> str:
    return f"{method} " + " ".join(f"{k}={v}" for k, v in options.items())


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .measure.bench import benchmark

    base, reduced, options = _build(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = {args.model: base.to(device)}
    gm = {args.model: flops(base, args.img_size)}
    if reduced is not None:
        name = _label(args.method, options).strip()
        models[name] = reduced.to(device)
        gm[name] = flops(reduced, args.img_size)
    if args.compile:
        models = {k: torch.compile(v) for k, v in models.items()}
    h, w = (args.img_size, args.img_size) if args.img_size else get_adapter(base).default_img_size()
    results = []
    total = len(args.batch_size) * len(args.precision) * args.repeats
    with tqdm(total=total, desc="bench", disable=args.json or not sys.stderr.isatty(), file=sys.stderr) as bar:
        for precision in args.precision:
            for bs in args.batch_size:
                bar.set_postfix(batch=bs, precision=precision)
                res = benchmark(models, batch_size=bs, input_size=(3, h, w), device=device, precision=precision,
                                warmup=args.warmup, repeats=args.repeats, iters=args.iters, compiled=args.compile,
                                gmacs=gm, progress=lambda _: bar.update(1))
                results.append(res)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            print(r.table())
            if len(r.timings) > 1:
                flops_ratio = r.timings[0].gmacs / r.timings[1].gmacs
                print(f"FLOPs ratio {flops_ratio:.2f}x, measured speed-up {r.timings[1].speedup:.2f}x\n")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    base, reduced, _ = _build(args)
    model = reduced if reduced is not None else base
    size = args.img_size
    report = flops_report(model, size)
    out: dict[str, Any] = {"reduced": report.to_dict(), "unreduced_gmacs": flops(base, size)}
    if args.traced:
        g, detail = traced_flops(model, size, detail=True)
        out["traced_gmacs"], out["traced_detail"] = g, detail
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(report.table())
    print(f"unreduced {out['unreduced_gmacs']:.3f} GMACs  ratio {out['unreduced_gmacs'] / report.gmacs:.2f}x")
    if args.traced:
        print(f"traced (FlopCounterMode / 2) {out['traced_gmacs']:.3f} GMACs"
              + ("  [SDPA not counted by this torch: re-counted with explicit attention]"
                 if out["traced_detail"]["explicit_attention_fallback"] else ""))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for name in method_names():
        cls = get_method_class(name)
        opts = ", ".join(f"{k}={v!r}" for k, v in cls.option_defaults().items())
        print(f"{name:<12} {opts}")
    return 0


RECIPE_FLAGS = ("epochs", "batch_size", "lr", "min_lr", "warmup_epochs", "weight_decay", "drop_path", "smoothing",
                "mixup", "cutmix", "kd_weight", "ratio_weight", "token_weight", "cut_weight", "feature_weight")


def _load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise VitrimError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise VitrimError(f"config file {path!r} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _merge_config(args: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """Values from ``--config FILE`` fill in every option not given on the command line."""
    data = _load_yaml(args.config)
    for k, v in (data.pop("method_options", None) or {}).items():
        data[f"opt_{k}"] = v
    unknown = sorted(k for k in data if k not in vars(args))
    if unknown:
        raise VitrimError(f"config {args.config!r}: unknown option(s) {', '.join(unknown)}")
    given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    for k, v in data.items():
        if k not in given and (k[4:] if k.startswith("opt_") else k) not in given:
            setattr(args, k, v)
    return args


def cmd_data(args: argparse.Namespace) -> int:
    from .train.data import build_digits, default_digits_root

    out = args.output or str(default_digits_root())
    root = build_digits(out, seed=args.seed)
    print(f"wrote the digits canvases (64x64, 10 classes) to {root}/train and {root}/val")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.data import ensure_digits
    from .train.engine import TrainConfig, train
    from .train.recipes import get_recipe
    from .zoo import EMBEDDED_MODEL

    embedded = args.model in (None, EMBEDDED_MODEL)
    model = args.model or EMBEDDED_MODEL
    data = args.data or str(ensure_digits())
    if args.recipe is None:
        if args.data is not None:
            raise VitrimError("choose a --recipe for your data (e.g. idlevit, evit, dynamicvit, dtps, etps, tome); "
                              "see `vitrim recipes`")
        args.recipe = "digits" if embedded and args.method in (None, "none") else "digits-finetune"
    recipe = get_recipe(args.recipe)
    overrides = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None}
    for item in args.set or []:
        if "=" not in item:
            raise VitrimError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.replace("-", "_")] = _literal(value)
    recipe = recipe.replace(**overrides)
    method = args.method or "none"
    args.method = method
    options = _method_options(args, defaults=False)
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
    from .models import create_model, load_checkpoint, read_checkpoint, state_dict_of
    from .train.data import ensure_digits, eval_transform, image_dataset, resolve_split, build_eval_loader
    from .train.evaluate import evaluate
    from .zoo import EMBEDDED_MODEL

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
    options = _method_options(args, defaults=False)
    data = args.data or str(ensure_digits())
    folder = resolve_split(data, "val")
    pretrained = args.pretrained or (model_name == EMBEDDED_MODEL and not args.checkpoint)
    extra = dict(saved.get("model_kwargs") or {})
    if saved.get("num_classes"):
        extra["num_classes"] = saved["num_classes"]
    base = create_model(model_name, pretrained=pretrained, img_size=args.img_size, **extra)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = {}
    if args.method not in ("none", ""):
        reduced = api.apply(copy.deepcopy(base), args.method, **options)
        if args.checkpoint:
            load_checkpoint(reduced, state, path=args.checkpoint)
            if not args.no_baseline and saved.get("method") not in (None, "none"):
                # the baseline of a fine-tuned reduced model is its own weights, unreduced
                load_checkpoint(base, state, ignore_prefix="vitrim.", path=args.checkpoint)
        if not args.no_baseline:
            models[f"{model_name} (unreduced)"] = base
        models[f"{model_name} + {_label(args.method, options).strip()}"] = reduced
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


def cmd_recipes(args: argparse.Namespace) -> int:
    from .train.recipes import RECIPES

    for name in sorted(RECIPES):
        print(f"{name:<16} {RECIPES[name].description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrim", description="Token reduction for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="throughput of a reduced model vs the unreduced one, same run",
                       description="Median images/s of the unreduced model and the reduced one, measured side by "
                                   "side (warm-up, interleaved repetitions), and the speed-up ratio.")
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[32], help="one or more batch sizes (default: 32)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                   help="fp32 and/or autocast bf16/fp16 (default: fp32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per model (default: 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; the median is reported (default: 5)")
    p.add_argument("--iters", type=int, default=3, help="forwards per repetition (default: 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models first")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("flops", help="per-layer token counts and analytic GMACs",
                       description="Analytic GMACs in the papers' convention (MACs, batch 1), per block.")
    _add_model_args(p)
    p.add_argument("--traced", action="store_true", help="also count with torch's FlopCounterMode")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("methods", help="list the available methods and their default options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("recipes", help="list the training recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("train", help="fine-tune a (reduced) model with the method's losses and distillation",
                       description="Train or fine-tune on an ImageFolder (train/ and val/). With no --model/--data: "
                                   "the embedded 12-block ViT on the bundled digits canvases. Several GPUs: "
                                   "torchrun --nproc_per_node N -m vitrim train ...")
    _add_model_args(p, default_model=None, default_method=None)
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (default: the embedded digits canvases)")
    p.add_argument("--recipe", help="named recipe preset (see `vitrim recipes`)")
    p.add_argument("--output", help="run folder for checkpoints and logs (default: runs/<model>-<method>)")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in PATH (its last.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output")
    p.add_argument("--config", metavar="YAML", help="options from a YAML file; command-line flags override it")
    p.add_argument("--num-classes", type=int, help="new classifier head with this many classes")
    p.add_argument("--model-kwargs", type=_literal, metavar="DICT",
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
    _add_model_args(p, default_model=None, default_method=None)
    p.add_argument("--data", help="ImageFolder root (or its val/ folder); default: the embedded digits canvases")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device")
    p.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--no-baseline", action="store_true", help="do not also evaluate the unreduced model")
    p.add_argument("--config", metavar="YAML", help="options from a YAML file; command-line flags override it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    from .compare import add_compare_parser
    from .export import add_export_parser
    from .visualize import add_visualize_parser

    add_compare_parser(sub)
    add_export_parser(sub)
    add_visualize_parser(sub)

    p = sub.add_parser("data", help="build the embedded digits dataset (ImageFolder) offline")
    p.add_argument("--output", help="folder (default: $VITRIM_HOME/digits64 or ~/.cache/vitrim/digits64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "config", None):
            args = _merge_config(args, argv)
        return args.func(args)
    except VitrimError as err:
        print(f"vitrim: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"vitrim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
