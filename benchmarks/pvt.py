"""IdleViT on PVT-v2: per-stage and per-block speed of the idle blocks against timm's, and the whole model.

    python benchmarks/pvt.py                                # pvt_v2_b1, keep 0.5 (stages 2-4), batch 32, fp32
    python benchmarks/pvt.py --threads 2 --repeats 7
    python benchmarks/pvt.py --profile 1                    # torch.profiler of stage 2's blocks (0-based 1),
                                                            # and the bound their compute kernels set

Inputs: the stage input maps (and every block's input) captured from timm's own model on the same
images, so timm's blocks and the idle blocks (the installed method's ``block_forward``, bound as the
adapter binds them) see the same tensors. Each entry is timed with
``vitrim.measure.bench._time_interleaved`` (warm-up, then repetitions with every entry in turn),
medians. Per block and per stage: measured speed-up against the block's own FLOPs ratio (analytic
MACs of ``vitrim.flops_report``, unreduced / reduced). Whole model: ``vitrim.measure.bench.benchmark``
in the same run, with the speed-up the block figures predict, ``T / (T_other + T_idle / ratio)``
(``T_idle``: timm's time in the idle stages' blocks; ``ratio``: their FLOPs ratio).
Weights are random (timm architecture only): speed does not depend on them.

The allocator decides much of the comparison on this CPU (glibc malloc). A tensor larger than
glibc's largest mmap threshold (32 MiB) is a fresh ``mmap`` each time, and every 4 KiB page of it
faults when first written: at batch 32 that is every ``[B, N, hidden]`` map of stages 1-2 (stage 2:
784 tokens x 1024 channels = 103 MB), which timm's blocks allocate several of (fc1, conv and GELU
outputs). ``--faults`` adds each entry's minor page faults (one call, ``getrusage``); to time without
them, let glibc keep and reuse freed memory:

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmarks/pvt.py --threads 1 --faults

Measured (``--threads 2 --no-whole --repeats 7 --faults``, 2-core shared AMD EPYC, torch 2.14; ms,
speed-up against the FLOPs ratio; faults per call, timm / idle):

    stage (blocks)     glibc default                              no mmap, no trim
    1 (full)           timm 882 (351k faults)                     timm 258 (0)
    2 (blocks 2, 3)    330 / 124 = 2.67x vs 1.85x (154k / 8k)     194 / 116 = 1.67x vs 1.85x (0 / 0)
    3 (blocks 4, 5)    191 / 93 = 2.06x vs 1.76x (48k / 3k)       147 / 89 = 1.65x vs 1.76x (0 / 0)
    4 (blocks 6, 7)    95 / 59 = 1.62x vs 1.73x (0 / 0)           94 / 58 = 1.61x vs 1.73x (0 / 0)
    stages 2-4         2.24x vs 1.78x                             1.65x vs 1.78x

The idle MLP (``vitrim.ops.idle.pvt_mlp``) allocates no ``[B, N, hidden]`` map: it works in chunks of
whole samples (about 4 MiB of hidden features) and runs the depthwise conv on small zero maps of a few
samples (``conv_at_rows``), while timm's blocks fault by an amount that depends on the process's
allocation history (glibc raises its mmap threshold after freeing a large block, up to 32 MiB).
Compare both settings before reading a speed-up.
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics

import timm
import torch

import vitrim
from vitrim.adapters.base import BoundBlock
from vitrim.adapters.pvt import PyramidState
from vitrim.measure.bench import _time_interleaved, benchmark


def stage_inputs(model, x):
    """``[(stage input [B, N, C], (H, W), [block inputs])]`` from timm's own forward."""
    out = []
    with torch.inference_mode():
        h = model.patch_embed(x)
        for stage in model.stages:
            if stage.downsample is not None:
                h = stage.downsample(h)
            B, H, W, C = h.shape
            t = h.reshape(B, H * W, C)
            ins = []
            for block in stage.blocks:
                ins.append(t)
                t = block(t, (H, W))
            out.append((ins[0], (H, W), ins))
            h = stage.norm(t).reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
    return out


def runners(reduced, stage_index: int, first: int, feat):
    """Closures: timm's block ``j`` / the idle block ``j`` on an input, and both stage chains."""
    stage = reduced.stages[stage_index]
    method = reduced.vitrim
    H, W = feat
    bound = [BoundBlock(b, ((H, W),), feat_size=(H, W)) for b in stage.blocks]

    def state():
        return PyramidState(num_prefix_tokens=0, num_patches=H * W, feat_size=(H, W), stage=stage_index)

    def timm_block(j, x):
        return stage.blocks[j](x, (H, W))

    def idle_block(j, x):
        return method.block_forward(bound[j], first + j, x, state())[0]

    def timm_stage(x):
        for block in stage.blocks:
            x = block(x, (H, W))
        return x

    def idle_stage(x):
        st = state()
        for j, b in enumerate(bound):
            x, st = method.block_forward(b, first + j, x, st)
        return x

    return timm_block, idle_block, timm_stage, idle_stage


def median(v):
    return statistics.median(v)


def minor_faults(calls) -> dict:
    """Minor page faults of one more call of each entry (``getrusage``: memory touched for the first time)."""
    out = {}
    for name, call in calls.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        call()
        out[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return out


# kernels whose work the FLOPs count (GEMMs, attention, convolutions) and the MLP's activation
_COMPUTE_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                "aten::mkldnn_convolution", "aten::gelu")


def profile_stage(reduced, stage_index: int, first: int, feat, x, rows: int) -> None:
    """torch.profiler tables of timm's and the idle stage's blocks, then a bound: timm's time over the
    idle blocks' compute kernels alone (everything else free) is the most the idle stage could reach."""
    from torch.profiler import ProfilerActivity, profile
    _, _, timm_stage, idle_stage = runners(reduced, stage_index, first, feat)
    totals = {}
    with torch.inference_mode():
        for name, fn in (("timm", timm_stage), ("idle", idle_stage)):
            fn(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fn(x)
            print(f"--- stage {stage_index + 1} blocks, {name} (3 calls)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
            events = prof.key_averages()
            totals[name] = (sum(e.self_cpu_time_total for e in events) / 1000,
                            sum(e.self_cpu_time_total for e in events if e.key in _COMPUTE_OPS) / 1000)
    (t_all, t_compute), (i_all, i_compute) = totals["timm"], totals["idle"]
    print(f"stage {stage_index + 1}, 3 calls: timm {t_all:.1f} ms ({t_compute:.1f} in GEMMs, attention, convs and GELU); "
          f"idle {i_all:.1f} ms ({i_compute:.1f} in them): {t_all / i_all:.2f}x measured, at most "
          f"{t_all / i_compute:.2f}x with all other idle work (norms, adds, selection, gathers, scatter) free")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pvt_v2_b1")
    p.add_argument("--keep-rate", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-blocks", action="store_true", help="per-stage figures only (no per-block rows)")
    p.add_argument("--no-whole", action="store_true", help="blocks and stages only")
    p.add_argument("--faults", action="store_true", help="also the minor page faults of one call of each entry")
    p.add_argument("--profile", type=int, metavar="STAGE", help="torch.profiler on this stage's blocks (0-based), then exit")
    p.add_argument("--profile-rows", type=int, default=25)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    red = vitrim.apply(copy.deepcopy(base), "idle", keep_rate=args.keep_rate).eval()
    plan_b, plan_r = vitrim.flops_report(base).layers, vitrim.flops_report(red).layers
    images = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    inputs = stage_inputs(base, images)
    starts = [0]
    for stage in base.stages:
        starts.append(starts[-1] + len(stage.blocks))
    if args.profile is not None:
        s = args.profile
        profile_stage(red, s, starts[s], inputs[s][1], inputs[s][0], args.profile_rows)
        return 0

    calls, rows = {}, []   # rows: (label, timm key, idle key, block indices)
    for s, (x0, feat, ins) in enumerate(inputs):
        t_block, i_block, t_stage, i_stage = runners(red, s, starts[s], feat)
        idx = list(range(starts[s], starts[s + 1]))
        if not any(i in red.vitrim.layers for i in idx):
            calls[f"s{s}"] = lambda t=t_stage, x=x0: t(x)
            rows.append((f"stage {s + 1}", f"s{s}", None, idx))
            continue
        if not args.no_blocks:
            for j, xj in enumerate(ins):
                calls[f"s{s}b{j} timm"] = lambda j=j, x=xj, f=t_block: f(j, x)
                calls[f"s{s}b{j} idle"] = lambda j=j, x=xj, f=i_block: f(j, x)
                rows.append((f"  block {idx[j]}", f"s{s}b{j} timm", f"s{s}b{j} idle", [idx[j]]))
        calls[f"s{s} timm"] = lambda t=t_stage, x=x0: t(x)
        calls[f"s{s} idle"] = lambda t=i_stage, x=x0: t(x)
        rows.append((f"stage {s + 1}", f"s{s} timm", f"s{s} idle", idx))
    with torch.inference_mode():
        samples = _time_interleaved(calls, torch.device("cpu"), args.warmup, args.repeats, args.iters, None)
        faults = minor_faults(calls) if args.faults else {}
    med = {k: median(v) / args.iters for k, v in samples.items()}

    print(f"{args.model}, idle keep {args.keep_rate}, batch {args.batch_size}, fp32, cpu, "
          f"{torch.get_num_threads()} threads, {args.repeats} reps x {args.iters} after {args.warmup} warm-up, medians")
    print(f"{'':<10} {'timm ms':>9} {'idle ms':>9} {'speed-up':>9} {'FLOPs ratio':>12} {'at ratio':>9}"
          + (f" {'timm faults':>12} {'idle faults':>12}" if faults else ""))
    t_idle_timm = t_idle_red = 0.0
    idle_macs_b = idle_macs_r = 0
    for label, tk, ik, idx in rows:
        mb = sum(plan_b[i].macs for i in idx)
        mr = sum(plan_r[i].macs for i in idx)
        if ik is None:
            tail = f" {'':>32} {faults[tk]:>12}" if faults else ""
            print(f"{label:<10} {1000 * med[tk]:>9.1f} {'(full)':>9}{tail}")
            continue
        sp, fr = med[tk] / med[ik], mb / mr
        print(f"{label:<10} {1000 * med[tk]:>9.1f} {1000 * med[ik]:>9.1f} {sp:>8.2f}x {fr:>11.2f}x "
              f"{'yes' if sp >= fr else 'NO':>9}" + (f" {faults[tk]:>12} {faults[ik]:>12}" if faults else ""))
        if label.startswith("stage"):
            t_idle_timm += med[tk]
            t_idle_red += med[ik]
            idle_macs_b += mb
            idle_macs_r += mr
    ratio = idle_macs_b / idle_macs_r if idle_macs_r else 1.0
    if t_idle_red:
        print(f"idle stages' blocks: {t_idle_timm / t_idle_red:.2f}x vs their FLOPs ratio {ratio:.2f}x")
    if args.no_whole:
        return 0
    g_b, g_r = vitrim.flops(base), vitrim.flops(red)
    result = benchmark({"timm": base, "idle": red}, batch_size=args.batch_size, device="cpu", precision="fp32",
                       warmup=args.warmup, repeats=args.repeats, iters=args.iters,
                       gmacs={"timm": g_b, "idle": g_r})
    print(result.table())
    speed = {t.name: t for t in result.timings}
    T = speed["timm"].ms_per_batch / 1000
    whole = speed["idle"].speedup
    predicted = T / ((T - t_idle_timm) + t_idle_timm / ratio)
    measured = T / ((T - t_idle_timm) + t_idle_red)
    print(f"whole model {whole:.2f}x; FLOPs ratio {g_b / g_r:.2f}x; predicted by the blocks at their FLOPs ratio "
          f"T/(T_other + T_idle/{ratio:.2f}) = {predicted:.2f}x, at the measured block speeds {measured:.2f}x "
          f"(T = {1000 * T:.0f} ms, T_idle = {1000 * t_idle_timm:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
