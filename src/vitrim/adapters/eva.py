"""Adapter for timm's ``Eva`` family (EVA-02, DINOv3, RoPE ViTs with timm's ``EvaAttention``).

The model's own modules run unchanged: ``patch_embed``, ``_pos_embed`` (class and register tokens,
absolute positions or none, the rope table), ``norm_pre``, every block, ``norm`` and the head. Each
block is handed to the method through a facade that shows the block contract
(``vitrim.adapters.base``) with this forward's rope rows bound: ``block(x)`` is the block's own
forward with its rope; its attention's ``q_norm`` / ``k_norm`` are the module's norms followed by the
module's own rotation of the patch rows, so ``vitrim.ops.attention`` computes exactly the attention
the block computes. Where tokens were pruned (a gather recorded by the method), the rope rows are
gathered with the same indices (``vitrim.ops.rope.gather_rope``); a token without a patch position
(EViT's fused token) gets the identity rotation [vitrim extension]. ToMe carries the coordinates of
its merged tokens in ``ForwardState.positions`` (``position="mean"``: the size-weighted mean, the
rotation recomputed there for DINOv3 rope; ``"keep"``: the destination's, a gather) [vitrim
extension]. Methods that compute on a subset of rows (IdleViT) are refused at the first block that
would need rope rows this adapter cannot give.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError, UnsupportedModelError, VitrimError
from ..measure.flops import CostPlan, linear_macs, price_blocks
from ..methods.base import ModelInfo, ReductionMethod
from ..ops.prune import PruneRecord
from ..ops.rope import gather_rope, grid_positions, rows_from_positions
from ..state import ForwardState
from .base import Adapter, overrides, register_adapter, run_block, runs_own_forward
from .timm_vit import check_attention_pool, pool_head, pool_head_macs, refuse_pool_positions

try:
    from timm.layers import PatchEmbed as TimmPatchEmbed
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3, _build_grid, apply_rot_embed_cat
    from timm.models.eva import Eva, EvaAttention, EvaBlock
except ImportError:  # pragma: no cover - guarded by the dependency pin
    Eva = EvaAttention = EvaBlock = TimmPatchEmbed = apply_rot_embed_cat = RotaryEmbeddingDinoV3 = None

__all__ = ["EvaAdapter"]


_SUPPORTED = "tome, evit, etps, dynamicvit and dtps"
_SUBSET_ERROR = ("a vitrim method asked a RoPE Eva block to attend over {rows} rows while it holds {prefix} prefix and "
                 "{patches} patch tokens; vitrim does not yet carry rope positions through this method. Supported on "
                 "timm Eva with RoPE: " + _SUPPORTED + "; every method at zero reduction and on Eva models without RoPE")


class _QKV:
    """The attention's q/k/v projections as one linear-like ``[q; k; v]`` (weight ``[3A, C]``), with
    ``q_bias`` / ``k_bias`` / ``v_bias`` (fused) or ``q_proj`` / ``k_proj`` / ``v_proj`` (separate)."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    @property
    def weight(self) -> torch.Tensor:
        a = self.attn
        return a.qkv.weight if a.qkv is not None else torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])

    @property
    def bias(self) -> Optional[torch.Tensor]:
        a = self.attn
        if a.qkv is not None:
            return None if a.q_bias is None else torch.cat((a.q_bias, a.k_bias, a.v_bias))
        parts = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
        if all(b is None for b in parts):
            return None
        return torch.cat([b if b is not None else torch.zeros_like(a.q_proj.weight[:, 0]) for b in parts])

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        if a.qkv is not None:  # as EvaAttention.forward computes it
            if a.q_bias is None:
                return a.qkv(x)
            if a.qkv_bias_separate:
                return a.qkv(x) + self.bias
            return F.linear(x, weight=a.qkv.weight, bias=self.bias)
        return torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], dim=-1)


class _RopeNorm:
    """The module's q- or k-norm, then its rotation of the patch rows (prefix rows get none)."""

    def __init__(self, norm: nn.Module, rope: Optional[torch.Tensor], num_prefix: int, half: bool) -> None:
        self.norm, self.rope, self.num_prefix, self.half = norm, rope, num_prefix, half

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = self.norm(t)
        if self.rope is None:
            return t
        p, n = self.num_prefix, self.rope.shape[-2]
        if t.shape[-2] == p + n:
            return torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], self.rope, half=self.half)], dim=2)
        if t.shape[-2] == 1:  # one query alone (the class or the average token's): no rotation
            return t
        raise VitrimError(_SUBSET_ERROR.format(rows=t.shape[-2], prefix=p, patches=n))


class _Attention:
    """Facade of an ``EvaAttention`` with this forward's rope rows (the attention part of the block contract)."""

    def __init__(self, attn: nn.Module, rope: Optional[torch.Tensor]) -> None:
        self.module = attn
        self.qkv = _QKV(attn)
        half = bool(getattr(attn, "rotate_half", False))
        self.q_norm = _RopeNorm(attn.q_norm, rope, attn.num_prefix_tokens, half)
        self.k_norm = _RopeNorm(attn.k_norm, rope, attn.num_prefix_tokens, half)
        self.attn_dim = attn.num_heads * attn.head_dim

    def __getattr__(self, name: str) -> Any:  # num_heads, head_dim, scale, norm, gate, proj, ..., training
        return getattr(self.__dict__["module"], name)


class _Block:
    """Facade of an ``EvaBlock`` with its rope bound: ``block(x)`` and the block contract's parts."""

    def __init__(self, block: nn.Module, rope: Optional[torch.Tensor], full_rope: Optional[torch.Tensor] = None,
                 model: Optional[nn.Module] = None, grid: tuple[int, int] = (0, 0)) -> None:
        self.module, self.rope, self.full_rope, self.model, self.grid = block, rope, full_rope, model, grid
        self.attn = _Attention(block.attn, rope)
        g1, g2 = block.gamma_1, block.gamma_2
        self.ls1 = (lambda t: g1 * t) if g1 is not None else nn.Identity()
        self.ls2 = (lambda t: g2 * t) if g2 is not None else nn.Identity()

    def at(self, state: ForwardState) -> "_Block":
        """This block with the rope rows of the tokens ``state`` describes (a method pruned before it)."""
        return _Block(self.module, _current_rope(self.model, self.full_rope, state, self.grid), self.full_rope,
                      self.model, self.grid)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rope is not None and x.shape[1] != self.module.attn.num_prefix_tokens + self.rope.shape[-2]:
            raise VitrimError(_SUBSET_ERROR.format(rows=x.shape[1], prefix=self.module.attn.num_prefix_tokens,
                                                   patches=self.rope.shape[-2]))
        return self.module(x, rope=self.rope)

    def __getattr__(self, name: str) -> Any:  # norm1, drop_path1, norm2, mlp, drop_path2, training
        return getattr(self.__dict__["module"], name)


@register_adapter
class EvaAdapter(Adapter):
    """Validates a timm ``Eva`` and installs/removes a method on it."""

    family = "timm-eva"
    label = "timm Eva"
    accepts = ("timm Eva models with EvaBlock/EvaAttention (eva02_*, vit_*_patch16_dinov3*: RoPE 'cat'/'dinov3' or "
               "none, fused or separate q/k/v with q_bias/v_bias, scale-norm, qk-norm, LayerScale, SwiGLU, registers, "
               "class token, token, average or attention-pool (map) heads); with RoPE: tome (position 'mean' on DINOv3 rope, 'keep' on any), evit, etps, dynamicvit, dtps")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return Eva is not None and isinstance(model, Eva)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        for fn in ("forward_features", "forward", "forward_head", "_pos_embed"):
            if overrides(model, Eva, fn):
                raise UnsupportedModelError(f"{name} overrides Eva.{fn}; accepted: {cls.accepts}")
        pe = model.patch_embed
        if not runs_own_forward(pe, TimmPatchEmbed) or not isinstance(pe.proj, nn.Conv2d):
            raise UnsupportedModelError(f"{name}.patch_embed is a {type(pe).__name__}; vitrim counts tokens from "
                                        f"timm's PatchEmbed; accepted: {cls.accepts}")
        check_attention_pool(model)  # an attention-pool head (Perception Encoder): timm's AttentionPoolLatent
        if getattr(model, "patch_drop", None) is not None:
            raise UnsupportedModelError(f"{name} uses patch dropout, which reorders tokens before the blocks; "
                                        f"create it with patch_drop_rate=0; accepted: {cls.accepts}")
        if getattr(model, "rope_mixed", False):
            raise UnsupportedModelError(f"{name} uses 'mixed' RoPE (one embedding per block), not yet supported; "
                                        f"accepted: {cls.accepts}")
        for i, block in enumerate(model.blocks):
            if not runs_own_forward(block, EvaBlock):
                raise UnsupportedModelError(
                    f"{name}.blocks[{i}] is a {type(block).__name__}; vitrim supports timm's pre-norm EvaBlock "
                    f"(post-norm EvaBlockPostNorm is not supported); accepted: {cls.accepts}")
            if not runs_own_forward(block.attn, EvaAttention):
                raise UnsupportedModelError(
                    f"{name}.blocks[{i}].attn is a {type(block.attn).__name__}; vitrim supports timm's EvaAttention "
                    f"(AttentionRope, grouped-query attention are not supported yet); accepted: {cls.accepts}")
            if block.attn.num_prefix_tokens != model.num_prefix_tokens:
                raise UnsupportedModelError(f"{name}.blocks[{i}].attn leaves {block.attn.num_prefix_tokens} rows "
                                            f"unrotated but the model has {model.num_prefix_tokens} prefix tokens")

    def info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(family=self.family, family_label=self.label, depth=len(m.blocks), embed_dim=m.embed_dim,
                         num_heads=m.blocks[0].attn.num_heads, num_prefix_tokens=m.num_prefix_tokens,
                         num_patches=m.patch_embed.num_patches, global_pool=m.global_pool or "",
                         has_class_token=m.cls_token is not None)

    def default_img_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.img_size)

    def num_patches(self, img_size: Optional[tuple[int, int]] = None) -> int:
        h, w = self.grid_size(img_size)
        return h * w

    def grid_size(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        pe = self.model.patch_embed
        if img_size is None:
            return tuple(pe.grid_size)
        if tuple(img_size) != tuple(pe.img_size) and not getattr(self.model, "dynamic_img_size", False):
            raise OptionError(f"img_size {img_size[0]}x{img_size[1]} does not match this model's fixed input size "
                              f"{pe.img_size[0]}x{pe.img_size[1]}; create it with dynamic_img_size=True")
        ph, pw = pe.patch_size
        if img_size[0] % ph or img_size[1] % pw:
            raise OptionError(f"img_size {img_size[0]}x{img_size[1]} is not a multiple of the patch size {ph}x{pw}")
        return img_size[0] // ph, img_size[1] // pw

    def cost_plan(self, img_size: tuple[int, int], method: Optional[ReductionMethod] = None) -> CostPlan:
        """Blocks priced through their facades (q/k/v as one ``[3A, C]`` linear; SwiGLU: its linears on
        every MLP row), the patch embedding per patch, the head."""
        m = self.model
        n = self.num_patches(img_size)
        head = linear_macs(m.head) if isinstance(m.head, nn.Module) else 0
        head += pool_head_macs(m, method, n + m.num_prefix_tokens, include_prefix=True)  # an attention pool
        blocks = [_Block(b, None) for b in m.blocks]
        return price_blocks(blocks, method, n + m.num_prefix_tokens, m.patch_embed.proj.weight.numel() * n, head)

    def install(self, method: ReductionMethod) -> None:
        refuse_pool_positions(self.model, method)
        super().install(method)


# ---------------------------------------------------------------------- reduced forward
def rope_at(module: nn.Module, grid: tuple[int, int]):
    """``coords [M, 2] (row, column) -> [M, 2D]``: the rotation of ``module`` at any grid coordinates, in its
    own layout, or ``None`` where vitrim has no such function for the rope type (then merged tokens must
    keep a grid position: ToMe ``position="keep"``).

    DINOv3's angles are linear in its normalised coordinates, an affine map of ``(row, column)``; the map is
    read off the module's own grid, so the function reproduces the module's rows on the integer grid.
    """
    if RotaryEmbeddingDinoV3 is None or not isinstance(module, RotaryEmbeddingDinoV3) or module.aug_active:
        return None
    norm = _build_grid(list(grid), grid_type="centered", grid_offset=module.grid_offset,
                       grid_indexing=module.grid_indexing, normalize_coords=module.normalize_coords,
                       ndim=2).flatten(0, -2).double()                                   # [HW, 2]
    h, w = grid
    zero = torch.zeros_like(norm[0])
    affine = torch.stack([norm[w] - norm[0] if h > 1 else zero,      # per row step
                          norm[1] - norm[0] if w > 1 else zero,      # per column step
                          norm[0]])                                  # [3, 2]: (row, column, 1) -> coordinates

    def recompute(coords: torch.Tensor) -> torch.Tensor:
        a = affine.to(coords.device)
        c = (torch.cat([coords.double(), torch.ones_like(coords[:, :1]).double()], -1) @ a).float()
        sin, cos = module._get_pos_embed_from_coords(c)
        return torch.cat([sin, cos], -1)

    return recompute


def _current_rope(model: nn.Module, rope: Optional[torch.Tensor], state: ForwardState,
                  grid: tuple[int, int]) -> Optional[torch.Tensor]:
    """The rope rows of the current patch tokens: the model's own tensor until tokens move."""
    if rope is None:
        return None
    last = next((r for r in reversed(state.records) if isinstance(r, PruneRecord) and r.positions is not None), None)
    if last is not None:
        return gather_rope(rope, last.positions)
    if state.size is None:
        return rope
    if state.positions is None:
        raise VitrimError("tokens were merged on a RoPE Eva model but the method did not carry their positions; "
                          "supported on timm Eva with RoPE: tome, " + _SUPPORTED)
    recompute = rope_at(model.rope, grid)
    if recompute is None and not torch.equal(state.positions, state.positions.round()):
        raise VitrimError(f"ToMe position='mean' needs the rotation at a merged token's mean coordinates, which "
                          f"vitrim computes for DINOv3 rope only (this model: {type(model.rope).__name__}); use "
                          f"position='keep' (merged tokens keep their destination's position)")
    return rows_from_positions(rope, state.positions, grid[1], recompute)


def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Image ``[B, 3, H, W]`` -> final normed tokens ``[B, T, C]`` and the forward's state."""
    method: ReductionMethod = self.vitrim
    grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:])) if self.dynamic_img_size \
        else tuple(self.patch_embed.grid_size)
    x = self.patch_embed(x)
    x, rope = self._pos_embed(x)
    x = self.norm_pre(x)
    state = method.new_state(x)
    if rope is not None:  # the blocks read positions: they follow merges (ToMe) from here
        state = state.replace(positions=grid_positions(grid, x.shape[0], x.device))
    use_ckpt = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
    for i, block in enumerate(self.blocks):
        current = _current_rope(self, rope, state, grid)
        x, state = run_block(method, _Block(block, current, rope, self, grid), i, x, state, use_ckpt)
    x = self.norm(x)
    method.finish(state)
    return x, state


def _head(self, x: torch.Tensor, weights: Optional[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
    if weights is None or self.global_pool in ("token", ""):
        return type(self)._vitrim_original_class.forward_head(self, x, pre_logits)
    if self.attn_pool is not None:  # keys weighted by what each token stands for (Eva pools every token)
        return pool_head(self, x, weights, pre_logits, include_prefix=True)
    if self.global_pool != "avg":
        raise VitrimError(f"pooling {self.global_pool!r} with weighted tokens is not supported on timm Eva")
    p = self.num_prefix_tokens
    w = weights[:, p:].to(x.dtype)
    x = (x[:, p:] * w).sum(dim=1) / w.sum(dim=1)
    x = self.head_drop(self.fc_norm(x))
    return x if pre_logits else self.head(x)


def _refuse_masks(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise VitrimError("attn_mask / is_causal are not supported on a vitrim-reduced model; vitrim.remove(model) "
                          "restores the original behaviour")


def _forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                      is_causal: bool = False) -> torch.Tensor:
    _refuse_masks(attn_mask, is_causal)
    x, state = self.forward_tokens(x)
    x._vitrim_pool_weights = (self.vitrim.pool_weights(state),)
    return x


def _forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    carried = getattr(x, "_vitrim_pool_weights", None)
    return _head(self, x, carried[0] if carried is not None else None, pre_logits)


def _forward_head_with_state(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
    return _head(self, x, self.vitrim.pool_weights(state))


def _forward_with_state(self, x: torch.Tensor):
    x, state = self.forward_tokens(x)
    return self.forward_head_with_state(x, state), state


def _forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
    _refuse_masks(attn_mask, is_causal)
    return self.forward_with_state(x)[0]


def _forward_intermediates(self, *args: Any, **kwargs: Any):
    raise VitrimError("forward_intermediates is not supported on a vitrim-reduced timm Eva model yet; use "
                      "vitrim.forward_dense(model, x) or vitrim.remove(model) for the original behaviour")


EvaAdapter.entry_points = {
    "forward_tokens": _forward_tokens,
    "forward_features": _forward_features,
    "forward_head": _forward_head,
    "forward_intermediates": _forward_intermediates,
    "forward": _forward,
    "forward_with_state": _forward_with_state,
    "forward_head_with_state": _forward_head_with_state,
}
