"""Token idling in Swin Transformer windows, as pure functions on a timm ``SwinTransformerBlock``'s modules.

Rules: ``docs/methods/idlevit.md`` ("Swin Transformer"). Every window of every image computes a fixed
number ``K`` of its ``M = ws^2`` slots, ranked on the block's own (for SW-MSA, shifted) windows by the
window-mean query's pre-softmax logits plus the head- and query-mean relative position bias. The other
tokens skip both sub-blocks and leave the block bit-identical.

* gather form (inference): the selected rows of every window are packed into ``[B * nW, K, C]``; the
  relative position bias and the shift mask are gathered for the selected pairs; the result is
  scattered back out of place.
* masked form (training): all ``M`` rows are computed, queries attend to selected keys only, and the
  residual updates of idle rows are discarded (``where``); or, with a given keep mask (a learned
  predictor's straight-through sample, any count per window), the residual branches are multiplied
  by the mask so that gradients reach whatever produced it.

Either form ranks by the window-mean score or by per-token ``scores`` (a predictor's keep
log-probability) placed in the windows' slots (:func:`slot_scores`).

Blocks map ``[B, H, W, C]`` to ``[B, H, W, C]`` (NHWC, as timm).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .idle import rows_per_mlp_chunk
from .rows import flat_rows

__all__ = ["window_slots", "window_partition", "window_reverse", "rel_pos_bias", "shift_mask", "window_scores",
           "select_window_slots", "slot_scores", "swin_idle_block_gather", "swin_idle_block_masked", "window_keep"]


def window_keep(slots: int, keep_rate: float) -> int:
    """``K = max(1, floor(M * r))`` slots computed per window."""
    return max(1, int(slots * keep_rate))


def _pads(size: tuple[int, int], ws: tuple[int, int]) -> tuple[int, int]:
    return (ws[0] - size[0] % ws[0]) % ws[0], (ws[1] - size[1] % ws[1]) % ws[1]


def window_partition(x: torch.Tensor, ws: tuple[int, int]) -> torch.Tensor:
    """``x: [B, Hp, Wp, C]`` (divisible by ``ws``) -> ``[B * nW, M, C]`` windows in timm's order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws[0], ws[0], W // ws[1], ws[1], C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws[0] * ws[1], C)


def window_reverse(w: torch.Tensor, ws: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``w: [B * nW, M, C]`` -> ``[B, Hp, Wp, C]`` with ``size = (Hp, Wp)``."""
    Hp, Wp = size
    C = w.shape[-1]
    x = w.view(-1, Hp // ws[0], Wp // ws[1], ws[0], ws[1], C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, Hp, Wp, C)


def _to_windows(x: torch.Tensor, ws: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """timm's roll, zero padding and partition: ``[B, H, W, C]`` -> ``[B * nW, M, C]``."""
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    ph, pw = _pads(x.shape[1:3], ws)
    return window_partition(F.pad(x, (0, 0, 0, pw, 0, ph)), ws)


def _from_windows(w: torch.Tensor, ws: tuple[int, int], shift: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_to_windows`: ``[B * nW, M, C]`` -> ``[B, H, W, C]`` (padding cropped)."""
    H, W = size
    ph, pw = _pads(size, ws)
    x = window_reverse(w, ws, (H + ph, W + pw))[:, :H, :W]
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x


_SLOTS: dict = {}


def window_slots(size: tuple[int, int], ws: tuple[int, int], shift: tuple[int, int],
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """``[nW, M]`` int64 flat position (in the ``H x W`` map) of every window slot, ``-1`` for padding.

    Cached per size, window, shift and device (a small table, built once)."""
    key = (tuple(size), tuple(ws), tuple(shift), str(device))
    table = _SLOTS.get(key)
    if table is None:
        if len(_SLOTS) > 256:
            _SLOTS.clear()
        table = _SLOTS[key] = _window_slots(size, ws, shift, device)
    return table


def _window_slots(size, ws, shift, device) -> torch.Tensor:
    H, W = size
    pos = torch.arange(H * W, device=device, dtype=torch.float64).view(1, H, W, 1) + 1  # 0 = padding after pad
    return _to_windows(pos, ws, shift).view(-1, ws[0] * ws[1]).long() - 1


def rel_pos_bias(attn: nn.Module) -> torch.Tensor:
    """``[heads, M, M]`` relative position bias of a timm ``WindowAttention`` (as its ``_get_rel_pos_bias``)."""
    M = attn.window_area
    return attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(M, M, -1).permute(2, 0, 1)


def shift_mask(block: nn.Module, size: tuple[int, int], dtype: torch.dtype, device: torch.device
               ) -> Optional[torch.Tensor]:
    """``[nW, M, M]`` additive shift mask (0 / -100) of the block at map ``size``, or ``None`` (W-MSA)."""
    if not any(block.shift_size):
        return None
    if getattr(block, "dynamic_mask", False) or block.attn_mask is None:
        ph, pw = _pads(size, block.window_size)
        return block.get_attn_mask(torch.empty(1, size[0] + ph, size[1] + pw, 1, dtype=dtype, device=device))
    return block.attn_mask


def window_scores(attn: nn.Module, zw: torch.Tensor, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Window-mean query score of every slot: ``(scale/H) <q_mean, W_k z_j + b_k> + beta_j``.

    Equals the mean over heads and query positions of the pre-softmax logits ``scale <q_i, k_j> + B_ij``
    (q is affine in z). No per-slot keys are formed: ``z_j (W_k^T q_mean)``, ``2 C^2`` per window plus
    ``C`` per slot.

    Args:
        zw: ``[B * nW, M, C]`` normed windows; pad: ``[nW, M]`` bool, True at padding slots (ranked last),
            or ``None`` when the map has no padding.

    Returns:
        ``[B * nW, M]`` scores.
    """
    A = attn.qkv.out_features // 3
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(zw.mean(1), w[:A], None if b is None else b[:A]) * (attn.scale / attn.num_heads)  # [BW, A]
    score = (zw @ (q @ w[A:2 * A]).unsqueeze(-1)).squeeze(-1)                      # [BW, M]: no [BW, M, C] temporary
    if b is not None:
        score = score + (q * b[A:2 * A]).sum(-1, keepdim=True)
    beta = rel_pos_bias(attn).mean(dim=(0, 1))                                     # [M]: mean over heads, queries
    score = score + beta.to(score.dtype)
    if pad is not None:
        nW = pad.shape[0]
        score = score.view(-1, nW, score.shape[-1]).masked_fill(pad, float("-inf")).view_as(score)
    return score


def slot_scores(scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Per-token scores placed in window slots: ``scores [B, H * W]``, ``slots [nW, M]`` (flat positions,
    ``-1`` for padding) -> ``[B * nW, M]``, padding slots ``-inf`` (ranked last)."""
    B = scores.shape[0]
    padded = torch.cat([scores, scores.new_full((B, 1), float("-inf"))], dim=1)    # position -1 -> the last column
    return padded[:, slots].reshape(B * slots.shape[0], slots.shape[1])


def _select(attn: nn.Module, zw: torch.Tensor, slots: torch.Tensor, size: tuple[int, int], keep: int,
            scores: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B * nW, K]`` top-``K`` slots per window: by ``scores`` ``[B, H * W]`` if given, else the window-mean score."""
    if scores is not None:
        return select_window_slots(slot_scores(scores, slots), keep)
    nW, M = slots.shape
    pad = slots < 0 if nW * M > size[0] * size[1] else None                        # static: from shapes
    return select_window_slots(window_scores(attn, zw, pad), keep)


def select_window_slots(score: torch.Tensor, keep: int) -> torch.Tensor:
    """``score: [B * nW, M]`` -> ``[B * nW, K]`` slot indices of the top-``K``, ascending in each window."""
    return score.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values


def _pair_bias(block: nn.Module, idx: torch.Tensor, nW: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Relative position bias plus shift mask for the selected pairs: ``idx [BW, K]`` -> ``[BW, heads, K, K]``."""
    attn = block.attn
    M = attn.window_area
    pair = idx.unsqueeze(2) * M + idx.unsqueeze(1)                                   # [BW, K, K]
    rel = attn.relative_position_index.view(-1)[pair]                                # [BW, K, K]
    bias = attn.relative_position_bias_table[rel].permute(0, 3, 1, 2)                # [BW, heads, K, K]
    if mask is not None:
        BW = idx.shape[0]
        win = torch.arange(BW, device=idx.device) % nW
        m = mask.reshape(nW, M * M)[win.unsqueeze(1), pair.view(BW, -1)].view(BW, 1, *pair.shape[1:])
        bias = bias + m.to(bias.dtype)
    return bias


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The module's own attention rule (SDPA or explicit) with an additive ``bias``: -> ``[BW, T, A]``."""
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1) + bias
        out = attn.attn_drop(attn.softmax(a)) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path2(block.mlp(block.norm2(x)))


def _mlp_residual_rows(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + MLP(norm2(x))`` on rows ``x: [R, C]``, in chunks of rows (the MLP is row-wise).

    A chunk's hidden features stay in cache and need no fresh (page-faulting) allocation; measured on
    swin_tiny at keep 0.5, batch 32: stage 2's idle blocks 151 -> 146 ms, the other stages unchanged.
    """
    rows = rows_per_mlp_chunk(block.mlp.fc1.out_features)
    if x.shape[0] <= rows:
        return _mlp_residual(block, x)
    return torch.cat([_mlp_residual(block, x[r:r + rows]) for r in range(0, x.shape[0], rows)])


def swin_idle_block_gather(block: nn.Module, x: torch.Tensor, keep: int, scores: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One idle Swin block, inference form: each window computes its top-``K`` slots only.

    Args:
        x: ``[B, H, W, C]``; keep: ``K`` (< ``M``); scores: ``[B, H * W]`` per-token scores ranked in each
            window instead of the window-mean score (``None``: the window-mean score).

    Returns:
        ``(out [B, H, W, C], index [B, nW * K])``: ``index`` the flat positions of the computed tokens
        (``-1`` for padding slots, whose outputs are dropped); idle tokens of ``out`` equal ``x``'s.
    """
    attn = block.attn
    B, H, W, C = x.shape
    ws, shift = tuple(block.window_size), tuple(block.shift_size)
    slots = window_slots((H, W), ws, shift, x.device)                               # [nW, M]
    nW, M = slots.shape
    zw = _to_windows(block.norm1(x), ws, shift)                                      # [BW, M, C]
    padded = nW * M > H * W                                                          # static: from shapes
    idx = _select(attn, zw, slots, (H, W), keep, scores)                             # [BW, K]
    BW = idx.shape[0]
    zs = zw.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))                           # [BW, K, C]
    heads = attn.num_heads
    q, k, v = attn.qkv(zs).reshape(BW, keep, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = _pair_bias(block, idx, nW, shift_mask(block, (H, W), x.dtype, x.device))
    a = attn.proj_drop(attn.proj(_attend(attn, q, k, v, bias)))                      # [BW, K, C]
    pos = slots.repeat(B, 1).gather(1, idx).view(B, nW * keep)                       # [B, nW*K]
    dest = flat_rows(pos, H * W)
    dest = torch.where(pos.reshape(-1) < 0, B * H * W, dest)                         # padding -> a dropped row
    flat = x.reshape(B * H * W, C)
    if padded:
        flat = torch.cat([flat, flat.new_zeros(1, C)])
    xs = flat.index_select(0, dest).view(B, nW * keep, C) + block.drop_path1(a.view(B, nW * keep, C))
    xs = _mlp_residual_rows(block, xs.reshape(-1, C))
    out = flat.index_copy(0, dest, xs)
    if padded:  # selected padding slots all write the one extra row, which is dropped
        out = out[:-1]
    return out.view(B, H, W, C), pos


def swin_idle_block_masked(block: nn.Module, x: torch.Tensor, keep: int, scores: Optional[torch.Tensor] = None,
                           mask: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """One idle Swin block, masked fixed-shape form (training); equal to the gather form on selected rows.

    Args:
        x: ``[B, H, W, C]``; keep: ``K``; scores: as in :func:`swin_idle_block_gather`.
        mask: ``[B, H, W]`` 0/1 keep mask (float, may carry a straight-through gradient) used instead of
            the top-``K``: any count per window. Keys are the tokens where ``mask.detach()`` is 1 (rolled and
            partitioned like the features; padding slots are never keys), and the residual branches are
            multiplied by ``mask`` (idle rows stay bit-identical for a 0/1 mask).

    Returns:
        ``(out [B, H, W, C], index [B, nW * K] or None (given mask), mask [B, H, W])``: the bool top-``K``
        mask, or the given ``mask``.
    """
    attn = block.attn
    B, H, W, C = x.shape
    ws, shift = tuple(block.window_size), tuple(block.shift_size)
    slots = window_slots((H, W), ws, shift, x.device)
    nW, M = slots.shape
    zw = _to_windows(block.norm1(x), ws, shift)
    if mask is None:
        idx = _select(attn, zw, slots, (H, W), keep, scores)
        BW = idx.shape[0]
        sel = torch.zeros(BW, M, dtype=torch.bool, device=x.device).scatter(1, idx, True)   # [BW, M]
    else:
        idx = None
        sel = _to_windows(mask.detach().unsqueeze(-1).to(x.dtype), ws, shift).squeeze(-1) > 0.5  # rolled like x: [BW, M]
        BW = sel.shape[0]
    heads = attn.num_heads
    q, k, v = attn.qkv(zw).reshape(BW, M, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = rel_pos_bias(attn).unsqueeze(0)                                           # [1, heads, M, M]
    shifted = shift_mask(block, (H, W), x.dtype, x.device)
    if shifted is not None:
        bias = (bias.view(1, 1, heads, M, M) + shifted.view(1, nW, 1, M, M).to(bias.dtype)).expand(B, -1, -1, -1, -1)
        bias = bias.reshape(BW, heads, M, M)
    # a select, not a sum: idle keys get the finite dtype minimum (no fp16 overflow)
    bias = torch.where(sel[:, None, None, :], bias, torch.finfo(q.dtype).min)
    a = _from_windows(attn.proj_drop(attn.proj(_attend(attn, q, k, v, bias))), ws, shift, (H, W))
    if mask is not None:  # straight-through: the branches scaled by the mask, gradients reach its source
        m = mask.unsqueeze(-1).to(x.dtype)
        x1 = x + m * block.drop_path1(a)
        x2 = x1 + m * block.drop_path2(block.mlp(block.norm2(x1.reshape(B, -1, C)))).view(B, H, W, C)
        return x2, None, mask
    m = _from_windows(sel.unsqueeze(-1), ws, shift, (H, W))                           # [B, H, W, 1], rolled back
    x1 = torch.where(m, x + block.drop_path1(a), x)
    x2 = torch.where(m, _mlp_residual(block, x1.reshape(B, -1, C)).view(B, H, W, C), x1)
    pos = slots.repeat(B, 1).gather(1, idx).view(B, nW * keep)
    return x2, pos, m.squeeze(-1).contiguous()
