"""The report of ``vitrim compare``: Markdown, CSV and terminal tables, plots with the Pareto front, and one
self-contained ``report.html``."""
from __future__ import annotations

import csv
import os
from typing import Any, Optional, Sequence

from ..methods.base import get_method_class
from .result import CompareResult, Row

__all__ = ["pareto_front", "markdown_table", "terminal_table", "extension_notes", "skipped_note", "write_csv", "plot_results", "untrained_methods",
           "write_report", "write_html", "method_color"]


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


def _point_label(row: Row) -> str:
    """The short setting printed next to a point: ``r=4``, ``0.7``, ``0.7*`` (untrained)."""
    if row.method == "none":
        return "unreduced"
    text = ", ".join(str(v) if k == "keep_rate" else f"{k}={v}" for k, v in row.options.items()) or row.method
    return text + ("*" if row.untrained else "")


def _plot(rows: list[Row], xs: list[float], xlabel: str, lower_x_better: bool, title: str, path: str) -> str:
    """Top-1 against ``xs``: one colour per method, each point labelled with its setting, the unreduced
    model a star, untrained rows hollow crosses kept off the Pareto front, the accuracy axis fitted to
    the trained rows (untrained rows below it sit on its lower edge, their top-1 in the label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = [r.top1 for r in rows]
    trusted = [i for i, r in enumerate(rows) if not r.untrained]
    lo = min(ys[i] for i in trusted)
    hi = max(ys[i] for i in trusted)
    pad = max(0.5, 0.12 * (hi - lo))
    ymin, ymax = max(0.0, lo - pad), min(100.0, hi + pad)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for method in dict.fromkeys(r.method for r in rows):
        for untrained in (False, True):
            idx = [i for i, r in enumerate(rows) if r.method == method and r.untrained == untrained]
            if not idx:
                continue
            label = "unreduced" if method == "none" else method + (" (untrained predictors)" if untrained else "")
            marker = "*" if method == "none" else ("x" if untrained else "o")
            ax.scatter([xs[i] for i in idx], [max(ys[i], ymin) for i in idx], color=method_color(method),
                       marker=marker, s=160 if method == "none" else 45, label=label, zorder=3)
    for i, r in enumerate(rows):
        text = _point_label(r) + (f" ({ys[i]:.0f}%)" if ys[i] < ymin else "")
        ax.annotate(text, (xs[i], max(ys[i], ymin)), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    color=method_color(r.method))
    front = [trusted[j] for j in pareto_front([(xs[i], ys[i]) for i in trusted], lower_x_better)]
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="gray", lw=1, zorder=2,
            label="Pareto front (trained rows)")
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=150, facecolors="none", edgecolors="black",
               lw=1.1, zorder=4)
    ax.set_ylim(ymin, ymax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right" if lower_x_better else "lower left", framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_results(result: CompareResult, folder: str) -> dict:
    """``acc_vs_gmacs.png``, ``acc_vs_throughput.png`` (largest batch size) and ``acc_vs_latency.png``
    (batch 1); needs accuracy."""
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
        "plot_latency": _plot(rows, [r.latency_ms for r in rows], "latency (ms, batch 1, median)", True, title,
                              os.path.join(folder, "acc_vs_latency.png")),
    }


def untrained_methods(result: CompareResult) -> list[str]:
    """Methods with rows whose learned parts (score predictors) are untrained (random)."""
    return list(dict.fromkeys(r.method for r in result.rows if r.untrained))


def _untrained_note(result: CompareResult) -> str:
    untrained = untrained_methods(result)
    if not untrained:
        return ""
    return (f"{', '.join(untrained)} (marked *) ran with untrained (randomly initialised) score predictors, so their "
            f"top-1 is not the method's; fine-tune (`vitrim train --method ...`) and pass the run's checkpoint "
            f"(`--checkpoint METHOD:VALUE=PATH`).")


def extension_notes(result: CompareResult) -> list[str]:
    """One line per method whose rows used rules that are not from its paper (``ReductionMethod.extensions``)."""
    notes: dict[str, tuple] = {}
    for r in result.rows:
        if r.extensions:
            notes.setdefault(r.method, r.extensions)
    return [f"{method}: {'; '.join(ext)} [vitrim extension]" for method, ext in notes.items()]


def skipped_note(result: CompareResult) -> str:
    """One line on the registered methods left out of the default list (they cannot reduce the model)."""
    if not result.skipped:
        return ""
    first, why = next(iter(result.skipped.items()))
    ran = list(dict.fromkeys(r.method for r in result.rows if r.method != "none"))
    return (f"not run: {', '.join(result.skipped)}, which cannot reduce this model (e.g. {first}: {why}); "
            f"compared: {', '.join(ran) or 'none'}.")


def terminal_table(result: CompareResult) -> str:
    """The table for a terminal (80 columns): method, setting, GMACs, top-1, speed-up at the largest
    batch size, batch-1 latency, weights (checkpoint paths listed under the table as ``[n]``)."""
    big = result.batch_sizes[-1]
    lines = [f"{'method':<11}{'setting':<16}{'GMACs':>8}{'top-1 %':>9}{f'x b{big}':>8}{'ms b1':>8}  weights",
             "-" * 78]
    files: list[str] = []
    for r in result.rows:
        if r.untrained:
            weights = "untrained*"
        elif r.weights in ("off-the-shelf", "shipped fine-tune"):
            weights = "" if r.weights == "off-the-shelf" else "fine-tuned"
        else:
            files.append(r.weights)
            weights = f"checkpoint [{len(files)}]"
        setting = r.setting if len(r.setting) <= 15 else r.setting[:14] + "~"
        lines.append(f"{r.method:<11}{setting:<16}{_fmt(r.gmacs, '.4f'):>8}{_fmt(r.top1, '.2f'):>9}"
                     f"{_fmt(r.speedup.get(big), '.2f'):>7}x{_fmt(r.latency_ms, '.2f'):>8}  {weights}")
    lines += [f"[{i}] {path}" for i, path in enumerate(files, 1)]
    return "\n".join(lines)


def write_report(result: CompareResult, folder: str, plots: bool = True) -> dict:
    """``results.csv``, ``results.md``, the plots and ``report.html`` in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    paths = {"csv": write_csv(result, os.path.join(folder, "results.csv"))}
    md = os.path.join(folder, "results.md")
    env = result.env
    with open(md, "w") as f:
        f.write(f"# vitrim compare: {env.get('model')}\n\n"
                f"Measured in one run on {env.get('device')} ({env.get('device_name')}, {env.get('threads')} threads, "
                f"torch {env.get('torch')}); "
                + (f"top-1 on {result.images} images of {env.get('data')}. " if result.images else "no top-1 (no data). ")
                + f"Throughput: "
                f"median img/s, all rows timed side by side; latency: batch 1.\n\n{markdown_table(result)}\n")
        if untrained_methods(result):
            f.write(f"\n{_untrained_note(result)}\n")
        for note in extension_notes(result):
            f.write(f"\n- {note}\n")
        if result.skipped:
            f.write(f"\n{skipped_note(result)}\n")
    paths["md"] = md
    if plots:
        paths.update(plot_results(result, folder))
    paths["html"] = write_html(result, os.path.join(folder, "report.html"), paths)
    return paths


def _data_uri(path: str) -> str:
    import base64

    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def write_html(result: CompareResult, path: str, paths: dict) -> str:
    """``report.html``: one self-contained page (images inlined) with the table, the plots, the run's
    environment and, per method at its middle strength, the picture of what it did to one image."""
    from html import escape

    env = result.env
    big = result.batch_sizes[-1]
    head = ["method", "setting", "weights", "GMACs", "params (M)", "top-1 (%)",
            *[f"img/s b{bs}" for bs in result.batch_sizes], f"speed-up b{big}", "latency b1 (ms)"]
    body = []
    for r in result.rows:
        cells = [r.method, r.setting, r.weights + (" *" if r.untrained else ""), _fmt(r.gmacs, ".4f"),
                 _fmt(r.params_m, ".3f"), _fmt(r.top1, ".2f"),
                 *[_fmt(r.img_per_s.get(bs), ".1f") for bs in result.batch_sizes],
                 _fmt(r.speedup.get(big), ".2f") + "x", _fmt(r.latency_ms, ".2f")]
        cls = ' class="untrained"' if r.untrained else (' class="base"' if r.method == "none" else "")
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    table = ("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
             + "".join(body) + "</tbody></table>")
    environment = [("model", env.get("model")), ("data", f"{env.get('data')} ({result.images} images)"),
                   ("device", f"{env.get('device')} ({env.get('device_name')})"), ("threads", env.get("threads")),
                   ("batch sizes", ", ".join(map(str, result.batch_sizes))),
                   ("timing", f"{env.get('warmup')} warm-up, {env.get('repeats')} repetitions x {env.get('iters')} "
                              f"forwards, median, all rows interleaved in one run"),
                   ("versions", f"vitrim {env.get('vitrim')}, torch {env.get('torch')}, timm {env.get('timm')}, "
                                f"python {env.get('python')}"),
                   ("fused attention", env.get("fused_attn")), ("run", f"{env.get('date')}, {env.get('seconds')} s")]
    env_html = "<table class='env'>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>"
                                                for k, v in environment) + "</table>"
    captions = {"plot_gmacs": "Top-1 against analytic GMACs (batch 1)",
                "plot_throughput": f"Top-1 against measured throughput (batch {big})",
                "plot_latency": "Top-1 against measured latency (batch 1)"}
    plots = "".join(f"<figure><img src='{_data_uri(paths[k])}' alt='{escape(c)}'><figcaption>{escape(c)}"
                    f"</figcaption></figure>" for k, c in captions.items() if k in paths)
    pictures = "".join(
        f"<figure class='pic'><img src='{_data_uri(png)}' alt='{escape(m)} {escape(setting)}'><figcaption>"
        f"{escape(m)} {escape(setting)}</figcaption></figure>" for m, (setting, png) in result.pictures.items())
    note = _untrained_note(result)
    extensions = "".join(f"<p class='note'>{escape(n)}</p>" for n in [*extension_notes(result), skipped_note(result)] if n)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vitrim compare: {escape(str(env.get('model')))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child, td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
tr.base td {{ font-weight: bold; }} tr.untrained td {{ color: #999; }}
table.env th {{ text-align: left; color: #555; font-weight: normal; }} table.env td {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; }} figure img {{ max-width: 520px; }}
figure.pic img {{ max-width: 100%; }} figcaption {{ font-size: 13px; color: #555; }}
</style></head><body>
<h1>vitrim compare: {escape(str(env.get('model')))}</h1>
<p>Every number on this page was measured in one run on this machine; no published number is shown.
GMACs are analytic (the papers' convention), throughput and latency are medians of interleaved repetitions,
speed-ups are against the unreduced model in the same run.</p>
<h2>Results</h2>{table}{f"<p class='note'>{escape(note)}</p>" if note else ""}{extensions}
<h2>Plots</h2>{plots or "<p>No accuracy was measured (no data), so there are no plots.</p>"}
<h2>What each method did to one image</h2>{pictures or "<p>No pictures in this run.</p>"}
<h2>Environment</h2>{env_html}
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
