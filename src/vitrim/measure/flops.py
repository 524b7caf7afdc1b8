"""FLOPs the way the papers count them: GMACs (fvcore convention), analytic and traced.

Pure pricing: this module knows module shapes and token plans, not model families. Each adapter
builds the :class:`CostPlan` of its family from these pieces (``Adapter.cost_plan``);
``vitrim.flops`` / ``vitrim.flops_report`` / ``vitrim.traced_flops`` put them together.

Analytic (the number papers compare; ``docs/flops.md``): per block, the qkv / output projection
and MLP linears on the rows that run through them plus ``2 * Tq * Tkv * attn_dim`` for
``QK^T`` and ``AV``; the patch-embedding convolution; the classifier head(s). Not counted:
norms, softmax, GELU, biases, residual adds and reduction bookkeeping (sorting, gather,
scatter), unless a method's rules count an extra matmul (``BlockTokens.extra_macs``).

Traced: ``torch.utils.flop_counter.FlopCounterMode`` / 2 on a real forward, as a cross-check.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..methods.base import BlockTokens

__all__ = ["LayerFlops", "CostPlan", "FlopsReport", "block_macs", "linear_macs", "conv_macs", "price_blocks",
           "model_name", "count_traced", "explicit_attention"]


@dataclass
class LayerFlops:
    index: int
    tokens_in: int     # query rows entering the block's attention
    tokens_kv: int     # key/value rows
    tokens_mlp: int    # rows through the MLP (= tokens leaving the block)
    macs: int


@dataclass
class CostPlan:
    """What an adapter prices for one input size: MACs per block and outside the blocks (batch 1)."""

    num_tokens: int    # tokens entering the first block (prefix included; first stage of a pyramid)
    embed_macs: int    # patch embedding (and a pyramid's downsampling)
    head_macs: int     # pooling head(s) and classifier(s)
    extra_macs: int    # the method's own outside the blocks (predictors)
    layers: list[LayerFlops] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return self.embed_macs + self.head_macs + self.extra_macs + sum(l.macs for l in self.layers)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


@dataclass
class FlopsReport(CostPlan):
    """Per-layer analytic MACs of a (possibly reduced) model at one input size."""

    model: str = ""
    method: Optional[str] = None
    options: dict = field(default_factory=dict)
    img_size: tuple[int, int] = (0, 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gmacs"] = self.gmacs
        return d

    def table(self) -> str:
        """Human-readable per-layer table (what ``vitrim flops`` prints)."""
        lines = [f"{self.model}  method={self.method or 'none'} {self.options or ''}  "
                 f"input={self.img_size[0]}x{self.img_size[1]}  tokens={self.num_tokens}",
                 f"{'block':>5} {'tokens in':>9} {'kv':>5} {'mlp/out':>7} {'GMACs':>8}"]
        for l in self.layers:
            lines.append(f"{l.index:>5} {l.tokens_in:>9} {l.tokens_kv:>5} {l.tokens_mlp:>7} {l.macs / 1e9:>8.4f}")
        lines.append(f"patch embed {self.embed_macs / 1e9:.4f}  head {self.head_macs / 1e9:.4f}"
                     + (f"  method extra {self.extra_macs / 1e9:.4f}" if self.extra_macs else ""))
        lines.append(f"total {self.gmacs:.3f} GMACs")
        return "\n".join(lines)


def model_name(model: nn.Module) -> str:
    """timm architecture name where known, else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or getattr(type(model), "_vitrim_original_class", type(model)).__name__


def linear_macs(module: nn.Module) -> int:
    """MACs per row of every ``nn.Linear`` inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def conv_macs(conv: nn.Module, out_positions: int) -> int:
    """MACs of a convolution producing ``out_positions`` output positions (weight = C_out * C_in / groups * kh * kw)."""
    return conv.weight.numel() * out_positions


def block_macs(block: nn.Module, tokens: BlockTokens) -> int:
    """Analytic MACs of one timm ViT block computing with ``tokens`` rows."""
    attn = block.attn
    qkv = attn.qkv.in_features * attn.qkv.out_features // 3  # per row, per q / k / v
    macs = qkv * tokens.q + 2 * qkv * tokens.kv
    macs += 2 * tokens.q * tokens.kv * attn.attn_dim            # QK^T and AV
    macs += attn.proj.in_features * attn.proj.out_features * tokens.q
    if getattr(attn, "gate", None) is not None:
        macs += linear_macs(attn.gate) * tokens.q
    macs += linear_macs(block.mlp) * tokens.mlp
    return macs + tokens.extra_macs


def price_blocks(blocks: Sequence[nn.Module], method: Optional[nn.Module], num_tokens: int,
                 embed_macs: int, head_macs: int) -> CostPlan:
    """The cost plan of ViT-layout blocks (``attn.qkv``, ``attn.proj``, ``mlp``; see :func:`block_macs`)
    at the method's token plan (every token when ``method`` is None)."""
    if method is None:
        plan, extra = [BlockTokens(num_tokens, num_tokens, num_tokens)] * len(blocks), 0
    else:
        plan, extra = method.block_tokens(num_tokens), method.extra_macs(num_tokens)
    layers = [LayerFlops(i, t.q, t.kv, t.mlp, block_macs(b, t)) for i, (b, t) in enumerate(zip(blocks, plan))]
    return CostPlan(num_tokens, embed_macs, head_macs, extra, layers)


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily switch every module with a ``fused_attn`` flag to explicit attention."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters temporarily without ``requires_grad``: under ``no_grad`` a view of a parameter (an
    attention pool's ``latent.expand``) would otherwise require grad without a grad_fn, which
    ``FlopCounterMode``'s module tracker cannot hook."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def count_traced(model: nn.Module, x: torch.Tensor,
                 explicit: Optional[Callable[[], contextlib.AbstractContextManager]] = None) -> tuple[float, dict]:
    """GMACs measured by ``FlopCounterMode`` (FLOPs / 2) on one eval-mode forward of ``x``.

    If the model calls a fused attention kernel the counter has no formula for (e.g. SDPA on
    CPU in some PyTorch versions), the attention matmuls would be missed (DeiT-S would read
    ~4.25 instead of 4.60); this is detected and the count is repeated with explicit attention
    (``explicit()``: the model family's own switch, by default :func:`explicit_attention`).

    Returns:
        ``(GMACs, {"sdpa_uncounted_ops": [...], "explicit_attention_fallback": bool})``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()

    def count() -> tuple[int, set[str]]:
        seen: set[str] = set()

        class _Spy(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.add(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), _frozen(model), counter, _Spy():
            model(x)
        counted = {str(k) for k in counter.get_flop_counts().get("Global", {})}
        sdpa_called = {op for op in seen if "scaled_dot_product" in op}
        missing = {op for op in sdpa_called if op not in counted}
        return counter.get_total_flops(), missing

    # parameters leave autograd for the count: a view of a parameter made under no_grad (timm's attention-pool
    # latent, ``latent.expand``) still requires grad without a grad_fn, which FlopCounterMode's module tracker rejects
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        total, missing = count()
        fallback = False
        if missing:
            with (explicit() if explicit is not None else explicit_attention(model)):
                total, _ = count()
            fallback = True
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)
    return total / 2 / 1e9, {"sdpa_uncounted_ops": sorted(missing), "explicit_attention_fallback": fallback}


# ---------------------------------------------------------------------- attention-pool heads
def attention_pool_macs(num_latents: int, num_tokens: int, q_macs: int, kv_macs: int, attn_dim: int,
                        out_macs: int) -> int:
    """MACs of an attention-pool head (``docs/flops.md``): the query projection on the latent rows,
    keys and values on the ``num_tokens`` pooled tokens, the latent-to-token products ``QK^T`` and
    ``AV`` (``2 L N A``), and what runs on the latent rows after the attention (output projection, MLP).

    ``q_macs`` / ``kv_macs`` / ``out_macs`` are per-row MACs (``linear_macs`` of those layers).
    """
    return num_latents * (q_macs + out_macs) + num_tokens * kv_macs + 2 * num_latents * num_tokens * attn_dim


def latent_pool_macs(pool: nn.Module, num_tokens: int) -> int:
    """:func:`attention_pool_macs` of a timm ``AttentionPoolLatent`` (``latent_len`` latents, ``q``,
    ``kv``, ``proj``, ``mlp``) pooling ``num_tokens`` tokens."""
    out = linear_macs(pool.proj) + (linear_macs(pool.mlp) if pool.mlp is not None else 0)
    return attention_pool_macs(pool.latent_len, num_tokens, linear_macs(pool.q), linear_macs(pool.kv),
                               pool.num_heads * pool.head_dim, out)


__all__ += ["attention_pool_macs", "latent_pool_macs"]
