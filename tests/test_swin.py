"""IdleViT on timm Swin Transformer: per-window idling (docs/methods/idlevit.md, "Swin Transformer")."""
import copy

import pytest
import timm
import torch

import vitrim
from vitrim.errors import UnsupportedModelError
from vitrim.ops import swin as sw

SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=10)


def small(**kw):
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **{**SMALL, **kw}).eval()


def reduced(model, **opts):
    r = copy.deepcopy(model)
    vitrim.apply(r, "idle", **opts)
    return r


def img(b=2, size=224, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# 1. keep 1 is bit-identical ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw,size", [({}, 224), ({"dynamic_img_size": True}, 256),
                                     ({"img_size": 112, "always_partition": True}, 112)])
def test_keep_one_bit_identical(kw, size):
    m = small(**kw)
    x = img(2, size)
    with torch.no_grad():
        assert torch.equal(reduced(m, keep_rate=1.0)(x), m(x))


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224",
                                  pytest.param("swin_small_patch4_window7_224", marks=pytest.mark.slow),
                                  pytest.param("swin_base_patch4_window7_224", marks=pytest.mark.slow)])
def test_keep_one_bit_identical_swin_t(name):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False).eval()
    x = img(1)
    with torch.no_grad():
        assert torch.equal(reduced(m, keep_rate=1.0)(x), m(x))


# 2. counts per window ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ws,rates,expect", [(7, (0.9, 0.8, 0.7, 0.6, 0.5), (44, 39, 34, 29, 24)),
                                             (12, (0.7, 0.5), (100, 72))])
def test_counts_per_window(ws, rates, expect):
    size = 224 if ws == 7 else 384
    m = small(window_size=ws, img_size=size)
    for r, k in zip(rates, expect):
        with torch.no_grad():
            _, state = reduced(m, keep_rate=r).forward_with_state(img(1, size))
        recs = state.records
        assert [rec.layer for rec in recs] == list(range(2, 8))
        for rec in recs:
            assert rec.keep == k
            per_window = rec.index.view(1, -1, k)
            # every window keeps K distinct real slots (no padding at these sizes)
            assert (per_window >= 0).all()
            assert all(len(set(w.tolist())) == k for w in per_window[0])


# 3. gather == masked ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [None, 7])  # the gathered rows' MLP in one call, in chunks of 7 rows
@pytest.mark.parametrize("size", [224, 256])
def test_gather_equals_masked(size, chunk_rows, monkeypatch):
    if chunk_rows is not None:
        from vitrim.ops import idle
        monkeypatch.setattr(idle, "_MLP_MIN_ROWS", chunk_rows)
        monkeypatch.setattr(idle, "_MLP_CHUNK_ELEMS", 1)
    m = small(dynamic_img_size=True)
    stage = m.layers[2]
    with torch.no_grad():
        x = stage.downsample(m.layers[1](m.layers[0](m.patch_embed(img(2, size)))))   # stage-3 input map
        for block in stage.blocks:                                           # W-MSA then SW-MSA
            x_in = x
            g, gi = sw.swin_idle_block_gather(block, x_in, 24)
            mk, mi, mask = sw.swin_idle_block_masked(block, x_in, 24)
            assert torch.equal(gi, mi)
            flat_sel = mask.view(2, -1)
            from_index = torch.zeros_like(flat_sel)
            for b in range(2):
                from_index[b, gi[b][gi[b] >= 0]] = True
            assert torch.equal(from_index, flat_sel)        # identical selected sets
            B, H, W, C = x_in.shape
            gf, mf, xf = g.view(B, -1, C), mk.view(B, -1, C), x_in.view(B, -1, C)
            assert (gf[flat_sel] - mf[flat_sel]).abs().max() <= 1e-5
            assert torch.equal(gf[~flat_sel], xf[~flat_sel]) and torch.equal(mf[~flat_sel], xf[~flat_sel])
            x = g


def test_gather_equals_masked_in_model():
    m = small(drop_path_rate=0.0)
    r = reduced(m, keep_rate=0.5)
    x = img(2)
    with torch.no_grad():
        ye, se = r.forward_with_state(x)
        r.train()
        yt, st = r.forward_with_state(x)
    for a, b in zip(se.records, st.records):
        assert torch.equal(a.index, b.index) and b.mask is not None
    assert (ye - yt).abs().max() <= 1e-4


# 4. no carried state: re-selection ---------------------------------------------------------------------
def test_reselection_not_cumulative():
    m = small()
    with torch.no_grad():
        _, state = reduced(m, keep_rate=0.5).forward_with_state(img(1))
    recs = {rec.layer: set(rec.index[0].tolist()) for rec in state.records}
    # blocks 4 and 5 share the stage-3 map: some token idle in block 4 is computed in block 5
    assert recs[5] - recs[4]
    assert len(recs[5]) == len(recs[4])


# 5. batch independence ---------------------------------------------------------------------------------
def test_batch_independence():
    r = reduced(small(), keep_rate=0.5)
    x = img(3)
    with torch.no_grad():
        yb, sb = r.forward_with_state(x)
        y1, s1 = r.forward_with_state(x[1:2])
    assert (yb[1:2] - y1).abs().max() <= 1e-5
    for a, b in zip(sb.records, s1.records):
        assert torch.equal(a.index[1:2], b.index)


# 6. shift mask respected ------------------------------------------------------------------------------
def test_shift_mask_respected(monkeypatch):
    m = small(img_size=112)            # stage 1: 28x28, 16 windows, SW-MSA in block 1
    block = m.layers[0].blocks[1]
    assert any(block.shift_size)
    ws, shift = tuple(block.window_size), tuple(block.shift_size)
    slots = sw.window_slots((28, 28), ws, shift)
    nW, M = slots.shape
    region = block.attn_mask[nW - 1]   # last window: four sub-regions
    K = 30
    fixed = torch.arange(0, M, dtype=torch.long)[torch.randperm(M, generator=torch.Generator().manual_seed(0))[:K]]
    fixed = fixed.sort().values
    monkeypatch.setattr(sw, "select_window_slots", lambda score, keep: fixed.expand(score.shape[0], keep).clone())
    x = torch.randn(1, 28, 28, 32)
    with torch.no_grad():
        base, _ = sw.swin_idle_block_gather(block, x, K)
        a = int(fixed[0])
        other = [int(j) for j in fixed if region[a, j] != 0]
        assert other
        x2 = x.clone().view(-1, 32)
        x2[slots[nW - 1, a]] += 3.0
        out, _ = sw.swin_idle_block_gather(block, x2.view_as(x), K)
        moved = (out - base).view(-1, 32).abs().amax(-1)
        assert moved[slots[nW - 1, other]].max() <= 1e-6
        assert moved[slots[nW - 1, a]] > 1e-3
        # an idle token's value reaches no computed output
        idle = [j for j in range(M) if j not in set(fixed.tolist())][0]
        x3 = x.clone().view(-1, 32)
        x3[slots[nW - 1, idle]] += 3.0
        out3, _ = sw.swin_idle_block_gather(block, x3.view_as(x), K)
        d = (out3 - base).view(-1, 32).abs().amax(-1)
        d[slots[nW - 1, idle]] = 0
        assert d.max() == 0


# 7. score identity ------------------------------------------------------------------------------------
def test_score_identity():
    m = small()
    block = m.layers[1].blocks[1]
    attn = block.attn
    with torch.no_grad():
        zw = sw._to_windows(block.norm1(torch.randn(2, 28, 28, 64)), tuple(block.window_size),
                            tuple(block.shift_size))
        BW, M, C = zw.shape
        q, k, _ = attn.qkv(zw).reshape(BW, M, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q * attn.scale) @ k.transpose(-2, -1) + sw.rel_pos_bias(attn).unsqueeze(0)
        want = logits.mean(dim=(1, 2))
        got = sw.window_scores(attn, zw)
    assert ((got - want).abs() / want.abs().clamp(min=1e-3)).max() <= 1e-5 or (got - want).abs().max() <= 1e-5


def test_score_forms_no_per_slot_keys():
    """Ranking never builds a [B * nW, M, C] tensor (no keys, no multiply-sum temporary)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:  # new memory
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    attn = small().layers[1].blocks[1].attn
    zw = torch.randn(2 * 16, 49, 64)
    with torch.no_grad(), Largest():
        sw.window_scores(attn, zw)
    assert Largest.biggest < zw.numel()


# 8. FLOPs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,want", [("swin_tiny_patch4_window7_224", {1.0: 4.491, 0.7: 3.399, 0.5: 2.672}),
                                       ("swin_small_patch4_window7_224", {1.0: 8.741, 0.7: 6.345}),
                                       ("swin_base_patch4_window7_224", {1.0: 15.431, 0.7: 11.210})])
def test_flops_spec(name, want):
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False)
    assert abs(vitrim.flops(m) - want[1.0]) <= 1e-3
    for r, g in want.items():
        if r < 1:
            assert abs(vitrim.flops(reduced(m, keep_rate=r)) - g) <= 1e-3


def test_flops_traced():
    m = small()
    assert vitrim.traced_flops(m) == pytest.approx(vitrim.flops(m), rel=1e-9)
    r = reduced(m, keep_rate=0.5)
    # the score is two matmuls per window (2 C^2) and one per slot (C): the tracer counts all of it
    assert vitrim.traced_flops(r) == pytest.approx(vitrim.flops(r), rel=1e-3)
    assert sum(1 for _ in _idle_blocks(r)) == 6


def _idle_blocks(model):
    from vitrim.adapters.swin import SwinAdapter, window_layout
    sizes = SwinAdapter(model, check=False).stage_sizes()
    i = 0
    for stage, size in zip(model.layers, sizes):
        for block in stage.blocks:
            if i in model.vitrim.layers:
                yield block, window_layout(block, size)[2]
            i += 1


# 9. no new parameters ---------------------------------------------------------------------------------
def test_no_new_parameters():
    m = small()
    sd = m.state_dict()
    r = reduced(m, keep_rate=0.7)
    assert list(r.state_dict().keys()) == list(sd.keys())
    r.load_state_dict(sd, strict=True)
    m.load_state_dict(r.state_dict(), strict=True)


# 10. shapes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [224, 256])
def test_shapes_and_entry_points(size):
    m = small(dynamic_img_size=True)
    r = reduced(m, keep_rate=0.5)
    x = img(2, size)
    with torch.no_grad():
        assert r.forward_features(x).shape == m.forward_features(x).shape
        a, ia = r.forward_intermediates(x)
        b, ib = m.forward_intermediates(x)
        assert a.shape == b.shape and [t.shape for t in ia] == [t.shape for t in ib]
        tokens, state = vitrim.forward_tokens(r, x)
        assert tokens.shape[1] == a.shape[1] * a.shape[2]
        assert r.forward_head_with_state(tokens, state).shape == (2, 10)
        for rec in state.records:
            assert rec.index.max() < state.num_patches or rec.layer < 6


def test_padding_slots_never_written():
    m = small(dynamic_img_size=True)
    block = m.layers[2].blocks[1]                  # at 256: an 8x8 map, windows of 7: padding
    x = torch.randn(2, 8, 8, 128)
    with torch.no_grad():
        out, pos = sw.swin_idle_block_gather(block, x, 48)
    assert (pos < 0).any()                         # some padding slot was among the top-K
    assert out.shape == x.shape
    computed = torch.zeros(2, 64, dtype=torch.bool)
    for b in range(2):
        computed[b, pos[b][pos[b] >= 0]] = True
    assert computed.any(1).all() and not computed.all()
    assert torch.equal(out.view(2, 64, -1)[~computed], x.view(2, 64, -1)[~computed])


# 11. refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tome", "evit", "dynamicvit", "etps", "dtps"])
def test_refuses_token_removing_methods(method):
    with pytest.raises(UnsupportedModelError, match=rf"method '{method}' cannot reduce a Swin Transformer: it removes "
                       r"or merges tokens, but Swin blocks need the full H x W token grid \(windows, shifted windows, "
                       r"patch merging\); accepted on Swin Transformer: idle"):
        vitrim.apply(small(), method)


@pytest.mark.parametrize("name", ["swinv2_tiny_window8_256", "swinv2_cr_tiny_224"])
def test_refuses_swin_v2(name):
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False)
    with pytest.raises(UnsupportedModelError, match="SwinTransformer"):
        vitrim.apply(m, "idle")


def test_refuses_overriding_subclass():
    class Custom(type(small())):
        def forward_features(self, x):
            return super().forward_features(x)

    m = small()
    m.__class__ = Custom
    with pytest.raises(UnsupportedModelError, match="SwinTransformer"):
        vitrim.apply(m, "idle")


# forward_dense, compile -------------------------------------------------------------------------------
def test_torch_compile_matches():
    r = reduced(small(img_size=112), keep_rate=0.5)
    x = img(1, 112)
    with torch.no_grad():
        want = r(x)
        got = torch.compile(r, backend="eager", fullgraph=True)(x)
    assert torch.allclose(got, want, atol=1e-5)


# options: keep_rate per stage, layers ------------------------------------------------------------------
def test_keep_rate_per_stage_and_layers():
    with torch.device("meta"):
        m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    same = reduced(m, keep_rate=(1.0, 0.5, 0.5, 0.5))
    assert same.vitrim.layers == tuple(range(2, 12))
    assert vitrim.flops(same) == pytest.approx(vitrim.flops(reduced(m, keep_rate=0.5)), abs=1e-9)
    third = reduced(m, keep_rate=(1.0, 1.0, 0.5, 1.0))
    assert third.vitrim.layers == tuple(range(4, 10))
    assert third.vitrim.options()["keep_rate"] == (1.0, 1.0, 0.5, 1.0)
    few = reduced(m, keep_rate=0.5, layers=[0, 5])
    plan = vitrim.flops_report(few).layers
    assert [l.tokens_in for l in plan][:6] == [64 * 24, 3136, 784, 784, 196, 4 * 24]
    with pytest.raises(vitrim.OptionError, match="one such number per stage"):
        vitrim.apply(copy.deepcopy(m), "idle", keep_rate=(0.5, 0.5))


def test_visualize_draws_each_stage_on_its_own_map(tmp_path):
    """Idle records of a later stage count on that stage's map; the picture scales them to the patch grid."""
    import numpy as np
    from vitrim.visual.pictures import visualize
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(2, 2, 2, 2),
                              num_heads=(1, 1, 2, 2), img_size=112).eval()
    reduced = vitrim.apply(model, "idle", keep_rate=0.5)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad(), reduced.vitrim.provenance():
        maps = reduced.vitrim.token_maps(lambda: reduced.forward_with_state(x)[1], (28, 28))
    assert maps and all(m.state.shape == (28, 28) for m in maps)
    last = maps[-1]  # stage 4: a 4x4 map, each token a 7x7 square of patches
    assert (last.state.reshape(4, 7, 4, 7).std(axis=(1, 3)) == 0).all()
    visualize(reduced, str(tmp_path / "swin.png"))
    assert (tmp_path / "swin.png").stat().st_size > 0
