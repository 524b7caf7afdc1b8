"""IdleViT on timm PVT-v2 (pyramid): identity, masked = gather, keep counts, FLOPs, errors, training."""
import copy

import pytest
import timm
import torch

import vitrim
from vitrim.errors import UnsupportedModelError
from vitrim.ops.idle import index_to_mask, pvt_idle_block_gather, pvt_idle_block_masked

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def small_pvt(fused=True, seed=0, **kw):
    """pvt_v2_b0's layout (2 blocks per stage, sr 8/4/2/1, mlp ratios 8/8/4/4) with fewer channels."""
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    torch.manual_seed(seed)
    model = PyramidVisionTransformerV2(depths=(2, 2, 2, 2), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                                       num_classes=10, **kw).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model


def linear_pvt(**kw):
    """A small linear-SRA PVT-v2 (as pvt_v2_b2_li, fewer blocks and channels)."""
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    torch.manual_seed(0)
    return PyramidVisionTransformerV2(depths=(1, 2, 2, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                                      linear=True, num_classes=10, **kw).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_keep_rate_one_is_identity_and_remove(fused):
    model = small_pvt(fused=fused)
    with torch.no_grad():
        ref = model(X)
        vitrim.apply(model, "idle", keep_rate=1.0)
        assert torch.equal(model(X), ref)
        vitrim.update(model, keep_rate=0.5)
        assert not torch.allclose(model(X), ref)
        vitrim.remove(model)
        assert type(model) is timm.models.pvt_v2.PyramidVisionTransformerV2
        assert torch.equal(model(X), ref)


def test_defaults_keep_counts_and_rows():
    model = vitrim.apply(small_pvt(), "idle", keep_rate=0.5)
    method = vitrim.get_method(model)
    assert method.layers == (2, 3, 4, 5, 6, 7)  # every block after the first stage
    blocks = [b for s in model.stages for b in s.blocks]
    rows = [0] * len(blocks)  # fc1 rows per sample (the idle MLP may run its rows in chunks)

    def count(i):
        def hook(m, inp, out):
            rows[i] += out.shape[:-1].numel() // X.shape[0]
        return hook

    hooks = [b.mlp.fc1.register_forward_hook(count(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        out, state = vitrim.forward_with_state(model, X)
    for h in hooks:
        h.remove()
    # 64 px: stages of 16x16, 8x8, 4x4, 2x2 tokens; idle blocks compute floor(N * 0.5)
    assert rows == [256, 256, 32, 32, 8, 8, 2, 2]
    assert [r.keep for r in state.records] == [32, 32, 8, 8, 2, 2]
    assert [r.layer for r in state.records] == [2, 3, 4, 5, 6, 7]
    assert out.shape == (2, 10)
    assert state.feat_size == (2, 2)
    tokens, _ = vitrim.forward_tokens(model, X)
    assert tokens.shape == (2, 4, 64)  # the full last-stage map


def test_custom_layers_include_first_stage():
    model = vitrim.apply(small_pvt(), "idle", keep_rate=0.7, layers=[0, 1, 5])
    assert [vitrim.get_method(model).keep(i, n) for i, n in [(0, 256), (1, 256), (2, 64), (5, 16)]] == [179, 179, None, 11]
    with torch.no_grad():
        _, state = vitrim.forward_with_state(model, X)
    assert [(r.layer, r.keep) for r in state.records] == [(0, 179), (1, 179), (5, 11)]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("make,stage", [(small_pvt, 0), (small_pvt, 1), (small_pvt, 3), (linear_pvt, 1)])
def test_masked_equals_gather_block(make, stage, fused):
    model = make()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    side = 16 // 2 ** stage
    n = side * side
    block = model.stages[stage].blocks[0]
    x = torch.randn(2, n, block.attn.dim, generator=torch.Generator().manual_seed(3))
    x_before = x.clone()
    keep = max(1, n // 3)
    with torch.no_grad():
        g, gi = pvt_idle_block_gather(block, x, keep, (side, side))
        m, mi, mask = pvt_idle_block_masked(block, x, keep, (side, side))
    assert torch.equal(x, x_before)
    assert torch.equal(gi, mi) and torch.equal(mask, index_to_mask(gi, n))
    torch.testing.assert_close(g, m, atol=1e-5, rtol=1e-5)
    assert torch.equal(g[~mask], x[~mask]) and torch.equal(m[~mask], x[~mask])
    assert not torch.allclose(g[mask], x[mask])


def test_depthwise_conv_sees_zeros_at_idle_positions():
    """The computed rows of an idle block equal the unmodified block run on a map whose idle
    rows do not exist in the MLP: here, by zeroing fc1's output at idle positions by hand."""
    model = small_pvt()
    block = model.stages[1].blocks[0]
    x = torch.randn(1, 64, block.attn.dim)
    with torch.no_grad():
        out, index = pvt_idle_block_gather(block, x, 20, (8, 8))
        mask = index_to_mask(index, 64)[..., None].float()
        handle = block.mlp.fc1.register_forward_hook(lambda m, i, o: o * mask)
        full = block(x, (8, 8))
        handle.remove()
    sel = mask[..., 0].bool()
    torch.testing.assert_close(out[sel], full[sel], atol=1e-5, rtol=1e-5)


def test_training_form_matches_inference_model():
    model = vitrim.apply(small_pvt(), "idle", keep_rate=0.5)
    with torch.no_grad():
        out_eval, st_eval = vitrim.forward_with_state(model, X)
        model.train()
        out_train, st_train = vitrim.forward_with_state(model, X)
    torch.testing.assert_close(out_train, out_eval, atol=1e-5, rtol=1e-5)
    for e, t in zip(st_eval.records, st_train.records):
        assert torch.equal(e.index.sort(1).values, t.index.sort(1).values) and t.mask is not None


def test_training_backward_finite():
    model = vitrim.apply(small_pvt(drop_path_rate=0.1), "idle", keep_rate=0.5).train()
    model.set_grad_checkpointing(True)
    out, state = vitrim.forward_with_state(model, X)
    out.logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_forward_intermediates_follow_idling():
    model = vitrim.apply(small_pvt(), "idle", keep_rate=0.5)
    with torch.no_grad():
        final, maps = model.forward_intermediates(X)
        feats = model.forward_features(X)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert torch.equal(final, feats) and torch.equal(maps[-1], feats)


def test_linear_attention_variant_runs():
    model = linear_pvt()
    with torch.no_grad():
        ref = model(X)
        vitrim.apply(model, "idle", keep_rate=1.0)
        assert torch.equal(model(X), ref)
        vitrim.update(model, keep_rate=0.5)
        assert model(X).shape == (2, 10)


@pytest.mark.parametrize("name,expected", [("pvt_v2_b0", 0.566), ("pvt_v2_b1", 2.108), ("pvt_v2_b2", 4.027)])
def test_flops_unreduced_match_timm(name, expected):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert vitrim.flops(model) == pytest.approx(expected, abs=0.001)  # timm's cards: 0.57 / 2.1 / 4.0 GMACs


def test_flops_reduced_and_traced():
    model = timm.create_model("pvt_v2_b0").eval()
    base = vitrim.flops(model)
    vitrim.apply(model, "idle", keep_rate=0.5)
    report = vitrim.flops_report(model)
    assert report.method == "idle" and len(report.layers) == 8
    assert [l.tokens_in for l in report.layers] == [3136, 3136, 392, 392, 98, 98, 24, 24]
    assert [l.tokens_kv for l in report.layers] == [49, 49, 49, 49, 49, 49, 49, 49]
    assert report.gmacs == pytest.approx(0.4166, abs=0.0005) and report.gmacs < base
    # FlopCounterMode counts matmuls and convs, not the idle blocks' elementwise MACs: the score's
    # N C logits (the depthwise conv runs on the whole zero map, a conv it sees)
    blocks = [b for s in model.stages for b in s.blocks]
    tokens = [3136, 3136, 784, 784, 196, 196, 49, 49]
    elementwise = sum(n * b.attn.dim for b, l, n in zip(blocks, report.layers, tokens) if l.tokens_in < n)
    assert vitrim.traced_flops(model) == pytest.approx(report.gmacs - elementwise / 1e9, abs=1e-9)
    vitrim.update(model, keep_rate=1.0)
    assert vitrim.flops(model) == pytest.approx(base, abs=1e-9)


def test_cli_flops_pyramid(capsys):
    from vitrim.cli import main
    assert main(["flops", "--model", "pvt_v2_b1", "--method", "idle", "--keep-rate", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "total 1.529 GMACs" in out and "unreduced 2.108 GMACs" in out


def test_methods_that_drop_tokens_are_refused():
    model = small_pvt()
    with pytest.raises(UnsupportedModelError, match="cannot reduce a pyramid model.*accepted on PVT-v2.*idle"):
        vitrim.apply(model, "tome", r=4)
    assert not vitrim.is_reduced(model)


def test_modified_blocks_are_refused():
    model = small_pvt()

    class MyBlock(timm.models.pvt_v2.Block):
        def forward(self, x, feat_size):
            return super().forward(x, feat_size) * 2

    old = model.stages[1].blocks[0]
    new = MyBlock(32, num_heads=2, sr_ratio=4)
    model.stages[1].blocks[0] = new
    with pytest.raises(UnsupportedModelError, match=r"stages\[1\].blocks\[0\] block is a MyBlock"):
        vitrim.apply(model, "idle")
    model.stages[1].blocks[0] = old


def test_state_dict_unchanged():
    model = small_pvt()
    keys = list(model.state_dict())
    vitrim.apply(model, "idle", keep_rate=0.5)
    assert list(model.state_dict()) == keys
    model.load_state_dict(small_pvt(seed=1).state_dict(), strict=True)


def test_no_graph_breaks():
    torch._dynamo.reset()
    try:
        model = vitrim.apply(small_pvt(), "idle", keep_rate=0.5)
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(X)
        assert explained.graph_break_count == 0, explained.break_reasons
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("train", [False, True])
def test_bf16_autocast(train):
    model = vitrim.apply(small_pvt(), "idle", keep_rate=0.5).train(train)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(X)
    assert torch.isfinite(out.float()).all()


def _mlp_on_zero_map(mlp, rows, index, feat_size):
    """The idle MLP as the model's own modules: fc1 rows on a zero map, the full-map depthwise conv,
    read back at the rows."""
    B, S, _ = rows.shape
    h = mlp.relu(mlp.fc1(rows))
    n = feat_size[0] * feat_size[1]
    full = h.new_zeros(B, n, h.shape[-1]).scatter(1, index.unsqueeze(-1).expand_as(h), h)
    conv = mlp.dwconv(full.transpose(1, 2).reshape(B, -1, *feat_size)).flatten(2).transpose(1, 2)
    return mlp.fc2(mlp.act(conv.gather(1, index.unsqueeze(-1).expand(B, S, conv.shape[-1]))))


@pytest.mark.parametrize("group", [1, 2, 5])  # chunks of 1 sample, of 2 (and a last one of 1), all 5 in one
@pytest.mark.parametrize("map_group", [1, 2, 8])  # zero maps of 1 sample, of 2, of the whole chunk
@pytest.mark.parametrize("make,stage", [(small_pvt, 1), (linear_pvt, 1), (small_pvt, 3)])
def test_pvt_mlp_equals_zero_map_conv(monkeypatch, make, stage, group, map_group):
    """The idle MLP (fc1 and fc2 at the computed rows, the conv on small zero maps) equals the
    depthwise conv of one whole zero map, values and gradients, over chunks of whole samples (a
    partial last chunk included); without autograd (chunks written in place) bit for bit the same."""
    from vitrim.ops import idle
    mlp = make().stages[stage].blocks[0].mlp
    side = 16 // 2 ** stage
    n, keep = side * side, max(1, side * side // 2)
    monkeypatch.setattr(idle, "_MLP_MIN_ROWS", group * keep)
    monkeypatch.setattr(idle, "_MLP_CHUNK_ELEMS", 1)
    monkeypatch.setattr(idle, "_MAP_ELEMS", map_group * n * mlp.fc1.out_features)
    calls = []
    monkeypatch.setattr(mlp.fc1, "forward", lambda x, f=mlp.fc1.forward: calls.append(x.shape[:-1].numel()) or f(x))
    g = torch.Generator().manual_seed(4)
    index = torch.stack([torch.randperm(n, generator=g)[:keep] for _ in range(5)])
    rows = torch.randn(5, keep, mlp.fc1.in_features, generator=g, requires_grad=True)
    out = idle.pvt_mlp(mlp, rows, index, (side, side))
    assert calls == [group * keep] * (5 // group) + [keep] * (5 % group)
    ref = _mlp_on_zero_map(mlp, rows, index, (side, side))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the chunks written into one result in place: the same values
        torch.testing.assert_close(idle.pvt_mlp(mlp, rows, index, (side, side)), out, atol=0, rtol=0)
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, [rows, mlp.dwconv.weight], grad)
    want = torch.autograd.grad(ref, [rows, mlp.dwconv.weight], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_other_depthwise_convs_are_refused():
    model = small_pvt()
    hidden = model.stages[2].blocks[1].mlp.fc1.out_features
    model.stages[2].blocks[1].mlp.dwconv = torch.nn.Conv2d(hidden, hidden, 5, 1, 2, groups=hidden)
    with pytest.raises(UnsupportedModelError, match=r"stages\[2\].blocks\[1\] mlp.dwconv .*depthwise 3x3"):
        vitrim.apply(model, "idle")
