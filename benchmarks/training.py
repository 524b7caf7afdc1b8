"""Training-step benchmark: every method at its default against the unreduced model, same run.

    python benchmarks/training.py                          # DeiT-S, batch 16, fp32, every method
    python benchmarks/training.py --methods tome idle --batch-size 64 --device cuda   # fp16 AMP on CUDA

One step is forward in training mode, cross-entropy plus the method's own loss terms, backward and
an AdamW step. All models are timed in one process with warm-up and interleaved repetitions; the
table shows median img/s and the speed-up over the unreduced model.

Learned keep decisions (DynamicViT, dTPS) are timed at their keep rates: the method's
``keep_at_rates()`` sets each score predictor's last bias so that it keeps its stage's rate of the
tokens still alive (0.7 of them at rho = 0.7: 0.7, 0.49, 0.34 of the patches), as a predictor does once
the ratio loss has pulled it there. A freshly initialised predictor keeps about half of them at every
stage (0.5, 0.25, 0.13), which is cheaper than the training it stands for; ``--untrained-predictors``
times that instead. A line after the table gives the mean fraction of patch tokens alive at each
stage, measured on one batch in training mode.
"""
import argparse
import copy
import sys

import timm
import torch

import vitrim
from vitrim.cli.measure import training_loss
from vitrim.measure.bench import benchmark_training
from vitrim.ops.prune import prune_records


def alive_fractions(model, images) -> list[float]:
    """Mean fraction of patch tokens alive after each pruning stage of one training-mode forward."""
    model.train()
    with torch.no_grad():
        _, state = model.forward_tokens(images)
    return [float(r.keep.float().mean()) for r in prune_records(state) if r.keep is not None]


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
    p.add_argument("--untrained-predictors", action="store_true",
                   help="time learned keep decisions as initialised (about half kept per stage), not at their rates")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    base = timm.create_model(args.model, pretrained=False)
    models = {args.model: base}
    alive_by_label: dict[str, str] = {}
    probe = torch.randn(args.batch_size, 3, *base.default_cfg["input_size"][1:],
                        generator=torch.Generator().manual_seed(0))
    for name in args.methods:
        reduced = vitrim.apply(copy.deepcopy(base), name)
        m = vitrim.get_method(reduced)
        label = f"{name} {m.strength}={m.options()[m.strength]}"
        if not args.untrained_predictors:
            m.keep_at_rates()  # learned decisions: as trained ones keep (ReductionMethod.keep_at_rates)
        alive = alive_fractions(reduced, probe)
        if alive:
            alive_by_label[label] = "/".join(f"{a:.2f}" for a in alive)
        models[label] = reduced
    models = {k: v.to(device) for k, v in models.items()}
    gm = {k: vitrim.flops(v) for k, v in models.items()}
    res = benchmark_training(models, batch_size=args.batch_size, num_classes=base.num_classes, device=device,
                             precision=precision, warmup=args.warmup, repeats=args.repeats, iters=args.iters,
                             gmacs=gm, loss_fns={k: training_loss for k in models},
                             progress=lambda s: print(s, file=sys.stderr))
    print(res.to_json() if args.json else res.table())
    if alive_by_label and not args.json:
        print("patch tokens alive per stage (training form, mean over the batch): "
              + ", ".join(f"{k}: {v}" for k, v in alive_by_label.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
