"""Adapter for timm's ``Eva`` family (EVA-02, DINOv3, Perception Encoder, the RoPE ViTs).

The model's own modules run unchanged: ``patch_embed``, ``_pos_embed`` (class and register tokens,
absolute positions or none, the rope table), ``norm_pre``, every block, ``norm`` and the head (token,
average or attention pool). Each block is handed to the method through a facade that shows the block
contract (``vitrim.adapters.base``) with this forward's rope rows bound: ``block(x)`` is the block's own
forward with its rope; its attention's ``q_norm`` / ``k_norm`` are the module's norms followed by the
module's own rotation of the patch rows, so ``vitrim.ops.attention`` computes exactly the attention the
block computes; ``attn.at_rows(index)`` is the same for a subset of rows (IdleViT's computed rows).
Post-norm blocks are shown in the pre-norm layout (their norms in the ``ls1`` / ``ls2`` slots);
grouped-query attention repeats its key/value heads as the module does. Positions (rules:
``docs/models/eva.md``): where tokens were pruned (a gather recorded by the method), the rope rows are
gathered with the same indices (``vitrim.ops.rope.gather_rope``); a token without a patch position
(EViT's fused token) gets the identity rotation [vitrim extension]. ToMe carries the coordinates of its
merged tokens in ``ForwardState.positions`` (``position="mean"``: the size-weighted mean, the rotation
recomputed there for cat, mixed and DINOv3 rope; ``"keep"``: the destination's, a gather) [vitrim
extension]. ``mixed`` rope has one table per block.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OptionError, UnsupportedModelError, VitrimError
from ..measure.flops import CostPlan, LayerFlops, linear_macs
from ..methods.base import BlockTokens, ModelInfo, ReductionMethod
from ..ops.prune import PruneRecord
from ..ops.rope import gather_rope, grid_positions, rows_from_positions
from ..state import ForwardState
from .base import Adapter, overrides, register_adapter, run_block, runs_own_forward

try:
    from timm.layers import AttentionPoolLatent, AttentionRope
    from timm.layers import PatchEmbed as TimmPatchEmbed
    from timm.layers.pos_embed_sincos import (RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed,
                                              _build_grid, _rope_layout, apply_rot_embed_cat, get_mixed_freqs,
                                              get_mixed_grid)
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
except ImportError:  # pragma: no cover - guarded by the dependency pin
    Eva = EvaAttention = EvaBlock = EvaBlockPostNorm = AttentionRope = AttentionPoolLatent = None
    TimmPatchEmbed = apply_rot_embed_cat = RotaryEmbeddingDinoV3 = RotaryEmbeddingCat = RotaryEmbeddingMixed = None

__all__ = ["EvaAdapter"]


_SUPPORTED = "evit, etps, dynamicvit, dtps and idle"
_SUBSET_ERROR = ("a vitrim method asked a RoPE Eva block to attend over {rows} rows while it holds {prefix} prefix and "
                 "{patches} patch tokens, without saying which rows they are (attn.at_rows); supported on timm Eva "
                 "with RoPE: tome, " + _SUPPORTED)


def _expand_heads(attn: nn.Module, t: torch.Tensor, dim: int) -> torch.Tensor:
    """Grouped-query attention: the ``num_kv_heads`` key/value heads of ``t`` (axis ``dim`` of width
    ``Hkv * d``) repeated to ``num_heads`` heads (head ``h`` uses kv head ``h // groups``, as timm)."""
    g = getattr(attn, "num_kv_groups", 1)
    if g == 1:
        return t
    dim = dim % t.dim()
    return t.unflatten(dim, (attn.num_kv_heads, attn.head_dim)).repeat_interleave(g, dim=dim).flatten(dim, dim + 1)


class _QKV:
    """The attention's q/k/v projections as one linear-like ``[q; k; v]`` (weight ``[3A, C]``): fused
    ``qkv`` with its own bias or ``q_bias`` / ``k_bias`` / ``v_bias``, or separate ``q_proj`` / ``k_proj`` /
    ``v_proj``; with grouped-query attention the key and value heads are repeated to every query head
    (what the module does after its projections), so the contract's ``[3A, C]`` layout holds."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    @property
    def weight(self) -> torch.Tensor:
        a = self.attn
        if a.qkv is not None:
            return a.qkv.weight
        return torch.cat([a.q_proj.weight, _expand_heads(a, a.k_proj.weight, 0), _expand_heads(a, a.v_proj.weight, 0)])

    @property
    def bias(self) -> Optional[torch.Tensor]:
        a = self.attn
        if a.qkv is not None:
            if getattr(a, "q_bias", None) is not None:
                return torch.cat((a.q_bias, a.k_bias, a.v_bias))
            return a.qkv.bias
        parts = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
        if all(b is None for b in parts):
            return None
        zeros = [torch.zeros_like(p.weight[:, 0]) for p in (a.q_proj, a.k_proj, a.v_proj)]
        b = [pb if pb is not None else z for pb, z in zip(parts, zeros)]
        return torch.cat([b[0], _expand_heads(a, b[1], 0), _expand_heads(a, b[2], 0)])

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        if a.qkv is not None:  # as EvaAttention / AttentionRope compute it
            if getattr(a, "q_bias", None) is None:
                return a.qkv(x)
            if a.qkv_bias_separate:
                return a.qkv(x) + self.bias
            return F.linear(x, weight=a.qkv.weight, bias=self.bias)
        return torch.cat([a.q_proj(x), _expand_heads(a, a.k_proj(x), -1), _expand_heads(a, a.v_proj(x), -1)], dim=-1)


class _RopeNorm:
    """The module's q- or k-norm, then its rotation of the patch rows (prefix rows get none).

    ``rope: [..., n, 2D]`` are the rows of the ``n`` patch tokens present; ``t: [B, H, T, d]`` holds
    ``T = p + n`` rows (prefix first) or one query alone (the class or the average token's: no rotation)."""

    def __init__(self, norm: nn.Module, rope: torch.Tensor, num_prefix: int, half: bool) -> None:
        self.norm, self.rope, self.num_prefix, self.half = norm, rope, num_prefix, half

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = self.norm(t)
        p, n = self.num_prefix, self.rope.shape[-2]
        if t.shape[-2] == p + n:
            rotated = apply_rot_embed_cat(t[:, :, p:], self.rope, half=self.half).type_as(t)
            return torch.cat([t[:, :, :p], rotated], dim=2)
        if t.shape[-2] == 1:
            return t
        raise VitrimError(_SUBSET_ERROR.format(rows=t.shape[-2], prefix=p, patches=n))


class _Attention:
    """Facade of an ``EvaAttention`` / ``AttentionRope`` with this forward's rope rows (the attention
    part of the block contract), and :meth:`at_rows` for a method that computes some rows only."""

    def __init__(self, attn: nn.Module, rope: Optional[torch.Tensor], num_prefix: int) -> None:
        self.module, self.rope, self.num_prefix = attn, rope, num_prefix
        self.qkv = _QKV(attn)
        if rope is None:  # the module's own norms: keys stay linear in the input where they were
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        else:
            half = bool(getattr(attn, "rotate_half", False))
            self.q_norm = _RopeNorm(attn.q_norm, rope, num_prefix, half)
            self.k_norm = _RopeNorm(attn.k_norm, rope, num_prefix, half)
        self.attn_dim = attn.num_heads * attn.head_dim

    def at_rows(self, index: torch.Tensor) -> "_Attention":
        """This attention for the rows ``index: [B, S]`` of the current tokens only (the prefix rows first,
        then patch rows in any order, as ``vitrim.ops.idle.select_rows`` returns them): their rope rows."""
        if self.rope is None:
            return self
        p = self.num_prefix
        return _Attention(self.module, gather_rope(self.rope, index[:, p:] - p), p)

    def __getattr__(self, name: str) -> Any:  # num_heads, head_dim, scale, norm, gate, proj, ..., training
        return getattr(self.__dict__["module"], name)


_IDENTITY = nn.Identity()


def _scale(gamma: Optional[torch.Tensor], own: Optional[nn.Module]):
    if own is not None:
        return own
    if gamma is None:
        return _IDENTITY
    return lambda t: gamma * t


class _Rope:
    """The rope of one forward: the model's table (``[N, 2D]``; ``mixed``: ``[depth, H, N, 2D]``, one per
    block) and the patch grid; the rows of the tokens a state describes (:meth:`rows`)."""

    def __init__(self, model: nn.Module, table: Optional[torch.Tensor], grid: tuple[int, int]) -> None:
        self.model, self.table, self.grid = model, table, grid
        self.per_block = bool(getattr(model, "rope_mixed", False))

    def of_block(self, index: int) -> Optional[torch.Tensor]:
        if self.table is None:
            return None
        return self.table[index] if self.per_block else self.table

    def rows(self, index: int, state: ForwardState) -> Optional[torch.Tensor]:
        """The rope rows of block ``index``'s current patch tokens: the model's own table until tokens move."""
        table = self.of_block(index)
        if table is None:
            return None
        last = next((r for r in reversed(state.records) if isinstance(r, PruneRecord) and r.positions is not None),
                    None)
        if last is not None:
            return gather_rope(table, last.positions)
        if state.size is None:
            return table
        if state.positions is None:
            raise VitrimError("tokens were merged on a RoPE Eva model but the method did not carry their positions; "
                              "supported on timm Eva with RoPE: tome, " + _SUPPORTED)
        recompute = rope_at(self.model.rope, self.grid, index)
        if recompute is None and not torch.equal(state.positions, state.positions.round()):
            raise VitrimError(f"ToMe position='mean' needs the rotation at a merged token's mean coordinates, which "
                              f"vitrim computes for timm's cat (axial), mixed and DINOv3 rope (this model: "
                              f"{type(self.model.rope).__name__}); use position='keep' (merged tokens keep their "
                              f"destination's position)")
        return rows_from_positions(table, state.positions, self.grid[1], recompute)


class _Block:
    """Facade of an ``EvaBlock`` / ``EvaBlockPostNorm`` with its rope bound: ``block(x)`` and the block
    contract's parts. A post-norm block ``x + drop_path(norm(attn(x)))`` is shown in the contract's
    pre-norm layout with ``norm1`` / ``norm2`` as the identity and its norms in the ``ls1`` / ``ls2``
    slots, so every method's block code computes exactly what the block computes."""

    def __init__(self, block: nn.Module, index: int, rope: Optional[_Rope] = None,
                 rows: Optional[torch.Tensor] = None, num_prefix: int = 0) -> None:
        self.module, self.index, self.ctx, self.rope = block, index, rope, rows
        self.attn = _Attention(block.attn, rows, num_prefix)
        if _is_post_norm(block):
            self.norm1 = self.norm2 = _IDENTITY
            self.ls1, self.ls2 = block.norm1, block.norm2
        else:
            self.norm1, self.norm2 = block.norm1, block.norm2
            self.ls1 = _scale(getattr(block, "gamma_1", None), getattr(block, "ls1", None))
            self.ls2 = _scale(getattr(block, "gamma_2", None), getattr(block, "ls2", None))

    def at(self, state: ForwardState) -> "_Block":
        """This block with the rope rows of the tokens ``state`` describes (a method moved them before it)."""
        if self.ctx is None:
            return self
        return _Block(self.module, self.index, self.ctx, self.ctx.rows(self.index, state), self.attn.num_prefix)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.attn.num_prefix
        if self.rope is not None and x.shape[1] != p + self.rope.shape[-2]:
            raise VitrimError(_SUBSET_ERROR.format(rows=x.shape[1], prefix=p, patches=self.rope.shape[-2]))
        return self.module(x, rope=self.rope)

    def __getattr__(self, name: str) -> Any:  # drop_path1, mlp, drop_path2, training
        return getattr(self.__dict__["module"], name)


def _is_post_norm(block: nn.Module) -> bool:
    return EvaBlockPostNorm is not None and isinstance(block, EvaBlockPostNorm)


def _block_macs(block: nn.Module, t: BlockTokens) -> int:
    """MACs of one Eva block (``docs/flops.md``): q on the query rows, k and v (the kv width: grouped-query
    attention) on the key rows, ``QK^T`` and ``AV``, the gate and ``proj`` on the query rows, the MLP's
    linears (SwiGLU / GLU: gate, value and output) on its rows."""
    a = block.attn
    c = block.norm1.normalized_shape[0] if hasattr(block.norm1, "normalized_shape") else a.proj.out_features
    width = a.num_heads * a.head_dim
    kv_width = getattr(a, "kv_dim", width)
    macs = c * width * t.q + 2 * c * kv_width * t.kv + 2 * t.q * t.kv * width
    macs += linear_macs(a.proj) * t.q
    if a.gate is not None:
        macs += linear_macs(a.gate) * t.q
    return macs + linear_macs(block.mlp) * t.mlp + t.extra_macs


def _pool_macs(pool: nn.Module, tokens: int) -> int:
    """MACs of timm's ``AttentionPoolLatent`` over ``tokens`` final tokens: q on the latent tokens, kv on
    every token, the latent-to-token products, ``proj`` and the MLP on the latent tokens."""
    m, c = pool.latent_len, pool.kv.in_features
    macs = m * linear_macs(pool.q) + tokens * linear_macs(pool.kv) + 2 * m * tokens * c
    return macs + m * (linear_macs(pool.proj) + (linear_macs(pool.mlp) if pool.mlp is not None else 0))


@register_adapter
class EvaAdapter(Adapter):
    """Validates a timm ``Eva`` and installs/removes a method on it."""

    family = "timm-eva"
    label = "timm Eva"
    accepts = ("timm Eva models (eva02_*, vit_*_dinov3*, vit_pe_*, vit_*_rope*): pre- or post-norm EvaBlocks with "
               "EvaAttention or AttentionRope (fused or separate q/k/v, q_bias/v_bias, grouped-query, qk-norm, "
               "scale-norm, gated), LayerScale, Mlp/SwiGLU/GLU, class token and/or registers, absolute positions or "
               "none, RoPE cat/mixed/dinov3 or none, token, average or attention-pool (map) heads; every method "
               "(ToMe position 'mean' on cat, mixed and DINOv3 rope, 'keep' on any)")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return Eva is not None and isinstance(model, Eva)

    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        for fn in ("forward_features", "forward", "forward_head", "_pos_embed", "pool"):
            if overrides(model, Eva, fn):
                raise UnsupportedModelError(f"{name} overrides Eva.{fn}; accepted: {cls.accepts}")
        pe = model.patch_embed
        if not runs_own_forward(pe, TimmPatchEmbed) or not isinstance(pe.proj, nn.Conv2d):
            raise UnsupportedModelError(f"{name}.patch_embed is a {type(pe).__name__}; vitrim counts tokens from "
                                        f"timm's PatchEmbed; accepted: {cls.accepts}")
        pool = getattr(model, "attn_pool", None)
        if pool is not None and not runs_own_forward(pool, AttentionPoolLatent):
            raise UnsupportedModelError(f"{name}.attn_pool is a {type(pool).__name__}; vitrim reduces timm's "
                                        f"AttentionPoolLatent heads; accepted: {cls.accepts}")
        if getattr(model, "patch_drop", None) is not None:
            raise UnsupportedModelError(f"{name} uses patch dropout, which reorders tokens before the blocks; "
                                        f"create it with patch_drop_rate=0; accepted: {cls.accepts}")
        for i, block in enumerate(model.blocks):
            if not (runs_own_forward(block, EvaBlock) or runs_own_forward(block, EvaBlockPostNorm)):
                raise UnsupportedModelError(
                    f"{name}.blocks[{i}] is a {type(block).__name__}; vitrim supports timm's EvaBlock and "
                    f"EvaBlockPostNorm; accepted: {cls.accepts}")
            attn = block.attn
            if not (runs_own_forward(attn, EvaAttention) or runs_own_forward(attn, AttentionRope)):
                raise UnsupportedModelError(
                    f"{name}.blocks[{i}].attn is a {type(attn).__name__}; vitrim supports timm's EvaAttention and "
                    f"AttentionRope; accepted: {cls.accepts}")
            if attn.num_prefix_tokens != model.num_prefix_tokens:
                raise UnsupportedModelError(f"{name}.blocks[{i}].attn leaves {attn.num_prefix_tokens} rows "
                                            f"unrotated but the model has {model.num_prefix_tokens} prefix tokens")
            if attn.proj.in_features != attn.num_heads * attn.head_dim:
                raise UnsupportedModelError(f"{name}.blocks[{i}].attn projects {attn.proj.in_features} channels but "
                                            f"has {attn.num_heads} heads of {attn.head_dim}")

    def info(self) -> ModelInfo:
        m = self.model
        pool = "map" if getattr(m, "attn_pool", None) is not None else (m.global_pool or "")
        return ModelInfo(family=self.family, family_label=self.label, depth=len(m.blocks), embed_dim=m.embed_dim,
                         num_heads=m.blocks[0].attn.num_heads, num_prefix_tokens=m.num_prefix_tokens,
                         num_patches=m.patch_embed.num_patches, global_pool=pool,
                         has_class_token=m.cls_token is not None, weighted_attention_pool=True)

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
        """Each block priced from its own modules (:func:`_block_macs`), the patch embedding per patch, the
        head: the attention pool over the final tokens (:func:`_pool_macs`) and the classifier."""
        m = self.model
        n = self.num_patches(img_size)
        tokens = n + m.num_prefix_tokens
        if method is None:
            plan, extra = [BlockTokens(tokens, tokens, tokens)] * len(m.blocks), 0
        else:
            plan, extra = method.block_tokens(tokens), method.extra_macs(tokens)
        layers = [LayerFlops(i, t.q, t.kv, t.mlp, _block_macs(b, t)) for i, (b, t) in enumerate(zip(m.blocks, plan))]
        head = linear_macs(m.head) if isinstance(m.head, nn.Module) else 0
        if getattr(m, "attn_pool", None) is not None:
            head += _pool_macs(m.attn_pool, plan[-1].tokens_out if plan else tokens)
        return CostPlan(tokens, m.patch_embed.proj.weight.numel() * n, head, extra, layers)


# ---------------------------------------------------------------------- rotations at any coordinates
def _affine(grid_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[3, 2]``: the affine map ``(row, column, 1) -> coordinates`` of a rope module, read off its own
    coordinates ``grid_values: [h * w, 2]`` of the row-major patch grid (exact: the maps are affine)."""
    h, w = grid
    g = grid_values.double()
    zero = torch.zeros_like(g[0])
    return torch.stack([g[w] - g[0] if h > 1 else zero, g[1] - g[0] if w > 1 else zero, g[0]])


def _apply_affine(affine: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    c = torch.cat([coords.double(), torch.ones_like(coords[:, :1]).double()], -1)
    return (c @ affine.to(coords.device)).float()


def rope_at(module: nn.Module, grid: tuple[int, int], block: int = 0):
    """``coords [M, 2] (row, column) -> [M, 2D]`` (``mixed``: ``[H, M, 2D]``, block ``block``'s): the rotation of
    ``module`` at any grid coordinates in its own layout, or ``None`` where vitrim has no such function for the
    rope type or its coordinates are augmented (training-time jitter); merged tokens then need a grid position
    (ToMe ``position="keep"``).

    Every rope type's angles are linear in its coordinates, an affine map of ``(row, column)`` read off the
    module's own grid (``cat``: index / pixel / centered grids, offsets, ``ref_feat_shape`` rescaling, ``xy``
    order; ``dinov3``: normalised coordinates; ``mixed``: its ``t_x, t_y``), so each function reproduces the
    module's rows on the integer grid.
    """
    if getattr(module, "aug_active", False) and module.training:
        return None
    if RotaryEmbeddingDinoV3 is not None and isinstance(module, RotaryEmbeddingDinoV3):
        norm = _build_grid(list(grid), grid_type="centered", grid_offset=module.grid_offset,
                           grid_indexing=module.grid_indexing, normalize_coords=module.normalize_coords,
                           ndim=2).flatten(0, -2)
        affine = _affine(norm, grid)

        def dinov3(coords: torch.Tensor) -> torch.Tensor:
            sin, cos = module._get_pos_embed_from_coords(_apply_affine(affine, coords))
            return torch.cat([sin, cos], -1)

        return dinov3
    if RotaryEmbeddingCat is not None and isinstance(module, RotaryEmbeddingCat):
        values = _build_grid(list(grid), grid_type=module.grid_type, ref_feat_shape=module.ref_feat_shape,
                             grid_offset=module.grid_offset, grid_indexing=module.grid_indexing,
                             normalize_coords=module.normalize_coords).flatten(0, -2)
        affine = _affine(values, grid)

        def cat(coords: torch.Tensor) -> torch.Tensor:
            pos = _apply_affine(affine, coords).unsqueeze(-1) * module.bands.float()      # [M, 2, bands]
            sin = _rope_layout(pos.sin().flatten(-2), module.rotate_half)
            cos = _rope_layout(pos.cos().flatten(-2), module.rotate_half)
            return torch.cat([sin, cos], -1)

        return cat
    if RotaryEmbeddingMixed is not None and isinstance(module, RotaryEmbeddingMixed):
        t_x, t_y = get_mixed_grid(list(grid), grid_indexing=module.grid_indexing, device=module.freqs.device)
        affine = _affine(torch.stack([t_x, t_y], -1), grid)

        def mixed(coords: torch.Tensor) -> torch.Tensor:
            c = _apply_affine(affine, coords)
            return get_mixed_freqs(module.freqs[:, block], c[:, 0], c[:, 1])              # [H, M, 2D]

        return mixed
    return None


# ---------------------------------------------------------------------- reduced forward
def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, _Rope]:
    """The model's own embedding: patch embedding, prefix tokens, positions, the rope table, ``norm_pre``."""
    grid = tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:])) if self.dynamic_img_size \
        else tuple(self.patch_embed.grid_size)
    x = self.patch_embed(x)
    x, table = self._pos_embed(x)
    return self.norm_pre(x), _Rope(self, table, grid)


def _run_blocks(self, x: torch.Tensor, rope: _Rope, take=(), last: Optional[int] = None):
    """Blocks ``0..last`` through the method; ``(x, state, [(i, x_i, state_i) for i in take])``."""
    method: ReductionMethod = self.vitrim
    state = method.new_state(x)
    if rope.table is not None:  # the blocks read positions: they follow merges (ToMe) from here
        state = state.replace(positions=grid_positions(rope.grid, x.shape[0], x.device))
    use_ckpt = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
    p = self.num_prefix_tokens
    taken = []
    blocks = self.blocks if last is None else self.blocks[:last + 1]
    for i, block in enumerate(blocks):
        facade = _Block(block, i, rope, rope.rows(i, state), p)
        x, state = run_block(method, facade, i, x, state, use_ckpt)
        if i in take:
            taken.append((i, x, state))
    return x, state, taken


def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Image ``[B, 3, H, W]`` -> final normed tokens ``[B, T, C]`` and the forward's state."""
    x, rope = _embed(self, x)
    x, state, _ = _run_blocks(self, x, rope)
    x = self.norm(x)
    self.vitrim.finish(state)
    return x, state


def _head(self, x: torch.Tensor, weights: Optional[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
    """The model's head on reduced tokens. Token pooling or uniform weights: the model's own. Average
    pooling: weighted by ``weights [B, T, 1]`` (token sizes, keep masks). Attention pool: ``log(weights)``
    added to its logits (ToMe's proportional attention; a keep mask's dead tokens get ``-inf``)."""
    pool = getattr(self, "attn_pool", None)
    if pool is not None and pool.pos_embed is not None and x.shape[1] != pool.pos_embed.shape[0]:
        raise VitrimError(f"{type(self).__name__}.attn_pool adds its own position embedding to "
                          f"{pool.pos_embed.shape[0]} tokens but {x.shape[1]} reach it: vitrim cannot reduce a model "
                          f"whose attention pool has positions; accepted: attention pools without pos_embed")
    if weights is None or (pool is None and self.global_pool in ("token", "")):
        return type(self)._vitrim_original_class.forward_head(self, x, pre_logits)
    if pool is not None:
        x = pool(x, attn_mask=weights[:, None, None, :, 0].to(x.dtype).log())
    elif self.global_pool == "avg":
        p = self.num_prefix_tokens
        w = weights[:, p:].to(x.dtype)
        x = (x[:, p:] * w).sum(dim=1) / w.sum(dim=1)
    else:
        raise VitrimError(f"pooling {self.global_pool!r} with weighted tokens is not supported on timm Eva; "
                          f"accepted: 'token', 'avg', attention pools, or a method whose tokens keep equal weight")
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
    if carried is None and self.vitrim.pools_with_weights and (self.global_pool == "avg" or
                                                                getattr(self, "attn_pool", None) is not None):
        raise VitrimError(
            f"forward_head got tokens that do not come from forward_features: with {self.vitrim.name!r} the pooling "
            f"is weighted by what each token stands for, which only forward_features' output carries. Pass "
            f"forward_features' output unchanged, or use model(x)")
    return _head(self, x, carried[0] if carried is not None else None, pre_logits)


def _forward_head_with_state(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
    return _head(self, x, self.vitrim.pool_weights(state))


def _forward_with_state(self, x: torch.Tensor):
    x, state = self.forward_tokens(x)
    return self.forward_head_with_state(x, state), state


def _forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
    _refuse_masks(attn_mask, is_causal)
    return self.forward_with_state(x)[0]


def _forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                           norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                           intermediates_only: bool = False, attn_mask: Optional[torch.Tensor] = None,
                           is_causal: bool = False):
    """timm's ``forward_intermediates`` on the reduced forward.

    A reduced intermediate is what the method leaves after that block: with ``output_fmt="NLC"`` the patch
    tokens as they are (``[B, T_i - P, C]``, fewer after merging or pruning); with ``"NCHW"`` a dense map
    ``[B, C, h, w]`` in which every patch takes the feature of the token that carries it at that depth
    (``ReductionMethod.patch_owners``, as ``vitrim.forward_dense``). Prefix tokens, ``norm``, ``stop_early``
    and ``intermediates_only`` behave as in timm.
    """
    from timm.models._features import feature_take_indices

    _refuse_masks(attn_mask, is_causal)
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    dense = output_fmt == "NCHW"
    method: ReductionMethod = self.vitrim
    take, max_index = feature_take_indices(len(self.blocks), indices)
    B = x.shape[0]
    intermediates, prefixes = [], []
    with method.provenance() if dense else contextlib.nullcontext():
        x, rope = _embed(self, x)
        x, state, taken = _run_blocks(self, x, rope, take=set(take), last=max_index if stop_early else None)
        for _, y, st in taken:
            y = self.norm(y) if norm else y
            p = st.num_prefix_tokens
            prefixes.append(y[:, :p])
            if dense:
                owner = method.patch_owners(st, y.shape[1], rope.grid).to(y.device).expand(B, -1)
                y = y.gather(1, owner.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
                intermediates.append(y.reshape(B, *rope.grid, -1).permute(0, 3, 1, 2).contiguous())
            else:
                intermediates.append(y[:, p:])
        method.finish(state)
    if return_prefix_tokens and self.num_prefix_tokens:
        intermediates = list(zip(intermediates, prefixes))
    if intermediates_only:
        return intermediates
    return self.norm(x), intermediates


EvaAdapter.entry_points = {
    "forward_tokens": _forward_tokens,
    "forward_features": _forward_features,
    "forward_head": _forward_head,
    "forward_intermediates": _forward_intermediates,
    "forward": _forward,
    "forward_with_state": _forward_with_state,
    "forward_head_with_state": _forward_head_with_state,
}
