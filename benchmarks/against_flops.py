"""Shared by the model-family benchmarks: reduce one model several ways, time all of them in the same run
and check each speed-up against its FLOPs ratio.

A family benchmark (``lvvit.py``, ``rope.py``, ``video.py``) names its model and its settings and calls
:func:`run`; everything else (arguments, timing, the table, the exit code) is here.
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable

import torch
from torch import nn

import vitrim
from vitrim.adapters import get_adapter, resolve_img_size
from vitrim.measure.bench import benchmark

Settings = dict[str, tuple[str, dict]]  # label -> (method, options)


def parser(description: str, model: str, batch_size: int = 32, repeats: int = 5) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=model)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed repetitions, median reported (default: {repeats})")
    p.add_argument("--iters", type=int, default=1, help="forwards per model per repetition (default: 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    return p


def run(args: argparse.Namespace, build: Callable[[str], nn.Module], settings: Settings) -> int:
    """Time ``build(args.model)`` and one reduced copy per setting; 0 if every speed-up >= its FLOPs ratio.

    The input is one sample of the model's own shape (its adapter's ``input_shape``: an image, a clip, a
    spectrogram), at the model's native size.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build(args.model).eval().to(args.device)
    input_size = get_adapter(base).input_shape(resolve_img_size(base, None))
    models = {args.model: base}
    gmacs = {args.model: vitrim.flops(base)}
    for label, (method, options) in settings.items():
        models[label] = vitrim.apply(copy.deepcopy(base), method, **options).eval()
        gmacs[label] = vitrim.flops(models[label])

    result = benchmark(models, batch_size=args.batch_size, input_size=input_size, device=args.device,
                       precision=args.precision, warmup=args.warmup, repeats=args.repeats, iters=args.iters,
                       gmacs=gmacs, progress=lambda s: print(s, flush=True))
    print(result.table())
    print()
    print(f"{'model':<36} {'GMACs':>8} {'FLOPs ratio':>11} {'speed-up':>9}  check")
    ok = True
    for t in result.timings:
        ratio = gmacs[args.model] / gmacs[t.name]
        passed = t.speedup >= ratio
        ok &= passed or t.name == args.model
        print(f"{t.name:<36} {gmacs[t.name]:>8.3f} {ratio:>10.2f}x {t.speedup:>8.2f}x  "
              + ("" if t.name == args.model else ("ok" if passed else "below FLOPs ratio")))
    print(f"\ntorch {result.env['torch']}, timm {result.env['timm']}, threads {result.env['threads']}, "
          f"sdpa {'on' if result.env['fused_attn'] else 'off'}")
    return 0 if ok else 1
