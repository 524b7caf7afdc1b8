"""Adapter for timm's PVT-v2 (``pvt_v2_b0`` .. ``pvt_v2_b5``, ``pvt_v2_b2_li``): pyramid ViTs.

Only methods that keep every token in place can reduce a pyramid model (its stages need complete
``H x W`` maps for the overlapping patch embeddings, the spatial-reduction attention and the
depthwise convolutions): the adapter reports ``ModelInfo.needs_all_tokens``, and methods that
remove tokens refuse such models (``ReductionMethod.check_model``).

Installing swaps the model's class for a generated subclass whose forward runs the model's own
``patch_embed``, each stage's own ``downsample`` and ``norm`` and the model's ``forward_head``, and
hands every block to the method bound to its stage's ``(H, W)`` (a :class:`~vitrim.adapters.base.BoundBlock`
with ``feat_size``), with a :class:`PyramidState` per stage. Blocks are numbered 0.. across stages
(``pvt_v2_b1``: stage 0 = blocks 0, 1; stage 1 = 2, 3; ...).

FLOPs (:meth:`PvtV2Adapter.cost_plan`, used by ``vitrim.flops``): MACs of every linear and
convolution from the modules' shapes, for the rows each block computes (the method's
``plan_block`` with the stage's ``H * W`` tokens): ``q`` and ``proj`` on the computed rows; spatial
reduction (conv, or pool + 1x1 conv) and ``kv`` on the full map; ``QK^T`` and ``AV`` computed-rows x
reduced keys; ``fc1``, ``fc2`` and the 3x3 depthwise conv (9 MACs per hidden channel) on the
computed rows (an idle block computes the conv at its computed rows only, ``ops.idle.pvt_mlp``); the
method's own extra MACs (an idle block's selection score). Norms, activations, pooling and
bookkeeping are not counted (``docs/flops.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..measure.flops import CostPlan, LayerFlops, conv_macs
from ..methods.base import ModelInfo, ReductionMethod
from ..state import ForwardState
from .base import (Adapter, BoundBlock, overrides, register_adapter, run_block,
                   runs_own_forward)

try:  # timm >= 1.0
    from timm.models import pvt_v2 as _pvt
except ImportError:  # pragma: no cover - guarded by the dependency pin
    _pvt = None

__all__ = ["PvtV2Adapter", "PyramidState"]

FAMILY = "timm-pvt-v2"


@dataclass(frozen=True)
class PyramidState(ForwardState):
    """:class:`ForwardState` of one stage: ``num_patches = H * W`` of the stage, its ``feat_size``
    ``(H, W)`` and index; ``records`` carry over from stage to stage."""

    feat_size: tuple[int, int] = (0, 0)
    stage: int = 0


def _conv_out(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return (size[0] + 2 * ph - kh) // sh + 1, (size[1] + 2 * pw - kw) // sw + 1


def _is_dwconv3x3(conv: nn.Module) -> bool:
    """Whether ``conv`` is timm's ``MlpWithDepthwiseConv.dwconv`` layout: depthwise 3x3, stride 1, zero padding 1."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and conv.groups == conv.in_channels == conv.out_channels)


@register_adapter
class PvtV2Adapter(Adapter):
    """Validates a timm ``PyramidVisionTransformerV2`` and installs/removes a method on it."""

    family = FAMILY
    label = "PVT-v2"
    accepts = "timm PyramidVisionTransformerV2 (pvt_v2_b0..b5, pvt_v2_b2_li) for methods that idle tokens"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _pvt is not None and isinstance(model, _pvt.PyramidVisionTransformerV2)

    # ------------------------------------------------------------------ checks
    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        for fn in ("forward_features", "forward", "forward_head"):
            if overrides(model, _pvt.PyramidVisionTransformerV2, fn):
                raise UnsupportedModelError(
                    f"{name} overrides PyramidVisionTransformerV2.{fn}; vitrim reduces timm's own PVT-v2 "
                    f"(pvt_v2_b0..b5, pvt_v2_b2_li), so it cannot keep {name}'s behaviour")
        for s, stage in enumerate(model.stages):
            if not runs_own_forward(stage, _pvt.PyramidVisionTransformerStage):
                raise UnsupportedModelError(f"{name}.stages[{s}] is a {type(stage).__name__}; vitrim supports "
                                            f"timm's pvt_v2.PyramidVisionTransformerStage")
            for i, block in enumerate(stage.blocks):
                where = f"{name}.stages[{s}].blocks[{i}]"
                parts = ((block, _pvt.Block, "block"), (block.attn, _pvt.Attention, "attn"),
                         (block.mlp, _pvt.MlpWithDepthwiseConv, "mlp"))
                for module, cls, what in parts:
                    if not runs_own_forward(module, cls):
                        raise UnsupportedModelError(
                            f"{where} {what} is a {type(module).__name__}; vitrim supports timm's pvt_v2.Block "
                            f"with pvt_v2.Attention (spatial reduction or linear) and MlpWithDepthwiseConv")
                conv = block.mlp.dwconv
                if not _is_dwconv3x3(conv):
                    raise UnsupportedModelError(
                        f"{where} mlp.dwconv is {conv!r}; vitrim's idle MLP supports timm's depthwise 3x3 conv "
                        f"(stride 1, zero padding 1, groups = channels), which it runs on the map of the "
                        f"computed rows with zeros at the idle positions")

    # ------------------------------------------------------------------ facts
    def info(self) -> ModelInfo:
        m = self.model
        depths = tuple(len(s.blocks) for s in m.stages)
        dims = tuple(s.blocks[0].attn.dim if len(s.blocks) else 0 for s in m.stages)
        last = m.stages[-1].blocks[-1].attn
        h, w = self.stage_sizes()[0]
        return ModelInfo(
            family=FAMILY, family_label=self.label, depth=sum(depths), embed_dim=last.dim, num_heads=last.num_heads,
            num_prefix_tokens=0, num_patches=h * w, global_pool=m.global_pool or "", has_class_token=False,
            stage_depths=depths, stage_dims=dims, needs_all_tokens=True,
        )

    def default_img_size(self) -> tuple[int, int]:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (3, 224, 224))
        return int(size[1]), int(size[2])

    def stage_sizes(self, img_size: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
        """``(H, W)`` of every stage's token map for an input of ``img_size``."""
        size = self.default_img_size() if img_size is None else img_size
        size = _conv_out(size, self.model.patch_embed.proj)
        out = []
        for stage in self.model.stages:
            if stage.downsample is not None:
                size = _conv_out(size, stage.downsample.proj)
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
        size = _conv_out(img_size, m.patch_embed.proj)
        embed = conv_macs(m.patch_embed.proj, size[0] * size[1])
        layers, index = [], 0
        for stage, (h, w) in zip(m.stages, sizes):
            n = h * w
            if stage.downsample is not None:
                embed += conv_macs(stage.downsample.proj, n)
            for block in stage.blocks:
                plan = method.plan_block(index, n, n) if method is not None else None
                rows = n if plan is None else plan.q
                kv_rows, macs = self._block_macs(block, n, (h, w), rows)
                layers.append(LayerFlops(index, rows, kv_rows, rows, macs + (0 if plan is None else plan.extra_macs)))
                index += 1
        head = m.head.in_features * m.head.out_features if isinstance(m.head, nn.Linear) else 0
        return CostPlan(sizes[0][0] * sizes[0][1], embed, head, 0, layers)

    @staticmethod
    def _block_macs(block: nn.Module, n: int, feat: tuple[int, int], rows: int) -> tuple[int, int]:
        """``(kv_rows, macs)`` of one block computing ``rows`` of its ``n`` tokens."""
        attn, mlp = block.attn, block.mlp
        c = attn.dim
        macs = rows * attn.q.in_features * attn.q.out_features
        if attn.pool is not None:  # linear SRA: adaptive pool to 7x7, then a 1x1 conv
            pooled = attn.pool.output_size
            ph, pw = (pooled, pooled) if isinstance(pooled, int) else pooled
            m_rows = ph * pw
            macs += conv_macs(attn.sr, m_rows)
        elif attn.sr is not None:
            oh, ow = _conv_out(feat, attn.sr)
            m_rows = oh * ow
            macs += conv_macs(attn.sr, m_rows)
        else:
            m_rows = n
        macs += m_rows * attn.kv.in_features * attn.kv.out_features
        macs += 2 * rows * m_rows * c                                   # QK^T and AV
        macs += rows * attn.proj.in_features * attn.proj.out_features
        macs += rows * (mlp.fc1.in_features * mlp.fc1.out_features + mlp.fc2.in_features * mlp.fc2.out_features)
        macs += conv_macs(mlp.dwconv, n)     # depthwise 3x3 on the whole map (idle positions hold zeros)
        return m_rows, macs


# ---------------------------------------------------------------------- reduced forward
def _run_stages(self, x: torch.Tensor, take: Optional[set[int]] = None):
    """Image -> final stage map ``[B, C, H, W]``, the last stage's state and the requested stage maps."""
    method: ReductionMethod = self.vitrim
    x = self.patch_embed(x)                     # [B, H, W, C]
    records: tuple = ()
    index = 0
    state: Optional[PyramidState] = None
    maps = []
    for s, stage in enumerate(self.stages):
        if stage.downsample is not None:
            x = stage.downsample(x)             # [B, C, H, W] -> [B, H, W, C]
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        state = PyramidState(num_prefix_tokens=0, num_patches=H * W, records=records, feat_size=(H, W), stage=s)
        use_ckpt = stage.grad_checkpointing and self.training and not torch.jit.is_scripting()
        for block in stage.blocks:
            x, state = run_block(method, BoundBlock(block, ((H, W),), feat_size=(H, W)), index, x, state, use_ckpt)
            index += 1
        records = state.records
        x = stage.norm(x).reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        if take is not None and s in take:
            maps.append(x)
    method.finish(state)
    return x, state, maps


def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Image ``[B, 3, H, W]`` -> the last stage's normed tokens ``[B, H*W, C]`` and the state."""
    x, state, _ = _run_stages(self, x)
    return x.flatten(2).transpose(1, 2), state


def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
    return _run_stages(self, x)[0]


def _forward_head_with_state(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
    """The model's own ``forward_head`` on the last stage's map (``[B, C, H, W]``, or its tokens
    ``[B, H*W, C]`` as returned by ``forward_tokens``): nothing is dropped, so pooling is plain."""
    if x.ndim == 3:
        H, W = state.feat_size
        x = x.reshape(x.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous()
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
        raise ValueError("output_fmt must be 'NCHW' for PVT-v2")
    take, _ = feature_take_indices(len(self.stages), indices)
    x, _, maps = _run_stages(self, x, set(take))
    return maps if intermediates_only else (x, maps)


PvtV2Adapter.entry_points = {  # the reduced forward: install() swaps these in
    "forward_tokens": _forward_tokens,
    "forward_features": _forward_features,
    "forward": _forward,
    "forward_with_state": _forward_with_state,
    "forward_head_with_state": _forward_head_with_state,
    "forward_intermediates": _forward_intermediates,
}
