"""The pruning family side by side: EViT, DynamicViT, eTPS and dTPS against the unreduced model.

    python benchmarks/pruning.py                                  # DeiT-S, keep 0.7, (3, 6, 9), batch 32, fp32, CPU
    python benchmarks/pruning.py --keep-rate 0.5 --locations 2 4 6 8 --device cuda --batch-size 256

One call to ``vitrim.measure.bench.benchmark``: the same input, warm-up, interleaved repetitions,
median images/s. Prints GMACs (analytic, the papers' convention), the FLOPs ratio and the
measured speed-up of every method; the issue's check is speed-up >= FLOPs ratio for each.
Weights are random (timm architecture only): speed and FLOPs do not depend on them.
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch

import vitrim
from vitrim.measure.bench import benchmark

METHODS = ("evit", "dynamicvit", "etps", "dtps")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--locations", type=int, nargs="*", default=[3, 6, 9])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15, help="timed repetitions, median reported (default: 15)")
    p.add_argument("--iters", type=int, default=1,
                   help="forwards per model per repetition (default: 1: short, finely interleaved samples, so "
                        "a burst of load on a shared machine hits every model alike)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = timm.create_model(args.model).eval().to(args.device)
    models = {args.model: base}
    gmacs = {args.model: vitrim.flops(base)}
    for name in args.methods:
        label = f"{name} keep={args.keep_rate} loc={tuple(args.locations)}"
        models[label] = vitrim.apply(copy.deepcopy(base), name, keep_rate=args.keep_rate,
                                     locations=tuple(args.locations)).eval()
        gmacs[label] = vitrim.flops(models[label])

    result = benchmark(models, batch_size=args.batch_size, device=args.device, precision=args.precision,
                       warmup=args.warmup, repeats=args.repeats, iters=args.iters, gmacs=gmacs)
    print(result.table())
    print()
    print(f"{'model':<36} {'GMACs':>7} {'FLOPs ratio':>11} {'speed-up':>9}  check")
    ok = True
    for t in result.timings:
        ratio = gmacs[args.model] / t.gmacs
        passed = t.speedup >= ratio
        ok &= passed
        print(f"{t.name:<36} {t.gmacs:>7.3f} {ratio:>10.2f}x {t.speedup:>8.2f}x  "
              f"{'ok' if passed else 'SLOWER THAN FLOPs'}")
    print(f"\ntorch {result.env['torch']}, timm {result.env['timm']}, threads {result.env['threads']}, "
          f"sdpa {'on' if result.env['fused_attn'] else 'off'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
