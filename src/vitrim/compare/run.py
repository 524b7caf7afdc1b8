"""The run of ``vitrim compare``: every method at a sweep of strengths against the unreduced model.

For each row (the unreduced model, then each method at each strength): analytic GMACs (batch 1),
parameters, throughput at each batch size (median img/s, all models timed in the same
:func:`~vitrim.measure.bench.benchmark` run, the unreduced model first), batch-1 latency, and top-1
on the given data (off the shelf, or from a fine-tuned checkpoint per row). The report writers
(:mod:`vitrim.compare.report`) turn the result into ``results.csv``, ``results.md`` and plots.
Every number in the outputs is measured in this run; no published number is ever shown.
"""
from __future__ import annotations

import copy
import datetime
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..adapters import attach, get_adapter
from ..api import flops
from ..errors import VitrimError
from ..measure.bench import benchmark
from ..methods.base import ModelInfo, get_method_class, parse_option_value, registered_methods
from ..checks import non_negative_int, positive_int, resolve_device, writable_dir
from ..models import create_model, load_checkpoint, read_checkpoint, state_dict_of
from ..progress import Progress
from ..train.data import build_eval_loader, check_classes, ensure_digits, eval_transform, image_dataset, resolve_split
from ..train.evaluate import evaluate
from ..version import __version__
from ..zoo import EMBEDDED_MODEL, is_digits_model, shipped_method_weights
from .report import write_report
from .result import CompareResult, Row

__all__ = ["Row", "CompareResult", "default_sweep", "parse_sweep", "parse_checkpoints", "compare"]

CACHE_BYTES = 1 << 30                 # evaluation images kept in memory below this size


# ---------------------------------------------------------------------- sweeps and checkpoints
def default_sweep(method: str, depth: int, num_patches: int) -> list[dict]:
    """The method's default strengths on a model of ``depth`` blocks and ``num_patches`` patch tokens
    (``ReductionMethod.default_sweep``; ToMe: ``r`` at 0.5, 0.8 and 1.0 of ``num_patches // depth``,
    DeiT-S: 8, 13, 16; the keep-rate methods: 0.9, 0.7, 0.5)."""
    info = ModelInfo(family="", depth=depth, embed_dim=0, num_heads=0, num_prefix_tokens=0,
                     num_patches=num_patches, global_pool="")
    return get_method_class(method).default_sweep(info)


def parse_sweep(text: Optional[str]) -> dict[str, list[dict]]:
    """``"tome:r=2,4;evit:keep_rate=0.9,0.7"`` -> ``{"tome": [{"r": 2}, {"r": 4}], "evit": [...]}``."""
    out: dict[str, list[dict]] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        try:
            method, rest = part.split(":", 1)
            key, values = rest.split("=", 1)
        except ValueError:
            raise VitrimError(f"--sweep entry {part!r} is not METHOD:OPTION=V1,V2 (e.g. tome:r=2,4)") from None
        out[method.strip()] = [{key.strip(): parse_option_value(v.strip())} for v in values.split(",") if v.strip()]
    return out


def parse_checkpoints(items: Optional[Sequence[str]]) -> tuple[Optional[str], dict[tuple[str, Any], str]]:
    """``PATH`` (the model's own weights) and ``METHOD:VALUE=PATH`` (a fine-tuned row, e.g.
    ``idle:0.7=runs/x/best.pt``; VALUE is the strength option, ``r`` or ``keep_rate``)."""
    base, rows = None, {}
    for item in items or []:
        if "=" in item and ":" in item.split("=", 1)[0]:
            key, path = item.split("=", 1)
            method, value = key.split(":", 1)
            rows[(method.strip(), parse_option_value(value.strip()))] = path
        elif base is None:
            base = item
        else:
            raise VitrimError(f"--checkpoint {item!r}: the model's weights are already {base!r}; per-row "
                              f"checkpoints are METHOD:VALUE=PATH (e.g. idle:0.7=runs/x/best.pt)")
    for path in [base, *rows.values()]:
        if path is not None and not os.path.isfile(path):
            raise VitrimError(f"checkpoint {path!r} does not exist or is not a file")
    return base, rows


def _middle(configs: list[tuple[str, dict, Optional[str]]], method: str) -> Optional[dict]:
    """The middle strength of ``method``'s swept rows (its picture goes into the report)."""
    sweep = [opts for m, opts, ckpt in configs if m == method and ckpt is None]
    return sweep[len(sweep) // 2] if sweep else None


def _picture(model: nn.Module, output: str, method: str, model_name: str) -> str:
    """What the method did to the default image of the model, drawn into ``output/pictures/``."""
    from ..visual import visualize

    folder = os.path.join(output, "pictures")
    os.makedirs(folder, exist_ok=True)
    return visualize(model, os.path.join(folder, f"{method}.png"), model_name=model_name)


def _method_list(methods: Any) -> list[str]:
    """The methods to compare: ``None`` (every registered one), a name, a comma-separated string, or a list."""
    if methods is None:
        return [cls.name for cls in registered_methods()]
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
        raise VitrimError(f"methods must be a list of method names, got {methods!r}")
    for m in methods:
        get_method_class(m)  # unknown names fail here, naming the accepted ones
    return list(methods)


def _accepted(methods: Sequence[str], info: ModelInfo, asked: set) -> tuple[list[str], dict[str, str]]:
    """``(methods that can reduce the model, {method: why not} for the others)``; a method with a sweep
    or a checkpoint of its own was asked for, and keeps its error."""
    kept, skipped = [], {}
    for m in methods:
        try:
            get_method_class(m).check_model(info)
        except VitrimError as err:
            if m in asked:
                raise
            skipped[m] = str(err)
            continue
        kept.append(m)
    return kept, skipped


def _configs(methods: Sequence[str], sweeps: dict[str, list[dict]], ckpts: dict,
             info: ModelInfo) -> list[tuple[str, dict, Optional[str]]]:
    """(method, options, checkpoint) per reduced row: the sweep, plus fine-tuned rows."""
    out = []
    for m in methods:
        cls = get_method_class(m)
        key = cls.strength
        sweep = sweeps.get(m) or cls.default_sweep(info)
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
def compare(model: Optional[str] = None, methods: Optional[Sequence[str]] = None, *, data: Optional[str] = None,
            pretrained: bool = False, checkpoints: Optional[Sequence[str]] = None,
            sweeps: Optional[dict[str, list[dict]]] = None, batch_sizes: Sequence[int] = (1, 16),
            img_size: Optional[int] = None, device: Optional[str] = None, warmup: int = 2, repeats: int = 5,
            iters: int = 2, eval_batch_size: int = 64, max_images: Optional[int] = None, workers: int = 0,
            output: Optional[str] = "compare", progress: bool = True, plots: bool = True,
            seed: int = 0) -> CompareResult:
    """Measure the unreduced model and every method at each strength; write the report.

    Args:
        model: timm name; default: the embedded ``vitrim_vit_digits``. vitrim's digits models (``vitrim.zoo``)
            default to their shipped weights and, without ``data``, the digits validation split.
        methods: method names (default: every registered method that can reduce the model; the others
            are listed in ``CompareResult.skipped`` with the reason); ``sweeps`` overrides a method's
            strengths (``parse_sweep``).
        checkpoints: ``PATH`` for the model's weights, ``METHOD:VALUE=PATH`` for fine-tuned rows.
        batch_sizes: throughput batch sizes; batch 1 is always added (latency).
        data: ImageFolder root (or its ``val/``) for top-1; none: no accuracy (non-embedded models).
        max_images: evaluate on this many evenly spaced images only.
        seed: seeds the initialisation of learned parts applied off the shelf (predictors).
        output: folder for ``results.csv``, ``results.md``, ``acc_vs_gmacs.png``,
            ``acc_vs_throughput.png`` (``None``: write nothing).
    """
    # every input is checked before a model is built or an image read
    explicit = methods is not None
    methods = _method_list(methods)
    sizes = sorted({1, *(positive_int(b, "each batch size") for b in batch_sizes)})
    non_negative_int(warmup, "warmup")
    positive_int(repeats, "repeats")
    positive_int(iters, "iters")
    positive_int(eval_batch_size, "eval_batch_size")
    non_negative_int(workers, "workers")
    if max_images is not None:
        positive_int(max_images, "max_images")
    dev = resolve_device(device)
    if output is not None:
        writable_dir(output, "compare output folder")
    unknown = sorted(set(sweeps or {}) - set(methods))
    if unknown:
        raise VitrimError(f"sweep(s) given for {', '.join(unknown)}, which are not among the compared methods "
                          f"({', '.join(methods) or 'none'}); add them to methods")
    name = model or EMBEDDED_MODEL
    base_ckpt, row_ckpts = parse_checkpoints(checkpoints)
    row_states = {path: state_dict_of(read_checkpoint(path), path) for path in row_ckpts.values()}
    embedded = is_digits_model(name)
    base = create_model(name, pretrained=pretrained or (embedded and base_ckpt is None), checkpoint=base_ckpt,
                        img_size=img_size).eval()
    info = get_adapter(base).info()
    skipped: dict[str, str] = {}
    if not explicit:  # the default list: the methods this model accepts (asked of each method)
        methods, skipped = _accepted(methods, info, set(sweeps or {}) | {cm for cm, _ in row_ckpts})
    if data is None and embedded:
        data = str(ensure_digits())
    configs = _configs(methods, sweeps or {}, row_ckpts, info)
    batches, n_images = (None, 0)
    if data is not None:
        folder = resolve_split(data, "val")
        check_classes(folder, base)
        batches, n_images = _eval_batches(folder, base, eval_batch_size, max_images, workers)
    models: dict[str, nn.Module] = {}
    rows: list[Row] = []
    pictures: dict[str, tuple[str, str]] = {}
    started = time.perf_counter()
    torch.manual_seed(seed)  # learned methods' untrained parts (predictors) are initialised alike every run
    bar = Progress(total=len(configs) + 1 + len(sizes), desc="compare", enabled=progress, every=0.0)
    for method, opts, ckpt in [("none", {}, None), *configs]:
        bar.set_postfix_str(f"{method} {opts}" if opts else method)
        m = base
        if method != "none":
            m = copy.deepcopy(base)
            attach(m, method, **opts)
        weights, untrained = ckpt or "off-the-shelf", False
        if ckpt is not None:
            load_checkpoint(m, row_states[ckpt], path=ckpt)
        elif method != "none" and any(True for _ in m.vitrim.parameters()):
            shipped = shipped_method_weights(name, method, opts)
            if shipped is not None and base_ckpt is None:
                prefix = "vitrim."
                state = state_dict_of(read_checkpoint(str(shipped)), str(shipped))
                m.vitrim.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
                weights = "shipped fine-tune"
            else:
                weights, untrained = "untrained", True
        m.to(dev).eval()
        row = Row(method, opts, weights, flops(m, img_size), sum(p.numel() for p in m.parameters()) / 1e6,
                  untrained=untrained, extensions=tuple(m.vitrim.extensions()) if method != "none" else ())
        if output is not None and method != "none" and opts == _middle(configs, method):
            pictures[method] = (row.setting, _picture(m, output, method, name))
        if batches is not None:
            res = evaluate(m, batches, dev)
            row.top1, row.top5 = res.top1, res.top5
        key = row.name + (f" [{ckpt}]" if ckpt else "")
        models[key] = m
        rows.append(row)
        bar.update(1)
    hw = (img_size, img_size) if img_size else get_adapter(base).default_img_size()
    sample = tuple(get_adapter(base).input_shape(hw))
    env: dict = {}
    for bs in sizes:
        bar.set_postfix_str(f"benchmark batch {bs}")
        res = benchmark(models, batch_size=bs, input_size=sample, device=dev, warmup=warmup, repeats=repeats,
                        iters=iters)
        env = res.env
        for row, t in zip(rows, res.timings):
            row.img_per_s[bs], row.speedup[bs] = t.img_per_s, t.speedup
            if bs == 1:
                row.latency_ms = t.ms_per_batch
        bar.update(1)
    bar.close()
    env = {**env, "device": str(dev), "model": name, "data": str(data) if data else None, "vitrim": __version__,
           "warmup": warmup, "repeats": repeats, "iters": iters, "seconds": round(time.perf_counter() - started, 1),
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    result = CompareResult(rows, sizes, {}, env, n_images, pictures, skipped)
    if output is not None:
        result.paths = write_report(result, output, plots=plots)
    return result


