"""``vitrim visualize``: what a reduction method did to one image, per layer.

Everything drawn is read from the provenance the methods record during a real forward of the
reduced model, never recomputed:

* ToMe: ``state.source`` (``trace_source=True``). Its source map is of the final tokens, so the
  picture after block ``l`` comes from a forward with the schedule cut after ``l`` (merges in later
  blocks do not change earlier ones). Each merge group is filled with its mean colour and outlined.
* EViT / eTPS / dTPS / DynamicViT: each stage's ``PruneRecord.positions`` (the patches that survive
  the stage). Tokens pruned at the stage are tinted (EViT: fused into the extra token; TPS: squeezed
  into a kept host, each filled with its host's colour where ``PruneRecord.hosts`` is recorded;
  DynamicViT: dropped); tokens pruned at earlier stages are darkened.
* IdleViT: each idle layer's ``IdleRecord.index`` (the rows computed); idle tokens are darkened.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .errors import VitrimError

__all__ = ["Panel", "load_image", "method_panels", "render_panels", "visualize", "add_visualize_parser",
           "cmd_visualize"]

DISPLAY_MIN = 256              # panels are upscaled (nearest) to at least this many pixels per side
TINTS = {"evit": (1.0, 0.55, 0.0), "etps": (0.1, 0.5, 1.0), "dtps": (0.1, 0.5, 1.0), "dynamicvit": (0.9, 0.1, 0.1)}
IDLE_TINT = (0.25, 0.35, 0.85)
EARLIER_GREY = 0.55
LEGENDS = {"tome": "each merge group filled with its mean colour, outlined in white",
           "idle": "tinted blue: idle tokens (not computed in this block, passed on unchanged)",
           "pruning": "tinted: pruned at this block ({verb}); grey: pruned at an earlier block"}
PRUNED_VERB = {"evit": "fused", "etps": "squeezed", "dtps": "squeezed", "dynamicvit": "dropped"}


@dataclass
class Panel:
    """One picture of the grid: a per-patch map read from one layer's provenance.

    ``groups``: ``[h, w]`` group id per patch (ToMe; TPS hosts), or ``None``.
    ``state``: ``[h, w]`` 0 = active, 1 = pruned/idle at this layer, 2 = pruned earlier.
    """

    title: str
    groups: Optional[np.ndarray] = None
    state: Optional[np.ndarray] = None
    tint: tuple[float, float, float] = (1.0, 0.0, 0.0)


# ---------------------------------------------------------------------- input
def _default_pil(model_name: str):
    """A digits canvas for the embedded model, else scikit-image's astronaut."""
    from PIL import Image

    from .zoo import EMBEDDED_MODEL

    if model_name == EMBEDDED_MODEL:
        from .train.data import IMG_EXTENSIONS, ensure_digits

        files = sorted(p for p in (ensure_digits() / "val").rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        return Image.open(files[len(files) // 3]).convert("RGB")
    from skimage import data

    return Image.fromarray(data.astronaut())


def load_image(model: nn.Module, path: Optional[str], model_name: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(x [1, 3, H, W] normalised as the model's eval transform, picture [H, W, 3] in [0, 1])``."""
    from PIL import Image

    from .train.data import data_config, eval_transform

    if path is None:
        img = _default_pil(model_name)
    else:
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError) as err:
            raise VitrimError(f"cannot read image {path!r} ({err}); accepted: any file PIL opens (PNG, JPEG, ...)") \
                from err
    x = eval_transform(model)(img).unsqueeze(0)
    cfg = data_config(model)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    pic = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return x, pic


# ---------------------------------------------------------------------- provenance -> panels
def _tome_panels(model: nn.Module, x: torch.Tensor, grid: tuple[int, int], layers: Sequence[int]) -> list[Panel]:
    method = model.vitrim
    saved = (method.r, method.trace_source)
    schedule = list(method.schedule)
    panels = []
    try:
        method.trace_source = True
        for layer in layers:
            method.r = schedule[:layer + 1]
            _, state = model.forward_tokens(x)
            if state.source is None:
                panels.append(Panel(f"after block {layer + 1}: no merges yet",
                                    groups=np.arange(grid[0] * grid[1]).reshape(grid)))
                continue
            owner = state.source[0, :, state.num_prefix_tokens:].argmax(dim=0)
            n_groups = len(torch.unique(owner))
            panels.append(Panel(f"after block {layer + 1}: {n_groups} tokens", groups=owner.reshape(grid).numpy()))
    finally:
        method.r, method.trace_source = saved
    return panels


def _prune_panels(state, name: str, grid: tuple[int, int], layers: Optional[Sequence[int]]) -> list[Panel]:
    from .methods._pruning import prune_records

    n0 = grid[0] * grid[1]
    alive = np.ones(n0, dtype=bool)
    panels = []
    for rec in prune_records(state):
        if rec.positions is None:
            raise VitrimError("the pruning records hold no positions (masked training form); visualize runs the "
                              "model in eval mode")
        pos = rec.positions[0].numpy()
        now = np.zeros(n0, dtype=bool)
        now[pos[pos >= 0]] = True
        status = np.where(now, 0, np.where(alive, 1, 2))
        groups = _host_groups(rec, alive, n0)
        alive = now
        if layers is None or rec.block in layers:
            verb = PRUNED_VERB.get(name, "pruned")
            panels.append(Panel(f"block {rec.block + 1}: {int(now.sum())} kept, {int((status == 1).sum())} {verb}",
                                groups=None if groups is None else groups.reshape(grid),
                                state=status.reshape(grid), tint=TINTS.get(name, (1.0, 0.0, 0.0))))
    return panels


def _host_groups(rec, alive: np.ndarray, n0: int) -> Optional[np.ndarray]:
    """Group id per patch (each squeezed patch joins its host) where the record has ``hosts``."""
    hosts = getattr(rec, "hosts", None)
    rest = getattr(rec, "rest", None)
    if hosts is None or rest is None or rec.index is None:
        return None
    entering = np.flatnonzero(alive)                        # original positions of the rows entering
    groups = np.arange(n0)
    kept_pos = entering[rec.index[0].numpy()]
    for row, host in zip(rest[0].numpy(), hosts[0].numpy()):
        groups[entering[row]] = kept_pos[host]
    return groups


def _idle_panels(state, grid: tuple[int, int], layers: Optional[Sequence[int]], p: int) -> list[Panel]:
    from .ops.idle import IdleRecord

    recs = [r for r in state.records if isinstance(r, IdleRecord)]
    if layers is None and len(recs) > 4:
        recs = [recs[round(i * (len(recs) - 1) / 3)] for i in range(4)]
    panels = []
    n0 = grid[0] * grid[1]
    for rec in recs:
        if layers is not None and rec.layer not in layers:
            continue
        idx = rec.index[0].numpy()
        status = np.ones(n0, dtype=np.int64)
        status[idx[idx >= p] - p] = 0
        panels.append(Panel(f"block {rec.layer + 1}: {int((status == 0).sum())} computed, "
                            f"{int(status.sum())} idle", state=status.reshape(grid), tint=IDLE_TINT))
    return panels


def _default_tome_layers(depth: int) -> list[int]:
    return sorted({max(0, round(depth * f) - 1) for f in (0.25, 0.5, 0.75, 1.0)})


def method_panels(model: nn.Module, x: torch.Tensor, layers: Optional[Sequence[int]] = None) -> list[Panel]:
    """Panels for the method installed on ``model`` (from a real forward's provenance)."""
    from .adapters import get_adapter
    from .api import get_method

    method = get_method(model)
    model.eval()
    grid = tuple(get_adapter(model).grid_size(tuple(x.shape[-2:])))
    with torch.no_grad():
        if method.name == "tome":
            return _tome_panels(model, x, grid, layers or _default_tome_layers(method.info.depth))
        _, state = model.forward_with_state(x)
    if method.name == "idle":
        return _idle_panels(state, grid, layers, state.num_prefix_tokens)
    panels = _prune_panels(state, method.name, grid, layers)
    if not panels:
        raise VitrimError(f"method {method.name!r} recorded no pruning stage" + (f" at blocks {list(layers)}" if layers
                                                                                  else ""))
    return panels


# ---------------------------------------------------------------------- drawing
def _upscale(a: np.ndarray, f: int) -> np.ndarray:
    return np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def _draw(pic: np.ndarray, panel: Panel, grid: tuple[int, int]) -> np.ndarray:
    """The picture with the panel's map drawn on it, upscaled to at least ``DISPLAY_MIN`` pixels."""
    H, W = pic.shape[:2]
    ph, pw = H // grid[0], W // grid[1]
    pic = pic[:ph * grid[0], :pw * grid[1]]
    out = pic.copy()
    gid_px = None
    if panel.groups is not None:
        gid_px = _upscale(panel.groups, 1).repeat(ph, 0).repeat(pw, 1)
        flat, colours = gid_px.reshape(-1), out.reshape(-1, 3)
        sums = np.zeros((flat.max() + 1, 3))
        np.add.at(sums, flat, colours)
        counts = np.bincount(flat, minlength=len(sums))[:, None]
        out = (sums / np.maximum(counts, 1))[flat].reshape(out.shape)
    if panel.state is not None:
        st = panel.state.repeat(ph, 0).repeat(pw, 1)
        out = np.where((st == 1)[..., None], 0.35 * out + 0.65 * np.array(panel.tint), out)
        out = np.where((st == 2)[..., None], 0.3 * out + 0.7 * EARLIER_GREY, out)
    f = max(1, math.ceil(DISPLAY_MIN / max(out.shape[:2])))
    big = _upscale(out, f)
    if gid_px is not None:
        g = _upscale(gid_px, f)
        edge = np.zeros(g.shape, dtype=bool)
        edge[:, 1:] |= g[:, 1:] != g[:, :-1]
        edge[1:, :] |= g[1:, :] != g[:-1, :]
        big[edge] = (1.0, 1.0, 1.0)
    return big


def render_panels(pic: np.ndarray, panels: Sequence[Panel], grid: tuple[int, int], title: str, path: str,
                  cols: int = 5) -> str:
    """Write the grid (the image, then one panel per layer) to ``path`` (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [(_draw(pic, Panel("input"), grid), "input")] + [(_draw(pic, p, grid), p.title) for p in panels]
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows + 0.4), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, t) in zip(axes.flat, images):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(t, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def visualize(model: nn.Module, output: str, image: Optional[str] = None, layers: Optional[Sequence[int]] = None,
              model_name: Optional[str] = None) -> str:
    """Draw what the method installed on ``model`` (``vitrim.apply``) did to ``image`` and write ``output``.

    ``image`` defaults to a digits canvas for the embedded model, else scikit-image's astronaut;
    ``layers`` (0-based blocks) picks the panels (default: ToMe after 1/4, 1/2, 3/4 and all blocks;
    every pruning stage; up to four idle layers).
    """
    from .adapters import get_adapter
    from .api import get_method
    from .measure.flops import model_name as _arch

    method = get_method(model)
    name = model_name or _arch(model)
    x, pic = load_image(model, image, name)
    x = x.to(next(model.parameters()).device)
    panels = method_panels(model, x, layers)
    grid = tuple(get_adapter(model).grid_size(tuple(x.shape[-2:])))
    opts = ", ".join(f"{k}={v}" for k, v in method.options().items() if k not in ("trace_source",))
    legend = LEGENDS.get(method.name, LEGENDS["pruning"]).format(verb=PRUNED_VERB.get(method.name, "pruned"))
    return render_panels(pic, panels, grid, f"{name} + {method.name} ({opts})\n{legend}", output)


# ---------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {text!r}") from None


def add_visualize_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``vitrim visualize`` (model and method flags as ``vitrim flops``, default: the embedded model)."""
    from .cli import _add_model_args

    p = subparsers.add_parser(
        "visualize", help="draw what a method did to an image, per layer",
        description="A grid of the image with, per layer, ToMe's merge groups, the pruned/squeezed tokens "
                    "(EViT, TPS, DynamicViT) or the idle tokens (IdleViT), read from the method's provenance. "
                    "No IMAGE: a digits canvas for the embedded model, else scikit-image's astronaut.")
    p.add_argument("image", nargs="?", help="image file (default: see above)")
    _add_model_args(p, default_model=None, default_method="tome")
    p.add_argument("--show-layers", type=_int_list, metavar="I,J,...", help="0-based blocks to draw")
    p.add_argument("--output", "-o", default="vis.png", help="PNG to write (default: vis.png)")
    p.set_defaults(func=cmd_visualize)
    return p


def _default_strength(method: str, model: nn.Module) -> dict:
    """ToMe without ``r``: 0.8 of ``num_patches // depth`` (DeiT-S: 13; the embedded model: 4)."""
    from .adapters import get_adapter
    from .compare import default_sweep

    info = get_adapter(model).info()
    sweep = default_sweep(method, info.depth, info.num_patches)
    return sweep[len(sweep) // 2] if method == "tome" else {}


def cmd_visualize(args: argparse.Namespace) -> int:
    """``vitrim visualize``: build the model, apply the method (or solve it for --target-gmacs), draw."""
    from . import api
    from .cli import _method_options
    from .models import create_model
    from .zoo import EMBEDDED_MODEL

    name = args.model or EMBEDDED_MODEL
    if args.method in (None, "none", ""):
        raise VitrimError(f"visualize needs a method; accepted: {', '.join(api.methods())}")
    pretrained = args.pretrained or (name == EMBEDDED_MODEL and not args.checkpoint)
    model = create_model(name, pretrained=pretrained, checkpoint=args.checkpoint, img_size=args.img_size).eval()
    options = _method_options(args, defaults=False)
    if getattr(args, "target_gmacs", None) is not None:
        options["target_gmacs"] = args.target_gmacs
    elif not options or (args.method == "tome" and "r" not in options):
        options = {**_default_strength(args.method, model), **options}
    api.apply(model, args.method, **options)
    path = visualize(model, args.output, args.image, args.show_layers, model_name=name)
    method = api.get_method(model)
    print(f"wrote {path}: {name} + {method.name} {method.extra_repr()}")
    return 0
