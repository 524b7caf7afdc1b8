"""``vitrim`` command line: ``bench``, ``flops``, ``methods``.

Method options are given as ``--<option> VALUE`` with Python literal values, e.g.
``--method tome --r 13``, ``--r "(16, -1)"``, ``--r "[25, 25, 25]"``, ``--prop-attn False``.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
from typing import Any, Optional, Sequence

import torch

from . import api
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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default: {DEFAULT_MODEL})")
    g.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the hub or its cache)")
    g.add_argument("--checkpoint", metavar="PATH", help="load a local state dict into the model")
    g.add_argument("--img-size", type=int, help="input resolution (default: the model's own)")
    g.add_argument("--method", default="tome", help=f"reduction method: {', '.join(method_names())}, or 'none'")
    o = p.add_argument_group("method options (Python literals)")
    for name in _all_option_names():
        o.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", type=_literal, metavar="VALUE")


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    if args.method in ("none", ""):
        if given:
            raise VitrimError(f"options {', '.join(given)} given without a method")
        return {}
    cls = get_method_class(args.method)
    accepted = cls.option_names()
    wrong = sorted(set(given) - set(accepted))
    if wrong:
        raise VitrimError(f"option(s) {', '.join('--' + w.replace('_', '-') for w in wrong)} do not apply to "
                          f"method {cls.name!r}; accepted: {', '.join('--' + a.replace('_', '-') for a in accepted)}")
    return {**DEFAULT_METHOD_OPTIONS.get(cls.name, {}), **given}


def _build(args: argparse.Namespace):
    from .models import create_model

    base = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, img_size=args.img_size)
    base.eval()
    options = _method_options(args)
    reduced = None
    if args.method not in ("none", ""):
        reduced = api.apply(copy.deepcopy(base), args.method, **options)
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
    img = args.img_size or base.patch_embed.img_size[0]
    results = []
    total = len(args.batch_size) * len(args.precision) * args.repeats
    with tqdm(total=total, desc="bench", disable=args.json or not sys.stderr.isatty(), file=sys.stderr) as bar:
        for precision in args.precision:
            for bs in args.batch_size:
                bar.set_postfix(batch=bs, precision=precision)
                res = benchmark(models, batch_size=bs, input_size=(3, img, img), device=device, precision=precision,
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VitrimError as err:
        print(f"vitrim: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"vitrim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
