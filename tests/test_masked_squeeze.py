"""The cheaper masked TPS squeezing (``ops.prune.squeeze_masked``, dTPS training) gives the values and
gradients of the dense formula: the ``[B, N, N]`` cosine similarity with its masked max and the
``[B, N, N]`` assignment matrix (docs/methods/pruning.md, "Squeezing (eTPS, dTPS)")."""
import copy
import importlib
import math

import pytest
import torch

import vitrim
from vitrim.ops.prune import cosine_similarity_matrix, squeeze_masked
from conftest import small_vit


def dense_absorb(hosts, src, host_index, weight):
    """``y = (A / D) @ src + x e / D`` with the assignment matrix ``A_ji = w_i [host_i = j]``."""
    B, R = hosts.shape[:2]
    w = weight.to(hosts.dtype).unsqueeze(1)
    assign = torch.zeros(B, R, w.shape[-1], dtype=w.dtype).scatter(1, host_index.unsqueeze(1), w)
    den = assign.sum(dim=-1, keepdim=True) + math.e
    return torch.addcmul((assign / den) @ src, hosts, math.e / den)


def dense_squeeze_masked(x, keep, pruned_now, eps=1e-6):
    """The dense masked form: the full similarity matrix with gradient, its masked max, the assignment matrix."""
    sim = cosine_similarity_matrix(x, x, eps).masked_fill(keep.transpose(1, 2) <= 0, float("-inf"))
    best, host = sim.max(dim=-1)
    has_host = torch.isfinite(best)
    weight = torch.where(has_host, best, torch.zeros_like(best)).exp() * has_host * pruned_now[..., 0]
    return dense_absorb(x, x, host, weight)


def masks(B, N, g, empty_sample=True):
    prev = (torch.rand(B, N, 1, generator=g) < 0.8).double()
    keep = (torch.rand(B, N, 1, generator=g) < 0.5).double() * prev
    if empty_sample:
        keep[-1] = 0  # a sample with no host: returned unchanged, no gradient through squeezing
    return keep, (1 - keep) * prev


def squeeze_grads(fn, x, keep, pruned_now, upstream):
    xl, pl = x.detach().clone().requires_grad_(), pruned_now.detach().clone().requires_grad_()
    out = fn(xl, keep, pl)
    out.backward(upstream)
    return [out.detach(), xl.grad, pl.grad]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_squeeze_masked_is_the_dense_formula(dtype, tol):
    g = torch.Generator().manual_seed(0)
    B, N, C = 4, 13, 8
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    x[0, 5] = x[0, 2]  # two identical rows: a tie in the similarity, resolved to the first index in both
    keep, pruned_now = masks(B, N, g)
    upstream = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    args = [t.to(dtype) for t in (x, keep, pruned_now, upstream)]
    ref = squeeze_grads(dense_squeeze_masked, *args)
    new = squeeze_grads(squeeze_masked, *args)
    for name, a, b in zip(["out", "dx", "dpruned_now"], new, ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=name)
    assert ref[2].abs().sum() > 0 and ref[1].abs().sum() > 0
    assert torch.equal(new[0][-1], args[0][-1])  # no host: unchanged
    assert torch.equal(new[2][-1], torch.zeros_like(new[2][-1]))


def test_squeeze_masked_chooses_the_dense_hosts_exactly():
    """The hosts come from the same similarity formula: rows that absorb nothing, pruned and dead
    rows are bit-identical to the input in both, and the absorbing rows agree to rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 16, generator=g)
    keep, pruned_now = (t.float() for t in masks(3, 40, g, empty_sample=False))
    new, ref = squeeze_masked(x, keep, pruned_now), dense_squeeze_masked(x, keep, pruned_now)
    changed_new, changed_ref = (new != x).any(-1), (ref != x).any(-1)
    assert torch.equal(changed_new, changed_ref) and changed_new.any()
    torch.testing.assert_close(new, ref, atol=1e-6, rtol=1e-6)


def test_dtps_training_step_equals_the_dense_forms(monkeypatch):
    """One dTPS training step (forward, cross-entropy + the method's terms, backward): the loss and every
    parameter's gradient (predictors included) equal those of the dense squeeze and the explicit
    policy softmax."""
    from test_policy_attention import _old_attend, assert_same_step, training_step

    base = small_vit(img_size=64, patch_size=8, embed_dim=48, depth=6, num_heads=3)
    model = vitrim.apply(base, "dtps", keep_rate=0.6, locations=(1, 3)).train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 2, 3, 4])

    new = training_step(model, x, y)
    reference = copy.deepcopy(model)
    p = model.num_prefix_tokens

    def sliced_dense(x, keep, pruned_now):  # the previous wiring: squeeze the patch rows only, re-attach the prefix
        assert not keep[:, :p].any() and not pruned_now[:, :p].any()
        return torch.cat([x[:, :p], dense_squeeze_masked(x[:, p:], keep[:, p:], pruned_now[:, p:])], dim=1)

    monkeypatch.setattr(importlib.import_module("vitrim.methods.dynamicvit"), "squeeze_masked", sliced_dense)
    monkeypatch.setattr(importlib.import_module("vitrim.methods._pruning"), "attend_with_policy", _old_attend)
    assert_same_step(new, training_step(reference, x, y))
