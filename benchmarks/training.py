"""Training-step benchmark: every method at its default against the unreduced model, same run.

    python benchmarks/training.py                          # DeiT-S, batch 16, fp32, every method
    python benchmarks/training.py --methods tome idle --batch-size 64 --device cuda   # fp16 AMP on CUDA

One step is forward in training mode, cross-entropy plus the method's own loss terms, backward and
an AdamW step. All models are timed in one process with warm-up and interleaved repetitions; the
table shows median img/s and the speed-up over the unreduced model.
"""
import argparse
import copy
import sys

import timm
import torch

import vitrim
from vitrim.cli.measure import training_loss
from vitrim.measure.bench import benchmark_training


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--methods", nargs="+", default=["tome", "evit", "dynamicvit", "etps", "dtps", "idle"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: fp32 on the CPU, fp16 (AMP) on CUDA")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    base = timm.create_model(args.model, pretrained=False)
    models = {args.model: base}
    for name in args.methods:
        reduced = vitrim.apply(copy.deepcopy(base), name)
        m = vitrim.get_method(reduced)
        models[f"{name} {m.strength}={m.options()[m.strength]}"] = reduced
    models = {k: v.to(device) for k, v in models.items()}
    gm = {k: vitrim.flops(v) for k, v in models.items()}
    res = benchmark_training(models, batch_size=args.batch_size, num_classes=base.num_classes, device=device,
                             precision=precision, warmup=args.warmup, repeats=args.repeats, iters=args.iters,
                             gmacs=gm, loss_fns={k: training_loss for k in models},
                             progress=lambda s: print(s, file=sys.stderr))
    print(res.to_json() if args.json else res.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
