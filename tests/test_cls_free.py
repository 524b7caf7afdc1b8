"""Scoring without a class token [vitrim extension]: the average patch token's query (EViT, eTPS)."""
import pytest
import timm
import torch

import vitrim
from vitrim.adapters.eva import _Block
from vitrim.ops.attention import mean_query_logits, split_qkv


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=3, class_token=False,
                             global_pool="avg", **kw).eval()


def _eva(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, depth=3, class_token=False,
                             **kw).eval()


def _explicit(attn, z, k, p):
    """``<W_q mean_j z_j + b_q, k_j> * scale`` per head, written out."""
    w, b = attn.qkv.weight[:attn.attn_dim], attn.qkv.bias[:attn.attn_dim] if attn.qkv.bias is not None else 0
    q = z[:, p:].mean(1) @ w.T + b                                                     # [B, A]
    q = attn.q_norm(q.reshape(z.shape[0], attn.num_heads, 1, attn.head_dim))
    return torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k[:, :, p:]) * attn.scale


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("regs", [0, 2])
def test_scores_equal_the_formula_timm_vit(qk_norm, regs):
    m = _vit(qk_norm=qk_norm, reg_tokens=regs)
    x = m._pos_embed(m.patch_embed(torch.randn(2, 3, 64, 64)))
    blk = m.blocks[0]
    z = blk.norm1(x)
    _, k, _ = split_qkv(blk.attn, z)
    torch.testing.assert_close(mean_query_logits(blk.attn, z, k, regs), _explicit(blk.attn, z, k, regs),
                               rtol=1e-5, atol=1e-5)


def test_scores_equal_the_formula_with_rope():
    m = _eva()
    x, rope = m._pos_embed(m.patch_embed(torch.randn(2, 3, 64, 64)))
    blk = _Block(m.blocks[0], 0, None, rope, m.num_prefix_tokens)
    z = blk.norm1(x)
    _, k, _ = split_qkv(blk.attn, z)                                  # rotated keys
    torch.testing.assert_close(mean_query_logits(blk.attn, z, k, 0), _explicit(blk.attn, z, k, 0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_vit, _eva])
@pytest.mark.parametrize("method", ["evit", "etps"])
def test_pruning_without_class_token_scores_with_the_average_query(make, method):
    m = make()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        vitrim.apply(m, method, keep_rate=1.0, locations=(1,))
        assert torch.equal(m(x), ref)
        vitrim.update(m, keep_rate=0.5)
        out, state = m.forward_with_state(x)
    rec = state.records[-1]
    assert rec.kept == 8 and out.shape == ref.shape
    torch.testing.assert_close(rec.scores.sum(-1), torch.ones(2))   # softmax over the patch tokens
    assert vitrim.flops(m) < vitrim.flops(vitrim.remove(m) or m)


@pytest.mark.parametrize("make", [_vit, _eva])
def test_idle_without_class_token_ranks_by_the_average_query(make):
    """IdleViT's ranking without a class token: the head-mean pre-softmax logits of the average patch token's
    query (``mean_query_logits``), the computed rows are the prefix rows and the top-K by that score."""
    from vitrim.ops.idle import idle_block_gather, idle_scores
    m = make(reg_tokens=2) if make is _vit else make(num_reg_tokens=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        vitrim.apply(m, "idle", keep_rate=1.0)
        assert torch.equal(m(x), ref)
        vitrim.update(m, keep_rate=0.5, layers=(1,))
        out, state = m.forward_with_state(x)
        tokens = m.patch_embed(x)
        tokens = m._pos_embed(tokens)
        tokens, rope = tokens if isinstance(tokens, tuple) else (tokens, None)
        tokens = m.blocks[0](tokens, rope=rope) if rope is not None else m.blocks[0](tokens)
        blk = m.blocks[1] if rope is None else _Block(m.blocks[1], 1, None, rope, 2)
        z = blk.norm1(tokens)
        _, k, _ = split_qkv(blk.attn, z)
        expected = mean_query_logits(blk.attn, z, k, 2).mean(1)                  # [B, n]
        torch.testing.assert_close(idle_scores(blk.attn, z, 2, mean_query=True), expected, rtol=1e-5, atol=1e-5)
        _, index = idle_block_gather(blk, tokens, 8, 2, mean_query=True)
    rec = state.records[-1]
    assert torch.equal(rec.index, index) and rec.keep == 8
    assert torch.equal(index[:, :2], torch.arange(2).expand(2, 2))
    top = expected.topk(8, dim=-1).indices + 2
    assert torch.equal(index[:, 2:].sort(-1).values, top.sort(-1).values)
    assert out.shape == ref.shape and not torch.equal(out, ref)
