"""FLOPs the way the papers count them: GMACs (fvcore convention), analytic and traced.

Analytic (the number papers compare, protocol.md §2.2): per block, the qkv / output projection
and MLP linears on the rows that run through them plus ``2 * Tq * Tkv * attn_dim`` for
``QK^T`` and ``AV``; the patch-embedding convolution; the classifier head(s). Not counted:
norms, softmax, GELU, biases, residual adds and reduction bookkeeping (sorting, gather,
scatter), unless a method's spec counts an extra matmul (``BlockTokens.extra_macs``).

Traced: ``torch.utils.flop_counter.FlopCounterMode`` / 2 on a real forward, as a cross-check.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..methods.base import BlockTokens

__all__ = ["LayerFlops", "FlopsReport", "flops", "flops_report", "traced_flops", "block_macs", "linear_macs",
           "price_blocks"]

ImgSize = Union[int, tuple[int, int], None]


@dataclass
class LayerFlops:
    index: int
    tokens_in: int     # query rows entering the block's attention
    tokens_kv: int     # key/value rows
    tokens_mlp: int    # rows through the MLP (= tokens leaving the block)
    macs: int


@dataclass
class FlopsReport:
    """Per-layer analytic MACs of a (possibly reduced) model at one input size."""

    model: str
    method: Optional[str]
    options: dict
    img_size: tuple[int, int]
    num_tokens: int
    embed_macs: int
    head_macs: int
    extra_macs: int
    layers: list[LayerFlops] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return self.embed_macs + self.head_macs + self.extra_macs + sum(l.macs for l in self.layers)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

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


def price_blocks(blocks: Sequence[nn.Module], method: Optional[nn.Module],
                 num_tokens: int) -> tuple[list[tuple[int, int, int, int, int]], int]:
    """ViT-layout blocks priced at the method's token plan (every token when ``method`` is None).

    Returns:
        ``([(index, tokens_in, tokens_kv, tokens_mlp, macs)] per block, the method's extra MACs)``.
    """
    if method is None:
        plan, extra = [BlockTokens(num_tokens, num_tokens, num_tokens)] * len(blocks), 0
    else:
        plan, extra = method.block_tokens(num_tokens), method.extra_macs(num_tokens)
    return [(i, t.q, t.kv, t.mlp, block_macs(b, t)) for i, (b, t) in enumerate(zip(blocks, plan))], extra


def _embed_macs(model: nn.Module, num_patches: int) -> int:
    proj = model.patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        per_patch = proj.weight.numel() // proj.groups * proj.groups
        return per_patch * num_patches
    return linear_macs(proj) * num_patches


def _head_macs(model: nn.Module) -> int:
    heads = [getattr(model, "head", None), getattr(model, "head_dist", None)]
    macs = sum(linear_macs(h) for h in heads if isinstance(h, nn.Module))
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:  # one latent query over all tokens; counted as its linears per token
        macs += linear_macs(attn_pool)
    return macs


def _img_size(adapter, img_size: ImgSize) -> tuple[int, int]:
    if img_size is None:
        return adapter.default_img_size()
    if isinstance(img_size, int):
        return img_size, img_size
    if len(img_size) != 2:
        raise ValueError(f"img_size must be an int or (height, width), got {img_size!r}")
    return int(img_size[0]), int(img_size[1])


def flops_report(model: nn.Module, img_size: ImgSize = None) -> FlopsReport:
    """Per-layer analytic GMACs of ``model`` as reduced now (or unreduced), at batch 1."""
    from ..adapters import get_adapter

    adapter = get_adapter(model)
    size = _img_size(adapter, img_size)
    method = getattr(model, "vitrim", None)
    if hasattr(adapter, "cost_plan"):  # families with their own block layout (pyramids) price their blocks
        plan = adapter.cost_plan(size)
        return FlopsReport(
            model=model_name(model), method=None if method is None else method.name,
            options={} if method is None else method.options(), img_size=size, num_tokens=plan["num_tokens"],
            embed_macs=plan["embed_macs"], head_macs=plan["head_macs"], extra_macs=plan["extra_macs"],
            layers=[LayerFlops(*layer) for layer in plan["layers"]])
    num_patches = adapter.num_patches(size)
    num_tokens = num_patches + model.num_prefix_tokens
    layers, extra = price_blocks(model.blocks, method, num_tokens)
    return FlopsReport(
        model=model_name(model),
        method=None if method is None else method.name,
        options={} if method is None else method.options(),
        img_size=size, num_tokens=num_tokens,
        embed_macs=_embed_macs(model, num_patches), head_macs=_head_macs(model), extra_macs=extra,
        layers=[LayerFlops(*layer) for layer in layers],
    )


def flops(model: nn.Module, img_size: ImgSize = None) -> float:
    """Analytic GMACs of ``model`` as reduced now, in the papers' convention (batch 1).

    >>> import timm, vitrim
    >>> m = timm.create_model("deit_small_patch16_224")
    >>> round(vitrim.flops(m), 2), round(vitrim.flops(vitrim.apply(m, "tome", r=13)), 2)
    (4.6, 2.7)
    """
    return flops_report(model, img_size).gmacs


@contextlib.contextmanager
def _explicit_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily switch every module with a ``fused_attn`` flag to explicit attention."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


def traced_flops(model: nn.Module, img_size: ImgSize = None, detail: bool = False):
    """GMACs measured by ``FlopCounterMode`` (FLOPs / 2) on one forward at batch 1.

    If the model calls a fused attention kernel the counter has no formula for (e.g. SDPA on
    CPU in some PyTorch versions), the attention matmuls would be missed (DeiT-S would read
    ~4.25 instead of 4.60); this is detected and the count is repeated with explicit attention.

    Returns GMACs, or ``(GMACs, info dict)`` with ``detail=True``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from ..adapters import get_adapter

    size = _img_size(get_adapter(model), img_size)
    param = next(model.parameters())
    x = torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()

    def count() -> tuple[int, set[str]]:
        seen: set[str] = set()

        class _Spy(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.add(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter, _Spy():
            model(x)
        counted = {str(k) for k in counter.get_flop_counts().get("Global", {})}
        sdpa_called = {op for op in seen if "scaled_dot_product" in op}
        missing = {op for op in sdpa_called if op not in counted}
        return counter.get_total_flops(), missing

    try:
        total, missing = count()
        fallback = False
        if missing:
            with _explicit_attention(model):
                total, _ = count()
            fallback = True
    finally:
        model.train(was_training)
    gmacs = total / 2 / 1e9
    if detail:
        return gmacs, {"sdpa_uncounted_ops": sorted(missing), "explicit_attention_fallback": fallback}
    return gmacs
