"""Token pruning as pure, batched tensor functions (EViT, DynamicViT, TPS).

Two forms of the same decision:

* **gather** (inference, and EViT / eTPS always): rank the tokens, keep the top ``K`` by a real
  gather (MAE-style: the gather indices are returned so the caller can record or undo them),
  optionally fold the rest into a fused token (EViT) or into their nearest kept token (TPS
  squeezing);
* **masked** (DynamicViT / dTPS training): shapes stay fixed, a ``[B, T, 1]`` keep mask (the
  policy) hides pruned keys inside the attention softmax and squeezing writes into the kept rows.

Shapes: ``B`` batch, ``N`` / ``T`` tokens, ``C`` channels, ``H`` heads, ``d`` head width. Every
function treats its token axis as "the tokens that may be pruned": callers slice prefix tokens
(class, distillation, registers) off first, so those are never scored, pruned or fused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .rows import flat_rows

__all__ = [
    "PruneRecord",
    "prune_records",
    "keep_count_current",
    "keep_count_original",
    "class_attention_probs",
    "rank_tokens",
    "gather_tokens",
    "fused_token",
    "cosine_similarity_matrix",
    "squeeze_gather",
    "squeeze_masked",
    "gumbel_softmax_hard",
    "masked_mean",
    "softmax_with_policy",
    "policy_attention",
    "attend_with_policy",
]

#: the host's own weight in TPS squeezing: ``exp(cos(x, x)) = e`` (docs/methods/pruning.md, "Squeezing (eTPS, dTPS)")
E = math.e


@dataclass(frozen=True)
class PruneRecord:
    """One pruning stage of one forward (an entry of ``ForwardState.records``; read with :func:`prune_records`).

    Any method that removes patch tokens by a gather can record its stages this way
    (``ReductionMethod.record_stage``); dense features and pictures then follow it with no
    method-specific code.

    Attributes:
        method: the method's name.
        block: 0-based block index of the location.
        stage: 1-based position of the location among the method's locations.
        target: the stage's configured keep rate (for DynamicViT / dTPS the ratio of the input
            patch count ``N0``, the keep-ratio loss target; for EViT / eTPS of the current count).
        kept: patch tokens kept by the stage (gather form; the top-K count in masked form).
        keep: ``[B, N0]`` cumulative 0/1 keep decisions over all patch positions (masked training
            form only; carries the straight-through gradient).
        index: ``[B, kept]`` kept rows among the patch tokens entering the stage (gather form).
        positions: ``[B, n_out]`` original patch position of every patch token leaving the stage
            (gather form; ``-1`` for a token that is no patch, e.g. EViT's fused token).
        scores: ``[B, n_in]`` the scores the decision ranked (class attention, or the
            predictor's keep log-probability).
        rest: ``[B, n_in - kept]`` pruned rows among the patch tokens entering the stage, in the
            order of ``hosts`` (squeezing methods, gather form).
        hosts: ``[B, n_in - kept]`` for each pruned row, the kept row (0..kept-1) it was squeezed into.
        absorbs: the pruned tokens live on inside the leaving ones (squeezing): a stage that
            absorbs must record ``hosts`` for dense features to follow it.
    """

    method: str
    block: int
    stage: int
    target: float
    kept: int
    keep: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    rest: Optional[torch.Tensor] = None
    hosts: Optional[torch.Tensor] = None
    absorbs: bool = False


def prune_records(state) -> list[PruneRecord]:
    """The :class:`PruneRecord` of every stage of one forward (a ``ForwardState``), in order."""
    return [r for r in state.records if isinstance(r, PruneRecord)]


# ---------------------------------------------------------------------- keep counts
def keep_count_current(num_tokens: int, rate: float) -> int:
    """EViT / eTPS rule: ``ceil(rate * n)`` of the **current** patch-token count ``n``.

    >>> keep_count_current(196, 0.7), keep_count_current(139, 0.7)
    (138, 98)
    """
    return min(num_tokens, math.ceil(rate * num_tokens))


def keep_count_original(num_patches: int, ratio: float) -> int:
    """DynamicViT / dTPS rule: ``int(N0 * rho_s)`` of the **original** count ``N0`` (Python float,
    truncated), at least one token.

    >>> [keep_count_original(196, 0.7 ** s) for s in (1, 2, 3)]
    [137, 96, 67]
    """
    return max(1, min(num_patches, int(num_patches * ratio)))


# ---------------------------------------------------------------------- scores
def class_attention_probs(logits: torch.Tensor) -> torch.Tensor:
    """EViT's score: head-mean of the **post-softmax** class attention.

    ``logits: [B, H, T]`` class-query logits (scaled, e.g. ``ops.attention.class_attention_logits``)
    -> ``[B, T]``. Unlike IdleViT (head-mean of pre-softmax logits) a head with one sharp peak
    cannot dominate through large negative logits.
    """
    return logits.softmax(dim=-1).mean(dim=1)


# ---------------------------------------------------------------------- gather form
def rank_tokens(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split tokens by score: the top ``k`` and the rest, both in descending score order.

    Args:
        scores: ``[B, N]``; higher = more important.
        k: tokens to keep, ``0 <= k <= N``.

    Returns:
        ``(keep_index [B, k], rest_index [B, N - k])`` (int64). A stable sort, so ties go to the
        lower index and each sample's result does not depend on the rest of the batch.
    """
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return order[:, :k], order[:, k:]


def gather_tokens(x: torch.Tensor, index: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Rows of ``x`` picked per sample, MAE-style (one gather; ``index`` is the record of the choice).

    Args:
        x: ``[B, N, *]``.
        index: ``[B, K]`` rows to take, counted **after** the first ``num_prefix_tokens`` rows.
        num_prefix_tokens: rows kept in front, unchanged (class, distillation, register tokens);
            taken by the same gather, so no concatenation is needed.

    Returns:
        ``[B, num_prefix_tokens + K, *]``: the prefix rows, then ``x[b, num_prefix_tokens + index[b]]``.
    """
    if num_prefix_tokens:
        prefix = torch.arange(num_prefix_tokens, device=index.device, dtype=index.dtype)
        index = torch.cat([prefix.expand(index.shape[0], -1), index + num_prefix_tokens], dim=1)
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def fused_token(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """EViT's fused token: the **unnormalised** weighted sum of tokens.

    Args:
        x: ``[B, N, C]`` tokens.
        weights: ``[B, N]`` class-attention scores of the inattentive tokens and 0 for the kept
            ones (not renormalised, docs/methods/pruning.md "EViT": the token's scale is the inattentive tokens' total
            attention mass). Zeroing the kept weights instead of gathering the inattentive rows
            saves a copy; adding exact zeros does not change the sum.

    Returns:
        ``[B, 1, C]``: ``sum_j weights_j * x_j``.
    """
    return torch.bmm(weights.unsqueeze(1).to(x.dtype), x)


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``a: [B, M, C], b: [B, R, C] -> [B, M, R]``: ``a_i . b_j / ((|a_i| + eps)(|b_j| + eps))``.

    The dot products are taken first and divided by the norms afterwards, so no normalised copy
    of the (large) token tensors is made.
    """
    na = torch.linalg.vector_norm(a, dim=-1).add(eps)
    nb = torch.linalg.vector_norm(b, dim=-1).add(eps)
    return (a @ b.transpose(-2, -1)) / (na.unsqueeze(-1) * nb.unsqueeze(-2))


def _absorb(hosts: torch.Tensor, src: torch.Tensor, host_index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``y_j = (e x_j + sum_i w_i x_i) / (e + sum_i w_i)`` over the ``i`` with ``host_index_i = j``.

    Computed as ``y = (A / D) @ src + x * (e / D)`` with the ``[B, R, M]`` assignment matrix
    ``A_ji = w_i [host_index_i = j]`` and ``D_j = e + sum_i A_ji``: one small matmul and one
    multiply-add over the hosts. A host that receives nothing has ``D = e``, ``e / D = 1``
    exactly and a zero row in ``A``, so it is returned bit-identical.

    Args:
        hosts: ``[B, R, C]``; src: ``[B, M, C]``; host_index: ``[B, M]`` into ``R``;
        weight: ``[B, M]`` (0 for rows that are not absorbed).
    """
    B, R = hosts.shape[:2]
    w = weight.to(hosts.dtype).unsqueeze(1)                                   # [B, 1, M]
    assign = torch.zeros(B, R, w.shape[-1], dtype=w.dtype, device=w.device).scatter(1, host_index.unsqueeze(1), w)
    den = assign.sum(dim=-1, keepdim=True) + E                                # [B, R, 1]
    return torch.addcmul((assign / den) @ src, hosts, E / den)


def _absorb_scattered(x: torch.Tensor, host_index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`_absorb` of ``x`` into itself by one scatter-add, for the masked form's ``M = R = N``.

    ``y = S / D + x * (e / D)`` with ``S_j = sum_{i -> j} w_i x_i`` and ``D_j = e + sum_{i -> j} w_i``:
    ``O(N C)`` (its backward is a gather) instead of the ``[B, N, N]`` assignment matrix and its
    ``N^2 C`` matmul. A row that receives nothing has ``S = 0``, ``D = e`` and ``e / D = 1`` exactly,
    so it is returned bit-identical; the others equal :func:`_absorb`'s to float rounding.

    Args:
        x: ``[B, N, C]``; host_index: ``[B, N]`` into ``N``; weight: ``[B, N]`` (0 for rows not absorbed).
    """
    B, N, C = x.shape
    w = weight.to(x.dtype).unsqueeze(-1)                                        # [B, N, 1]
    index = host_index.unsqueeze(-1)                                            # [B, N, 1]
    num = x.new_zeros(B, N, C).scatter_add(1, index.expand(-1, -1, C), x * w)
    den = x.new_zeros(B, N, 1).scatter_add(1, index, w) + E                     # [B, N, 1]
    return torch.addcmul(num / den, x, E / den)


def squeeze_gather(reserved: torch.Tensor, pruned: torch.Tensor, eps: float = 1e-6,
                   num_protected: int = 0, return_hosts: bool = False) -> torch.Tensor:
    """TPS squeezing, gather form (docs/methods/pruning.md, "Squeezing (eTPS, dTPS)"): each pruned token joins its most similar reserved token.

    Args:
        reserved: ``[B, R, C]`` kept tokens (the hosts), at least one after the protected rows.
        pruned: ``[B, M, C]`` tokens pruned at this stage.
        eps: added to the norms in the cosine similarity.
        num_protected: leading rows of ``reserved`` (prefix tokens) that are never hosts and
            are returned unchanged, so a caller can squeeze ``[prefix; kept]`` in one go.

    Returns:
        ``[B, R, C]``: host ``j`` becomes ``(e x_j + sum_{i -> j} exp(c_ij) x_i) / (e + sum exp(c_ij))``
        with ``c`` the cosine similarity of the full features; ``i -> j`` is the unidirectional
        nearest neighbour (first index on ties). Hosts that absorb nothing and protected rows
        are bit-identical to the input. With ``return_hosts=True``: ``(out, hosts)``,
        ``hosts: [B, M]`` the host row of each pruned token among the unprotected reserved rows.
    """
    if pruned.shape[1] == 0:
        return (reserved, pruned.new_zeros(pruned.shape[:2], dtype=torch.long)) if return_hosts else reserved
    sim, host = cosine_similarity_matrix(pruned, reserved[:, num_protected:], eps).max(dim=-1)   # [B, M]
    out = _absorb(reserved, pruned, host + num_protected, sim.exp())
    # host: [B, M] row among the unprotected reserved tokens each pruned token joined (provenance)
    return (out, host) if return_hosts else out


def _nearest_hosts(x: torch.Tensor, norms: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Without gradient: each row's most similar kept row.

    ``x: [B, N, C]``, ``norms: [B, N]`` (``|x| + eps``), ``keep: [B, N, 1]`` -> ``(host [B, N] int64,
    best [B, N])``, ``best = -inf`` where the sample keeps no row. The :func:`cosine_similarity_matrix`
    formula, so the choice is the dense one's; the ``[B, N, N]`` matrix is divided and masked in
    place and only read by the ``max`` (no backward through it).
    """
    with torch.no_grad():
        n = norms.detach()
        sim = torch.bmm(x.detach(), x.detach().transpose(1, 2))                 # [B, N, N]
        sim.div_(n.unsqueeze(-1) * n.unsqueeze(-2))
        sim.masked_fill_(keep.transpose(1, 2) <= 0, float("-inf"))
        best, host = sim.max(dim=-1)
    return host, best


def squeeze_masked(x: torch.Tensor, keep: torch.Tensor, pruned_now: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """TPS squeezing, masked fixed-shape form (dTPS training; docs/methods/pruning.md, "Squeezing").

    Args:
        x: ``[B, N, C]`` patch tokens (all positions, alive or not); rows with both masks 0 (e.g.
            prefix tokens passed along to spare the caller a slice) are neither hosts nor squeezed.
        keep: ``[B, N, 1]`` 0/1 tokens kept at this stage (the only possible hosts). Used as a
            boolean column mask, so it carries no gradient here.
        pruned_now: ``[B, N, 1]`` 0/1 tokens pruned at this stage (``(1 - keep) * prev``); it
            multiplies the absorption weights, so a straight-through Gumbel gradient reaches
            the predictor through squeezing.

    Returns:
        ``[B, N, C]``: kept rows squeezed as in :func:`squeeze_gather` (equal to it on the kept
        rows, to float rounding); every other row (pruned now, dead before, unmatched hosts) is
        bit-identical to ``x``. A sample with no kept token is returned unchanged.

    Cost: the ``[B, N, N]`` similarity is computed once without gradient, to choose the hosts
    (:func:`_nearest_hosts`); the chosen similarity ``c_i = cos(x_i, x_{host_i})`` gets its
    gradient from the two gathered rows (``O(N C)``: the gradient of the dense max is zero
    everywhere else), and the absorption is one scatter-add (:func:`_absorb_scattered`). The forward values
    are those of the dense formula (the chosen entry's value is the matrix's own); the gradients
    too, to float rounding.
    """
    na = torch.linalg.vector_norm(x, dim=-1).add(eps)                           # [B, N]
    host, best = _nearest_hosts(x, na, keep)
    has_host = torch.isfinite(best)                                             # [B, N]
    partner = gather_tokens(x, host)                                            # [B, N, C]
    chosen = (x * partner).sum(dim=-1) / (na * na.gather(1, host))              # cos(x_i, x_host_i), [B, N]
    sim = best.masked_fill(~has_host, 0.0) + (chosen - chosen.detach())         # the dense value, its gradient
    weight = sim.exp() * has_host * pruned_now[..., 0]
    return _absorb_scattered(x, host, weight)


# ---------------------------------------------------------------------- learned decisions
def gumbel_softmax_hard(logits: torch.Tensor, tau: float = 1.0, dim: int = -1,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Straight-through Gumbel-softmax: one-hot forward values, soft-sample gradients.

    Args:
        logits: ``[..., K]`` unnormalised log-probabilities (DynamicViT: log-softmax over keep/drop).
        tau: temperature of the soft sample.

    Returns:
        ``[..., K]`` with forward values exactly 0 or 1 (``hard + (soft - soft.detach())``, so no
        ``1 - s + s`` rounding), backward through ``softmax((logits + g) / tau)``. The Gumbel noise
        ``-log(Exp(1))`` is clamped away from ``log(0)`` instead of redrawn, so it is always
        finite without a data-dependent loop (same distribution up to measure zero).
    """
    u = torch.empty_like(logits).exponential_(generator=generator)
    gumbels = -u.clamp_min(torch.finfo(u.dtype).tiny).log()
    soft = ((logits + gumbels) / tau).softmax(dim)
    hard = F.one_hot(soft.argmax(dim), soft.shape[dim]).to(soft.dtype)
    if dim not in (-1, soft.dim() - 1):
        hard = hard.movedim(-1, dim)
    return hard + (soft - soft.detach())


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of the rows where ``mask`` is 1: ``x: [B, N, C], mask: [B, N, 1] -> [B, 1, C]``.

    ``mask=None`` is the plain mean. A sample with no row left gets 0 (not NaN).
    """
    if mask is None:
        return x.mean(dim=1, keepdim=True)
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1e-6)


# ---------------------------------------------------------------------- masked attention
def _policy_keys(policy: torch.Tensor) -> torch.Tensor:
    """``[B, T, 1]`` policy -> ``[B, 1, T, T]`` allowed keys ``G_ij = P_j + (1 - P_j) delta_ij``."""
    T = policy.shape[1]
    p = policy.reshape(policy.shape[0], 1, 1, T)
    eye = torch.eye(T, dtype=p.dtype, device=p.device)
    return p + (1 - p) * eye


def softmax_with_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's "softmax with policy" (docs/methods/pruning.md, "DynamicViT"): attention that ignores pruned keys.

    Args:
        logits: ``[B, H, T, T]`` pre-softmax attention ``QK^T / sqrt(d)``.
        policy: ``[B, T, 1]`` keep mask (1 = alive; prefix tokens are 1). Differentiable: it
            multiplies the exponentials, which is how attention trains the predictor.
        eps: keeps rows finite; the reference value 1e-6.

    Returns:
        ``[B, H, T, T]`` ``(exp(A - max) G + eps / T) / (sum exp(A - max) G + eps)``, computed in
        fp32 and cast back. Alive queries see alive keys only; a dead query sees the alive keys
        and itself. Rows sum to 1.
    """
    T = logits.shape[-1]
    a = logits.float()
    a = (a - a.amax(dim=-1, keepdim=True)).exp() * _policy_keys(policy.float())
    return ((a + eps / T) / (a.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


#: the split into alive-first key columns pays when at most this fraction of the keys must be kept
_SPLIT_MAX_FRACTION = 0.85


def _alive_first(policy: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, int]]:
    """Key order that puts every sample's live keys first: ``(order [B, T], position [B, T], A)``.

    ``order[b, j]`` is the key at column ``j`` (live keys first, each group in token order),
    ``position`` its inverse, ``A`` the most live keys of any sample: columns ``>= A`` hold keys
    with policy exactly 0 in every sample. ``None`` when that leaves too few columns to skip, for an
    empty batch, and while ``torch.compile`` traces (a data-dependent count has no place in a graph).
    """
    B, T, _ = policy.shape
    if B == 0 or torch.compiler.is_compiling():  # A is data-dependent: a compiled graph keeps token order
        return None
    dead = (policy[..., 0] == 0).to(torch.uint8)                             # [B, T]
    A = T - int(dead.sum(dim=1).min())
    if A > _SPLIT_MAX_FRACTION * T:
        return None
    order = torch.sort(dead, dim=1, stable=True).indices
    position = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=order.device).expand(B, T))
    return order, position, A


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x: [B, H, T, w]`` contiguous, ``rows`` from :func:`~vitrim.ops.rows.flat_rows` -> ``[B, H, n, w]`` contiguous."""
    B, H, _, w = x.shape
    return x.reshape(-1, w).index_select(0, rows).view(B, H, -1, w)


class _PolicyAttention(torch.autograd.Function):
    """:func:`policy_attention` with a hand-written backward (the formulas in its docstring).

    Keys are put in an alive-first column order when enough of them are dropped in every sample
    (:func:`_alive_first`): the ``A`` first columns hold every live key, the others only keys with
    policy 0, which add nothing to the output and nothing to ``dL/dA`` apart from the row max's
    and the own key's single entries. Those columns cost the logits (for the row max) and, in
    backward, ``e^T dL/dnu`` (the dropped keys' policy gradient) only: of the six ``[T, T]``
    matmuls, four run on ``A`` columns. The row max's and the own-key terms are applied as
    ``[B, H, T, d]`` gathers and scatters instead of ``[T, T]`` entries. The autograd graph of the
    same expression would also add the backward of ``logits - m`` over ``[B, H, T, T]``.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, scale: float,
                eps: float) -> torch.Tensor:
        B, H, T, d = q.shape
        acc = torch.promote_types(v.dtype, torch.float32)  # fp32 for fp16 / bf16 / fp32, fp64 stays fp64
        split = _alive_first(policy.detach())
        # every matmul is a bmm on [B H, ., .] views: 4-D matmul copies strided (and transposed) operands
        if split is None:
            A, order, position = T, None, None
            kc = k.contiguous()                                                  # keys, in column order
            vc, pc = v, policy.reshape(B, 1, T, 1).to(v.dtype)
        else:
            order, position, A = split
            kc = _take_rows(k.contiguous(), flat_rows(order, T, H))
            vc = _take_rows(v.contiguous(), flat_rows(order[:, :A], T, H))       # the A first columns' values
            pc = policy[..., 0].gather(1, order[:, :A]).reshape(B, 1, A, 1).to(v.dtype)
        if torch.compiler.is_compiling():  # traced out= results may keep q's strides
            qs = (q * scale).contiguous()
        else:                              # contiguous in one pass
            qs = torch.mul(q, scale, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
        logits = torch.bmm(qs.reshape(B * H, T, d), kc.reshape(B * H, T, d).transpose(1, 2)).view(B, H, T, T)
        e = logits.to(acc)
        m, top = e.max(dim=-1, keepdim=True)                                     # [B, H, T, 1], a column
        e = e.sub_(m).exp_()                                                     # in place: no [T, T] copy
        w = v.new_empty(B, H, A, d + 1)                                          # [P * v, P] of the A columns
        torch.mul(vc, pc, out=w[..., :d])
        w[..., d:] = pc
        ea = e[..., :A].to(v.dtype).reshape(B * H, T, A)                        # a view: A columns of T
        nu = torch.bmm(ea, w.view(B * H, A, d + 1)).view(B, H, T, d + 1)
        nu_acc = nu.to(acc)
        if position is None:
            own_e = e.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)                   # e_ii, [B, H, T, 1] (a view)
        else:
            # e_ii at the own key's column: entry (row b h i, column position[b, i]) of e as [B H T, T]
            own = torch.arange(B * H * T, device=q.device).view(B, H, T) * T + position[:, None, :]
            own_e = e.reshape(-1)[own.reshape(-1)].view(B, H, T, 1)
        p = policy.reshape(B, 1, T, 1).to(acc)                                   # queries, token order
        vf = v.to(acc)
        own = own_e * (1 - p)                                                    # e_ii (1 - P_i)
        # laid out [B, T, H, d] (as SDPA's output): the caller's heads-to-tokens reshape is then a view
        num = torch.empty(B, T, H, d, dtype=acc, device=v.device).transpose(1, 2)
        torch.addcmul(nu_acc[..., :d], own, vf, out=num)
        num = num.add_(vf.sum(dim=-2, keepdim=True), alpha=eps / T)
        den = nu_acc[..., d:] + own + eps                                        # [B, H, T, 1]
        out = num.div_(den)
        ctx.save_for_backward(qs, k, kc, v, p, w, e, nu_acc, top, own_e, den, out, order, position)
        ctx.scale, ctx.eps, ctx.columns = scale, eps, A
        ctx.policy_dtype, ctx.logit_dtype, ctx.nu_dtype = policy.dtype, logits.dtype, nu.dtype
        return out.to(v.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        qs, k, kc, v, p, w, e, nu, top, own_e, den, out, order, position = ctx.saved_tensors
        B, H, T, d = qs.shape
        A = ctx.columns
        acc, ld, md = out.dtype, ctx.logit_dtype, ctx.nu_dtype
        g_nu = torch.empty(B, H, T, d + 1, dtype=acc, device=grad.device)        # [dL/dnum, dL/dden]
        g_num = torch.div(grad.to(acc), den, out=g_nu[..., :d])                  # [B, H, T, d]
        g_den = (g_num * out).sum(dim=-1, keepdim=True).neg_()                   # d out / d den = -out / den
        g_nu[..., d:] = g_den
        vf = v.to(acc)
        own = own_e * (1 - p)                                                    # e_ii (1 - P_i)
        g_own = (g_num * vf).sum(dim=-1, keepdim=True) + g_den                   # [B, H, T, 1]
        g_diag = g_own * own                                                     # dL/dA_ii through e_ii
        g_max = (g_nu * nu).sum(dim=-1, keepdim=True).neg_() - g_diag            # dL/dA at the row max's key
        g_nu_m = g_nu.to(md).view(B * H, T, d + 1)
        ev = e.to(md).view(B * H, T, T)
        g_w = torch.bmm(ev.transpose(1, 2), g_nu_m).view(B, H, T, d + 1).to(acc)  # every key's, column order
        to_tokens = None if position is None else flat_rows(position, T, H)      # column order -> token order
        if to_tokens is not None:
            g_w = _take_rows(g_w, to_tokens)
        g_q = g_k = g_v = g_p = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g_a = torch.bmm(g_nu_m, w.to(md).view(B * H, A, d + 1).transpose(1, 2)).view(B, H, T, A)
            g_l = g_a.to(acc).mul_(e[..., :A]).to(ld).view(B * H, T, A)          # dL/dA on the A columns
            kcl = kc.to(ld)
            at_max = flat_rows(top[..., 0], T, H)                                # each row's max key
            if ctx.needs_input_grad[0]:  # scale * (dA @ k + the max's and the own key's entries)
                g_q = torch.bmm(g_l, kcl[:, :, :A].reshape(B * H, A, d)).view(B, H, T, d)
                g_q = g_q.addcmul_(g_max.to(ld), _take_rows(kcl, at_max))
                g_q = g_q.addcmul_(g_diag.to(ld), k.to(ld)).mul_(ctx.scale).to(qs.dtype)
            if ctx.needs_input_grad[1]:  # dA^T @ (scale q), the same entries
                qsl = qs.to(ld)
                g_kc = torch.zeros(B, H, T, d, dtype=ld, device=qs.device)
                g_kc[:, :, :A] = torch.bmm(g_l.transpose(1, 2), qsl.reshape(B * H, T, d)).view(B, H, A, d)
                g_kc.view(-1, d).index_add_(0, at_max, (g_max.to(ld) * qsl).view(-1, d))
                g_k = g_kc if to_tokens is None else _take_rows(g_kc, to_tokens)
                g_k = g_k.addcmul_(g_diag.to(ld), qsl).to(k.dtype)
        if ctx.needs_input_grad[2]:  # P * dL/d(Pv) + own dL/dnum + eps/T sum_i dL/dnum_i
            g_v = torch.addcmul(g_num.sum(dim=-2, keepdim=True).mul_(ctx.eps / T), g_num, own)
            g_v = g_v.addcmul_(g_w[..., :d], p).to(v.dtype)
        if ctx.needs_input_grad[3]:  # keys: v . dL/d(Pv) + dL/dP; queries: -own_e dL/down; summed over heads
            g_pk = (g_w[..., :d] * vf).sum(dim=-1, keepdim=True) + g_w[..., d:] - g_own * own_e
            g_p = g_pk.sum(dim=1).to(ctx.policy_dtype)                           # [B, T, 1]
        return g_q, g_k, g_v, g_p, None, None


def policy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, scale: float,
                     eps: float = 1e-6) -> torch.Tensor:
    """``softmax_with_policy(q k^T * scale, policy) @ v`` without the policy-masked ``[T, T]`` matrix.

    The key mask goes onto the values instead of the attention matrix. With ``e_ij = exp(A_ij - m_i)``
    (``m_i`` the row max over all keys) and ``G_ij = P_j + (1 - P_j) delta_ij``::

        sum_j e_ij G_ij v_j = e @ (P * v) + e_ii (1 - P_i) v_i
        sum_j e_ij G_ij     = e @ P       + e_ii (1 - P_i)

    so one matmul ``e @ [P * v, P]`` (``[B, H, T, d + 1]``) gives the numerator and the row sum, the
    query's own key is added from the diagonal ``e_ii`` of ``e``, and the
    ``eps`` terms of :func:`softmax_with_policy` are applied to the ``[B, H, T, d]`` result:
    ``out_i = (sum_j e_ij G_ij v_j + eps/T sum_j v_j) / (sum_j e_ij G_ij + eps)``. The only ``[T, T]``
    work left is the logits, the max, one ``exp`` and the matmul (and their backward), instead of the
    masked product, the ``eps`` sum and the division over ``[B, H, T, T]``; the gradient still reaches
    every key's policy entry (dropped ones included) through ``P * v`` and ``P``.

    The backward is written out (:class:`_PolicyAttention`): it is the gradient of the formula
    above, including the row max's (it does not cancel inside the ``eps`` terms, which dominate a
    row whose allowed keys all score far below its best dropped key; it reaches the one logit
    ``q_i . k_argmax``), with no ``[T, T]`` work beyond four matmuls and one multiply. Equal to the
    explicit formula to float rounding (tested at 1e-5 in float32 and 1e-10 in float64, values and
    gradients). No attention dropout: with dropout on the probabilities use :func:`softmax_with_policy`.
    No double backward.

    Args:
        q, k, v: ``[B, H, T, d]`` (after q/k-norm); policy: ``[B, T, 1]`` (1 = alive);
        scale: the logit scale (``d ** -0.5``).

    Returns:
        ``[B, H, T, d]`` in ``v``'s dtype (the softmax part in fp32 at least, as :func:`softmax_with_policy`).
    """
    return _PolicyAttention.apply(q, k, v, policy, scale, eps)


def attend_with_policy(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       policy: torch.Tensor) -> torch.Tensor:
    """Attention of a timm ``Attention`` module's ``q, k, v: [B, H, T, d]`` under a keep policy.

    When the policy needs a gradient (training with a predictor), or the module does not use fused
    attention, the explicit eps formula of :func:`softmax_with_policy` is computed, as
    :func:`policy_attention` (the same values and gradients without the masked ``[T, T]`` products;
    with attention dropout active, :func:`softmax_with_policy` itself). A boolean mask would cut
    the predictor's gradient. Otherwise, on the fused path, SDPA runs with the allowed keys as a
    ``0 / -inf`` mask (the allowed fast path; it differs by the eps terms, ~1e-6).

    Returns:
        ``[B, H, T, d]``.
    """
    needs_grad = torch.is_grad_enabled() and policy.requires_grad
    dropout = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn and not needs_grad:
        allowed = _policy_keys(policy) > 0
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    if dropout == 0.0:
        return policy_attention(q, k, v, policy, attn.scale)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    return attn.attn_drop(softmax_with_policy(logits, policy)) @ v
