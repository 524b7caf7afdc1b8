"""Attention pieces that run a timm ``Attention`` module's own layers with extra inputs.

timm's ``Attention.forward`` returns only its output; token reduction also needs the keys
(ToMe's metric), an additive key bias (proportional attention) or attention on a subset of
queries. These functions reuse the module's weights and honour every feature of timm 1.x
``Attention``: fused SDPA or explicit softmax (``attn.fused_attn``), qk-norm, scale-norm,
the sigmoid output gate, attention and projection dropout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["qkv_part", "split_qkv", "attend", "project", "attention_with_key_bias", "log_size_bias",
           "class_attention_logits", "class_attention_scores",
           "mean_query_logits"]


def qkv_part(attn: nn.Module, part: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight ``[A, C]`` and bias ``[A]`` (or None) of the q (0), k (1) or v (2) third of ``attn.qkv``."""
    a = attn.attn_dim
    w = attn.qkv.weight[part * a:(part + 1) * a]
    b = attn.qkv.bias[part * a:(part + 1) * a] if attn.qkv.bias is not None else None
    return w, b


def split_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x: [B, T, C] -> q, k, v: [B, H, T, d]``, after ``q_norm`` / ``k_norm``."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attend(
        attn: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scaled dot-product attention with an optional additive bias.

    Args:
        q: ``[B, H, Tq, d]``; k, v: ``[B, H, Tk, d]``.
        bias: broadcastable to ``[B, H, Tq, Tk]`` (e.g. ``[B, 1, 1, Tk]`` log sizes), added to
            the logits. On the fused path it is passed to SDPA as a float mask (flash is then
            not eligible; the memory-efficient or math kernel is used).

    Returns:
        ``[B, H, Tq, d]``.
    """
    if bias is not None:
        bias = bias.to(q.dtype)
    if attn.fused_attn:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0,
        )
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return attn.attn_drop(logits.softmax(dim=-1)) @ v


def project(attn: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Heads back to tokens, then scale-norm, gate (computed from the input ``x``) and proj.

    ``out: [B, H, Tq, d]``, ``x: [B, Tq, C]`` (the attention's input rows for these queries).
    """
    B, _, Tq, _ = out.shape
    out = out.transpose(1, 2).reshape(B, Tq, attn.attn_dim)
    out = attn.norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def log_size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention: ``size: [B, T, 1] -> [B, 1, 1, T]`` additive key bias ``log(s)``."""
    return size.log()[:, None, None, :, 0]


def attention_with_key_bias(
        attn: nn.Module,
        x: torch.Tensor,
        key_bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of a timm ``Attention`` with an additive per-key bias.

    Args:
        x: ``[B, T, C]`` normalised tokens (the block's ``norm1`` output).
        key_bias: ``[B, 1, 1, T]`` or ``None``.

    Returns:
        ``(out [B, T, C], keys [B, T, d])``: the attention output and the keys it used,
        averaged over heads (ToMe's similarity metric).
    """
    q, k, v = split_qkv(attn, x)
    out = attend(attn, q, k, v, key_bias)
    return project(attn, out, x), k.mean(dim=1)


def class_attention_logits(
        attn: nn.Module,
        x: torch.Tensor,
        k: Optional[torch.Tensor] = None,
        query_index: int = 0,
) -> torch.Tensor:
    """Pre-softmax logits of one query token (the class token) against all keys, per head.

    Computes only the class query (``[B, H, 1, d]``) against the keys, so the full ``[T, T]``
    attention matrix is never materialised; works whatever kernel the attention itself uses.

    Args:
        x: ``[B, T, C]`` normalised tokens (the block's ``norm1`` output).
        k: ``[B, H, T, d]`` keys if already computed (after ``k_norm``); else projected here.
        query_index: row of the query token (0 = class token).

    Returns:
        ``[B, H, T]`` logits ``q_cls . k_j * scale`` (apply ``softmax(-1)`` and average heads for
        EViT / eTPS class-attention scores; IdleViT averages the pre-softmax logits).
    """
    B, T, C = x.shape
    d, H = attn.head_dim, attn.num_heads
    q = F.linear(x[:, query_index], *qkv_part(attn, 0)).reshape(B, H, 1, d)
    q = attn.q_norm(q)
    if k is None:
        k = attn.k_norm(F.linear(x, *qkv_part(attn, 1)).reshape(B, T, H, d).transpose(1, 2))
    return ((q * attn.scale) @ k.transpose(-2, -1))[:, :, 0]


def class_attention_scores(attn: nn.Module, x: torch.Tensor, k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EViT-style class attention: ``softmax`` over keys of the class query, averaged over heads.

    ``x: [B, T, C] -> [B, T]`` (the entry for the class token itself included; callers drop the
    prefix columns). Equal to row 0 of the full attention map averaged over heads.
    """
    return class_attention_logits(attn, x, k).softmax(dim=-1).mean(dim=1)


def mean_query_logits(attn: nn.Module, x: torch.Tensor, k: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Logits of the **average patch token's** query against the patch keys, per head (the score of
    models without a class token [vitrim extension]).

    ``q_bar = W_q . mean_j(z_j) + b_q`` over the patch rows ``z_j`` of ``x`` (after ``q_norm``, no rotation),
    ``logit_j = <q_bar, k_j> * scale`` with the model's own keys.

    Args:
        x: ``[B, P + n, C]`` normalised tokens (the block's ``norm1`` output).
        k: ``[B, H, P + n, d]`` the keys the attention used (after ``k_norm`` and any rotation).

    Returns:
        ``[B, H, n]``.
    """
    B = x.shape[0]
    p = num_prefix_tokens
    q = F.linear(x[:, p:].mean(dim=1), *qkv_part(attn, 0)).reshape(B, attn.num_heads, 1, attn.head_dim)
    q = attn.q_norm(q)
    return ((q * attn.scale) @ k[:, :, p:].transpose(-2, -1))[:, :, 0]
