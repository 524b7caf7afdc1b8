"""The cheaper masked training form of DynamicViT / dTPS (``ops.prune.policy_attention``) gives the
values and gradients of the explicit "softmax with policy" formula (docs/methods/pruning.md, "DynamicViT";
docs/training.md, "What each method computes in training")."""
import copy

import pytest
import torch
from timm.models.vision_transformer import Attention

import vitrim
import vitrim.ops.prune as prune
from vitrim.cli.measure import training_loss
from vitrim.ops.attention import split_qkv
from vitrim.ops.prune import attend_with_policy, policy_attention, softmax_with_policy
from conftest import small_vit


def explicit(q, k, v, policy, scale):
    """The reference: the formula of softmax_with_policy on the full [T, T] matrix, then @ v."""
    return softmax_with_policy((q * scale) @ k.transpose(-2, -1), policy) @ v


def grads(fn, q, k, v, policy, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, policy)]
    out = fn(*leaves, q.shape[-1] ** -0.5)
    out.backward(upstream)
    return [out.detach()] + [t.grad for t in leaves]


def formula(q, k, v, policy, scale, eps=1e-6):
    """The explicit formula in the inputs' own dtype (softmax_with_policy computes in fp32)."""
    a = (q * scale) @ k.transpose(-2, -1)
    a = (a - a.amax(dim=-1, keepdim=True)).exp() * prune._policy_keys(policy)
    return ((a + eps / a.shape[-1]) / (a.sum(dim=-1, keepdim=True) + eps)) @ v


def inputs(kind, dtype, spread):
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 3, 2, 11, 8
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=dtype) * spread for _ in range(3))
    if kind == "binary":
        policy = (torch.rand(B, T, 1, generator=g) > 0.4).to(dtype)
        policy[:, 0] = 1
        policy[2, 1:] = 0  # a sample with only the class token alive
    elif kind == "soft":
        policy = torch.rand(B, T, 1, generator=g, dtype=dtype)
    else:
        policy = torch.ones(B, T, 1, dtype=dtype)
    return q, k, v, policy, torch.randn(B, H, T, d, generator=g, dtype=dtype)


KINDS = ["binary", "soft", "all alive"]


@pytest.mark.parametrize("split", [False, True], ids=["all columns", "alive-first columns"])
@pytest.mark.parametrize("kind", KINDS)
def test_policy_attention_is_the_explicit_formula_in_float64(kind, split, monkeypatch):
    """The same mathematics, values and gradients, even for rows the eps terms dominate (large logits,
    a sample with one alive token: the row max's gradient matters there), with the keys in token
    order and in the alive-first column order (forced for every policy, also without dropped keys)."""
    monkeypatch.setattr(prune, "_SPLIT_MAX_FRACTION", 1.0 if split else 0.0)
    q, k, v, policy, upstream = inputs(kind, torch.float64, spread=2.0)
    assert (prune._alive_first(policy) is not None) == split
    ref = grads(formula, q, k, v, policy, upstream)
    new = grads(policy_attention, q, k, v, policy, upstream)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dpolicy"], new, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)
    if kind == "binary":
        assert ref[4][policy == 0].abs().sum() > 0  # dropped keys get a gradient (straight-through)


@pytest.mark.parametrize("kind", KINDS)
def test_policy_attention_equals_softmax_with_policy_in_float32(kind):
    q, k, v, policy, upstream = inputs(kind, torch.float32, spread=1.0)
    ref = grads(explicit, q, k, v, policy, upstream)
    new = grads(policy_attention, q, k, v, policy, upstream)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dpolicy"], new, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_attend_with_policy_uses_it_in_training_and_the_formula_with_dropout():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2).train()
    q, k, v = split_qkv(attn, torch.randn(2, 6, 16))
    policy = torch.tensor([1, 1, 0, 1, 0, 1.0]).view(1, 6, 1).expand(2, -1, -1).clone().requires_grad_()
    torch.testing.assert_close(attend_with_policy(attn, q, k, v, policy),
                               explicit(q, k, v, policy, attn.scale), atol=1e-5, rtol=1e-5)
    attn.attn_drop.p = 0.5  # dropout acts on the probabilities: the explicit matrix is kept
    torch.manual_seed(1)
    out = attend_with_policy(attn, q, k, v, policy)
    torch.manual_seed(1)
    ref = torch.nn.functional.dropout(softmax_with_policy((q * attn.scale) @ k.transpose(-2, -1), policy), 0.5) @ v
    torch.testing.assert_close(out, ref)


def _old_attend(attn, q, k, v, policy):
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    return attn.attn_drop(softmax_with_policy(logits, policy)) @ v


def training_step(m, x, y):
    """Loss and every parameter's gradient of one training step, with fixed Gumbel noise."""
    torch.manual_seed(7)  # the same Gumbel noise in every run
    m.zero_grad(set_to_none=True)
    loss = training_loss(m, x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def assert_same_step(new, ref):
    """Two ``training_step`` results agree (1e-5), and the predictors got gradients."""
    (loss_new, grads_new), (loss_ref, grads_ref) = new, ref
    torch.testing.assert_close(loss_new, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads_new.keys() == grads_ref.keys() and any("predictors" in n for n in grads_new)
    for n in grads_ref:
        torch.testing.assert_close(grads_new[n], grads_ref[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("method", ["dynamicvit", "dtps"])
def test_training_step_loss_and_gradients_equal_the_explicit_form(method, monkeypatch):
    """One training step (forward, cross-entropy + the method's terms, backward) of a reduced model:
    the loss and every parameter's gradient (predictors included) equal the explicit formula's."""
    base = small_vit(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3)
    model = vitrim.apply(base, method, keep_rate=0.6, locations=(1, 3)).train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2, 3, 4])

    new = training_step(model, x, y)
    reference = copy.deepcopy(model)
    import importlib
    monkeypatch.setattr(importlib.import_module("vitrim.methods._pruning"), "attend_with_policy", _old_attend)
    assert_same_step(new, training_step(reference, x, y))


@pytest.mark.parametrize("split", [False, True], ids=["all columns", "alive-first columns"])
def test_policy_attention_backward_passes_gradcheck(split, monkeypatch):
    """The hand-written backward against finite differences (float64, every input, a sample with one alive token)."""
    monkeypatch.setattr(prune, "_SPLIT_MAX_FRACTION", 1.0 if split else 0.0)
    q, k, v, policy, _ = inputs("binary", torch.float64, spread=1.0)
    leaves = [t[:2, :, :6].detach().clone().requires_grad_() for t in (q, k, v)]
    p = policy[:2, :6].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c, d: policy_attention(a, b, c, d, 0.3), (*leaves, p))


def test_policy_attention_on_strided_inputs_and_a_constant_policy():
    """q, k, v as split_qkv gives them (views of one permuted tensor) and a policy without gradient:
    the values and the q/k/v gradients of the formula; no gradient is asked of the policy."""
    g = torch.Generator().manual_seed(3)
    B, T, H, d = 2, 9, 2, 4
    qkv = torch.randn(B, T, 3, H, d, generator=g, dtype=torch.float64).permute(2, 0, 3, 1, 4).requires_grad_()
    policy = (torch.rand(B, T, 1, generator=g) > 0.5).double()
    upstream = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    results = []
    for fn in (policy_attention, formula):
        leaf = qkv.detach().clone().requires_grad_()
        out = fn(*leaf.unbind(0), policy, d ** -0.5)
        out.backward(upstream)
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-10, rtol=1e-10)


def test_policy_attention_in_bfloat16_keeps_dtypes_and_follows_float32():
    q, k, v, policy, upstream = inputs("binary", torch.float32, spread=1.0)
    ref = grads(explicit, q, k, v, policy, upstream)
    new = grads(policy_attention, *(t.bfloat16() for t in (q, k, v, policy)), upstream.bfloat16())
    assert all(t.dtype == torch.bfloat16 for t in new)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dpolicy"], new, ref):
        torch.testing.assert_close(a.float(), b, atol=0.1, rtol=0.05, msg=name)


def test_alive_first_columns_hold_every_live_key_and_skip_the_dropped_ones():
    """A policy dropping about half the keys of every sample takes the alive-first path by default:
    the first A columns are each sample's live keys in token order, then its dropped ones; the
    result is the formula's (values and every gradient)."""
    g = torch.Generator().manual_seed(5)
    B, H, T, d = 4, 2, 20, 8
    policy = (torch.rand(B, T, 1, generator=g) > 0.5).double()
    policy[:, 0] = 1
    order, position, A = prune._alive_first(policy)
    alive = policy[..., 0] > 0
    assert A == int(alive.sum(1).max()) < T
    for b in range(B):
        live = alive[b].nonzero()[:, 0]
        assert order[b, :len(live)].tolist() == live.tolist()
        assert (policy[b, order[b, A:], 0] == 0).all()
        assert (order[b, position[b]] == torch.arange(T)).all()
    q, k, v, upstream = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(4))
    ref = grads(formula, q, k, v, policy, upstream)
    new = grads(policy_attention, q, k, v, policy, upstream)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dpolicy"], new, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=name)
    assert prune._alive_first(torch.ones(B, T, 1)) is None  # nothing to skip: the plain column order


@pytest.mark.slow
def test_masked_training_step_under_torch_compile():
    """`torch.compile` of a DynamicViT in training mode (as `vitrim bench --train --compile` runs it):
    the masked attention keeps the token column order there (no data-dependent split) and traces no
    out= buffers, so the step runs, with a finite loss and gradients for the predictors."""
    torch.manual_seed(0)
    model = vitrim.apply(small_vit(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3), "dynamicvit",
                         keep_rate=0.5, locations=(1,)).train()
    compiled = torch.compile(model)  # called directly: training_loss would unwrap it
    loss = torch.nn.functional.cross_entropy(compiled(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "predictors" in n)
