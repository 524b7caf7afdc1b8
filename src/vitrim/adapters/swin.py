"""Adapter for timm's Swin Transformer (``swin_tiny/small/base/large_patch4_window7_224`` and the other
``swin_*`` of class ``SwinTransformer``): windowed pyramid ViTs, experimental.

Only methods that keep every token in place can reduce it (window partition, cyclic shift and its mask,
the position-indexed relative bias and 2x2 patch merging need the complete ``H x W`` map): the adapter
reports ``ModelInfo.needs_all_tokens``; methods that remove or merge tokens refuse the model.

Installing swaps the model's class for a generated subclass whose forward runs the model's own
``patch_embed``, each stage's own ``downsample`` (patch merging), the final ``norm`` and ``forward_head``,
and hands every block (``[B, H, W, C] -> [B, H, W, C]``) to the method. Each block is handed as a
:class:`~vitrim.adapters.base.BoundBlock` that also carries its selection unit ``idle_slots`` (``M``,
the window's slots at the current size) and ``idle_forms``: the family's own idle block in gather
(inference) and masked (training) form (:mod:`vitrim.ops.swin`), closed over the block's window
size, shift and mask. Blocks are numbered 0.. across stages (Swin-T: 0-1 / 2-3 / 4-9 / 10-11).

FLOPs (:meth:`SwinAdapter.cost_plan`): per block and image ``nW * (rows * (qkv + proj + mlp) +
2 * rows^2 * C)`` with ``rows`` the slots each window computes (the method's ``plan_block`` on one
window of ``M`` slots), plus the method's extra MACs per window; patch merging ``N_out * 4C * 2C``,
the patch embedding and the head. Norms, softmax, biases, masks, roll, top-k, gather and scatter
are not counted (``docs/flops.md``).

SwinV2 (``SwinTransformerV2``) and SwinV2-CR (``SwinTransformerV2Cr``) are refused with a message
naming timm ``SwinTransformer`` (:class:`SwinV2Refusal`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..measure.flops import CostPlan, LayerFlops, conv_macs
from ..methods.base import ModelInfo, ReductionMethod
from ..ops.swin import swin_idle_block_gather, swin_idle_block_masked
from ..state import ForwardState
from .base import Adapter, BoundBlock, overrides, register_adapter, run_block, runs_own_forward
from .pvt import PyramidState

try:
    from timm.models import swin_transformer as _swin
except ImportError:  # pragma: no cover - guarded by the dependency pin
    _swin = None
try:
    from timm.models import swin_transformer_v2 as _swin_v2
    from timm.models import swin_transformer_v2_cr as _swin_v2_cr
except ImportError:  # pragma: no cover
    _swin_v2 = _swin_v2_cr = None

__all__ = ["SwinAdapter", "SwinV2Refusal", "window_layout"]

FAMILY = "timm-swin"
ACCEPTS = "timm SwinTransformer (swin_tiny/small/base/large_patch4_window7_224 ...) for methods that idle tokens"


def window_layout(block: nn.Module, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], int]:
    """``(window_size, shift_size, nW)`` of a timm Swin block on an ``H x W`` map (padded grid)."""
    ws, shift = tuple(block.window_size), tuple(block.shift_size)
    return ws, shift, math.ceil(size[0] / ws[0]) * math.ceil(size[1] / ws[1])


def _idle_forms(block: nn.Module):
    """The block's idle forms: ``gather(x, keep, scores=None)`` and ``masked(x, keep, scores=None, mask=None)``
    (``scores``: ``[B, H * W]`` per-token scores ranked per window instead of the window-mean score;
    ``mask``: a ``[B, H, W]`` 0/1 keep mask, e.g. a straight-through sample, instead of the top-K)."""
    def gather(x: torch.Tensor, keep: int, scores: Optional[torch.Tensor] = None):
        out, index = swin_idle_block_gather(block, x, keep, scores=scores)
        return out, index, None

    def masked(x: torch.Tensor, keep: int, scores: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None):
        return swin_idle_block_masked(block, x, keep, scores=scores, mask=mask)

    return gather, masked


@register_adapter
class SwinAdapter(Adapter):
    """Validates a timm ``SwinTransformer`` and installs/removes a method on it."""

    family = FAMILY
    label = "Swin Transformer"
    accepts = ACCEPTS

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _swin is not None and isinstance(model, _swin.SwinTransformer)

    # ------------------------------------------------------------------ checks
    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        for fn in ("forward_features", "forward", "forward_head", "forward_intermediates"):
            if overrides(model, _swin.SwinTransformer, fn):
                raise UnsupportedModelError(
                    f"{name} overrides SwinTransformer.{fn}; vitrim reduces timm's own SwinTransformer "
                    f"(swin_tiny/small/base_patch4_window7_224 ...), so it cannot keep {name}'s behaviour")
        for s, stage in enumerate(model.layers):
            if not runs_own_forward(stage, _swin.SwinTransformerStage):
                raise UnsupportedModelError(f"{name}.layers[{s}] is a {type(stage).__name__}; vitrim supports "
                                            f"timm's swin_transformer.SwinTransformerStage")
            ds = stage.downsample
            if not (isinstance(ds, nn.Identity) or runs_own_forward(ds, _swin.PatchMerging)):
                raise UnsupportedModelError(f"{name}.layers[{s}].downsample is a {type(ds).__name__}; vitrim "
                                            f"supports timm's PatchMerging (or none)")
            for i, block in enumerate(stage.blocks):
                where = f"{name}.layers[{s}].blocks[{i}]"
                for module, kind in ((block, _swin.SwinTransformerBlock), (block.attn, _swin.WindowAttention)):
                    if not runs_own_forward(module, kind) or overrides(block, _swin.SwinTransformerBlock, "_attn"):
                        raise UnsupportedModelError(
                            f"{where} is not timm's own SwinTransformerBlock with WindowAttention "
                            f"({type(module).__name__}); vitrim supports timm's Swin blocks")
                if block.attn.qkv.out_features != 3 * block.attn.qkv.in_features:
                    raise UnsupportedModelError(f"{where}: qkv maps {block.attn.qkv.in_features} channels to "
                                                f"{block.attn.qkv.out_features}; vitrim needs 3 x dim (q; k; v)")
                ws = tuple(block.window_size)
                if block.window_area != ws[0] * ws[1] or block.attn.window_area != block.window_area:
                    raise UnsupportedModelError(f"{where}: window area {block.window_area} is not {ws[0]}x{ws[1]}")

    # ------------------------------------------------------------------ facts
    def info(self) -> ModelInfo:
        m = self.model
        depths = tuple(len(s.blocks) for s in m.layers)
        dims = tuple(s.blocks[0].attn.qkv.in_features if len(s.blocks) else 0 for s in m.layers)
        last = m.layers[-1].blocks[-1].attn
        h, w = self.stage_sizes()[0]
        return ModelInfo(
            family=FAMILY, family_label=self.label, depth=sum(depths), embed_dim=dims[-1], num_heads=last.num_heads,
            num_prefix_tokens=0, num_patches=h * w, global_pool=getattr(m, "global_pool", "") or "",
            has_class_token=False, stage_depths=depths, stage_dims=dims, needs_all_tokens=True,
            windowed=True, needs_all_tokens_why="Swin blocks need the full H x W token grid (windows, shifted "
                                               "windows, patch merging)",
        )

    def default_img_size(self) -> tuple[int, int]:
        built = getattr(self.model.patch_embed, "img_size", None)  # the size the model was built for
        if built is not None:
            return int(built[0]), int(built[1])
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (3, 224, 224))
        return int(size[1]), int(size[2])

    def stage_sizes(self, img_size: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
        """``(H, W)`` of every stage's token map for an input of ``img_size``."""
        size = self.default_img_size() if img_size is None else tuple(img_size)
        pe = self.model.patch_embed
        ph, pw = pe.patch_size
        if size[0] % ph or size[1] % pw:
            if not getattr(pe, "dynamic_img_pad", False):
                raise UnsupportedModelError(f"input size {size} is not divisible by the patch size {(ph, pw)}")
        size = (math.ceil(size[0] / ph), math.ceil(size[1] / pw))
        if not getattr(pe, "dynamic_img_size", False) and getattr(pe, "strict_img_size", True) \
                and pe.img_size is not None and tuple(pe.img_size) != (size[0] * ph, size[1] * pw):
            raise UnsupportedModelError(f"input size {tuple(size)} differs from the model's {tuple(pe.img_size)}; "
                                        f"build it with dynamic_img_size=True (or img_size=...) for other sizes")
        out = []
        for stage in self.model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
            out.append(size)
        return out

    def num_patches(self, img_size: Optional[tuple[int, int]] = None) -> int:
        h, w = self.stage_sizes(img_size)[0]
        return h * w

    def grid_size(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        return self.stage_sizes(img_size)[0]

    def output_grid(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        return self.stage_sizes(img_size)[-1]

    # ------------------------------------------------------------------ FLOPs
    def cost_plan(self, img_size: tuple[int, int], method: Optional[ReductionMethod] = None) -> CostPlan:
        """Analytic MACs per block of the model under ``method`` (see the module docstring)."""
        m = self.model
        sizes = self.stage_sizes(img_size)
        n1 = sizes[0][0] * sizes[0][1]
        embed = conv_macs(m.patch_embed.proj, n1)
        layers, index = [], 0
        for stage, (h, w) in zip(m.layers, sizes):
            if not isinstance(stage.downsample, nn.Identity):
                red = stage.downsample.reduction
                embed += h * w * red.in_features * red.out_features
            for block in stage.blocks:
                _, _, nW = window_layout(block, (h, w))
                M = block.window_area
                plan = method.plan_block(index, M, M) if method is not None else None
                rows = M if plan is None else plan.q
                attn, mlp = block.attn, block.mlp
                c = attn.qkv.in_features
                per_row = (attn.qkv.in_features * attn.qkv.out_features + attn.proj.in_features * attn.proj.out_features
                           + mlp.fc1.in_features * mlp.fc1.out_features + mlp.fc2.in_features * mlp.fc2.out_features)
                macs = nW * (rows * per_row + 2 * rows * rows * c + (0 if plan is None else plan.extra_macs))
                layers.append(LayerFlops(index, nW * rows, nW * rows, nW * rows, macs))
                index += 1
        head = m.head.fc.in_features * m.head.fc.out_features if isinstance(getattr(m.head, "fc", None), nn.Linear) else 0
        return CostPlan(n1, embed, head, 0, layers)


@register_adapter
class SwinV2Refusal(Adapter):
    """Refuses SwinV2 and SwinV2-CR with a clear message (cosine attention, log-spaced position MLP and
    post-norm blocks: vitrim's Swin idle blocks are written for timm ``SwinTransformer``)."""

    family = "timm-swin-v2"
    label = "SwinV2"
    accepts = ""

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        kinds = tuple(k for k in (getattr(_swin_v2, "SwinTransformerV2", None),
                                  getattr(_swin_v2_cr, "SwinTransformerV2Cr", None)) if k is not None)
        return bool(kinds) and isinstance(model, kinds)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        raise UnsupportedModelError(
            f"{type(model).__name__} (SwinV2 / SwinV2-CR) is not supported: its cosine attention, position MLP "
            f"and post-norm blocks differ from Swin v1; vitrim idles tokens on timm SwinTransformer "
            f"(swin_tiny/small/base_patch4_window7_224 ...)")

    def info(self) -> ModelInfo:  # pragma: no cover - check() always refuses
        raise NotImplementedError

    def default_img_size(self):  # pragma: no cover
        raise NotImplementedError

    def grid_size(self, img_size=None):  # pragma: no cover
        raise NotImplementedError

    def num_patches(self, img_size=None):  # pragma: no cover
        raise NotImplementedError

    def cost_plan(self, img_size, method=None):  # pragma: no cover
        raise NotImplementedError


# ---------------------------------------------------------------------- reduced forward
def _run_stages(self, x: torch.Tensor, take: Optional[set[int]] = None):
    """Image -> final normed map ``[B, H, W, C]``, the last stage's state and the requested stage maps (NCHW)."""
    method: ReductionMethod = self.vitrim
    x = self.patch_embed(x)                     # [B, H, W, C]
    records: tuple = ()
    index = 0
    state: Optional[PyramidState] = None
    maps = []
    last = len(self.layers) - 1
    for s, stage in enumerate(self.layers):
        x = stage.downsample(x)
        B, H, W, C = x.shape
        state = PyramidState(num_prefix_tokens=0, num_patches=H * W, records=records, feat_size=(H, W), stage=s)
        use_ckpt = stage.grad_checkpointing and self.training and not torch.jit.is_scripting()
        for block in stage.blocks:
            bound = BoundBlock(block, (), idle_slots=block.window_area, idle_forms=_idle_forms(block))
            x, state = run_block(method, bound, index, x, state, use_ckpt)
            index += 1
        records = state.records
        if take is not None and s in take:
            maps.append((x, s == last))
    x = self.norm(x)
    method.finish(state)
    return x, state, maps


def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Image ``[B, 3, H, W]`` -> the last stage's normed tokens ``[B, H*W, C]`` and the state."""
    x, state, _ = _run_stages(self, x)
    return x.flatten(1, 2), state


def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
    return _run_stages(self, x)[0]


def _forward_head_with_state(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
    """The model's own ``forward_head`` on the final map (``[B, H, W, C]`` or its tokens ``[B, H*W, C]``)."""
    if x.ndim == 3:
        H, W = state.feat_size
        x = x.reshape(x.shape[0], H, W, -1)
    return self.forward_head(x)


def _forward_with_state(self, x: torch.Tensor):
    x, state, _ = _run_stages(self, x)
    return self.forward_head(x), state


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.forward_head(_run_stages(self, x)[0])


def _forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                           output_fmt: str = "NCHW", intermediates_only: bool = False):
    """timm's ``forward_intermediates`` (stage maps, NCHW) on the reduced forward."""
    from timm.models._features import feature_take_indices

    if output_fmt != "NCHW":
        raise ValueError("output_fmt must be 'NCHW' for Swin")
    take, _ = feature_take_indices(len(self.layers), indices)
    x, _, maps = _run_stages(self, x, set(take))
    out = [(self.norm(m) if norm and is_last else m).permute(0, 3, 1, 2).contiguous() for m, is_last in maps]
    return out if intermediates_only else (x, out)


SwinAdapter.entry_points = {
    "forward_tokens": _forward_tokens,
    "forward_features": _forward_features,
    "forward": _forward,
    "forward_with_state": _forward_with_state,
    "forward_head_with_state": _forward_head_with_state,
    "forward_intermediates": _forward_intermediates,
}
