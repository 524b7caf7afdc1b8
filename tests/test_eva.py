"""timm Eva (EVA-02, DINOv3): zero reduction, rope rows under pruning, FLOPs, refusals."""
import pytest
import timm
import torch

import vitrim
from vitrim.errors import UnsupportedModelError, VitrimError
from vitrim.ops.rope import gather_rope

MODELS = {
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64)),          # cls + 4 registers, LayerScale, dinov3 rope
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56)),             # SwiGLU, scale-norm, q/v bias, cat rope
}


def make(key, depth=2, **kw):
    torch.manual_seed(0)
    name, base = MODELS[key]
    return timm.create_model(name, pretrained=False, depth=depth, **{**base, **kw}).eval()


def image(m, batch=2):
    torch.manual_seed(1)
    return torch.randn(batch, 3, *m.patch_embed.img_size)


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method,options", [("tome", dict(r=0)), ("evit", dict(keep_rate=1.0, locations=(1,))),
                                            ("etps", dict(keep_rate=1.0, locations=(1,)))])
def test_zero_reduction_bit_identical(key, fused, method, options):
    m = make(key)
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    x = image(m)
    with torch.no_grad():
        ref = m(x)
        vitrim.apply(m, method, **options)
        out = m(x)
        vitrim.remove(m)
        back = m(x)
    assert torch.equal(out, ref)
    assert torch.equal(back, ref)


def test_gather_rope_rows_and_identity():
    rope = torch.randn(6, 8)
    index = torch.tensor([[4, 0, -1], [1, 5, 2]])
    rows = gather_rope(rope, index)
    assert rows.shape == (2, 1, 3, 8)
    assert torch.equal(rows[0, 0, 0], rope[4]) and torch.equal(rows[1, 0, 2], rope[2])
    assert torch.equal(rows[0, 0, 2], torch.cat([torch.zeros(4), torch.ones(4)]))  # sin 0, cos 1: identity
    per_head = torch.randn(3, 6, 8)
    assert torch.equal(gather_rope(per_head, index)[1, 2, 1], per_head[2, 5])


@pytest.mark.parametrize("key", list(MODELS))
def test_pruning_equals_plain_block_on_kept_tokens_with_their_rope_rows(key):
    """EViT prunes in block 0; block 1 must be the module's own block on the kept tokens with their rope rows."""
    m = make(key, depth=2)
    x = image(m)
    one = make(key, depth=1)
    one.load_state_dict({k: v for k, v in m.state_dict().items() if k in one.state_dict()}, strict=False)
    one.blocks[0].load_state_dict(m.blocks[0].state_dict())
    one.norm = torch.nn.Identity()
    with torch.no_grad():
        _, rope = m._pos_embed(m.patch_embed(x))
        vitrim.apply(one, "evit", keep_rate=0.5, locations=(0,), fuse=False)
        mid, state = one.forward_tokens(x)
        positions = state.records[-1].positions                      # [B, kept] original patch indices
        ref = m.norm(m.blocks[1](mid, rope=gather_rope(rope, positions)))
        vitrim.apply(m, "evit", keep_rate=0.5, locations=(0,), fuse=False)
        out, _ = m.forward_tokens(x)
    assert out.shape[1] < m.num_prefix_tokens + m.patch_embed.num_patches
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pruned_result_is_batch_independent_and_fused_token_runs():
    m = make("dinov3", depth=3)
    x = image(m, batch=3)
    vitrim.apply(m, "evit", keep_rate=0.5, locations=(1,))
    with torch.no_grad():
        full = m(x)
        single = m(x[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", list(MODELS))
def test_flops_match_flop_counter(key):
    m = make(key)
    analytic = vitrim.flops(m)
    traced = vitrim.traced_flops(m)
    assert abs(analytic - traced) / traced < 0.01
    vitrim.apply(m, "evit", keep_rate=0.5, locations=(1,))
    assert vitrim.flops(m) < analytic
    assert abs(vitrim.flops(m) - vitrim.traced_flops(m)) / vitrim.traced_flops(m) < 0.02


def test_idle_on_rope_is_refused_not_wrong():
    m = make("dinov3", depth=3)
    vitrim.apply(m, "idle")
    with pytest.raises(VitrimError, match="RoPE Eva"):
        m(image(m))


def test_refused_families_name_what_is_accepted():
    mixed = timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False, depth=1, img_size=64)
    with pytest.raises(UnsupportedModelError, match="mixed"):
        vitrim.apply(mixed, "evit", keep_rate=0.7, locations=(0,))
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, img_size=64)
    with pytest.raises(UnsupportedModelError, match="Beit"):
        vitrim.apply(beit, "tome", r=1)
    naflex = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1)
    with pytest.raises(UnsupportedModelError, match="NaFlexVit"):
        vitrim.apply(naflex, "tome", r=1)


def _topk_decision(logp, prev, k):
    """Fixed decisions for the masked form: the top k alive tokens by predicted keep score."""
    from vitrim.ops.prune import rank_tokens
    scores = logp[..., 0].masked_fill(prev[..., 0] <= 0, float("-inf"))
    keep_index, _ = rank_tokens(scores, k)
    return torch.zeros_like(prev).scatter(1, keep_index.unsqueeze(-1), 1.0)


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("method", ["dynamicvit", "dtps"])
def test_masked_training_equals_gather_inference_on_eva(key, method):
    m = make(key, depth=3)
    x = image(m)
    vitrim.apply(m, method, keep_rate=0.5, locations=(1, 2))
    with torch.no_grad():
        ref = m(x)
        m.vitrim.masked_decision = _topk_decision
        m.train()
        out = m(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    del m.vitrim.masked_decision  # back to the Gumbel decisions
    m(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in m.vitrim.predictors.parameters())


def test_recomputed_rotation_equals_the_module_rows():
    from vitrim.adapters.eva import rope_at
    from vitrim.ops.rope import grid_positions
    m = make("dinov3", img_size=(64, 96), dynamic_img_size=True)
    x = torch.randn(1, 3, 64, 96)
    _, rope = m._pos_embed(m.patch_embed(x))
    recompute = rope_at(m.rope, (4, 6))
    torch.testing.assert_close(recompute(grid_positions((4, 6), 1, x.device)[0]), rope, rtol=0, atol=1e-6)


@pytest.mark.parametrize("position", ["mean", "keep"])
def test_tome_positions_follow_the_merges(position):
    m = make("dinov3", depth=3)
    x = image(m)
    vitrim.apply(m, "tome", r=3, position=position, trace_source=True)
    with torch.no_grad():
        _, state = m.forward_tokens(x)
    p = m.num_prefix_tokens
    source = state.source[:, p:, p:]                                  # [B, n, N0] patches each token holds
    grid = torch.stack(torch.meshgrid(torch.arange(4.), torch.arange(4.), indexing="ij"), -1).reshape(16, 2)
    if position == "mean":
        expected = (source @ grid) / source.sum(-1, keepdim=True)
        torch.testing.assert_close(state.positions, expected, rtol=1e-6, atol=1e-6)
    else:  # a grid position the token holds
        assert torch.equal(state.positions, state.positions.round())
        held = source.gather(2, (state.positions[..., 0] * 4 + state.positions[..., 1]).long().unsqueeze(-1))
        assert bool((held == 1).all())
    assert state.positions.shape[1] == 16 - 9


def test_tome_mean_needs_a_rope_vitrim_can_recompute():
    m = make("eva02", depth=3)
    vitrim.apply(m, "tome", r=2, position="mean")
    with pytest.raises(VitrimError, match="position='keep'"):
        m(image(m))
    vitrim.update(m, position="keep")
    assert m(image(m)).shape[0] == 2


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("tome", dict(r=3)), ("evit", dict(keep_rate=0.5, locations=(1,)))])
def test_compiles_as_one_graph(method, options):
    torch._dynamo.reset()
    m = make("dinov3", depth=3)
    x = image(m)
    vitrim.apply(m, method, **options)
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
