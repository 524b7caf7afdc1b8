"""LV-ViT-S reduced by DynamicViT 0.7, dTPS (4, 8, 12) 0.5 and IdleViT 0.7 against the unreduced model.

    python benchmarks/lvvit.py                       # lvvit_s, batch 32, fp32, CPU
    python benchmarks/lvvit.py --device cuda --batch-size 256

One call to ``vitrim.measure.bench.benchmark``: the same input, warm-up, interleaved repetitions,
median images/s. Prints analytic GMACs (protocol convention), the FLOPs ratio and the measured
speed-up of each method; the check is speed-up >= FLOPs ratio. Weights are random (speed and FLOPs
do not depend on them).
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch

import vitrim
from vitrim.measure.bench import benchmark

SETTINGS = {  # the papers' LV-ViT-S settings (locations and idle layers are vitrim's depth-rule defaults)
    "dynamicvit keep=0.7": ("dynamicvit", {"keep_rate": 0.7}),
    "dtps keep=0.5 loc=(4, 8, 12)": ("dtps", {"keep_rate": 0.5, "locations": (4, 8, 12)}),
    "idle keep=0.7": ("idle", {"keep_rate": 0.7}),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lvvit_s")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions, median reported (default: 7)")
    p.add_argument("--iters", type=int, default=1, help="forwards per model per repetition (default: 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = timm.create_model(args.model).eval().to(args.device)
    models = {args.model: base}
    gmacs = {args.model: vitrim.flops(base)}
    for label, (method, options) in SETTINGS.items():
        models[label] = vitrim.apply(copy.deepcopy(base), method, **options).eval()
        gmacs[label] = vitrim.flops(models[label])

    result = benchmark(models, batch_size=args.batch_size, device=args.device, precision=args.precision,
                       warmup=args.warmup, repeats=args.repeats, iters=args.iters, gmacs=gmacs)
    print(result.table())
    print()
    print(f"{'model':<32} {'GMACs':>7} {'FLOPs ratio':>11} {'speed-up':>9}  check")
    ok = True
    base_gmacs = gmacs[args.model]
    for t in result.timings:
        ratio = base_gmacs / gmacs[t.name]
        passed = t.speedup >= ratio
        ok &= passed or t.name == args.model
        print(f"{t.name:<32} {gmacs[t.name]:>7.3f} {ratio:>10.2f}x {t.speedup:>8.2f}x  "
              + ("" if t.name == args.model else ("ok" if passed else "below FLOPs ratio")))
    print(f"\ntorch {result.env['torch']}, timm {result.env['timm']}, threads {result.env['threads']}, "
          f"sdpa {'on' if result.env['fused_attn'] else 'off'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
