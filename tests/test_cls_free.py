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
    blk = _Block(m.blocks[0], rope, rope)
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


def test_methods_that_need_a_class_token_still_say_so():
    """Every built-in method scores without a class token now; a pruning method that does not declare
    ``scores_without_class_token`` is still refused on such a model."""
    from vitrim.adapters import get_adapter
    from vitrim.methods._pruning import PruningMethod
    from vitrim.methods.base import get_method_class

    class NeedsClassToken(PruningMethod):
        name = "needs_cls"

    assert all(get_method_class(n).scores_without_class_token
               for n in ("evit", "etps", "dynamicvit", "dtps", "idle"))
    with pytest.raises(vitrim.OptionError, match="class token"):
        NeedsClassToken(get_adapter(_vit()).info())
