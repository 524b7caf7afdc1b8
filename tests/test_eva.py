"""timm Eva (EVA-02, DINOv3, Perception Encoder, RoPE ViTs): the properties of docs/models/eva.md on every
module variant: zero reduction, rope rows under pruning and idling, recomputed rotations, masked training,
class-token-free scores, attention-pool heads, FLOPs, intermediates, refusals."""
import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import Eva

import vitrim
from vitrim.adapters.eva import _Block, _head, rope_at
from vitrim.errors import UnsupportedModelError, VitrimError
from vitrim.ops.attention import mean_query_logits, split_qkv
from vitrim.ops.rope import gather_rope, grid_positions

MODELS = {  # the five models, small
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64)),          # cls + 4 registers, LayerScale, dinov3 rope
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56)),             # SwiGLU, scale-norm, q/v bias, cat rope, ape
    "pe": ("vit_pe_core_tiny_patch16_384", dict(img_size=64)),          # AttentionRope, attention-pool head, norm_pre
    "mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=64)),   # mixed rope: one table per block
    "reg1gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(img_size=64)),  # no class token, 1 register, GAP
}
_BASE = dict(img_size=32, patch_size=8, embed_dim=48, num_heads=4, num_classes=10, use_abs_pos_emb=False,
             use_rot_pos_emb=True)
VARIANTS = {  # module variants timm's Eva builds, on a tiny base
    "postnorm": dict(use_post_norm=True, swiglu_mlp=True),                                    # GluMlp, gate (below)
    "gqa": dict(attn_type="rope", qkv_fused=False, num_kv_heads=2, qk_norm=True, init_values=0.1,
                num_reg_tokens=2, rope_type="dinov3", rope_rotate_half=True),
    "separate": dict(qkv_fused=False, qk_norm=True, scale_attn_inner=True, swiglu_mlp=True, scale_mlp=True,
                     use_abs_pos_emb=True, init_values=0.1),                                   # SwiGLU, q/v bias
    "norope": dict(use_rot_pos_emb=False, use_abs_pos_emb=True),                              # EVA-01 style
}
ALL = list(MODELS) + list(VARIANTS)
ZERO = [("tome", dict(r=0)), ("evit", dict(keep_rate=1.0, locations=(1,))), ("etps", dict(keep_rate=1.0, locations=(1,))),
        ("dynamicvit", dict(keep_rate=1.0, locations=(1,))), ("dtps", dict(keep_rate=1.0, locations=(1,))),
        ("idle", dict(keep_rate=1.0))]
REDUCE = [("tome", dict(r=2)), ("tome", dict(r=2, position="keep")), ("evit", dict(keep_rate=0.5, locations=(1,))),
          ("etps", dict(keep_rate=0.5, locations=(1,))), ("dynamicvit", dict(keep_rate=0.5, locations=(1,))),
          ("dtps", dict(keep_rate=0.5, locations=(1,))), ("idle", dict(keep_rate=0.5, layers=(1, 2)))]


def make(key, depth=3, **kw):
    torch.manual_seed(0)
    if key in VARIANTS:
        m = Eva(depth=depth, **{**_BASE, **VARIANTS[key], **kw}).eval()
        if key == "postnorm":  # gated attention: Eva does not pass gated_attn to its blocks, so build them here
            from timm.models.eva import EvaAttention
            for blk in m.blocks:
                blk.attn = EvaAttention(48, num_heads=4, num_prefix_tokens=m.num_prefix_tokens, gated=True,
                                        scale_norm=False).eval()
        return m
    name, base = MODELS[key]
    return timm.create_model(name, pretrained=False, depth=depth, **{**base, **kw}).eval()


def image(m, batch=2):
    torch.manual_seed(1)
    return torch.randn(batch, 3, *m.patch_embed.img_size)


def rope_of(m, x, block=0):
    """The model's own rope table for block ``block`` (mixed rope: one per block)."""
    _, table = m._pos_embed(m.patch_embed(x))
    return table[block] if (table is not None and m.rope_mixed) else table


# ---------------------------------------------------------------------- 1. zero reduction
@pytest.mark.parametrize("key", ALL)
@pytest.mark.parametrize("fused", [True, False])
def test_zero_reduction_bit_identical_and_remove_restores(key, fused):
    m = make(key, depth=2)
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    x = image(m)
    with torch.no_grad():
        ref = m(x)
        ref_mid = m.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        for method, options in ZERO:
            vitrim.apply(m, method, **options)
            assert torch.equal(m(x), ref), method
            mid = m.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
            assert all(torch.equal(a, b) for a, b in zip(mid, ref_mid)), method
            vitrim.remove(m)
            assert torch.equal(m(x), ref)


@pytest.mark.parametrize("key", ALL)
def test_flops_match_flop_counter_at_zero_reduction(key):
    m = make(key, depth=2)
    traced = vitrim.traced_flops(m)
    assert abs(vitrim.flops(m) - traced) / traced < 0.01


# ---------------------------------------------------------------------- every method on every model
@pytest.mark.parametrize("key", ALL)
@pytest.mark.parametrize("method,options", REDUCE, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_every_method_reduces_every_model(key, method, options):
    """Inference and a training step run; FLOPs fall and match FlopCounterMode within 2 % (the rest is
    the methods' own scoring and matching); gradients reach the learned predictors."""
    m = make(key)
    x = image(m)
    base = vitrim.flops(m)
    with torch.no_grad():
        shape = m(x).shape
    vitrim.apply(m, method, **options)
    with torch.no_grad():
        out = m(x)
    assert out.shape == shape and torch.isfinite(out).all()
    assert vitrim.flops(m) < base
    traced = vitrim.traced_flops(m) - _idle_gap(m)
    assert abs(vitrim.flops(m) - traced) / traced < 0.02
    m.train()
    m(x).logsumexp(-1).sum().backward()
    predictors = getattr(m.vitrim, "predictors", None)
    if predictors is not None:
        assert all(p.grad is not None for p in predictors.parameters())
    assert m.blocks[0].attn.proj.weight.grad is not None


def _idle_gap(m):
    """GMACs IdleViT's forward executes beyond its count, as docs/methods/idlevit.md states: without qk-norm
    and rope the ranking skips the idle rows' keys (``-(T - S - 1) C^2``); with grouped-query attention the
    selected rows' keys and values are projected to every query head (``+2 S C (A - A_kv)``)."""
    method = m.vitrim
    if method.name != "idle":
        return 0.0
    a = m.blocks[0].attn
    c, width = m.embed_dim, a.num_heads * a.head_dim
    kv = getattr(a, "kv_dim", width)
    low_rank = m.rope is None and isinstance(a.k_norm, torch.nn.Identity)
    t = m.num_prefix_tokens + m.patch_embed.num_patches
    gap = 0
    for k in method.keep_counts():
        if k is None:
            continue
        s = k + m.num_prefix_tokens
        gap += -(t - s - 1) * c * c if low_rank else 2 * s * c * (width - kv)
    return gap / 1e9


# ---------------------------------------------------------------------- 2. recomputed rotations
@pytest.mark.parametrize("key", ["dinov3", "eva02", "pe", "mixed", "reg1gap", "postnorm"])
def test_recomputed_rotation_equals_the_module_rows(key):
    m = make(key, img_size=(64, 96), dynamic_img_size=True) if key == "dinov3" else make(key)
    x = torch.randn(1, 3, 64, 96) if key == "dinov3" else image(m, 1)
    grid = tuple(m.patch_embed.dynamic_feat_size(x.shape[-2:]))
    coords = grid_positions(grid, 1, x.device)[0]
    for block in (0, len(m.blocks) - 1):
        rows = rope_at(m.rope, grid, block)(coords)
        torch.testing.assert_close(rows, rope_of(m, x, block), rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", ["dinov3", "eva02", "mixed"])
@pytest.mark.parametrize("position", ["mean", "keep"])
def test_tome_positions_follow_the_merges(key, position):
    m = make(key)
    x = image(m)
    vitrim.apply(m, "tome", r=3, position=position, trace_source=True)
    with torch.no_grad():
        _, state = m.forward_tokens(x)
    p = m.num_prefix_tokens
    h, w = m.patch_embed.grid_size
    source = state.source[:, p:, p:]                                  # [B, n, N0] patches each token holds
    grid = grid_positions((h, w), 1, x.device)[0]
    if position == "mean":
        expected = (source @ grid) / source.sum(-1, keepdim=True)
        torch.testing.assert_close(state.positions, expected, rtol=1e-6, atol=1e-6)
        assert not torch.equal(state.positions, state.positions.round())
    else:  # a grid position the token holds
        assert torch.equal(state.positions, state.positions.round())
        held = source.gather(2, (state.positions[..., 0] * w + state.positions[..., 1]).long().unsqueeze(-1))
        assert bool((held == 1).all())
    assert state.positions.shape[1] == h * w - 9


def test_merged_token_uses_the_rotation_at_its_mean_coordinates():
    """The rows the blocks see after a merge: the module's own row on the grid, the recomputed rotation at
    the size-weighted mean elsewhere (never averaged sin/cos)."""
    from vitrim.adapters.eva import _Rope
    from vitrim.state import ForwardState
    m = make("eva02")
    x = image(m, 1)
    table = rope_of(m, x)
    grid = tuple(m.patch_embed.grid_size)
    pos = grid_positions(grid, 1, x.device)[:, :4].clone()
    pos[0, 1] = torch.tensor([0.5, 1.25])                             # a merged token between patches
    state = ForwardState(num_prefix_tokens=1, num_patches=grid[0] * grid[1], size=torch.ones(1, 5, 1), positions=pos)
    rows = _Rope(m, table, grid).rows(0, state)[0, 0]
    assert torch.equal(rows[[0, 2, 3]], table[[0, 2, 3]])
    torch.testing.assert_close(rows[1], rope_at(m.rope, grid)(pos[0, 1:2])[0], rtol=0, atol=0)
    half = table.shape[-1] // 2
    torch.testing.assert_close(rows[1, :half] ** 2 + rows[1, half:] ** 2, torch.ones(half))  # a rotation


def test_tome_mean_refused_where_the_rotation_cannot_be_recomputed():
    m = make("dinov3")
    m.rope.aug_active = True                                          # training-time coordinate jitter
    vitrim.apply(m, "tome", r=2, position="mean")
    m.train()
    with pytest.raises(VitrimError, match="position='keep'"):
        m(image(m))
    vitrim.update(m, position="keep")
    assert m(image(m)).shape[0] == 2


# ---------------------------------------------------------------------- 3. pruning and idling: rope rows
@pytest.mark.parametrize("key", ["dinov3", "eva02", "mixed", "pe", "gqa"])
def test_pruning_equals_plain_block_on_kept_tokens_with_their_rope_rows(key):
    """EViT prunes in block 0; block 1 must be the module's own block on the kept tokens with their rope rows."""
    m = make(key, depth=2)
    x = image(m)
    vitrim.apply(m, "evit", keep_rate=0.5, locations=(0,), fuse=False)
    with torch.no_grad():
        out, state = m.forward_tokens(x)
        positions = state.records[-1].positions                      # [B, kept] original patch indices
        mid = _first_block_output(m, x)
        table = rope_of(m, x, block=1)
        ref = m.norm(m.blocks[1](mid, rope=gather_rope(table, positions)))
    assert out.shape[1] == m.num_prefix_tokens + m.patch_embed.num_patches // 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _first_block_output(model, x):
    """Tokens leaving block 0 of a reduced Eva (block 1 swapped for a pass-through)."""
    from vitrim.adapters import eva as eva_adapter
    tokens, rope = eva_adapter._embed(model, x)
    state = model.vitrim.new_state(tokens)
    if rope.table is not None:
        state = state.replace(positions=grid_positions(rope.grid, tokens.shape[0], tokens.device))
    facade = _Block(model.blocks[0], 0, rope, rope.rows(0, state), model.num_prefix_tokens)
    return model.vitrim.block_forward(facade, 0, tokens, state)[0]


@pytest.mark.parametrize("key", ["dinov3", "eva02", "mixed", "reg1gap", "gqa", "postnorm"])
def test_idle_computed_rows_equal_plain_block_with_their_rope_rows(key):
    """IdleViT in block 1: the computed rows are the module's block on those rows with their own rope rows;
    idle rows leave unchanged."""
    m = make(key, depth=2)
    x = image(m)
    p = m.num_prefix_tokens
    with torch.no_grad():
        t, table = m._pos_embed(m.patch_embed(x))
        t = m.blocks[0](m.norm_pre(t), rope=table[0] if m.rope_mixed else table)
        vitrim.apply(m, "idle", keep_rate=0.5, layers=(1,))
        out, state = m.forward_tokens(x)
        index = state.records[-1].index                               # [B, p + K] computed rows
        rows = t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        rope1 = table[1] if m.rope_mixed else table
        computed = m.blocks[1](rows, rope=None if rope1 is None else gather_rope(rope1, index[:, p:] - p))
        ref = t.scatter(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]), computed)
    assert index.shape[1] == p + m.patch_embed.num_patches // 2
    torch.testing.assert_close(out, m.norm(ref), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- 5. class-token-free scores
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_class_token_free_scores_equal_the_formula(qk_norm, rope):
    """``<W_q mean_j z_j + b_q, k_j> * scale`` with the module's own keys (k-norm, then its rotation),
    written out with timm's functions, equals what the methods score with."""
    m = Eva(depth=1, class_token=False, num_reg_tokens=1, global_pool="avg", qk_norm=qk_norm,
            **{**_BASE, "use_rot_pos_emb": rope, "use_abs_pos_emb": not rope})
    x = image(m)
    t, table = m._pos_embed(m.patch_embed(x))
    blk = _Block(m.blocks[0], 0, None, table, 1)
    z = blk.norm1(t)
    _, k, _ = split_qkv(blk.attn, z)
    a = m.blocks[0].attn
    B, T, _ = z.shape
    q = a.q_norm((z[:, 1:].mean(1) @ a.qkv.weight[:48].T + a.q_bias).reshape(B, 4, 1, 12))
    keys = a.k_norm((z @ a.qkv.weight[48:96].T).reshape(B, T, 4, 12).transpose(1, 2))[:, :, 1:]
    if rope:
        keys = apply_rot_embed_cat(keys, table)
    expected = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], keys) * a.scale
    torch.testing.assert_close(mean_query_logits(blk.attn, z, k, 1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["evit", "etps", "idle", "dynamicvit"])
def test_methods_reduce_models_without_class_token(method):
    m = make("reg1gap")
    assert m.cls_token is None
    options = dict(keep_rate=0.5, layers=(1,)) if method == "idle" else dict(keep_rate=0.5, locations=(1,))
    vitrim.apply(m, method, **options)
    with torch.no_grad():
        out, state = m.forward_with_state(image(m))
    assert out.shape == (2, m.num_classes)
    if method in ("evit", "etps"):
        torch.testing.assert_close(state.records[-1].scores.sum(-1), torch.ones(2))  # softmax over the patches


# ---------------------------------------------------------------------- 6. masked training = gather inference
def _topk_decision(logp, prev, k):
    """Fixed decisions for the masked form: the top k alive tokens by predicted keep score."""
    from vitrim.ops.prune import rank_tokens
    scores = logp[..., 0].masked_fill(prev[..., 0] <= 0, float("-inf"))
    keep_index, _ = rank_tokens(scores, k)
    return torch.zeros_like(prev).scatter(1, keep_index.unsqueeze(-1), 1.0)


@pytest.mark.parametrize("key", ["dinov3", "eva02", "pe", "mixed"])
@pytest.mark.parametrize("method", ["dynamicvit", "dtps"])
def test_masked_training_equals_gather_inference(key, method):
    m = make(key)
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


@pytest.mark.parametrize("key", ["dinov3", "eva02", "mixed", "reg1gap", "gqa"])
def test_idle_training_forms_equal_gather_inference(key):
    """The training form (and the masked form) compute the selected rows as the gather form does."""
    from vitrim.ops.idle import idle_block_gather, idle_block_masked, idle_block_train
    m = make(key, depth=2)
    x = image(m)
    p = m.num_prefix_tokens
    with torch.no_grad():
        t, table = m._pos_embed(m.patch_embed(x))
        blk = _Block(m.blocks[1], 1, None, table[1] if m.rope_mixed else table, p)
        mean_query = m.cls_token is None
        ref, index = idle_block_gather(blk, t, 8, p, mean_query)
        trained, index_t, mask, _ = idle_block_train(blk, t, 8, p, mean_query)
        masked, index_m, _, _ = idle_block_masked(blk, t, 8, p, mean_query)
    assert torch.equal(index, index_t) and torch.equal(index, index_m)
    torch.testing.assert_close(trained, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masked[mask], ref[mask], atol=1e-4, rtol=1e-4)
    vitrim.apply(m, "idle", keep_rate=0.5, layers=(1,))
    with torch.no_grad():
        inference = m(x)
        m.train()
        training = m(x)
    torch.testing.assert_close(training, inference, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- attention-pool head
@pytest.mark.parametrize("fused", [True, False])
def test_attention_pool_over_merged_duplicates_equals_pooling_the_duplicates(fused):
    """ToMe's log(size) in the attention pool: a token standing for two identical copies pools as the copies."""
    m = vitrim.apply(make("pe", depth=1), "tome", r=0)
    m.attn_pool.fused_attn = fused
    torch.manual_seed(2)
    x = torch.randn(2, 6, m.embed_dim)
    dup = torch.cat([x, x[:, 2:4]], dim=1)                            # tokens 2 and 3 twice
    size = torch.tensor([1.0, 1.0, 2.0, 2.0, 1.0, 1.0]).reshape(1, 6, 1).expand(2, -1, -1)
    with torch.no_grad():
        merged = _head(m, x, size)
        plain = _head(m, dup, None)
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- 7. batch independence, compile
@pytest.mark.parametrize("method,options", [("tome", dict(r=3)), ("evit", dict(keep_rate=0.5, locations=(1,))),
                                            ("idle", dict(keep_rate=0.5))])
def test_results_do_not_depend_on_the_rest_of_the_batch(method, options):
    m = make("dinov3")
    x = image(m, batch=3)
    vitrim.apply(m, method, **options)
    with torch.no_grad():
        full = m(x)
        single = m(x[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("tome", dict(r=3)), ("evit", dict(keep_rate=0.5, locations=(1,))),
                                            ("idle", dict(keep_rate=0.5))])
def test_compiles_as_one_graph(method, options):
    torch._dynamo.reset()
    m = make("mixed")
    x = image(m)
    vitrim.apply(m, method, **options)
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- intermediates
def test_forward_intermediates_follow_the_reduction():
    m = make("dinov3")
    x = image(m)
    vitrim.apply(m, "tome", r=3)
    p = m.num_prefix_tokens
    with torch.no_grad():
        final, mids = m.forward_intermediates(x, output_fmt="NLC")
        tokens, _ = m.forward_tokens(x)
        dense = m.forward_intermediates(x, indices=[0, 2], intermediates_only=True, return_prefix_tokens=True)
    assert [y.shape[1] for y in mids] == [13, 10, 7]
    torch.testing.assert_close(final, tokens, rtol=0, atol=0)
    (d0, pre0), (d2, _) = dense
    assert d0.shape == d2.shape == (2, m.embed_dim, 4, 4) and pre0.shape == (2, p, m.embed_dim)


# ---------------------------------------------------------------------- 8. refusals
def test_refused_families_name_what_is_accepted():
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, depth=1, img_size=64)
    with pytest.raises(UnsupportedModelError, match="Beit is not supported.*timm Eva models"):
        vitrim.apply(beit, "tome", r=1)
    naflex = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1)
    with pytest.raises(UnsupportedModelError, match="NaFlexVit is not supported.*timm Eva models"):
        vitrim.apply(naflex, "tome", r=1)
    dropped = make("dinov3", patch_drop_rate=0.5)
    with pytest.raises(UnsupportedModelError, match="patch dropout.*accepted"):
        vitrim.apply(dropped, "evit")

    class Custom(Eva):
        def forward_features(self, x, attn_mask=None, is_causal=False):
            return super().forward_features(x)

    custom = Custom(depth=1, **_BASE)
    with pytest.raises(UnsupportedModelError, match="overrides Eva.forward_features; accepted"):
        vitrim.apply(custom, "tome", r=1)


def test_rope_rows_gather_and_identity():
    rope = torch.randn(6, 8)
    index = torch.tensor([[4, 0, -1], [1, 5, 2]])
    rows = gather_rope(rope, index)
    assert rows.shape == (2, 1, 3, 8)
    assert torch.equal(rows[0, 0, 0], rope[4]) and torch.equal(rows[1, 0, 2], rope[2])
    assert torch.equal(rows[0, 0, 2], torch.cat([torch.zeros(4), torch.ones(4)]))  # sin 0, cos 1: identity
    per_head = torch.randn(3, 6, 8)
    assert torch.equal(gather_rope(per_head, index)[1, 2, 1], per_head[2, 5])
    batched = torch.randn(2, 1, 6, 8)
    assert torch.equal(gather_rope(batched, index)[1, 0, 1], batched[1, 0, 5])
