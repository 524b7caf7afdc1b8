"""IdleViT throughput against the unreduced timm model, measured side by side.

    python benchmarks/idle.py                        # DeiT-S: baseline, idle 0.7, idle 0.5 (+ evit 0.5), batch 32, fp32
    python benchmarks/idle.py --pyramid              # PVT-v2 b1 at 224: baseline, idle 0.7, idle 0.5
    python benchmarks/idle.py --device cuda --batch-size 256

One call to ``vitrim.measure.bench.benchmark`` per model family: the same input, warm-up,
interleaved repetitions, median images/s. Prints GMACs (analytic, the papers' convention), the
MACs the forward actually executes (``vitrim.traced_flops``: lower for idle on models without
qk-norm, whose ranking needs no per-token keys), both ratios and the measured speed-up. The issue's
checks (DeiT-S): idle 0.7 speed-up >= its FLOPs ratio (both counts), and idle 0.5 at least as fast
as EViT 0.5 in the same run (when EViT is available).
Weights are random (timm architecture only): speed and FLOPs do not depend on them.
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch

import vitrim
from vitrim.measure.bench import benchmark


def build(model_name: str, rates: list[float], with_evit: bool, layers) -> tuple[dict, dict]:
    torch.manual_seed(0)
    base = timm.create_model(model_name).eval()
    models = {model_name: base}
    for r in rates:
        opts = {"keep_rate": r} if layers is None else {"keep_rate": r, "layers": layers}
        models[f"idle keep={r}" + ("" if layers is None else f" layers={list(layers)}")] = \
            vitrim.apply(copy.deepcopy(base), "idle", **opts).eval()
    if with_evit:
        models["evit keep=0.5"] = vitrim.apply(copy.deepcopy(base), "evit", keep_rate=0.5).eval()
    return models, {name: vitrim.flops(m) for name, m in models.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pyramid", action="store_true", help="PVT-v2 instead of DeiT-S")
    p.add_argument("--model", help="timm model (default: deit_small_patch16_224, or pvt_v2_b1 with --pyramid)")
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--layers", type=int, nargs="+", help="idle blocks (default: the method's rule)")
    p.add_argument("--no-evit", action="store_true", help="leave EViT 0.5 out of the DeiT run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model or ("pvt_v2_b1" if args.pyramid else "deit_small_patch16_224")
    with_evit = not args.pyramid and not args.no_evit and "evit" in vitrim.methods()
    models, gmacs = build(name, args.keep_rates, with_evit, args.layers)
    executed = {k: vitrim.traced_flops(m) for k, m in models.items()}
    models = {k: m.to(args.device) for k, m in models.items()}

    result = benchmark(models, batch_size=args.batch_size, device=args.device, precision=args.precision,
                       warmup=args.warmup, repeats=args.repeats, iters=args.iters, gmacs=gmacs)
    print(result.table())
    print()
    print(f"{'model':<36} {'GMACs':>7} {'FLOPs ratio':>11} {'executed':>9} {'ratio':>6} {'speed-up':>9}")
    for t in result.timings:
        print(f"{t.name:<36} {t.gmacs:>7.3f} {gmacs[name] / t.gmacs:>10.2f}x {executed[t.name]:>9.3f} "
              f"{executed[name] / executed[t.name]:>5.2f}x {t.speedup:>8.2f}x")
    speed = {t.name: t for t in result.timings}
    if not args.pyramid and 0.7 in args.keep_rates and args.layers is None:
        t = speed["idle keep=0.7"]
        ratio = max(gmacs[name] / t.gmacs, executed[name] / executed["idle keep=0.7"])
        print(f"\ncheck: idle 0.7 speed-up {t.speedup:.2f}x >= FLOPs ratio {ratio:.2f}x (larger of the two counts): "
              f"{'PASS' if t.speedup >= ratio else 'FAIL'}")
    if with_evit and 0.5 in args.keep_rates and args.layers is None:
        idle, evit = speed["idle keep=0.5"], speed["evit keep=0.5"]
        print(f"check: idle 0.5 {idle.img_per_s:.1f} img/s >= evit 0.5 {evit.img_per_s:.1f} img/s: "
              f"{'PASS' if idle.img_per_s >= evit.img_per_s else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
