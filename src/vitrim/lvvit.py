"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers",
NeurIPS 2021) as timm models: ``lvvit_t``, ``lvvit_s``, ``lvvit_m``, ``lvvit_l``.

The network is timm's :class:`~timm.models.vision_transformer.VisionTransformer` with three
changes, so every timm ViT path (``_pos_embed``, blocks, ``norm``, grad checkpointing) and
vitrim's timm-ViT adapter apply unchanged:

* ``patch_embed`` is :class:`LVViTStem` (three conv + BatchNorm + ReLU, then a stride-8 projection:
  stride 16 in all, the patch grid in row-major order);
* every block's ``ls1`` / ``ls2`` is :class:`ResidualScale` (divides the branch by ``skip_lam``, no
  stored state), LayerNorm eps is 1e-5 and ``qkv`` has no bias;
* an ``aux_head`` on every patch token; the output is ``head(t[:, 0]) + 0.5 * max_j aux_head(t[:, j])``
  (max per class over the patch tokens present at the final norm).

The state dict has exactly the key names of the released checkpoints (``patch_embed.conv1`` ...,
``blocks.<i>.attn.qkv.weight`` without bias, ``aux_head.*``), so they load with ``strict=True``.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from timm.models.vision_transformer import VisionTransformer

__all__ = ["LVViT", "LVViTStem", "ResidualScale", "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l"]

_RELEASE = "https://github.com/zihangJiang/TokenLabeling/releases/download/"


class LVViTStem(nn.Module):
    """Images ``[B, 3, H, W]`` -> patch tokens ``[B, (H/16)(W/16), C]`` (row-major).

    conv 7x7/2 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU -> conv 8x8/8 (bias).
    """

    def __init__(self, img_size: Any = 224, patch_size: Any = 16, in_chans: int = 3, embed_dim: int = 384,
                 stem_dim: int = 64, bias: bool = True, dynamic_img_pad: bool = False, strict_img_size: bool = True,
                 output_fmt: Optional[str] = None, device=None, dtype=None, **unused: Any) -> None:
        super().__init__()
        if output_fmt not in (None, "NLC") or dynamic_img_pad:
            raise ValueError("LV-ViT's stem supports neither dynamic_img_size nor dynamic_img_pad")
        if to_2tuple(patch_size) != (16, 16):
            raise ValueError(f"LV-ViT's stem has a fixed stride of 16, got patch_size={patch_size!r}")
        dd = {"device": device, "dtype": dtype}
        self.img_size = to_2tuple(img_size)
        self.patch_size = (16, 16)
        self.grid_size = (self.img_size[0] // 16, self.img_size[1] // 16)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = False
        self.flatten = True
        self.conv1 = nn.Conv2d(in_chans, stem_dim, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_dim, **dd)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(stem_dim, **dd)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(stem_dim, **dd)
        self.relu = nn.ReLU(inplace=True)  # stateless: no key
        self.proj = nn.Conv2d(stem_dim, embed_dim, 8, stride=8, bias=True, **dd)

    def feat_ratio(self, as_scalar: bool = True):
        return 16 if as_scalar else (16, 16)

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // 16, img_size[1] // 16

    def conv_macs(self, img_size: tuple[int, int]) -> int:
        """MACs of the four convolutions at ``img_size`` (batch 1)."""
        h, w = (img_size[0] + 1) // 2, (img_size[1] + 1) // 2  # after the stride-2 7x7 (padding 3)
        mid = h * w * sum(c.weight.numel() for c in (self.conv1, self.conv2, self.conv3))
        gh, gw = self.dynamic_feat_size(img_size)
        return mid + gh * gw * self.proj.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        # channels-last: oneDNN runs these convolutions about 2x faster on CPU than on NCHW (measured), and
        # the projection's output then flattens to a contiguous [B, N, C] without a copy
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class ResidualScale(nn.Module):
    """``x / skip_lam``: LV-ViT's residual-branch divisor in a block's LayerScale slot (no state)."""

    def __init__(self, skip_lam: float) -> None:
        super().__init__()
        self.skip_lam = float(skip_lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.skip_lam

    def extra_repr(self) -> str:
        return f"skip_lam={self.skip_lam}"


class LVViT(VisionTransformer):
    """timm ViT with LV-ViT's stem, ``skip_lam`` residuals, ``aux_head`` and output rule."""

    def __init__(self, skip_lam: float = 2.0, stem_dim: int = 64, **kwargs: Any) -> None:
        if kwargs.get("dynamic_img_size") or kwargs.get("dynamic_img_pad"):
            raise ValueError("LV-ViT does not support dynamic_img_size / dynamic_img_pad")
        kwargs.setdefault("global_pool", "token")
        if kwargs["global_pool"] != "token":
            raise ValueError(f"LV-ViT pools with its class token and aux head, got global_pool={kwargs['global_pool']!r}")
        kwargs.update(class_token=True, qkv_bias=False, embed_layer=partial(LVViTStem, stem_dim=stem_dim),
                      norm_layer=partial(nn.LayerNorm, eps=1e-5))
        kwargs.setdefault("mlp_ratio", 3.0)
        super().__init__(**kwargs)
        self.skip_lam = float(skip_lam)
        for block in self.blocks:
            block.ls1 = ResidualScale(skip_lam)
            block.ls2 = ResidualScale(skip_lam)
        self.aux_head = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        if self.num_classes > 0:  # as timm initialises its head
            nn.init.trunc_normal_(self.aux_head.weight, std=0.02)
            nn.init.zeros_(self.aux_head.bias)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(f"LV-ViT pools with its class token and aux head, got global_pool={global_pool!r}")
        super().reset_classifier(num_classes)
        self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final normed tokens ``x: [B, T, C]`` -> ``(head(x[:, 0]) [B, K], aux_head(x[:, P:]) [B, T - P, K])``."""
        x = self.head_drop(x)
        return self.head(x[:, 0]), self.aux_head(x[:, self.num_prefix_tokens:])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``head(x[:, 0]) + 0.5 * aux_head(x[:, 1:]).max(dim=1)`` on the final tokens ``x: [B, T, C]``;
        ``pre_logits``: the class token's feature ``[B, C]``."""
        if pre_logits:
            return x[:, 0]
        cls_out, aux_out = self.forward_aux(x)
        return cls_out + 0.5 * aux_out.max(dim=1).values


def _cfg(url: str, crop_pct: float, **kwargs: Any) -> dict:
    return {"url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": crop_pct,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.conv1", "classifier": "head", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({
    "lvvit_t.in1k": _cfg(_RELEASE + "v0.2.0/lvvit_t.pth", 0.9),
    "lvvit_s.in1k": _cfg(_RELEASE + "1.0/lvvit_s-26M-224-83.3.pth.tar", 0.9),
    "lvvit_s.in1k_384": _cfg(_RELEASE + "1.0/lvvit_s-26M-384-84.4.pth.tar", 1.0, input_size=(3, 384, 384)),
    "lvvit_m.in1k": _cfg(_RELEASE + "1.0/lvvit_m-56M-224-84.0.pth.tar", 1.0),
    "lvvit_m.in1k_384": _cfg(_RELEASE + "1.0/lvvit_m-56M-384-85.4.pth.tar", 1.0, input_size=(3, 384, 384)),
    "lvvit_m.in1k_448": _cfg(_RELEASE + "1.0/lvvit_m-56M-448-85.5.pth.tar", 1.0, input_size=(3, 448, 448)),
    "lvvit_l.in1k_448": _cfg(_RELEASE + "1.0/lvvit_l-150M-448-86.2.pth.tar", 1.0, input_size=(3, 448, 448)),
    "lvvit_l.in1k_512": _cfg(_RELEASE + "1.0/lvvit_l-150M-512-86.4.pth.tar", 1.0, input_size=(3, 512, 512)),
})


def _filter(state_dict: dict, model: nn.Module) -> dict:
    """Released files: flat state dicts; wrappers and a ``module.`` prefix are accepted as timm does."""
    for key in ("state_dict_ema", "model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    return {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _create(variant: str, pretrained: bool, **kwargs: Any) -> LVViT:
    return build_model_with_cfg(LVViT, variant, pretrained, pretrained_filter_fn=_filter, **kwargs)



@register_model
def lvvit_t(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-T: 12 blocks, width 240, 4 heads, skip_lam 1 (8.53 M parameters)."""
    args = dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=3.0, skip_lam=1.0, stem_dim=64)
    return _create("lvvit_t", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_s(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-S: 16 blocks, width 384, 6 heads, skip_lam 2 (26.15 M parameters)."""
    args = dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, skip_lam=2.0, stem_dim=64)
    return _create("lvvit_s", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_m(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-M: 20 blocks, width 512, 8 heads, skip_lam 2 (55.83 M parameters)."""
    args = dict(embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0, skip_lam=2.0, stem_dim=64)
    return _create("lvvit_m", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_l(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-L: 24 blocks, width 768, 12 heads, skip_lam 3, stem width 128; 448 px by default."""
    args = dict(img_size=448, embed_dim=768, depth=24, num_heads=12, mlp_ratio=3.0, skip_lam=3.0, stem_dim=128)
    return _create("lvvit_l", pretrained, **dict(args, **kwargs))
