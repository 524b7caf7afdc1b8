"""Pure pruning ops: squeezing (tps.md §3, §12), fused token, Gumbel, masked attention (dynamicvit.md §4)."""
import math

import pytest
import torch
from timm.layers import Attention

from vitrim.ops.attention import attend, class_attention_scores, split_qkv
from vitrim.ops.prune import (attend_with_policy, cosine_similarity_matrix, fused_token, gather_tokens,
                              gumbel_softmax_hard, keep_count_current, keep_count_original, masked_mean,
                              rank_tokens, softmax_with_policy, squeeze_gather, squeeze_masked)

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G)


# ---------------------------------------------------------------------- counts
def test_keep_counts_floating_point_rules():
    assert [keep_count_original(196, 0.7 ** s) for s in (1, 2, 3, 4)] == [137, 96, 67, 47]
    assert [keep_count_original(196, 0.5 ** s) for s in (1, 2, 3, 4)] == [98, 49, 24, 12]
    n, ks = 196, []
    for _ in range(3):
        ks.append(keep_count_current(n, 0.7))
        n = ks[-1] + 1  # with EViT's fused token
    assert ks == [138, 98, 70]
    assert keep_count_current(196, 1.0) == 196 and keep_count_original(196, 1.0) == 196
    assert keep_count_original(10, 0.01) == 1  # at least one token survives


# ---------------------------------------------------------------------- gather, fused token
def test_gather_keeps_prefix_in_front_and_follows_index():
    x = rand(2, 7, 3)
    index = torch.tensor([[4, 0], [1, 3]])
    out = gather_tokens(x, index, num_prefix_tokens=2)
    assert torch.equal(out[:, :2], x[:, :2])
    assert torch.equal(out[0, 2:], x[0, [6, 2]]) and torch.equal(out[1, 2:], x[1, [3, 5]])
    assert torch.equal(gather_tokens(x[..., 0], index), x[..., 0].gather(1, index))


def test_rank_tokens_descending_and_complementary():
    s = rand(3, 10)
    keep, rest = rank_tokens(s, 4)
    assert torch.equal(keep, s.topk(4).indices)
    assert torch.equal(torch.sort(torch.cat([keep, rest], 1), 1).values, torch.arange(10).expand(3, -1))
    vals = s.gather(1, torch.cat([keep, rest], 1))
    assert (vals[:, :-1] >= vals[:, 1:]).all()


def test_fused_token_is_unnormalised_sum_of_the_rest():
    x, a = rand(2, 7, 5), torch.rand(2, 7, generator=G)
    keep, rest = rank_tokens(a, 3)
    fused = fused_token(x, a.scatter(1, keep, 0.0))
    expected = torch.stack([sum(a[b, j] * x[b, j] for j in rest[b].tolist()) for b in range(2)]).unsqueeze(1)
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-6)
    # not renormalised: scaling the weights scales the token
    torch.testing.assert_close(fused_token(x, 2 * a.scatter(1, keep, 0.0)), 2 * fused)


# ---------------------------------------------------------------------- squeezing
def squeeze_reference(reserved, pruned, eps=1e-6):
    """Spec formula with Python loops over tokens (tps.md §3.1-3.3)."""
    out = reserved.clone()
    B, R, _ = reserved.shape
    for b in range(B):
        num = [math.e * reserved[b, j] for j in range(R)]
        den = [math.e] * R
        for i in range(pruned.shape[1]):
            p = pruned[b, i]
            sims = [float(p @ reserved[b, j]) / ((float(p.norm()) + eps) * (float(reserved[b, j].norm()) + eps))
                    for j in range(R)]
            j = max(range(R), key=lambda t: sims[t])
            num[j] = num[j] + math.exp(sims[j]) * p
            den[j] += math.exp(sims[j])
        for j in range(R):
            out[b, j] = num[j] / den[j]
    return out


def test_squeeze_worked_examples():
    y = squeeze_gather(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[2.0, 1.0]]]))
    torch.testing.assert_close(y[0, 0], torch.tensor([1.473631, 0.473631]), atol=1e-6, rtol=0)
    assert torch.equal(y[0, 1], torch.tensor([0.0, 1.0]))
    y = squeeze_gather(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]]), torch.tensor([[[2.0, 1.0], [1.0, 0.0]]]))
    torch.testing.assert_close(y[0, 0], torch.tensor([1.310299, 0.310299]), atol=1e-6, rtol=0)
    assert torch.equal(y[0, 1:], torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))


def test_squeeze_equals_brute_force_loop():
    reserved, pruned = rand(3, 6, 8), rand(3, 9, 8)
    torch.testing.assert_close(squeeze_gather(reserved, pruned), squeeze_reference(reserved, pruned),
                               atol=1e-6, rtol=1e-6)


def test_unmatched_hosts_and_protected_rows_bit_identical():
    reserved, pruned = rand(2, 8, 16), rand(2, 3, 16)
    out = squeeze_gather(reserved, pruned, num_protected=2)
    host = cosine_similarity_matrix(pruned, reserved[:, 2:]).argmax(-1) + 2
    for b in range(2):
        untouched = sorted(set(range(8)) - set(host[b].tolist()))
        assert 0 in untouched and 1 in untouched  # protected rows are never hosts
        assert torch.equal(out[b, untouched], reserved[b, untouched])
        assert not torch.equal(out[b, host[b]], reserved[b, host[b]])
    torch.testing.assert_close(out[:, 2:], squeeze_reference(reserved[:, 2:], pruned), atol=1e-6, rtol=1e-6)


def test_identity_absorption_and_convexity():
    reserved = rand(2, 5, 6)
    out = squeeze_gather(reserved, reserved[:, [1, 3]].clone())
    torch.testing.assert_close(out, reserved, atol=1e-6, rtol=1e-6)
    reserved, pruned = rand(2, 4, 6), rand(2, 10, 6)
    out = squeeze_gather(reserved, pruned)
    host = cosine_similarity_matrix(pruned, reserved).argmax(-1)
    for b in range(2):
        for j in range(4):
            group = torch.cat([reserved[b, j:j + 1], pruned[b, host[b] == j]])
            assert (out[b, j] >= group.min(0).values - 1e-6).all() and (out[b, j] <= group.max(0).values + 1e-6).all()


def test_masked_squeeze_equals_gather_squeeze():
    B, N, C = 3, 12, 8
    x = rand(B, N, C)
    prev = (torch.rand(B, N, 1, generator=G) < 0.8).float()
    keep = (torch.rand(B, N, 1, generator=G) < 0.5).float() * prev
    pruned_now = (1 - keep) * prev
    out = squeeze_masked(x, keep, pruned_now)
    for b in range(B):
        k = keep[b, :, 0].bool()
        p = pruned_now[b, :, 0].bool()
        ref = squeeze_gather(x[b:b + 1, k], x[b:b + 1, p])[0]
        torch.testing.assert_close(out[b, k], ref, atol=1e-6, rtol=1e-6)
        assert torch.equal(out[b, ~k], x[b, ~k])  # pruned now and dead before: bit-identical


def test_masked_squeeze_without_hosts_is_identity():
    x = rand(2, 5, 4)
    keep = torch.zeros(2, 5, 1)
    assert torch.equal(squeeze_masked(x, keep, torch.ones(2, 5, 1)), x)


def test_masked_squeeze_gradient_reaches_pruned_now():
    x = rand(2, 6, 4)
    keep = torch.tensor([1, 0, 1, 0, 0, 1.0]).view(1, 6, 1).expand(2, -1, -1)
    pruned_now = (1 - keep).clone().requires_grad_()
    squeeze_masked(x, keep, pruned_now).sum().backward()
    assert pruned_now.grad.abs().sum() > 0


# ---------------------------------------------------------------------- Gumbel
def test_gumbel_hard_values_and_straight_through_gradient():
    logits = rand(4, 50, 2).log_softmax(-1).requires_grad_()
    y = gumbel_softmax_hard(logits, generator=torch.Generator().manual_seed(3))
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y.sum(-1), torch.ones(4, 50))
    (y[..., 0] * rand(4, 50)).sum().backward()
    assert logits.grad.abs().sum() > 0
    # samples follow the probabilities: a token with keep probability ~1 is kept
    sure = torch.tensor([[[0.0, -30.0]]]).expand(1, 200, 2)
    assert gumbel_softmax_hard(sure)[..., 0].all()


def test_masked_mean():
    x = rand(2, 4, 3)
    m = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0.0]]).unsqueeze(-1)
    out = masked_mean(x, m)
    torch.testing.assert_close(out[0, 0], (x[0, 0] + x[0, 2]) / 2)
    assert torch.equal(out[1], torch.zeros(1, 3))
    torch.testing.assert_close(masked_mean(x, None), x.mean(1, keepdim=True))


# ---------------------------------------------------------------------- masked attention
def test_softmax_with_policy_properties():
    T = 9
    logits = rand(2, 3, T, T)
    ones = torch.ones(2, T, 1)
    torch.testing.assert_close(softmax_with_policy(logits, ones), logits.softmax(-1), atol=1e-5, rtol=1e-5)
    policy = torch.ones(2, T, 1)
    policy[0, [2, 5, 7]] = 0
    policy[1, [1, 8]] = 0
    probs = softmax_with_policy(logits, policy)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, T), atol=1e-5, rtol=1e-5)
    for b in range(2):
        alive = policy[b, :, 0].bool()
        sub = logits[b][:, alive][:, :, alive].softmax(-1)
        torch.testing.assert_close(probs[b][:, alive][:, :, alive], sub, atol=1e-5, rtol=1e-5)
        dead = (~alive).nonzero().flatten()
        # a dead query sees the alive keys and itself
        allowed = alive.clone()
        allowed[dead[0]] = True
        torch.testing.assert_close(probs[b, :, dead[0]][:, allowed], logits[b, :, dead[0]][:, allowed].softmax(-1),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_attend_with_policy_ignores_dead_tokens(fused):
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2).eval()
    attn.fused_attn = fused
    x = rand(2, 7, 16)
    policy = torch.tensor([1, 1, 0, 1, 0, 1, 1.0]).view(1, 7, 1).expand(2, -1, -1)
    alive = policy[0, :, 0].bool()
    with torch.no_grad():
        q, k, v = split_qkv(attn, x)
        out = attend_with_policy(attn, q, k, v, policy)
        ref = attend(attn, q[:, :, alive], k[:, :, alive], v[:, :, alive])
        torch.testing.assert_close(out[:, :, alive], ref, atol=1e-5, rtol=1e-5)
        x2 = x.clone()
        x2[:, ~alive] = rand(2, 2, 16)  # dead tokens' features do not reach alive outputs
        q2, k2, v2 = split_qkv(attn, x2)
        torch.testing.assert_close(attend_with_policy(attn, q2, k2, v2, policy)[:, :, alive], out[:, :, alive],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attend_with_policy(attn, q, k, v, torch.ones(2, 7, 1)), attend(attn, q, k, v),
                                   atol=1e-5, rtol=1e-5)


def test_policy_gradient_uses_the_explicit_formula():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2)  # fused by default: a needed gradient still flows
    q, k, v = split_qkv(attn, rand(1, 5, 16))
    policy = torch.tensor([1, 1, 0, 1, 1.0]).view(1, 5, 1).requires_grad_()
    attend_with_policy(attn, q, k, v, policy).square().sum().backward()
    assert policy.grad.abs().sum() > 0


@pytest.mark.parametrize("qk_norm", [False, True])
def test_class_attention_side_computation_equals_explicit_row(qk_norm):
    torch.manual_seed(0)
    attn = Attention(24, num_heads=3, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).eval()
    x = rand(2, 11, 24)
    with torch.no_grad():
        q, k, _ = split_qkv(attn, x)
        full = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, H, T, T]
        torch.testing.assert_close(class_attention_scores(attn, x, k), full[:, :, 0].mean(1), atol=1e-6, rtol=1e-6)


def test_evit_scores_are_post_softmax_head_means():
    # idlevit.md §3 test case: tokens [cls, a, b], two heads; EViT's rule selects a (IdleViT's selects b)
    logits = torch.tensor([[[0.0, 0.1, 0.0], [0.0, -50.0, -40.0]]])
    from vitrim.ops.prune import class_attention_probs
    scores = class_attention_probs(logits)[:, 1:]
    torch.testing.assert_close(scores, torch.tensor([[0.178, 0.161]]), atol=1e-3, rtol=0)
    assert rank_tokens(scores, 1)[0].item() == 0  # a
    assert logits.mean(1)[:, 1:].argmax().item() == 1  # the pre-softmax mean would pick b


def test_flat_rows_read_the_rows_of_an_expanded_gather():
    """``flat_rows`` positions read the same rows as ``gather`` with an expanded index: per sample
    for ``[B, T, C]``, per sample and head for ``[B, H, T, w]`` (one index for every head, or one per head)."""
    from vitrim.ops.rows import flat_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g)
    index = torch.stack([torch.randperm(7, generator=g)[:4] for _ in range(3)])
    got = x.reshape(-1, 5).index_select(0, flat_rows(index, 7)).view(3, 4, 5)
    assert torch.equal(got, x.gather(1, index.unsqueeze(-1).expand(-1, -1, 5)))
    y = torch.randn(3, 2, 7, 5, generator=g)
    shared = y.reshape(-1, 5).index_select(0, flat_rows(index, 7, heads=2)).view(3, 2, 4, 5)
    assert torch.equal(shared, y.gather(2, index[:, None, :, None].expand(-1, 2, -1, 5)))
    per_head = torch.stack([index, index.flip(-1)], dim=1)                     # [B, H, n]
    got = y.reshape(-1, 5).index_select(0, flat_rows(per_head, 7, heads=2)).view(3, 2, 4, 5)
    assert torch.equal(got, y.gather(2, per_head.unsqueeze(-1).expand(-1, -1, -1, 5)))
