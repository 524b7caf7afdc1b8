"""vitrim's own registered timm models: the embedded default trained by ``vitrim train``.

``vitrim_vit_digits``: a 12-block ViT (width 64, 2 heads, 8 px patches) for the 64 x 64 digits
canvases (64 patch tokens + class token), so the papers' layer indices (3, 6, 9; 3..11) apply.
``pretrained=True`` loads the checkpoint shipped inside the package (no network).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = ["EMBEDDED_MODEL", "EMBEDDED_CHECKPOINT", "vitrim_vit_digits", "shipped_method_weights"]

EMBEDDED_MODEL = "vitrim_vit_digits"
EMBEDDED_CHECKPOINT = Path(__file__).parent / "assets" / "vit_digits64.pth"
#: fine-tuned learned parts of methods on the embedded model: ``<method>_<keep_rate>.pth`` holding only
#: ``vitrim.*`` keys (score predictors), trained with the backbone frozen (see its README)
SHIPPED_METHOD_WEIGHTS = Path(__file__).parent / "assets" / "predictors"


def shipped_method_weights(model: str, method: str, options: dict) -> Optional[Path]:
    """The shipped fine-tuned weights of ``method``'s learned parts for the embedded ``model`` at
    ``options`` (a keep rate alone, the method's other options at their defaults), or ``None``."""
    if model != EMBEDDED_MODEL or set(options) != {"keep_rate"}:
        return None
    path = SHIPPED_METHOD_WEIGHTS / f"{method}_{options['keep_rate']}.pth"
    return path if path.is_file() else None

default_cfgs = generate_default_cfgs({
    "vitrim_vit_digits.digits64": {
        "file": str(EMBEDDED_CHECKPOINT), "num_classes": 10, "input_size": (3, 64, 64), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "label_names": tuple(str(d) for d in range(10)),  # the digits canvases' class folders
    },
})


@register_model
def vitrim_vit_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=12, num_heads=2, mlp_ratio=4.0, num_classes=10)
    if pretrained and not EMBEDDED_CHECKPOINT.is_file():
        raise FileNotFoundError(f"the embedded checkpoint {EMBEDDED_CHECKPOINT} is missing from this install")
    return build_model_with_cfg(VisionTransformer, "vitrim_vit_digits", pretrained, **dict(args, **kwargs))
from . import lvvit as _lvvit  # noqa: F401,E402  (registers the LV-ViT models)
