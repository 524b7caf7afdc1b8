"""What a reduction method did to one image, per layer (``vitrim visualize``).

Everything drawn is read from the provenance the method recorded during a real forward of the
reduced model, never recomputed: the method turns its records into :class:`~vitrim.methods.base.TokenMap`
pictures (``ReductionMethod.token_maps``: ToMe's merge groups from its source map, each pruning
stage's kept / squeezed / fused / dropped patches, IdleViT's idle tokens per idle layer), and this
module draws them on the image: merge groups filled with their mean colour and outlined, tokens
reduced at a block tinted with the method's colour, tokens reduced earlier greyed.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..adapters import get_adapter
from ..api import get_method
from ..checks import writable_file
from ..errors import VitrimError
from ..measure.flops import model_name as architecture_name
from ..methods.base import ReductionMethod, TokenMap

__all__ = ["load_image", "method_panels", "render_panels", "visualize", "method_color"]

DISPLAY_MIN = 256              # panels are upscaled (nearest) to at least this many pixels per side
PICTURE_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
EARLIER_GREY = 0.55


def method_color(method: type[ReductionMethod] | ReductionMethod) -> tuple[float, float, float]:
    """RGB in [0, 1] of a method's ``color`` (a matplotlib colour; grey where it sets none)."""
    from matplotlib.colors import to_rgb

    return to_rgb(method.color or "tab:gray")


# ---------------------------------------------------------------------- input
def _default_pil(model_name: str):
    """A digits canvas for the embedded model, else scikit-image's astronaut."""
    from PIL import Image

    from ..zoo import is_digits_model

    if is_digits_model(model_name):
        from ..train.data import IMG_EXTENSIONS, ensure_digits

        files = sorted(p for p in (ensure_digits() / "val").rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        return Image.open(files[len(files) // 3]).convert("RGB")
    from skimage import data

    return Image.fromarray(data.astronaut())


def load_image(model: nn.Module, path: Optional[str], model_name: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(x [1, 3, H, W] normalised as the model's eval transform, picture [H, W, 3] in [0, 1])``."""
    from PIL import Image

    from ..train.data import data_config, eval_transform

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


# ---------------------------------------------------------------------- provenance -> pictures
def method_panels(model: nn.Module, x: torch.Tensor, layers: Optional[Sequence[int]] = None) -> list[TokenMap]:
    """The pictures the method installed on ``model`` gives of one image ``x: [1, 3, H, W]``
    (``ReductionMethod.token_maps``, from real eval-mode forwards)."""
    method = get_method(model)
    depth = method.info.depth
    if layers is not None:
        layers = list(layers)
        bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < depth]
        if bad or not layers:
            raise VitrimError(f"layers {bad or layers} are not blocks of this model; accepted: 0-based block indices "
                              f"in 0..{depth - 1}")
    model.eval()
    grid = tuple(get_adapter(model).grid_size(tuple(x.shape[-2:])))

    def run():
        with torch.no_grad():
            return model.forward_with_state(x)[1]

    with method.provenance():
        maps = method.token_maps(run, grid, layers)
    drawn = [m.block for m in maps]
    missing = [v for v in layers or () if v not in drawn]
    if missing or not maps:
        everything = [m.block for m in method.token_maps(run, grid, list(range(depth)))] if missing else []
        raise VitrimError(f"method {method.name!r} recorded nothing to draw"
                          + (f" at blocks {missing}; it reduces tokens at blocks {everything}" if missing else ""))
    return maps


# ---------------------------------------------------------------------- drawing
def _upscale(a: np.ndarray, f: int) -> np.ndarray:
    return np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def _draw(pic: np.ndarray, panel: TokenMap, grid: tuple[int, int], tint: tuple[float, float, float]) -> np.ndarray:
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
        out = np.where((st == 1)[..., None], 0.35 * out + 0.65 * np.array(tint), out)
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


def render_panels(pic: np.ndarray, panels: Sequence[TokenMap], grid: tuple[int, int], title: str, path: str,
                  cols: int = 5, tint: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> str:
    """Write the grid (the image, then one panel per layer) to ``path`` (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [(_draw(pic, TokenMap("input"), grid, tint), "input")] + [(_draw(pic, p, grid, tint), p.title)
                                                                         for p in panels]
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

    ``output`` ends in .png, .jpg, .pdf or .svg (checked before any work). ``image`` defaults to a
    digits canvas for the embedded model, else scikit-image's astronaut;
    ``layers`` (0-based blocks) picks the panels (default: the method's choice, e.g. ToMe after 1/4,
    1/2, 3/4 and all blocks, every pruning stage, up to four idle layers).
    """
    method = get_method(model)
    output = str(writable_file(output, "picture", PICTURE_FORMATS))
    name = model_name or architecture_name(model)
    x, pic = load_image(model, image, name)
    x = x.to(next(model.parameters()).device)
    panels = method_panels(model, x, layers)
    grid = tuple(get_adapter(model).grid_size(tuple(x.shape[-2:])))
    opts = ", ".join(f"{k}={v}" for k, v in method.options().items() if k not in ("trace_source",))
    return render_panels(pic, panels, grid, f"{name} + {method.name} ({opts})\n{method.picture_legend()}", output,
                         tint=method_color(method))
