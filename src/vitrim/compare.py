"""``vitrim compare``: every method at a sweep of strengths against the unreduced model, side by side.

For each row (the unreduced model, then each method at each strength): analytic GMACs (batch 1),
parameters, throughput at each batch size (median img/s, all models timed in the same
:func:`~vitrim.measure.bench.benchmark` run, the unreduced model first), batch-1 latency, and top-1
on the given data (off the shelf, or from a fine-tuned checkpoint per row). Writes ``results.csv``,
``results.md`` and two PNG plots (accuracy vs GMACs, accuracy vs throughput; Pareto front marked).
Every number in the outputs is measured in this run; no published number is ever shown.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .errors import VitrimError

__all__ = ["Row", "CompareResult", "default_sweep", "parse_sweep", "parse_checkpoints", "compare", "pareto_front",
           "markdown_table", "write_csv", "plot_results", "add_compare_parser", "cmd_compare"]

ALL_METHODS = ("tome", "evit", "etps", "dtps", "dynamicvit", "idle")
KEEP_RATES = (0.9, 0.7, 0.5)
TOME_FRACTIONS = (0.5, 0.8, 1.0)      # of r_max = num_patches // depth (DeiT-S: 8, 13, 16)
CACHE_BYTES = 1 << 30                 # evaluation images kept in memory below this size
METHOD_COLORS = {"none": "black", "tome": "tab:blue", "evit": "tab:orange", "etps": "tab:green",
                 "dtps": "tab:red", "dynamicvit": "tab:purple", "idle": "tab:brown"}


@dataclass
class Row:
    """One measured configuration."""

    method: str                       # "none" for the unreduced model
    options: dict
    weights: str                      # "off-the-shelf" or the checkpoint path
    gmacs: float
    params_m: float
    top1: Optional[float] = None
    top5: Optional[float] = None
    img_per_s: dict = field(default_factory=dict)   # batch size -> median img/s
    speedup: dict = field(default_factory=dict)     # batch size -> ratio to the unreduced model
    latency_ms: Optional[float] = None              # batch 1, median ms per image

    @property
    def setting(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items()) or "-"

    @property
    def name(self) -> str:
        return "unreduced" if self.method == "none" else f"{self.method} {self.setting}"


@dataclass
class CompareResult:
    rows: list[Row]
    batch_sizes: list[int]
    paths: dict                       # "csv", "md", "plot_gmacs", "plot_throughput" -> path
    env: dict
    images: int = 0


# ---------------------------------------------------------------------- sweeps and checkpoints
def default_sweep(method: str, depth: int, num_patches: int) -> list[dict]:
    """Strengths per method, valid for the model: ToMe ``r`` at 0.5, 0.8 and 1.0 of
    ``num_patches // depth`` (DeiT-S: 8, 13, 16; the embedded model: 2, 4, 5); keep rates 0.9, 0.7, 0.5."""
    from .methods.base import get_method_class

    name = get_method_class(method).name
    if name == "tome":
        r_max = max(num_patches // depth, 1)
        values = sorted({max(1, round(r_max * f)) for f in TOME_FRACTIONS})
        return [{"r": r} for r in values]
    return [{"keep_rate": k} for k in KEEP_RATES]


def parse_sweep(text: Optional[str]) -> dict[str, list[dict]]:
    """``"tome:r=2,4;evit:keep_rate=0.9,0.7"`` -> ``{"tome": [{"r": 2}, {"r": 4}], "evit": [...]}``."""
    from .cli import _literal

    out: dict[str, list[dict]] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        try:
            method, rest = part.split(":", 1)
            key, values = rest.split("=", 1)
        except ValueError:
            raise VitrimError(f"--sweep entry {part!r} is not METHOD:OPTION=V1,V2 (e.g. tome:r=2,4)") from None
        out[method.strip()] = [{key.strip(): _literal(v.strip())} for v in values.split(",") if v.strip()]
    return out


def parse_checkpoints(items: Optional[Sequence[str]]) -> tuple[Optional[str], dict[tuple[str, Any], str]]:
    """``PATH`` (the model's own weights) and ``METHOD:VALUE=PATH`` (a fine-tuned row, e.g.
    ``idle:0.7=runs/x/best.pt``; VALUE is the strength option, ``r`` or ``keep_rate``)."""
    from .cli import _literal

    base, rows = None, {}
    for item in items or []:
        if "=" in item and ":" in item.split("=", 1)[0]:
            key, path = item.split("=", 1)
            method, value = key.split(":", 1)
            rows[(method.strip(), _literal(value.strip()))] = path
        elif base is None:
            base = item
        else:
            raise VitrimError(f"--checkpoint {item!r}: the model's weights are already {base!r}; per-row "
                              f"checkpoints are METHOD:VALUE=PATH (e.g. idle:0.7=runs/x/best.pt)")
    for path in [base, *rows.values()]:
        if path is not None and not os.path.isfile(path):
            raise VitrimError(f"checkpoint {path!r} does not exist or is not a file")
    return base, rows


def _configs(methods: Sequence[str], sweeps: dict[str, list[dict]], ckpts: dict, depth: int,
             num_patches: int) -> list[tuple[str, dict, Optional[str]]]:
    """(method, options, checkpoint) per reduced row: the sweep, plus fine-tuned rows."""
    from .solve import strength_option

    out = []
    for m in methods:
        key = strength_option(m)
        sweep = sweeps.get(m) or default_sweep(m, depth, num_patches)
        for opts in sweep:
            out.append((m, dict(opts), None))
        for (cm, value), path in ckpts.items():
            if cm == m:
                out.append((m, {key: value}, path))
    unknown = sorted({cm for cm, _ in ckpts} - set(methods))
    if unknown:
        raise VitrimError(f"checkpoint(s) for method(s) {', '.join(unknown)} not in --methods {', '.join(methods)}")
    return out


# ---------------------------------------------------------------------- evaluation data
def _eval_batches(folder: Path, base: nn.Module, batch_size: int, max_images: Optional[int], workers: int):
    """The evaluation data: in memory when small (read once for every row), else a loader."""
    from torch.utils.data import Subset

    from .train.data import build_eval_loader, eval_transform, image_dataset

    dataset = image_dataset(folder, transform=eval_transform(base))
    if max_images is not None and max_images < len(dataset):
        step = len(dataset) / max_images  # evenly spaced, so every class folder is represented
        dataset = Subset(dataset, [int(i * step) for i in range(max_images)])
    loader = build_eval_loader(dataset, batch_size, workers)
    c, h, w = base.pretrained_cfg.get("input_size", (3, 224, 224)) if hasattr(base, "pretrained_cfg") else (3, 224, 224)
    if len(dataset) * c * h * w * 4 <= CACHE_BYTES:
        return [(x, y) for x, y in loader], len(dataset)
    return loader, len(dataset)


# ---------------------------------------------------------------------- the run
def compare(model: Optional[str] = None, methods: Sequence[str] = ALL_METHODS, *, data: Optional[str] = None,
            pretrained: bool = False, checkpoints: Optional[Sequence[str]] = None,
            sweeps: Optional[dict[str, list[dict]]] = None, batch_sizes: Sequence[int] = (1, 16),
            img_size: Optional[int] = None, device: Optional[str] = None, warmup: int = 2, repeats: int = 5,
            iters: int = 2, eval_batch_size: int = 64, max_images: Optional[int] = None, workers: int = 0,
            output: Optional[str] = "compare", progress: bool = True, plots: bool = True,
            seed: int = 0) -> CompareResult:
    """Measure the unreduced model and every method at each strength; write the report.

    Args:
        model: timm name; default: the embedded ``vitrim_vit_digits`` with its shipped weights and,
            without ``data``, the digits validation split.
        methods: method names; ``sweeps`` overrides a method's strengths (``parse_sweep``).
        checkpoints: ``PATH`` for the model's weights, ``METHOD:VALUE=PATH`` for fine-tuned rows.
        batch_sizes: throughput batch sizes; batch 1 is always added (latency).
        data: ImageFolder root (or its ``val/``) for top-1; none: no accuracy (non-embedded models).
        max_images: evaluate on this many evenly spaced images only.
        seed: seeds the initialisation of learned parts applied off the shelf (predictors).
        output: folder for ``results.csv``, ``results.md``, ``acc_vs_gmacs.png``,
            ``acc_vs_throughput.png`` (``None``: write nothing).
    """
    from tqdm import tqdm

    from . import api
    from .adapters import get_adapter
    from .measure.bench import benchmark
    from .measure.flops import flops
    from .models import create_model, load_checkpoint
    from .train.data import ensure_digits, resolve_split
    from .train.evaluate import evaluate
    from .zoo import EMBEDDED_MODEL

    name = model or EMBEDDED_MODEL
    base_ckpt, row_ckpts = parse_checkpoints(checkpoints)
    embedded = name == EMBEDDED_MODEL
    base = create_model(name, pretrained=pretrained or (embedded and base_ckpt is None), checkpoint=base_ckpt,
                        img_size=img_size).eval()
    info = get_adapter(base).info()
    if data is None and embedded:
        data = str(ensure_digits())
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = sorted({1, *(int(b) for b in batch_sizes)})
    if sizes[0] < 1:
        raise VitrimError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    configs = _configs(list(methods), sweeps or {}, row_ckpts, info.depth, info.num_patches)
    batches, n_images = (None, 0)
    if data is not None:
        batches, n_images = _eval_batches(resolve_split(data, "val"), base, eval_batch_size, max_images, workers)
    models: dict[str, nn.Module] = {}
    rows: list[Row] = []
    torch.manual_seed(seed)  # learned methods' untrained parts (predictors) are initialised alike every run
    bar = tqdm(total=len(configs) + 1 + len(sizes), desc="compare", disable=not progress, file=sys.stderr)
    for method, opts, ckpt in [("none", {}, None), *configs]:
        bar.set_postfix_str(f"{method} {opts}")
        m = base if method == "none" else api.apply(copy.deepcopy(base), method, **opts)
        if ckpt is not None:
            load_checkpoint(m, ckpt)
        m.to(dev).eval()
        row = Row(method, opts, ckpt or "off-the-shelf", flops(m, img_size),
                  sum(p.numel() for p in m.parameters()) / 1e6)
        if batches is not None:
            res = evaluate(m, batches, dev)
            row.top1, row.top5 = res.top1, res.top5
        key = row.name + (f" [{ckpt}]" if ckpt else "")
        models[key] = m
        rows.append(row)
        bar.update(1)
    h, w = (img_size, img_size) if img_size else get_adapter(base).default_img_size()
    env: dict = {}
    for bs in sizes:
        bar.set_postfix_str(f"benchmark batch {bs}")
        res = benchmark(models, batch_size=bs, input_size=(3, h, w), device=dev, warmup=warmup, repeats=repeats,
                        iters=iters)
        env = res.env
        for row, t in zip(rows, res.timings):
            row.img_per_s[bs], row.speedup[bs] = t.img_per_s, t.speedup
            if bs == 1:
                row.latency_ms = t.ms_per_batch
        bar.update(1)
    bar.close()
    env = {**env, "device": str(dev), "model": name, "data": str(data) if data else None}
    result = CompareResult(rows, sizes, {}, env, n_images)
    if output is not None:
        result.paths = write_report(result, output, plots=plots)
    return result


# ---------------------------------------------------------------------- outputs
def pareto_front(points: Sequence[tuple[float, float]], lower_x_better: bool) -> list[int]:
    """Indices of the non-dominated points (higher y better; x lower or higher better), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = False
        for j, (x2, y2) in enumerate(points):
            if j == i:
                continue
            better_x = x2 <= x if lower_x_better else x2 >= x
            strictly = (x2 != x) or (y2 > y)
            if better_x and y2 >= y and strictly:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _columns(result: CompareResult) -> list[tuple[str, Any]]:
    big = result.batch_sizes[-1]
    cols: list[tuple[str, Any]] = [
        ("method", lambda r: r.method), ("setting", lambda r: r.setting), ("weights", lambda r: r.weights),
        ("GMACs", lambda r: _fmt(r.gmacs, ".4f")), ("params (M)", lambda r: _fmt(r.params_m, ".3f")),
        ("top-1 (%)", lambda r: _fmt(r.top1, ".2f")),
    ]
    for bs in result.batch_sizes:
        cols.append((f"img/s b{bs}", lambda r, bs=bs: _fmt(r.img_per_s.get(bs), ".1f")))
    cols.append((f"speed-up b{big}", lambda r: _fmt(r.speedup.get(big), ".2f") + "x"))
    cols.append(("latency b1 (ms)", lambda r: _fmt(r.latency_ms, ".2f")))
    return cols


def markdown_table(result: CompareResult) -> str:
    """The results as a Markdown table (all columns measured in this run)."""
    cols = _columns(result)
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in result.rows:
        lines.append("| " + " | ".join(str(f(r)) for _, f in cols) + " |")
    return "\n".join(lines)


def write_csv(result: CompareResult, path: str) -> str:
    """One line per row; machine-readable numbers (empty when not measured)."""
    fields = ["model", "method", "setting", "weights", "gmacs", "params_m", "top1", "top5", "latency_ms_b1"]
    fields += [f"img_per_s_b{bs}" for bs in result.batch_sizes] + [f"speedup_b{bs}" for bs in result.batch_sizes]
    fields += ["device", "threads", "images"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in result.rows:
            line = {"model": result.env.get("model"), "method": r.method, "setting": r.setting, "weights": r.weights,
                    "gmacs": r.gmacs, "params_m": r.params_m, "top1": r.top1, "top5": r.top5,
                    "latency_ms_b1": r.latency_ms, "device": result.env.get("device"),
                    "threads": result.env.get("threads"), "images": result.images}
            for bs in result.batch_sizes:
                line[f"img_per_s_b{bs}"], line[f"speedup_b{bs}"] = r.img_per_s.get(bs), r.speedup.get(bs)
            w.writerow(line)
    return path


def _plot(rows: list[Row], xs: list[float], xlabel: str, lower_x_better: bool, title: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = [r.top1 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    for method in dict.fromkeys(r.method for r in rows):
        idx = [i for i, r in enumerate(rows) if r.method == method]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], color=METHOD_COLORS.get(method, "gray"),
                   marker="*" if method == "none" else "o", s=120 if method == "none" else 40,
                   label="unreduced" if method == "none" else method, zorder=3)
    front = pareto_front(list(zip(xs, ys)), lower_x_better)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="gray", lw=1, zorder=2,
            label="Pareto front")
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=140, facecolors="none", edgecolors="black",
               lw=1.2, zorder=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if lower_x_better else "lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_results(result: CompareResult, folder: str) -> dict:
    """``acc_vs_gmacs.png`` and ``acc_vs_throughput.png`` (largest batch size); needs accuracy."""
    rows = [r for r in result.rows if r.top1 is not None]
    if not rows:
        return {}
    big = result.batch_sizes[-1]
    title = f"{result.env.get('model')} on {result.images} images, {result.env.get('device')}"
    return {
        "plot_gmacs": _plot(rows, [r.gmacs for r in rows], "GMACs (analytic, batch 1)", True, title,
                            os.path.join(folder, "acc_vs_gmacs.png")),
        "plot_throughput": _plot(rows, [r.img_per_s[big] for r in rows], f"throughput (img/s, batch {big}, median)",
                                 False, title, os.path.join(folder, "acc_vs_throughput.png")),
    }


def untrained_methods(result: CompareResult) -> list[str]:
    """Methods with rows that add parameters to the model but load no checkpoint (untrained predictors)."""
    base = result.rows[0].params_m
    return list(dict.fromkeys(r.method for r in result.rows[1:] if r.params_m > base and r.weights == "off-the-shelf"))


def write_report(result: CompareResult, folder: str, plots: bool = True) -> dict:
    """``results.csv``, ``results.md`` and the plots in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    paths = {"csv": write_csv(result, os.path.join(folder, "results.csv"))}
    md = os.path.join(folder, "results.md")
    env = result.env
    with open(md, "w") as f:
        f.write(f"# vitrim compare: {env.get('model')}\n\n"
                f"Measured in one run on {env.get('device')} ({env.get('device_name')}, {env.get('threads')} threads, "
                f"torch {env.get('torch')}); top-1 on {result.images} images of {env.get('data')}. Throughput: "
                f"median img/s, all rows timed side by side; latency: batch 1.\n\n{markdown_table(result)}\n")
        untrained = untrained_methods(result)
        if untrained:
            f.write(f"\n{', '.join(untrained)} off the shelf run with untrained (randomly initialised) score "
                    f"predictors, so their top-1 is not the method's; fine-tune (`vitrim train --method ...`) and "
                    f"pass the run's checkpoint (`--checkpoint METHOD:VALUE=PATH`).\n")
    paths["md"] = md
    if plots:
        paths.update(plot_results(result, folder))
    return paths


# ---------------------------------------------------------------------- CLI
def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_compare_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``vitrim compare``."""
    p = subparsers.add_parser(
        "compare", help="every method at a sweep of strengths vs the unreduced model: GMACs, speed, top-1",
        description="Measure the unreduced model and each method at several strengths side by side; write "
                    "results.csv, results.md and accuracy-vs-GMACs / accuracy-vs-throughput plots. With no "
                    "arguments: the embedded model on the digits validation split.")
    p.add_argument("--model", help="timm model name (default: the embedded vitrim_vit_digits)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    p.add_argument("--checkpoint", action="append", metavar="[METHOD:VALUE=]PATH",
                   help="PATH: the model's weights; METHOD:VALUE=PATH: a fine-tuned row, e.g. "
                        "idle:0.7=runs/x/best.pt (repeatable)")
    p.add_argument("--data", help="ImageFolder root or its val/ folder (default for the embedded model: digits)")
    p.add_argument("--methods", type=_csv_list, default=list(ALL_METHODS),
                   help=f"comma-separated methods (default: {','.join(ALL_METHODS)})")
    p.add_argument("--sweep", help="strengths per method, e.g. 'tome:r=8,13,16;evit:keep_rate=0.9,0.7' "
                                   "(default: ToMe r at 0.5/0.8/1.0 of patches//depth, keep rates 0.9/0.7/0.5)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 16],
                   help="throughput batch sizes; 1 is always included (default: 1 16)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's own)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; median reported (default: 5)")
    p.add_argument("--iters", type=int, default=2, help="forwards per repetition (default: 2)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, help="evaluate on this many evenly spaced images")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes (default: 0)")
    p.add_argument("--output", "-o", default="compare", help="report folder (default: ./compare)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    """``vitrim compare``: run :func:`compare`, print the table and the written paths."""
    result = compare(args.model, args.methods, data=args.data, pretrained=args.pretrained,
                     checkpoints=args.checkpoint, sweeps=parse_sweep(args.sweep), batch_sizes=args.batch_size,
                     img_size=args.img_size, device=args.device, warmup=args.warmup, repeats=args.repeats,
                     iters=args.iters, eval_batch_size=args.eval_batch_size, max_images=args.max_images,
                     workers=args.workers, output=args.output,
                     progress=not args.no_progress and sys.stderr.isatty())
    print(markdown_table(result))
    untrained = untrained_methods(result)
    if untrained:
        print(f"note: {', '.join(untrained)} off the shelf have untrained predictors; their top-1 needs fine-tuning")
    for kind, path in result.paths.items():
        print(f"wrote {path}")
    return 0
