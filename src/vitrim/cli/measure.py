"""``vitrim bench`` and ``vitrim flops``."""
from __future__ import annotations

import argparse
import functools
import json
import sys
import types
from typing import Any

import torch

from .. import api
from ..api import flops, flops_report, traced_flops
from ..checks import non_negative_int, positive_int
from ..measure.bench import benchmark, benchmark_training, output_logits
from ..progress import Progress
from .common import add_model_args, build_models, device_of, input_shape, label

__all__ = ["add_measure_parsers", "cmd_bench", "cmd_flops", "training_loss"]


def add_measure_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput of a reduced model vs the unreduced one, same run",
                       description="Median images/s of the unreduced model and the reduced one, measured side by "
                                   "side (warm-up, interleaved repetitions), and the speed-up ratio.")
    add_model_args(p)
    p.add_argument("--batch-size", type=int, nargs="+", default=[32], help="one or more batch sizes (default: 32)")
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="fp32 and/or autocast bf16/fp16 (default: fp32; with --train on CUDA: fp16, AMP)")
    p.add_argument("--train", action="store_true",
                   help="time the training step (forward in training mode, cross-entropy plus the method's own "
                        "loss terms, backward, AdamW step) instead of inference")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards (or steps) per model (default: 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; the median is reported (default: 5)")
    p.add_argument("--iters", type=int, default=3, help="forwards per repetition (default: 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models first")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("flops", help="per-layer token counts and analytic GMACs",
                       description="Analytic GMACs in the papers' convention (MACs, batch 1), per block.")
    add_model_args(p)
    p.add_argument("--traced", action="store_true", help="also count with torch's FlopCounterMode")
    p.add_argument("--convention", choices=["protocol", "paper"], default="protocol",
                   help="protocol (default): vitrim's analytic count; paper: also the model family's own "
                        "publication convention where it has one (LV-ViT; inferred)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)


def cmd_bench(args: argparse.Namespace) -> int:
    device = device_of(args.device)  # every input checked before a model is built
    for flag, values in (("--batch-size", args.batch_size), ("--repeats", [args.repeats]), ("--iters", [args.iters])):
        for v in values:
            positive_int(v, flag)
    non_negative_int(args.warmup, "--warmup")
    base, reduced, options = build_models(args)
    models = {args.model: base.to(device)}
    gm = {args.model: flops(base, args.img_size)}
    if reduced is not None:
        name = label(args.method, options)
        if args.train and not args.method_weights_loaded and api.get_method(reduced).keep_at_rates():
            print(f"note: {args.method}'s untrained keep decisions were set to keep its rates, as trained ones do "
                  f"(a fresh predictor keeps about half); docs/training.md, 'Learned keep decisions'",
                  file=sys.stderr)
        models[name] = reduced.to(device)
        gm[name] = flops(reduced, args.img_size)
    sample = input_shape(base, args.img_size)
    loss_fns = {name: training_loss for name in models}
    if args.train:
        num_classes = _check_classifier(base, sample, device)
        if args.compile:  # the whole loss (forward, head, method terms) compiled; optimiser and backward eager
            loss_fns = {name: _compiled_loss(m) for name, m in models.items()}
    elif args.compile:
        models = {k: torch.compile(v) for k, v in models.items()}
    precisions = args.precision or (["fp16"] if args.train and device.type == "cuda" else ["fp32"])
    results = []
    total = len(args.batch_size) * len(precisions) * args.repeats
    with Progress(total=total, desc="bench", enabled=not args.json, every=10.0) as bar:
        for precision in precisions:
            for bs in args.batch_size:
                bar.set_postfix_str(f"batch {bs}, {precision}")
                common = dict(batch_size=bs, input_size=sample, device=device, precision=precision,
                              warmup=args.warmup, repeats=args.repeats, iters=args.iters, compiled=args.compile,
                              gmacs=gm, progress=lambda _: bar.update(1))
                if args.train:
                    res = benchmark_training(models, num_classes=num_classes, loss_fns=loss_fns, **common)
                else:
                    res = benchmark(models, **common)
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


def _check_classifier(base: torch.nn.Module, sample: tuple[int, ...], device: torch.device) -> int:
    """The number of classes a training step's targets are drawn from; refuses a model without class
    logits (one forward of one sample, before any timing)."""
    from ..train.data import model_classes

    was_training = base.training
    with torch.no_grad():
        output_logits(base.eval()(torch.zeros(1, *sample, device=device)))
    base.train(was_training)
    n, _ = model_classes(base)
    return max(1, int(n or 1))


def _compiled_loss(model: torch.nn.Module):
    """:func:`training_loss` of ``model`` as one function compiled by ``torch.compile`` (``LossFn`` signature)."""
    compiled = torch.compile(functools.partial(training_loss, model))
    return lambda _model, images, targets: compiled(images, targets)


def training_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus, for a reduced model, its method's own loss terms with the method's weights
    (keep-ratio loss, token cut loss ...; the terms that need a teacher are left out, as is the teacher)."""
    from ..api import get_method, is_reduced

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: the reduced model's own methods
    if not is_reduced(model):
        logits = model(images)
        terms: dict[str, torch.Tensor] = {}
    else:
        method = get_method(model)
        tokens, state = model.forward_tokens(images)
        logits = model.forward_head_with_state(tokens, state)
        terms = method.loss_terms(state, tokens, None, dict(method.loss_weights), types.SimpleNamespace())
    loss = torch.nn.functional.cross_entropy(output_logits(logits), targets)  # HF outputs, distilled pairs
    return loss + sum(terms.values()) if terms else loss


def cmd_flops(args: argparse.Namespace) -> int:
    base, reduced, _ = build_models(args)
    model = reduced if reduced is not None else base
    size = args.img_size
    report = flops_report(model, size)
    out: dict[str, Any] = {"reduced": report.to_dict(), "unreduced_gmacs": flops(base, size)}
    if args.convention == "paper":
        from ..adapters import get_adapter, resolve_img_size
        hw = resolve_img_size(model, size)
        method = getattr(model, "vitrim", None)
        out["paper_gmacs"] = get_adapter(model).paper_gmacs(hw, method)
        out["unreduced_paper_gmacs"] = get_adapter(base).paper_gmacs(hw)
    if args.traced:
        g, detail = traced_flops(model, size, detail=True)
        out["traced_gmacs"], out["traced_detail"] = g, detail
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(report.table())
    print(f"unreduced {out['unreduced_gmacs']:.3f} GMACs  ratio {out['unreduced_gmacs'] / report.gmacs:.2f}x")
    if "paper_gmacs" in out:
        print(f"paper convention [inferred] {out['paper_gmacs']:.3f} GMACs (unreduced {out['unreduced_paper_gmacs']:.3f}; "
              f"no heads, no predictors: the published DynamicViT figures exclude them)")
    if args.traced:
        print(f"traced (FlopCounterMode / 2) {out['traced_gmacs']:.3f} GMACs"
              + ("  [SDPA not counted by this torch: re-counted with explicit attention]"
                 if out["traced_detail"]["explicit_attention_fallback"] else ""))
    return 0
