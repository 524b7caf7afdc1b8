"""The report of ``vitrim compare``: Markdown and CSV tables, plots with the Pareto front."""
from __future__ import annotations

import csv
import os
from typing import Any, Optional, Sequence

from ..methods.base import get_method_class
from .result import CompareResult, Row

__all__ = ["pareto_front", "markdown_table", "write_csv", "plot_results", "untrained_methods", "write_report",
           "method_color"]


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


def method_color(method: str) -> Optional[str]:
    """The plot colour of a row's method (the unreduced model in black; the method's ``color``)."""
    return "black" if method == "none" else get_method_class(method).color


def _plot(rows: list[Row], xs: list[float], xlabel: str, lower_x_better: bool, title: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = [r.top1 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    for method in dict.fromkeys(r.method for r in rows):
        idx = [i for i, r in enumerate(rows) if r.method == method]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], color=method_color(method),
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


