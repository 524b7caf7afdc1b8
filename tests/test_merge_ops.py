"""Pure token ops: bipartite soft matching, size-weighted merge, provenance, unmerge (tome.md §2-5, §17)."""
import math

import pytest
import torch

from vitrim.ops.merge import (bipartite_soft_matching, clamp_r, merge_source, merge_wavg,
                              unmerge_from_source)


def worked_example_metric():
    angles = torch.tensor([0, 90, 80, 180, 175, 270, 300], dtype=torch.float64) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None]  # [1, 7, 2]


def test_worked_example_class_token():
    metric = worked_example_metric()
    x = torch.arange(7, dtype=torch.float64).view(1, 7, 1)
    d = bipartite_soft_matching(metric, 2, num_prefix_tokens=1)
    x2, size = merge_wavg(d, x)
    assert x2.flatten().tolist() == [0, 6, 1.5, 3.5, 5]
    assert size.flatten().tolist() == [1, 1, 2, 2, 1]
    src = merge_source(d, x)
    groups = [set(torch.nonzero(row).flatten().tolist()) for row in src[0]]
    assert groups == [{0}, {6}, {1, 2}, {3, 4}, {5}]


def test_worked_example_no_prefix():
    x = torch.arange(7, dtype=torch.float64).view(1, 7, 1)
    d = bipartite_soft_matching(worked_example_metric(), 2, num_prefix_tokens=0)
    assert merge_wavg(d, x)[0].flatten().tolist() == [6, 0, 1.5, 3.5, 5]


def test_clamp():
    assert clamp_r(5, 7, 1) == 3
    assert clamp_r(200, 197, 1) == 98
    assert clamp_r(-3, 197, 1) == 0
    d = bipartite_soft_matching(torch.randn(1, 7, 4), 5, 1)
    assert d.merge(torch.randn(1, 7, 3), "mean").shape[1] == 4
    d = bipartite_soft_matching(torch.randn(2, 197, 8), 200, 1)
    assert d.merge(torch.randn(2, 197, 3), "mean").shape[1] == 99


def brute_force_merge(metric, x, r, k):
    """Loop-based reference of tome.md §2.2 for one sample, mean mode, general k."""
    T = metric.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    A, Bs = list(range(0, T, 2)), list(range(1, T, 2))
    best, partner = {}, {}
    for a in A:
        if a < k:
            best[a] = -math.inf
            continue
        cands = [(float(m[a] @ m[b]), b) for b in Bs if b >= k]
        s, b = max(cands, key=lambda c: c[0])
        best[a], partner[a] = s, b
    r = max(0, min(r, (T - k) // 2))
    order = sorted(A, key=lambda a: -best[a])
    src, unm = order[:r], order[r:]
    groups = {b: [b] for b in Bs}
    for a in src:
        groups[partner[a]].append(a)
    if k > 0:
        unm = sorted(unm)
    prefix = list(range(k))
    out_tokens = prefix + [a for a in unm if a >= k] + [b for b in Bs if b >= k]
    rows = []
    for t in out_tokens:
        members = groups.get(t, [t])
        rows.append(torch.stack([x[i] for i in members]).mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("T,r", [(9, 3), (16, 7), (33, 10), (20, 50)])
def test_matches_brute_force(k, T, r):
    g = torch.Generator().manual_seed(T * 10 + k)
    metric = torch.randn(3, T, 5, generator=g, dtype=torch.float64)
    x = torch.randn(3, T, 4, generator=g, dtype=torch.float64)
    d = bipartite_soft_matching(metric, r, k)
    got = d.merge(x, "mean")
    for b in range(3):
        torch.testing.assert_close(got[b], brute_force_merge(metric[b], x[b], r, k))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_unmerge_single_layer(k):
    T, r = 15, 5
    metric = torch.randn(2, T, 6, dtype=torch.float64)
    d = bipartite_soft_matching(metric, r, k)
    x = torch.arange(T, dtype=torch.float64).view(1, T, 1).expand(2, T, 1).contiguous()
    src = merge_source(d, x)  # which pre-merge positions each merged token holds
    y = torch.randn(2, T - r, 3, dtype=torch.float64)
    full = d.unmerge(y)
    assert full.shape == (2, T, 3)
    for b in range(2):
        for p in range(T):
            j = int(src[b, :, p].argmax())  # the merged token holding position p
            torch.testing.assert_close(full[b, p], y[b, j])
        for p in range(k):  # prefix tokens back at their own index
            torch.testing.assert_close(full[b, p], y[b, p])


def test_size_weighted_average_is_exact_and_differs_from_repeated_mean():
    g = torch.Generator().manual_seed(0)
    B, T0, k = 2, 41, 1
    x0 = torch.randn(B, T0, 8, generator=g, dtype=torch.float64)
    x, size, source, xm = x0, None, None, x0
    for r in (8, 7, 6):
        metric = torch.randn(B, x.shape[1], 4, generator=g, dtype=torch.float64)
        d = bipartite_soft_matching(metric, r, k)
        source = merge_source(d, x, source)
        xm = d.merge(xm, "mean")
        x, size = merge_wavg(d, x, size)
    expected = (source @ x0) / source.sum(-1, keepdim=True)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(xm, expected)
    # source invariants: binary, one 1 per column, row sums equal size, prefix rows are e_0
    assert set(source.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(source.sum(1), torch.ones(B, T0, dtype=torch.float64))
    torch.testing.assert_close(source.sum(-1, keepdim=True), size.double())
    assert torch.equal(source[:, 0], torch.nn.functional.one_hot(torch.tensor(0), T0).double().expand(B, T0))
    assert size.sum(1).flatten().tolist() == [T0, T0]
    # multi-layer unmerge maps every original position to its final token
    full = unmerge_from_source(x, source)
    for b in range(B):
        for i in range(T0):
            j = int(source[b, :, i].argmax())
            assert torch.equal(full[b, i], x[b, j])


def test_gradcheck_size_weighted_merge():
    metric = torch.randn(2, 11, 4, dtype=torch.float64)
    d = bipartite_soft_matching(metric, 4, 1)
    x = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)
    size = torch.randint(1, 4, (2, 11, 1)).double()
    assert torch.autograd.gradcheck(lambda t: merge_wavg(d, t, size)[0], (x,))


def test_zero_metric_gives_no_nan():
    metric = torch.zeros(1, 9, 4)
    d = bipartite_soft_matching(metric, 3, 1)
    out, size = merge_wavg(d, torch.randn(1, 9, 5))
    assert torch.isfinite(out).all() and out.shape == (1, 6, 5)


def test_batch_independence_of_decisions():
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(4, 25, 6, generator=g)
    x = torch.randn(4, 25, 5, generator=g)
    together = bipartite_soft_matching(metric, 8, 1).merge(x, "mean")
    for b in range(4):
        alone = bipartite_soft_matching(metric[b:b + 1], 8, 1).merge(x[b:b + 1], "mean")
        torch.testing.assert_close(alone[0], together[b])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_merge(dtype):
    metric = torch.randn(2, 17, 4).to(dtype)
    x = torch.randn(2, 17, 8).to(dtype)
    d = bipartite_soft_matching(metric, 6, 1)
    out, size = merge_wavg(d, x)
    assert out.dtype == dtype and size.dtype == torch.float32 and torch.isfinite(out.float()).all()
