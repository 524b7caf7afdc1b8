"""vitrim's own registered timm models, trained by ``vitrim train`` on the embedded digits canvases.

``vitrim_vit_digits`` (the embedded default): a 12-block ViT (width 64, 2 heads, 8 px patches) for the
64 x 64 digits canvases (64 patch tokens + class token), so the papers' layer indices (3, 6, 9; 3..11) apply.
``vitrim_eva_digits``: the same size as a timm ``Eva`` built like DINOv3 (RoPE, class token and 4
registers, LayerScale, SwiGLU MLP, no absolute positions). ``vitrim_siglip_digits``: the same size as a
timm ``VisionTransformer`` built like SigLIP (no class token, attention-pool ``map`` head).
``pretrained=True`` loads the checkpoint shipped inside the package (no network).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

__all__ = ["EMBEDDED_MODEL", "EMBEDDED_CHECKPOINT", "DIGITS_MODELS", "is_digits_model", "vitrim_vit_digits",
           "vitrim_eva_digits", "vitrim_siglip_digits", "shipped_method_weights"]

_ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODEL = "vitrim_vit_digits"
EMBEDDED_CHECKPOINT = _ASSETS / "vit_digits64.pth"
#: every model vitrim trained on its digits canvases and ships: name -> its checkpoint inside the package
DIGITS_MODELS = {
    EMBEDDED_MODEL: EMBEDDED_CHECKPOINT,
    "vitrim_eva_digits": _ASSETS / "eva_digits64.pth",
    "vitrim_siglip_digits": _ASSETS / "siglip_digits64.pth",
}


def is_digits_model(name: Optional[str]) -> bool:
    """Whether ``name`` is one of vitrim's digits models (their data defaults to the digits canvases and
    their weights to the shipped checkpoint)."""
    return name in DIGITS_MODELS
#: fine-tuned learned parts of methods on the digits models: ``<model>/<method>_<keep_rate>.pth`` holding
#: only ``vitrim.*`` keys (score predictors), trained with the backbone frozen (see its README)
SHIPPED_METHOD_WEIGHTS = Path(__file__).parent / "assets" / "predictors"


def shipped_method_weights(model: str, method: str, options: dict) -> Optional[Path]:
    """The shipped fine-tuned weights of ``method``'s learned parts for the digits ``model`` at
    ``options`` (a keep rate alone, the method's other options at their defaults), or ``None``."""
    if not is_digits_model(model) or set(options) != {"keep_rate"}:
        return None
    path = SHIPPED_METHOD_WEIGHTS / model / f"{method}_{options['keep_rate']}.pth"
    return path if path.is_file() else None

def _digits_cfg(name: str) -> dict:
    return {
        "file": str(DIGITS_MODELS[name]), "num_classes": 10, "input_size": (3, 64, 64), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "label_names": tuple(str(d) for d in range(10)),  # the digits canvases' class folders
    }


default_cfgs = generate_default_cfgs({f"{name}.digits64": _digits_cfg(name) for name in DIGITS_MODELS})

#: what the three digits models share: 64 x 64 canvases, 8 px patches (an 8 x 8 grid), 12 blocks of width 64
_DIGITS_ARGS = dict(img_size=64, patch_size=8, embed_dim=64, depth=12, num_heads=2, mlp_ratio=4.0, num_classes=10)


def _build_digits(cls: type, name: str, pretrained: bool, args: dict, kwargs: dict):
    if pretrained and not DIGITS_MODELS[name].is_file():
        raise FileNotFoundError(f"the shipped checkpoint {DIGITS_MODELS[name]} of {name} is missing from this install")
    return build_model_with_cfg(cls, name, pretrained, **{**_DIGITS_ARGS, **args, **kwargs})


@register_model
def vitrim_vit_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _build_digits(VisionTransformer, "vitrim_vit_digits", pretrained, {}, kwargs)


@register_model
def vitrim_eva_digits(pretrained: bool = False, **kwargs) -> Eva:
    """DINOv3-like: axial RoPE (dinov3 type), class token + 4 registers, LayerScale, SwiGLU, no absolute positions."""
    args = dict(mlp_ratio=8 / 3, qkv_bias=False, init_values=0.1, rope_type="dinov3", rope_temperature=100, rope_rotate_half=True,
                use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=4, swiglu_mlp=True, use_fc_norm=False,
                global_pool="token")
    return _build_digits(Eva, "vitrim_eva_digits", pretrained, args, kwargs)


@register_model
def vitrim_siglip_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """SigLIP-like: no class token, attention-pool (``map``) head over the patch tokens."""
    return _build_digits(VisionTransformer, "vitrim_siglip_digits", pretrained,
                         dict(class_token=False, global_pool="map"), kwargs)
from . import lvvit as _lvvit  # noqa: F401,E402  (registers the LV-ViT models)
