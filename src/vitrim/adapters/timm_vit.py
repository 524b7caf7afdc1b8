"""Adapter for timm's ``VisionTransformer`` family (DeiT, distilled DeiT, ViT, registers, ...).

Installing a method swaps the model's class for a generated subclass whose forward threads a
:class:`~vitrim.state.ForwardState` through the blocks and hands each block to the method.
Everything else is the model's own code: ``patch_embed``, ``_pos_embed`` (class, distillation
and register tokens, dynamic image size, ``no_embed_class``), ``patch_drop``, ``norm_pre``,
``norm`` and ``forward_head``; blocks and their modules are not touched. ``remove`` restores the
original class, so the state dict and behaviour are exactly the original ones.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from ..errors import OptionError, UnsupportedModelError, VitrimError
from ..measure.flops import CostPlan, latent_pool_macs, linear_macs, price_blocks
from ..methods.base import ModelInfo, ReductionMethod
from ..ops.attention import latent_pool
from ..state import ForwardState
from .base import Adapter, overrides, register_adapter, run_block, runs_own_forward

try:  # timm >= 1.0
    from timm.layers import Attention as TimmAttention
    from timm.layers import AttentionPoolLatent
    from timm.layers import PatchEmbed as TimmPatchEmbed
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # pragma: no cover - guarded by the dependency pin
    TimmAttention = TimmBlock = TimmPatchEmbed = VisionTransformer = AttentionPoolLatent = None

__all__ = ["TimmViTAdapter", "check_attention_pool", "refuse_pool_positions", "pool_head", "pool_head_macs"]


def check_attention_pool(model: nn.Module) -> None:
    """An attention-pool head (``model.attn_pool``, ``global_pool='map'``) is timm's ``AttentionPoolLatent``
    with its own forward: vitrim runs its modules with a key bias (``ops.attention.latent_pool``)."""
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        return
    if AttentionPoolLatent is None or not runs_own_forward(pool, AttentionPoolLatent):
        raise UnsupportedModelError(
            f"{type(model).__name__}.attn_pool is a {type(pool).__name__}; vitrim reduces attention-pool heads that "
            f"are timm's AttentionPoolLatent (global_pool='map': vit_*_siglip_*, vit_*_map), whose modules it "
            f"runs with a key bias")
    if pool.latent.shape[-1] != (pool.q.in_features if isinstance(pool.q, nn.Linear) else pool.num_heads * pool.head_dim):
        raise UnsupportedModelError(f"{type(model).__name__}.attn_pool's latent width does not match its query "
                                    f"projection; vitrim cannot run this pool")


def pool_head(model: nn.Module, x: torch.Tensor, weights: torch.Tensor, pre_logits: bool,
              include_prefix: bool) -> torch.Tensor:
    """A timm model's attention-pool head on final tokens ``x: [B, T, C]`` whose keys stand for ``weights``
    ``[B, T, 1]`` tokens (``ops.attention.latent_pool``), then its ``fc_norm``, ``head_drop`` and ``head``
    (``include_prefix``: the pool attends over the prefix tokens too)."""
    if not include_prefix:
        p = model.num_prefix_tokens
        x, weights = x[:, p:], weights[:, p:]
    x = model.head_drop(model.fc_norm(latent_pool(model.attn_pool, x, weights)))
    return x if pre_logits else model.head(x)


def pool_head_macs(model: nn.Module, method: Optional[ReductionMethod], num_tokens: int,
                   include_prefix: bool) -> int:
    """MACs of ``model.attn_pool`` (0 without one) on the tokens ``method`` leaves of ``num_tokens`` entering
    the first block (``docs/flops.md``)."""
    pool = getattr(model, "attn_pool", None)
    if pool is None:
        return 0
    final = num_tokens if method is None else method.final_tokens(num_tokens)
    return latent_pool_macs(pool, final if include_prefix else final - model.num_prefix_tokens)


def refuse_pool_positions(model: nn.Module, method: ReductionMethod) -> None:
    """A pool with its own position embedding reads a fixed token order: refused for methods that remove tokens."""
    pool = getattr(model, "attn_pool", None)
    if pool is not None and getattr(pool, "pos_embed", None) is not None and method.removes_tokens:
        idling = "methods that keep every token in place (idle)"
        raise UnsupportedModelError(
            f"{type(model).__name__}.attn_pool adds its own position embedding to a fixed sequence of "
            f"{pool.pos_embed.shape[0]} tokens, which {method.name!r} merges or removes; accepted on this model: "
            f"{idling}, or a model whose attention pool has no pos_embed")


@register_adapter
class TimmViTAdapter(Adapter):
    """Validates a timm ViT and installs/removes a method on it."""

    family = "timm-vit"
    label = "timm VisionTransformer"
    accepts = ("timm VisionTransformer models (deit_*, deit_*_distilled, vit_* with class token or global-pool "
               "head, attention-pool heads (global_pool='map': vit_*_siglip_*, vit_*_map), register tokens, "
               "qk-norm, LayerScale, fused or non-fused attention, dynamic image size)")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return VisionTransformer is not None and isinstance(model, VisionTransformer)

    # ------------------------------------------------------------------ checks
    @classmethod
    def check(cls, model: nn.Module) -> None:
        name = type(model).__name__
        for fn in ("forward_features", "forward"):
            if overrides(model, VisionTransformer, fn):
                raise UnsupportedModelError(
                    f"{name} overrides VisionTransformer.{fn}; vitrim reduces timm VisionTransformer models "
                    f"whose feature forward is timm's own (deit_*, deit_*_distilled, vit_*), so it cannot "
                    f"keep {name}'s behaviour. Accepted: timm VisionTransformer and subclasses that only "
                    f"override _pos_embed/forward_head (e.g. VisionTransformerDistilled).")
        cls.check_patch_embed(model)
        check_attention_pool(model)
        for i, block in enumerate(model.blocks):
            if not runs_own_forward(block, TimmBlock):
                raise UnsupportedModelError(
                    f"{name}.blocks[{i}] is a {type(block).__name__}; vitrim supports timm's "
                    f"vision_transformer.Block (pre-norm: attention, LayerScale, drop_path, MLP). "
                    f"Blocks such as ResPostBlock or ParallelScalingBlock are not supported.")
            attn = block.attn
            if not runs_own_forward(attn, TimmAttention):
                raise UnsupportedModelError(
                    f"{name}.blocks[{i}].attn is a {type(attn).__name__}; vitrim supports timm.layers.Attention "
                    f"(fused or explicit, qk-norm, scale-norm, gate). RoPE or other attention is not supported.")

    @classmethod
    def check_patch_embed(cls, model: nn.Module) -> None:
        """The patch embedding is timm's PatchEmbed: one convolution, kernel = stride = patch size."""
        name = type(model).__name__
        pe = model.patch_embed
        if not runs_own_forward(pe, TimmPatchEmbed) or not isinstance(pe.proj, nn.Conv2d) \
                or tuple(pe.proj.kernel_size) != tuple(pe.patch_size) or tuple(pe.proj.stride) != tuple(pe.patch_size):
            raise UnsupportedModelError(
                f"{name}.patch_embed is a {type(pe).__name__}"
                + (" (a CNN stem: its token count is not the patch grid's)" if "Hybrid" in type(pe).__name__ else "")
                + "; vitrim counts tokens, grids and FLOPs from timm's PatchEmbed (one convolution with kernel = "
                  "stride = patch size). Accepted: timm ViTs with a PatchEmbed; hybrid ViTs (vit_*_r*_*, "
                  "HybridEmbed) are not supported")
        if pe.num_patches != pe.grid_size[0] * pe.grid_size[1]:
            raise UnsupportedModelError(f"{name}.patch_embed reports {pe.num_patches} patches for a "
                                        f"{pe.grid_size[0]}x{pe.grid_size[1]} grid; vitrim cannot count its tokens")

    # ------------------------------------------------------------------ facts
    def info(self) -> ModelInfo:
        m = self.model
        pool = "map" if getattr(m, "attn_pool", None) is not None else (m.global_pool or "")
        return ModelInfo(
            family=self.family,
            family_label=self.label,
            depth=len(m.blocks),
            embed_dim=m.embed_dim,
            num_heads=m.blocks[0].attn.num_heads,
            num_prefix_tokens=m.num_prefix_tokens,
            num_patches=m.patch_embed.num_patches,
            global_pool=pool,
            has_class_token=bool(getattr(m, "has_class_token", m.cls_token is not None)),
        )

    def default_img_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.img_size)

    def num_patches(self, img_size: Optional[tuple[int, int]] = None) -> int:
        pe = self.model.patch_embed
        if img_size is None:
            return pe.num_patches
        h, w = img_size
        if not (getattr(self.model, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True)):
            if (h, w) != tuple(pe.img_size):
                raise OptionError(f"img_size {h}x{w} does not match this model's fixed input size "
                                 f"{pe.img_size[0]}x{pe.img_size[1]}; create the model with dynamic_img_size=True "
                                 f"to run other sizes")
        ph, pw = pe.patch_size
        if getattr(pe, "dynamic_img_pad", False):
            return math.ceil(h / ph) * math.ceil(w / pw)
        if h % ph or w % pw:
            raise OptionError(f"img_size {h}x{w} is not a multiple of the patch size {ph}x{pw}, which this model "
                             f"refuses; accepted: multiples of {ph}x{pw} (or a model with dynamic_img_pad=True)")
        return (h // ph) * (w // pw)

    def grid_size(self, img_size: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        pe = self.model.patch_embed
        if img_size is None:
            return tuple(pe.grid_size)
        return img_size[0] // pe.patch_size[0], img_size[1] // pe.patch_size[1]

    # ------------------------------------------------------------------ FLOPs
    def cost_plan(self, img_size: tuple[int, int], method: Optional[ReductionMethod] = None) -> CostPlan:
        """Blocks priced by :func:`~vitrim.measure.flops.block_macs` at the method's plan; the patch
        embedding (its convolution, or linear, per patch); the head(s); an attention pool on the tokens
        the method leaves (:func:`~vitrim.measure.flops.latent_pool_macs`)."""
        m = self.model
        num_patches = self.num_patches(img_size)
        num_tokens = num_patches + m.num_prefix_tokens
        proj = m.patch_embed.proj
        per_patch = proj.weight.numel() if isinstance(proj, nn.Conv2d) else linear_macs(proj)
        heads = [getattr(m, "head", None), getattr(m, "head_dist", None)]
        head = sum(linear_macs(h) for h in heads if isinstance(h, nn.Module))
        head += pool_head_macs(m, method, num_tokens, m.pool_include_prefix)
        return price_blocks(m.blocks, method, num_tokens, per_patch * num_patches, head)

    def install(self, method: ReductionMethod) -> None:
        refuse_pool_positions(self.model, method)
        super().install(method)


# ---------------------------------------------------------------------- reduced forward
def _forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, ForwardState]:
    """Image ``[B, 3, H, W]`` -> final normed tokens ``[B, T, C]`` and the forward's state."""
    method: ReductionMethod = self.vitrim
    x = self.patch_embed(x)
    x = self._pos_embed(x)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    state = method.new_state(x)
    use_ckpt = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
    for i, block in enumerate(self.blocks):
        x, state = run_block(method, block, i, x, state, use_ckpt)
    x = self.norm(x)
    method.finish(state)
    return x, state


def _refuse_masks(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise VitrimError("attn_mask / is_causal are not supported on a vitrim-reduced model: the tokens a mask "
                          "refers to are merged or removed; vitrim.remove(model) restores the original behaviour")


def _forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                      is_causal: bool = False) -> torch.Tensor:
    """The final normed tokens ``[B, T, C]`` as the method leaves them. The pooling weights of this
    forward (token sizes) travel with the returned tensor, so ``forward_head(forward_features(x))``
    equals ``forward(x)``."""
    _refuse_masks(attn_mask, is_causal)
    x, state = self.forward_tokens(x)
    x._vitrim_pool_weights = (self.vitrim.pool_weights(state),)
    return x


def _pool_weighted(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """timm's global pooling with average terms weighted by token sizes (docs/methods/tome.md, "Pooling")."""
    pool = self.global_pool
    if not self.pool_include_prefix:
        x, weights = x[:, self.num_prefix_tokens:], weights[:, self.num_prefix_tokens:]
    w = weights.to(x.dtype)
    mean = (x * w).sum(dim=1) / w.sum(dim=1)
    if pool == "avg":
        return mean
    if pool == "avgmax":
        return 0.5 * (x.amax(dim=1) + mean)
    return x.amax(dim=1)  # max: unweighted, a merged token's max is its mean's max


def _head(self, x: torch.Tensor, weights: Optional[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
    """The model's head on reduced tokens: its own for token pooling or uniform weights; otherwise average
    terms weighted by ``weights`` ``[B, T, 1]``, or an attention pool whose keys stand for ``weights``
    tokens (``+ log(w)`` on its logits; docs/methods/tome.md, "Attention-pool heads")."""
    if weights is None or self.global_pool in ("token", ""):
        return type(self)._vitrim_original_class.forward_head(self, x, pre_logits)  # the model's own (distilled too)
    if self.attn_pool is not None:
        return pool_head(self, x, weights, pre_logits, self.pool_include_prefix)
    x = _pool_weighted(self, x, weights)
    x = self.fc_norm(x)
    x = self.head_drop(x)
    return x if pre_logits else self.head(x)


def _forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """timm's ``forward_head`` on what ``forward_features`` returned (its pooling weights included)."""
    carried = getattr(x, "_vitrim_pool_weights", None)
    if carried is not None:
        return _head(self, x, carried[0], pre_logits)
    if self.vitrim.pools_with_weights and self.global_pool in ("avg", "avgmax", "map"):
        raise VitrimError(
            f"forward_head got tokens that do not come from forward_features: with {self.vitrim.name!r} the "
            f"{'attention' if self.global_pool == 'map' else 'average'} pooling is weighted by what each token stands for, which only forward_features' output carries. "
            f"Pass forward_features' output unchanged, or use model(x), or "
            f"model.forward_head_with_state(*vitrim.forward_tokens(model, x))")
    return _head(self, x, None, pre_logits)


def _forward_head_with_state(self, x: torch.Tensor, state: ForwardState) -> torch.Tensor:
    """The model's head on reduced tokens, average terms weighted by the method's pooling weights."""
    return _head(self, x, self.vitrim.pool_weights(state))


def _forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                           norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                           intermediates_only: bool = False, output_dict: bool = False,
                           attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    """timm's ``forward_intermediates`` on the reduced forward (``get_intermediate_layers`` follows it).

    A reduced intermediate is what the method leaves after that block: with ``output_fmt="NLC"`` the
    patch tokens as they are (``[B, T_i - P, C]``, fewer after merging or pruning); with ``"NCHW"`` a
    dense map ``[B, C, h, w]`` in which every patch takes the feature of the token that carries it at
    that depth (``ReductionMethod.patch_owners``, as ``vitrim.forward_dense``). Prefix tokens, ``norm``,
    ``stop_early``, ``intermediates_only`` and ``output_dict`` behave as in timm.
    """
    from timm.models._features import feature_take_indices

    _refuse_masks(attn_mask, is_causal)
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    dense = output_fmt == "NCHW"
    method: ReductionMethod = self.vitrim
    take, max_index = feature_take_indices(len(self.blocks), indices)
    B, _, height, width = x.shape
    grid = tuple(self.patch_embed.dynamic_feat_size((height, width)))
    blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
    intermediates, prefixes = [], []
    with method.provenance() if dense else contextlib.nullcontext():
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        state = method.new_state(x)
        use_ckpt = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        for i, block in enumerate(blocks):
            x, state = run_block(method, block, i, x, state, use_ckpt)
            if i not in take:
                continue
            y = self.norm(x) if norm else x
            p = state.num_prefix_tokens
            prefixes.append(y[:, :p])
            if dense:
                owner = method.patch_owners(state, y.shape[1], grid).to(y.device).expand(B, -1)
                y = y.gather(1, owner.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
                intermediates.append(y.reshape(B, *grid, -1).permute(0, 3, 1, 2).contiguous())
            else:
                intermediates.append(y[:, p:])
        method.finish(state)
    prefixes = prefixes if self.num_prefix_tokens else None
    if output_dict:
        out = {"image_intermediates": intermediates}
        if prefixes is not None and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefixes
        if not intermediates_only:
            out["image_features"] = self.norm(x)
        return out
    if return_prefix_tokens and prefixes is not None:
        intermediates = list(zip(intermediates, prefixes))
    if intermediates_only:
        return intermediates
    return self.norm(x), intermediates


def _forward_with_state(self, x: torch.Tensor):
    """Logits (as ``forward``) and the forward's state, for losses that need more than logits."""
    x, state = self.forward_tokens(x)
    return self.forward_head_with_state(x, state), state


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.forward_with_state(x)[0]


TimmViTAdapter.entry_points = {  # the reduced forward: install() swaps these in
    "forward_tokens": _forward_tokens,
    "forward_features": _forward_features,
    "forward_head": _forward_head,
    "forward_intermediates": _forward_intermediates,
    "forward": _forward,
    "forward_with_state": _forward_with_state,
    "forward_head_with_state": _forward_head_with_state,
}
