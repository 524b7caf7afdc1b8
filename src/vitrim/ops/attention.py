"""Attention pieces that run a timm ``Attention`` module's own layers with extra inputs.

timm's ``Attention.forward`` returns only its output; token reduction also needs the keys
(ToMe's metric), an additive key bias (proportional attention) or attention on a subset of
queries. These functions reuse the module's weights and honour every feature of timm 1.x
``Attention``: fused SDPA or explicit softmax (``attn.fused_attn``), qk-norm, scale-norm,
the sigmoid output gate, attention and projection dropout. :func:`latent_pool` does the same for
an attention-pool head (timm ``AttentionPoolLatent``): the pool's own modules with keys that stand
for several tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["qkv_part", "split_qkv", "attend", "project", "attention_with_key_bias", "log_size_bias",
           "class_attention_logits", "class_attention_scores",
           "mean_query_logits", "pool_key_bias", "latent_pool"]


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


def pool_key_bias(weights: torch.Tensor) -> torch.Tensor:
    """``weights: [B, N, 1] >= 0 -> [B, 1, 1, N]`` additive key bias ``log(w)`` (``-inf`` where ``w = 0``)."""
    return weights.log()[:, None, None, :, 0]


def _pool_attend(pool: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 weights: Optional[torch.Tensor]) -> torch.Tensor:
    """``q: [B, H, L, d]``, ``k, v: [B, H, N, d]``, ``weights: [B, N, 1]`` or None -> ``[B, H, L, d]``.

    The attention to key ``j`` is proportional to ``w_j exp(logit_j)``: ``softmax(logits + log w)``,
    on the pool's own path (SDPA with the bias as a float mask, or the explicit softmax with the
    bias added). A weight that carries a gradient (a keep policy in masked training) multiplies the
    exponentials instead, so the gradient reaches it (``log 0`` would give NaN gradients).
    """
    if weights is not None and torch.is_grad_enabled() and weights.requires_grad:
        logits = (q * pool.scale) @ k.transpose(-2, -1)
        a = (logits - logits.amax(dim=-1, keepdim=True)).exp() * weights[:, None, None, :, 0].to(logits.dtype)
        return (a / a.sum(dim=-1, keepdim=True)) @ v
    bias = None if weights is None else pool_key_bias(weights).to(q.dtype)
    if pool.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    logits = (q * pool.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v


def latent_pool(pool: nn.Module, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A timm ``AttentionPoolLatent`` head run with its own modules, each key standing for ``weights`` tokens.

    The learned latent queries (``pool.latent`` through ``pool.q``, ``q_norm``) attend over the
    keys / values of ``x`` (``pool.kv``, ``k_norm``); then ``proj``, ``proj_drop``, the residual MLP
    (``norm``, ``mlp``) and the pool's own latent reduction (``pool.pool``: ``"token"``, ``"avg"``
    or none). With ``weights`` the attention to key ``j`` is proportional to ``w_j exp(logit_j)``
    (ToMe's proportional attention, ``+ log(size)`` on the keys: pooling a merged token of size
    ``s`` equals pooling ``s`` copies of it; a 0/1 keep policy pools the alive tokens only).
    ``weights=None`` computes what ``pool(x)`` computes.

    Args:
        pool: the model's ``AttentionPoolLatent`` (``latent``, ``q``, ``kv``, ``q_norm``, ``k_norm``,
            ``num_heads``, ``head_dim``, ``scale``, ``fused_attn``, ``proj``, ``proj_drop``, ``norm``,
            ``mlp``, ``pool``, ``pos_embed``; a ``pos_embed`` is added, so ``N`` must be its length).
        x: ``[B, N, C]`` the tokens the pool attends over.
        weights: ``[B, N, 1]`` >= 0 (token sizes, a keep policy), or ``None``: plain attention.

    Returns:
        ``[B, C_out]`` (``pool.pool`` ``"token"`` / ``"avg"``) or ``[B, L, C_out]``.
    """
    B, N, _ = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    L, H, d = pool.latent_len, pool.num_heads, pool.head_dim
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, L, H, d).transpose(1, 2)
    k, v = pool.kv(x).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    out = _pool_attend(pool, q, k, v, weights).transpose(1, 2).reshape(B, L, H * d)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    if pool.pool == "token":
        return out[:, 0]
    if pool.pool == "avg":
        return out.mean(1)
    return out
