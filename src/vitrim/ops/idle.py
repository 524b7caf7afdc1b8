"""Token idling (IdleViT) as pure batched functions on a block's own modules.

Rules: ``docs/methods/idlevit.md`` ("Selection", "Inference", "Training").

An idle layer computes only some rows: the prefix tokens plus the top-``K`` patch tokens ranked by
the head-averaged pre-softmax class logits of this layer. The selected rows go through the block's
attention and MLP; every other row leaves the layer exactly as it entered ("idle"). Nothing moves
or disappears, so the next idle layer ranks all patch tokens again.

Two equivalent forms:

* **gather** (inference, real savings): gather the selected rows, run the block on them only,
  scatter them back to their original positions (out of place; the input is never written).
* **masked** (the paper's training form, fixed shape): all rows are computed, idle keys are masked
  out of the attention and the residual updates of idle rows are discarded; also returns the
  head-mean logits the token cut loss needs.

:func:`idle_block_train` is the training form vitrim runs: the same loss and gradients as the masked
form (idle rows' updates are discarded there, so their values, attention outputs and MLP never
reach the loss), computing queries and keys of all rows (the cut loss's logits) but values,
attention, projection and MLP of the selected rows only.

ViT functions take a timm ``vision_transformer.Block`` (``norm1``, ``attn`` via
:mod:`vitrim.ops.attention`, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``).
``pvt_*`` functions take a timm ``pvt_v2.Block`` (see ``docs/methods/idlevit.md`` for that design).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend, project, qkv_part
from .rows import flat_rows

__all__ = [
    "IdleRecord", "keep_count", "gather_rows", "scatter_rows", "select_rows", "index_to_mask",
    "scores_through_linear_keys", "low_rank_scoring", "rank_scores", "idle_scores", "head_mean_logits",
    "idle_block_gather", "idle_block_masked", "idle_block_train",
    "pvt_scores", "pvt_keys_values", "rows_per_mlp_chunk", "conv_at_rows", "pvt_mlp", "pvt_idle_block_gather", "pvt_idle_block_masked",
]


@dataclass(frozen=True)
class IdleRecord:
    """What one idle layer exposes for losses and pictures (an entry of ``ForwardState.records``).

    Attributes:
        layer: 0-based block index (flattened over stages for pyramid models).
        keep: ``K``, patch tokens computed (prefix tokens come on top).
        index: ``[B, S]`` positions of the computed rows (prefix first, then the top-K, unsorted).
        mask: ``[B, T]`` bool, True for computed rows; masked (training) form only.
        grid: ``(H, W)`` of the stage's token map on pyramid models (``index`` counts on it), else ``None``.
        logits: ``[B, T, T]`` head-mean of the scaled, unmasked attention logits (cut loss input);
            masked form of class-token ViTs only.
    """

    layer: int
    keep: int
    index: torch.Tensor
    mask: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    grid: Optional[tuple[int, int]] = None  # pyramid models: the stage's own H x W map ``index`` refers to


def keep_count(num_patches: int, keep_rate: float, exponent: int) -> int:
    """``K = floor(N0 * r**s)`` in Python floats, as the official code (``196 * 0.7**2 -> 96``)."""
    return int(num_patches * keep_rate ** exponent)


# ---------------------------------------------------------------------- row bookkeeping
def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x: [B, T, C]``, ``index: [B, S]`` -> ``[B, S, C]`` rows ``x[b, index[b]]``.

    One ``index_select`` on the flattened rows (an order of magnitude faster on CPU than
    ``gather`` with an expanded ``[B, S, C]`` index).
    """
    B, T, C = x.shape
    return x.reshape(B * T, C).index_select(0, flat_rows(index, T)).view(B, index.shape[1], C)


def scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Copy of ``x: [B, T, C]`` with ``rows: [B, S, C]`` written at ``index: [B, S]`` (out of place)."""
    B, T, C = x.shape
    return x.reshape(B * T, C).index_copy(0, flat_rows(index, T), rows.reshape(-1, C)).view(B, T, C)


def select_rows(score: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """Prefix rows plus the ``keep`` best patch rows.

    Args:
        score: ``[B, N]`` ranking score of the patch tokens (larger = computed).
        keep: ``K``; num_prefix: ``p`` prefix tokens in front of the patches.

    Returns:
        ``[B, p + K]`` int64 row positions in the full ``[B, p + N]`` sequence.
    """
    top = score.topk(keep, dim=-1, sorted=False).indices + num_prefix
    if num_prefix == 0:
        return top
    prefix = torch.arange(num_prefix, device=score.device).expand(score.shape[0], num_prefix)
    return torch.cat([prefix, top], dim=1)


def index_to_mask(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``index: [B, S]`` -> ``[B, T]`` bool mask of the computed rows."""
    mask = torch.zeros(index.shape[0], num_tokens, dtype=torch.bool, device=index.device)
    return mask.scatter(1, index, True)


# ---------------------------------------------------------------------- ViT blocks
def _heads(attn: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``[B, T, A] -> [B, H, T, d]``."""
    B, T, _ = t.shape
    return t.reshape(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)


def _class_query(attn: nn.Module, z: torch.Tensor, num_prefix: int = 1, mean_query: bool = False) -> torch.Tensor:
    """The scoring query (after ``q_norm``, no rotation), times ``scale / heads``: ``[B, T, C] -> [B, A]``.

    The class token's (row 0), or with ``mean_query`` the average patch token's, ``W_q mean_j(z_j) + b_q``
    over the patch rows (models without a class token [vitrim extension]).
    """
    B = z.shape[0]
    w_q, b_q = qkv_part(attn, 0)
    row = z[:, num_prefix:].mean(dim=1) if mean_query else z[:, 0]
    q = attn.q_norm(F.linear(row, w_q, b_q).reshape(B, attn.num_heads, 1, attn.head_dim))   # [B, H, 1, d]
    return q.reshape(B, attn.attn_dim) * (attn.scale / attn.num_heads)


def _for_rows(attn: nn.Module, index: torch.Tensor) -> nn.Module:
    """The attention for the rows ``index: [B, S]`` only: a family whose q/k norms depend on the row
    (rotary positions) gives ``attn.at_rows(index)``; otherwise ``attn`` itself."""
    at_rows = getattr(attn, "at_rows", None)
    return attn if at_rows is None else at_rows(index)


def _keys(attn: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Keys of all rows, token-major, after ``k_norm`` (on ``[B, H, T, d]``): ``[B, T, C] -> [B, T, A]``."""
    B, T, _ = z.shape
    w_k, b_k = qkv_part(attn, 1)
    k = _heads(attn, F.linear(z, w_k, b_k))
    return attn.k_norm(k).transpose(1, 2).reshape(B, T, attn.attn_dim)


def scores_through_linear_keys(q: torch.Tensor, z: torch.Tensor, w_k: torch.Tensor,
                               b_k: Optional[torch.Tensor]) -> torch.Tensor:
    """``<q, W_k z_j + b_k>`` for every row ``j`` without per-row keys, as ``<W_k^T q, z_j> + <q, b_k>``.

    ``C^2 + N C`` MACs instead of the ``N C^2`` of the keys. A multiply-and-sum rather than an
    ``[N, C] x [C, 1]`` bmm: the matrix-vector bmm is ~6x slower on CPU.

    Args:
        q: ``[B, A]`` one query per sample; z: ``[B, N, C]`` rows; w_k: ``[A, C]``; b_k: ``[A]`` or None.

    Returns:
        ``[B, N]``.
    """
    score = (z * (q @ w_k).unsqueeze(1)).sum(-1)
    if b_k is not None:
        score = score + (q * b_k).sum(-1, keepdim=True)
    return score


def low_rank_scoring(attn: nn.Module) -> bool:
    """Whether the ranking can skip the keys: true when keys are linear in ``z`` (no ``k_norm``, no
    rotation: a rotary family's ``k_norm`` includes its rotation)."""
    return isinstance(attn.k_norm, nn.Identity)


def rank_scores(attn: nn.Module, z: torch.Tensor, num_prefix: int, mean_query: bool = False
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """IdleViT's ranking score: the head mean of the class query's pre-softmax logits ("Selection").

    Equal to ``class_attention_logits(attn, z).mean(1)`` (:mod:`vitrim.ops.attention`) by
    ``sum_h <q^h, k^h> = <q, k>``. Without ``k_norm`` the keys are linear in ``z``, so
    ``<q, W_k z_j + b_k> = <W_k^T q, z_j> + <q, b_k>``: ``C^2 + N C`` MACs and no per-token keys
    (the gather form then computes keys for the selected rows only). With ``k_norm`` (qk-norm
    models) the keys of all rows are computed and returned for reuse.

    Args:
        z: ``[B, T, C]`` the block's ``norm1`` output; num_prefix: ``p``.
        mean_query: score with the average patch token's query instead of the class token's (models
            without a class token [vitrim extension]; ``docs/methods/idlevit.md``).

    Returns:
        ``(score [B, N], keys)``: scores of the patch tokens (class query only, never the full
        attention matrix) and ``keys [B, T, A]`` (after ``k_norm``) when they were computed, else ``None``.
    """
    q = _class_query(attn, z, num_prefix, mean_query)                # [B, A]
    if low_rank_scoring(attn):
        return scores_through_linear_keys(q, z[:, num_prefix:], *qkv_part(attn, 1)), None
    k = _keys(attn, z)
    return (k[:, num_prefix:] * q.unsqueeze(1)).sum(-1), k           # not a bmm: see scores_through_linear_keys


def idle_scores(attn: nn.Module, z: torch.Tensor, num_prefix: int, mean_query: bool = False) -> torch.Tensor:
    """``[B, N]`` ranking scores of the patch tokens (see :func:`rank_scores`)."""
    return rank_scores(attn, z, num_prefix, mean_query)[0]


def head_mean_logits(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``mean_h (q^h k^hT) * scale`` for ``q, k: [B, H, T, d]`` -> ``[B, T, T]``.

    Uses ``sum_h <q^h, k^h> = <q, k>`` over all channels: one ``[T, A] x [A, T]`` product per sample
    instead of a per-head ``[H, T, T]`` tensor.
    """
    B, H, T, d = q.shape
    qf = q.transpose(1, 2).reshape(B, T, H * d)
    kf = k.transpose(1, 2).reshape(B, T, H * d)
    return (qf @ kf.transpose(1, 2)) * (attn.scale / H)


def idle_block_gather(block: nn.Module, x: torch.Tensor, keep: int, num_prefix: int,
                      mean_query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One idle layer, inference form ("Inference").

    The class query ranks the patch tokens (:func:`rank_scores`: without ``k_norm`` no per-token
    keys are needed; with it the keys of all rows are computed and the selected ones reused), then
    Q, K, V, attention, projection and MLP run on the ``S = p + K`` selected rows only.

    Args:
        x: ``[B, T, C]`` tokens entering the block; keep: ``K``; num_prefix: ``p`` (always computed).
        mean_query: rank with the average patch token's query (no class token, see :func:`rank_scores`).

    Returns:
        ``(out [B, T, C], index [B, S])``; ``out`` is a new tensor whose idle rows equal ``x``'s.
    """
    attn = block.attn
    B, T, C = x.shape
    z = block.norm1(x)
    score, k_all = rank_scores(attn, z, num_prefix, mean_query)
    index = select_rows(score, keep, num_prefix)
    S, A, H, d = index.shape[1], attn.attn_dim, attn.num_heads, attn.head_dim
    flat = flat_rows(index, T)                                          # one flat index for every gather and the scatter
    zs = z.reshape(B * T, C).index_select(0, flat).view(B, S, C)
    if k_all is None:  # Q, K and V of the selected rows in one product
        q, k, v = attn.qkv(zs).reshape(B, S, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    else:  # Q and V of the selected rows (the q and v thirds of the qkv weight); the keys are reused
        w = attn.qkv.weight.reshape(3, A, -1)[0::2].reshape(2 * A, -1)
        b = attn.qkv.bias.reshape(3, A)[0::2].reshape(2 * A) if attn.qkv.bias is not None else None
        q, v = F.linear(zs, w, b).reshape(B, S, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        k = _heads(attn, k_all.reshape(B * T, A).index_select(0, flat).view(B, S, A))
    q = _for_rows(attn, index).q_norm(q)                            # rotary families: the selected rows' rotation
    xs = x.reshape(B * T, C).index_select(0, flat).view(B, S, C)
    xs = xs + block.drop_path1(block.ls1(project(attn, attend(attn, q, k, v), zs)))
    xs = xs + block.drop_path2(block.ls2(block.mlp(block.norm2(xs))))
    return x.reshape(B * T, C).index_copy(0, flat, xs.reshape(B * S, C)).view(B, T, C), index


def idle_block_masked(block: nn.Module, x: torch.Tensor, keep: int, num_prefix: int, mean_query: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One idle layer, masked fixed-shape training form ("Training").

    Every row is computed; every query (idle ones included) attends to the selected keys only;
    the residual updates of idle rows are discarded (``where``, so idle rows are bit-identical).
    The selection is computed exactly as in :func:`idle_block_gather`.

    Args:
        x: ``[B, T, C]``; keep: ``K``; num_prefix: ``p``.

    Returns:
        ``(out [B, T, C], index [B, S], mask [B, T] bool, logits [B, T, T])`` with ``logits`` the
        head mean of the scaled, unmasked attention logits (input of the token cut loss).
    """
    attn = block.attn
    B, T, _ = x.shape
    z = block.norm1(x)
    # the ranking exactly as in the gather form, so both forms select the same rows
    score, k_all = rank_scores(attn, z, num_prefix, mean_query)
    index = select_rows(score, keep, num_prefix)
    k = _heads(attn, _keys(attn, z) if k_all is None else k_all)
    mask = index_to_mask(index, T)
    w_q, b_q = qkv_part(attn, 0)
    w_v, b_v = qkv_part(attn, 2)
    q = attn.q_norm(_heads(attn, F.linear(z, w_q, b_q)))
    v = _heads(attn, F.linear(z, w_v, b_v))
    # dtype minimum, not -inf or -1e5: finite in every dtype (the class key is never masked)
    key_bias = torch.zeros(B, 1, 1, T, dtype=q.dtype, device=q.device).masked_fill(
        ~mask[:, None, None, :], torch.finfo(q.dtype).min)
    rows = mask.unsqueeze(-1)
    x = torch.where(rows, x + block.drop_path1(block.ls1(project(attn, attend(attn, q, k, v, key_bias), z))), x)
    x = torch.where(rows, x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), x)
    return x, index, mask, head_mean_logits(attn, q, k)


def idle_block_train(block: nn.Module, x: torch.Tensor, keep: int, num_prefix: int, mean_query: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One idle layer, training form: the outputs of :func:`idle_block_masked` at the cost of the
    gather form plus the queries and keys of the idle rows and the ``[T, T]`` head-mean logits.

    In the masked form an idle row's update is discarded and idle keys get zero attention weight,
    so the loss depends on idle rows only through their queries and keys in the cut loss's logits:
    Q and K run on all rows, the logits are their head mean, and V, attention (selected queries on
    selected keys), projection and MLP run on the ``S = p + K`` selected rows, scattered back.

    Args:
        x: ``[B, T, C]``; keep: ``K``; num_prefix: ``p``.

    Returns:
        ``(out [B, T, C], index [B, S], mask [B, T] bool, logits [B, T, T])`` as :func:`idle_block_masked`.
    """
    attn = block.attn
    B, T, C = x.shape
    H, d, A = attn.num_heads, attn.head_dim, attn.attn_dim
    z = block.norm1(x)
    score, k_all = rank_scores(attn, z, num_prefix, mean_query)    # the same ranking as both other forms
    index = select_rows(score, keep, num_prefix)
    S = index.shape[1]
    k = _keys(attn, z) if k_all is None else k_all                  # [B, T, A] token-major, after k_norm
    w_q, b_q = qkv_part(attn, 0)
    q = attn.q_norm(_heads(attn, F.linear(z, w_q, b_q))).transpose(1, 2).reshape(B, T, A)
    logits = (q @ k.transpose(1, 2)) * (attn.scale / H)             # = head_mean_logits, all rows
    flat = flat_rows(index, T)
    qs = q.reshape(B * T, A).index_select(0, flat).view(B, S, H, d).transpose(1, 2)
    ks = k.reshape(B * T, A).index_select(0, flat).view(B, S, H, d).transpose(1, 2)
    zs = z.reshape(B * T, C).index_select(0, flat).view(B, S, C)
    w_v, b_v = qkv_part(attn, 2)
    vs = _heads(attn, F.linear(zs, w_v, b_v))
    xs = x.reshape(B * T, C).index_select(0, flat).view(B, S, C)
    xs = xs + block.drop_path1(block.ls1(project(attn, attend(attn, qs, ks, vs), zs)))
    xs = xs + block.drop_path2(block.ls2(block.mlp(block.norm2(xs))))
    out = x.reshape(B * T, C).index_copy(0, flat, xs.reshape(B * S, C)).view(B, T, C)
    return out, index, index_to_mask(index, T), logits


# ---------------------------------------------------------------------- PVT-v2 blocks
def pvt_scores(attn: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Ranking score of a PVT-v2 block (no class token): the mean-token query's logits.

    The class query is replaced by the query of the average token (the model pools by averaging),
    and each token is scored against its own, unreduced key ``W_k z_j + b_k`` (the model's actual
    key when ``sr_ratio = 1``); head mean of the pre-softmax logits as in IdleViT. Computed as
    ``z (W_k^T q_mean)``: ``2 C^2 + N C`` MACs, no per-token keys or queries.

    Args:
        z: ``[B, N, C]`` the block's ``norm1`` output.

    Returns:
        ``[B, N]`` scores.
    """
    C = attn.dim
    q_mean = attn.q(z.mean(dim=1))                                   # [B, C]
    b_k = attn.kv.bias[:C] if attn.kv.bias is not None else None
    return scores_through_linear_keys(q_mean, z, attn.kv.weight[:C], b_k) * (attn.scale / attn.num_heads)


def pvt_keys_values(attn: nn.Module, z: torch.Tensor, feat_size: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of a timm ``pvt_v2.Attention`` from the full map (spatial reduction as timm).

    Args:
        z: ``[B, N, C]`` all tokens (idle ones with their current values); feat_size: ``(H, W)``.

    Returns:
        ``k, v: [B, heads, M, d]`` with ``M = N / sr^2`` (or 49 for linear attention).
    """
    B, N, C = z.shape
    H, W = feat_size
    if attn.pool is not None:  # linear SRA: pool to 7x7, 1x1 conv, norm, GELU
        m = z.permute(0, 2, 1).reshape(B, C, H, W)
        m = attn.act(attn.norm(attn.sr(attn.pool(m)).reshape(B, C, -1).permute(0, 2, 1)))
    elif attn.sr is not None:
        m = z.permute(0, 2, 1).reshape(B, C, H, W)
        m = attn.norm(attn.sr(m).reshape(B, C, -1).permute(0, 2, 1))
    else:
        m = z
    kv = attn.kv(m).reshape(B, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return kv[0], kv[1]


# hidden features per chunk of the idle MLP (4 MiB in fp32), and rows per chunk at least: the
# GEMMs keep enough rows, and a chunk's fc1 output, GELU and fc2 input stay in cache (measured on
# pvt_v2_b1 at keep 0.5, batch 32: 4 MiB / 1024 rows beat 2 MiB / 512 rows in every idle stage, at 1
# and 2 threads; larger chunks lost in stage 2)
_MLP_CHUNK_ELEMS = 2 ** 20
_MLP_MIN_ROWS = 1024


def rows_per_mlp_chunk(hidden: int) -> int:
    """Rows per chunk of an MLP run on gathered rows: about 4 MiB of ``hidden`` features, 1024 rows at least."""
    return max(_MLP_MIN_ROWS, _MLP_CHUNK_ELEMS // hidden)

# entries of the zero hidden map per depthwise conv call (4 MiB in fp32): the map, the conv's output
# and the rows read back stay in cache
_MAP_ELEMS = 2 ** 20


def conv_at_rows(conv: nn.Module, h: torch.Tensor, index: torch.Tensor, feat_size: tuple[int, int],
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv`` of the ``H x W`` map that holds ``h`` at ``index`` and zeros elsewhere, read at ``index``.

    The map is built and convolved a few samples at a time (about 4 MiB each, channels-last, the layout
    timm's ``MlpWithDepthwiseConv`` hands its conv), so no ``[B, N, hidden]`` map is formed. Measured on
    pvt_v2_b1 at keep 0.5 it is faster than 9 gathered taps at the rows in every stage, although it
    convolves the zero positions too (their cost is counted).

    Args:
        conv: a size-preserving conv (``hidden -> hidden``), e.g. the block's depthwise 3x3.
        h: ``[G, S, hidden]``; index: ``[G, S]`` distinct positions in the row-major map; feat_size: ``(H, W)``.
        out: ``[G, S, hidden]`` contiguous, written in place (outside autograd only); ``None``: a new tensor.

    Returns:
        ``[G, S, hidden]`` (``out`` when given).
    """
    G, S, hidden = h.shape
    H, W = feat_size
    N = H * W
    group = max(1, min(G, _MAP_ELEMS // (N * hidden)))
    # row of each entry in its group's flattened map: (sample within the group) * N + position
    rows = (index + (torch.arange(G, device=index.device) % group).unsqueeze(1) * N).reshape(-1)
    flat = h.reshape(G * S, hidden)
    pieces = []
    for g0 in range(0, G, group):
        g = min(group, G - g0)
        at = rows[g0 * S:(g0 + g) * S]
        zero_map = flat.new_zeros(g * N, hidden)
        zero_map.index_copy_(0, at, flat[g0 * S:(g0 + g) * S])        # in place: a fresh map, no clone
        y = conv(zero_map.view(g, H, W, hidden).permute(0, 3, 1, 2))      # [g, hidden, H, W], channels-last
        y = y.permute(0, 2, 3, 1).reshape(g * N, hidden)
        if out is None:
            pieces.append(y.index_select(0, at))
        else:
            torch.index_select(y, 0, at, out=out.view(G * S, hidden)[g0 * S:(g0 + g) * S])
    return torch.cat(pieces).view(G, S, hidden) if out is None else out


def pvt_mlp(mlp: nn.Module, rows: torch.Tensor, index: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
    """timm ``MlpWithDepthwiseConv`` on some rows; the depthwise conv sees zeros at the other rows.

    Idle tokens are absent from the MLP (as they are from the ViT idle layer): ``fc1`` and ``fc2`` run
    on the computed rows only, and the depthwise conv (the block's own module) sees zeros at the other
    positions (:func:`conv_at_rows`). Rows go in chunks of whole samples (about 4 MiB of hidden
    features), so that a chunk's hidden features stay in cache. Outside autograd each chunk's conv
    rows and ``fc2`` output are written into one result in place (no copies to join the chunks: up
    to a tenth of stage 2's idle-block time on pvt_v2_b1).

    Args:
        rows: ``[B, S, C]`` normed rows; index: ``[B, S]`` their positions in the ``H x W`` map.
        feat_size: ``(H, W)``.

    Returns:
        ``[B, S, C_out]``.
    """
    B, S, C = rows.shape
    hidden = mlp.fc1.out_features
    group = max(1, min(B, rows_per_mlp_chunk(hidden) // S))
    fc2 = mlp.fc2
    in_place = not torch.is_grad_enabled() and type(fc2) is nn.Linear
    if in_place:  # out= results: no autograd, a plain nn.Linear
        out = rows.new_empty(B, S, fc2.out_features)
        conv_out = rows.new_empty(min(group, B), S, hidden)
    pieces = []
    for b0 in range(0, B, group):
        h = mlp.relu(mlp.fc1(rows[b0:b0 + group]))                      # [g, S, hidden]
        g = h.shape[0]
        conv = conv_at_rows(mlp.dwconv, h, index[b0:b0 + group], feat_size, conv_out[:g] if in_place else None)
        h = mlp.drop(mlp.act(conv)).reshape(g * S, hidden)
        if in_place:
            target = out[b0:b0 + g].view(g * S, -1)
            if fc2.bias is None:
                torch.mm(h, fc2.weight.t(), out=target)
            else:
                torch.addmm(fc2.bias, h, fc2.weight.t(), out=target)
        else:
            pieces.append(fc2(h).view(g, S, -1))
    return mlp.drop(out if in_place else torch.cat(pieces))


def _pvt_attend(attn: nn.Module, z: torch.Tensor, rows: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
    """Queries of ``rows: [B, S, C]`` against keys/values of the full map ``z: [B, N, C]`` -> ``[B, S, C]``."""
    B, S, C = rows.shape
    q = attn.q(rows).reshape(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = pvt_keys_values(attn, z, feat_size)
    out = attend(attn, q, k, v).transpose(1, 2).reshape(B, S, C)
    return attn.proj_drop(attn.proj(out))


def pvt_idle_block_gather(block: nn.Module, x: torch.Tensor, keep: int,
                          feat_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One idle PVT-v2 block, inference form: queries, projection and MLP on the top-K rows only.

    Args:
        x: ``[B, N, C]`` with ``N = H * W``; keep: ``K``; feat_size: ``(H, W)``.

    Returns:
        ``(out [B, N, C], index [B, K])``; idle rows of ``out`` equal ``x``'s.
    """
    attn = block.attn
    z = block.norm1(x)
    index = select_rows(pvt_scores(attn, z), keep, 0)
    xs = gather_rows(x, index)
    xs = xs + block.drop_path1(_pvt_attend(attn, z, gather_rows(z, index), feat_size))
    xs = xs + block.drop_path2(pvt_mlp(block.mlp, block.norm2(xs), index, feat_size))
    return scatter_rows(x, index, xs), index


def pvt_idle_block_masked(block: nn.Module, x: torch.Tensor, keep: int, feat_size: tuple[int, int]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One idle PVT-v2 block, masked fixed-shape form (equal to the gather form on the selected rows).

    Returns:
        ``(out [B, N, C], index [B, K], mask [B, N] bool)``.
    """
    attn = block.attn
    N = x.shape[1]
    z = block.norm1(x)
    index = select_rows(pvt_scores(attn, z), keep, 0)
    mask = index_to_mask(index, N)
    rows = mask.unsqueeze(-1)
    x = torch.where(rows, x + block.drop_path1(_pvt_attend(attn, z, z, feat_size)), x)
    # idle rows enter the depthwise conv as zeros, exactly as in the gather form
    h = block.norm2(x)
    mlp = block.mlp
    hidden = mlp.relu(mlp.fc1(h)) * rows.to(h.dtype)
    B, _, Ch = hidden.shape
    conv = mlp.dwconv(hidden.transpose(1, 2).reshape(B, Ch, feat_size[0], feat_size[1])).flatten(2).transpose(1, 2)
    out = mlp.drop(mlp.fc2(mlp.drop(mlp.act(conv))))
    x = torch.where(rows, x + block.drop_path2(out), x)
    return x, index, mask
