"""IdleViT on Swin: per-stage block speed-ups and the whole model against timm's Swin, side by side.

    python benchmarks/swin.py                               # swin_tiny, keep 0.5 in stages 2-4, batch 32, fp32
    python benchmarks/swin.py --keep-rate 0.7 --threads 2

Per stage: the stage's blocks on the same input map (captured from timm's model on the same images),
timm's own blocks against the idle blocks (the installed method's ``block_forward``), interleaved
repetitions, medians. Whole model: ``vitrim.measure.bench.benchmark``, then whole forwards of both
models again, interleaved, with each stage's block time taken inside the same forwards (hooks on the
stages' downsample and the final norm). Prints the checks of the design (docs/methods/idlevit.md,
"Swin Transformer"): (a) the idle stages' blocks at least their FLOPs ratio faster (2.05x at keep 0.5)
on the same inputs, (b) the whole model at least ``T / (T_other + T_idle / ratio)``, with ``T``,
``T_idle`` (timm's time in the idle stages' blocks) and ``T_other`` from the same whole forwards, and
(c) the whole model against its FLOPs ratio.
Weights are random (timm architecture only): speed does not depend on them.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import vitrim
from vitrim.adapters.base import BoundBlock
from vitrim.adapters.pvt import PyramidState
from vitrim.measure.bench import benchmark


def stage_runner(model, stage_index: int, reduced, first_block: int):
    """Closures running stage ``stage_index``'s blocks (timm / idle) on a stage input map."""
    stage = model.layers[stage_index]
    method = reduced.vitrim

    def timm_blocks(x):
        return stage.blocks(x)

    def idle_blocks(x):
        B, H, W, _ = x.shape
        state = PyramidState(num_prefix_tokens=0, num_patches=H * W, feat_size=(H, W), stage=stage_index)
        from vitrim.adapters.swin import _idle_forms
        for j, block in enumerate(stage.blocks):
            bound = BoundBlock(block, (), idle_slots=block.window_area, idle_forms=_idle_forms(block))
            x, state = method.block_forward(bound, first_block + j, x, state)
        return x

    return timm_blocks, idle_blocks


def median_times(fns: dict, x, repeats: int) -> dict:
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)                                       # warm-up
        for _ in range(repeats):                        # interleaved
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def stage_clock(model) -> tuple[dict, list]:
    """Forward hooks that time each stage's blocks inside a whole-model forward (timm's or the idle one).

    Both forwards call every stage's ``downsample`` and the final ``norm`` as modules: stage ``s``'s blocks
    run from the end of its downsample to the start of the next downsample (or of the norm). Returns
    ``(marks, handles)``; after a forward, :func:`stage_times` reads the marks."""
    marks: dict = {}
    handles = []

    def at(key):
        return lambda *args: marks.__setitem__(key, time.perf_counter())

    for s, stage in enumerate(model.layers):
        handles.append(stage.downsample.register_forward_pre_hook(at(("start", s))))
        handles.append(stage.downsample.register_forward_hook(at(("blocks", s))))
    handles.append(model.norm.register_forward_pre_hook(at(("start", len(model.layers)))))
    return marks, handles


def stage_times(marks: dict, num_stages: int) -> list[float]:
    """Seconds of each stage's blocks in the last forward (see :func:`stage_clock`)."""
    return [marks[("start", s + 1)] - marks[("blocks", s)] for s in range(num_stages)]


def same_run_breakdown(base, red, x, repeats: int) -> dict:
    """Whole forwards of timm's model and the idle one, interleaved after one warm-up each, with the
    time of every stage's blocks taken inside the same forwards: medians of ``total`` and ``stages``."""
    clocks = {"timm": stage_clock(base), "idle": stage_clock(red)}
    runs = {"timm": [], "idle": []}
    try:
        with torch.inference_mode():
            for rep in range(repeats + 1):
                for name, model in (("timm", base), ("idle", red)):
                    t = time.perf_counter()
                    model(x)
                    total = time.perf_counter() - t
                    if rep:
                        runs[name].append((total, stage_times(clocks[name][0], len(base.layers))))
    finally:
        for _, handles in clocks.values():
            for h in handles:
                h.remove()
    out = {}
    for name, rows in runs.items():
        out[name] = {"total": statistics.median(r[0] for r in rows),
                     "stages": [statistics.median(r[1][s] for r in rows) for s in range(len(base.layers))]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="swin_tiny_patch4_window7_224")
    p.add_argument("--keep-rate", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-whole", action="store_true", help="per-stage blocks only")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    red = vitrim.apply(copy.deepcopy(base), "idle", keep_rate=args.keep_rate).eval()
    plan_b, plan_r = vitrim.flops_report(base).layers, vitrim.flops_report(red).layers
    x = torch.randn(args.batch_size, 3, 224, 224)

    print(f"{args.model}, keep {args.keep_rate}, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads")
    print(f"{'stage':<6} {'timm s':>8} {'idle s':>8} {'speed-up':>9} {'FLOPs ratio':>12}")
    t_idle_timm = t_idle_red = 0.0
    ratios, idle_stages = [], []
    with torch.inference_mode():
        h = base.patch_embed(x)
    start = 0
    for s, stage in enumerate(base.layers):
        with torch.inference_mode():
            h = stage.downsample(h)
        n = len(stage.blocks)
        idx = range(start, start + n)
        t_fn, i_fn = stage_runner(base, s, red, start)
        med = median_times({"timm": t_fn, "idle": i_fn}, h, args.repeats)
        ratio = sum(plan_b[i].macs for i in idx) / sum(plan_r[i].macs for i in idx)
        print(f"{s + 1:<6} {med['timm']:>8.3f} {med['idle']:>8.3f} {med['timm'] / med['idle']:>8.2f}x {ratio:>11.2f}x")
        if any(i in red.vitrim.layers for i in idx):
            t_idle_timm += med["timm"]
            t_idle_red += med["idle"]
            ratios.append(ratio)
            idle_stages.append(s)
        with torch.inference_mode():
            h = stage.blocks(h)
        start += n
    block_ratio = t_idle_timm / t_idle_red
    flops_blocks = min(ratios) if ratios else 1.0
    print(f"(a) idle stages' blocks: {block_ratio:.2f}x vs their FLOPs ratio (lowest stage) {flops_blocks:.2f}x: "
          f"{'PASS' if block_ratio >= flops_blocks else 'FAIL'}")
    if args.no_whole:
        return 0
    gmacs = {"timm": vitrim.flops(base), "idle": vitrim.flops(red)}
    result = benchmark({"timm": base, "idle": red}, batch_size=args.batch_size, device="cpu", precision="fp32",
                       warmup=1, repeats=args.repeats, iters=1, gmacs=gmacs)
    print(result.table())
    fr = gmacs["timm"] / gmacs["idle"]
    # (b) from one run: T, T_idle and T_other all come from the same whole forwards (stage times taken
    # inside them), so machine load cannot differ between the terms of the prediction
    br = same_run_breakdown(base, red, x, args.repeats)
    T = br["timm"]["total"]
    T_idle = sum(br["timm"]["stages"][s] for s in idle_stages)
    whole = T / br["idle"]["total"]
    print("same-run breakdown (whole forwards, medians), seconds:")
    print(f"{'':<14} {'total':>7} " + " ".join(f"{'stage ' + str(s + 1):>8}" for s in range(len(base.layers)))
          + f" {'other':>7}")
    for name in ("timm", "idle"):
        st = br[name]["stages"]
        print(f"{name:<14} {br[name]['total']:>7.3f} " + " ".join(f"{v:>8.3f}" for v in st)
              + f" {br[name]['total'] - sum(st):>7.3f}")
    print(f"{'speed-up':<14} {whole:>6.2f}x " + " ".join(
        f"{br['timm']['stages'][s] / br['idle']['stages'][s]:>7.2f}x" for s in range(len(base.layers))))
    predicted = T / ((T - T_idle) + T_idle / flops_blocks)
    print(f"(b) whole model {whole:.2f}x vs T/(T_other + T_idle/{flops_blocks:.2f}) = {predicted:.2f}x (idle stages "
          f"{T_idle / T:.0%} of timm's time, same run): {'PASS' if whole >= predicted else 'FAIL'}")
    print(f"(c) whole model {whole:.2f}x ({result.timings[1].speedup:.2f}x in the table above) vs FLOPs ratio "
          f"{fr:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
