"""Attention-pool heads (timm ``AttentionPoolLatent``, ``global_pool='map'``): every method, the pool's
proportional attention, FLOPs, batch independence, torch.compile (docs/methods/tome.md and pruning.md,
"Attention-pool heads")."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitrim
from conftest import small_vit
from vitrim.measure.flops import latent_pool_macs
from vitrim.ops.attention import latent_pool
from vitrim.ops.idle import rank_scores

ZERO = {"tome": {"r": 0}, "evit": {"keep_rate": 1.0}, "etps": {"keep_rate": 1.0}, "dynamicvit": {"keep_rate": 1.0},
        "dtps": {"keep_rate": 1.0}, "idle": {"keep_rate": 1.0}}
STRONG = {"tome": {"r": 6}, "evit": {"keep_rate": 0.5}, "etps": {"keep_rate": 0.5}, "dynamicvit": {"keep_rate": 0.5},
          "dtps": {"keep_rate": 0.5}, "idle": {"keep_rate": 0.5}}
METHODS = list(ZERO)


def siglip_like(fused=True, **kw):
    """A tiny SigLIP-style ViT: no class token, MAP head (64 px, 8 px patches: 64 tokens)."""
    kw = {"class_token": False, "global_pool": "map", "embed_dim": 32, "num_heads": 2, "depth": 4, **kw}
    return small_vit(fused=fused, **kw)


def map_with_class_token(fused=True, **kw):
    """A MAP head over class + register + patch tokens (``pool_include_prefix=True``)."""
    return small_vit(fused=fused, global_pool="map", embed_dim=32, num_heads=2, depth=4, reg_tokens=2,
                     pool_include_prefix=True, **kw)


MAKERS = {"siglip": siglip_like, "cls+reg": map_with_class_token}
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- the pool op
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_latent_pool_without_weights_is_the_module(fused, qk_norm):
    pool = siglip_like(fused=fused).attn_pool
    if qk_norm:
        from timm.layers import AttentionPoolLatent
        torch.manual_seed(1)
        pool = AttentionPoolLatent(32, num_heads=2, qk_norm=True, latent_len=2, pool_type="avg").eval()
        pool.fused_attn = fused
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        assert torch.equal(latent_pool(pool, x), pool(x))
        assert torch.equal(latent_pool(pool, x, torch.ones(3, 10, 1)), pool(x, attn_mask=torch.zeros(3, 1, 1, 10)))


@pytest.mark.parametrize("fused", [True, False])
def test_pooling_merged_duplicates_equals_pooling_the_duplicates(fused):
    """Spec property 4: with log(size) on the keys a token of size s counts as s copies of itself."""
    pool = siglip_like(fused=fused).attn_pool
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 32, generator=g)
    sizes = torch.randint(1, 5, (2, 12, 1), generator=g).float()
    # sample b: token j repeated sizes[b, j] times (same count per sample: pad with a duplicate of sample 0)
    dups = [torch.repeat_interleave(x[b], sizes[b, :, 0].long(), dim=0) for b in range(2)]
    with torch.no_grad():
        merged = latent_pool(pool, x, sizes)
        for b in range(2):
            torch.testing.assert_close(merged[b], pool(dups[b][None])[0], rtol=1e-5, atol=1e-5)
        # a zero weight removes a key (the masked training form's dead tokens)
        keep = torch.ones(2, 12, 1)
        keep[:, 5:] = 0
        torch.testing.assert_close(latent_pool(pool, x, keep), pool(x[:, :5]), rtol=1e-5, atol=1e-5)


def test_policy_weights_pass_gradients():
    pool = siglip_like(fused=False).attn_pool
    x = torch.randn(2, 8, 32)
    logits = torch.zeros(2, 8, 1, requires_grad=True)
    soft = logits.sigmoid()
    hard = torch.ones(2, 8, 1)
    hard[:, 6:] = 0
    keep = hard + soft - soft.detach()  # a straight-through 0/1 policy, as DynamicViT's Gumbel decisions
    out = latent_pool(pool, x, keep)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    torch.testing.assert_close(out, pool(x[:, :6]), rtol=1e-5, atol=1e-5)


def test_pool_macs_formula_equals_the_counter():
    pool = siglip_like(fused=False).attn_pool.requires_grad_(False)  # FlopCounterMode cannot hook latent.expand
    for n in (64, 37):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            pool(torch.randn(1, n, 32))
        assert counter.get_total_flops() // 2 == latent_pool_macs(pool, n)


# ---------------------------------------------------------------------- every method on a MAP model
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("method", METHODS)
def test_zero_reduction_is_bit_identical(method, kind, fused):
    model = MAKERS[kind](fused=fused)
    with torch.no_grad():
        ref = model(X)
        vitrim.apply(model, method, **ZERO[method])
        assert torch.equal(model(X), ref)
        assert torch.equal(model.forward_head(model.forward_features(X)), ref)
        vitrim.remove(model)
        assert torch.equal(model(X), ref)


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_reduces_a_map_model(method, kind):
    model = MAKERS[kind]()
    with torch.no_grad():
        ref = model(X)
        vitrim.apply(model, method, **STRONG[method])
        out, state = model.forward_with_state(X)
        tokens, _ = vitrim.forward_tokens(model, X)
        assert torch.equal(model.forward_head(model.forward_features(X)), out)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    if method != "idle":
        assert tokens.shape[1] < 64 + model.num_prefix_tokens
    assert vitrim.flops(model) < vitrim.flops(vitrim.remove(model) or model)


def test_tome_pools_with_log_size_on_the_keys():
    """The reduced head equals the pool run on the final tokens with log(size) on its keys."""
    model = vitrim.apply(siglip_like(), "tome", r=6)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, X)
        out = model(X)
        pooled = latent_pool(model.attn_pool, tokens, state.size)
        torch.testing.assert_close(out, model.head(model.fc_norm(pooled)), rtol=0, atol=0)
        plain = model.head(model.fc_norm(model.attn_pool(tokens)))
    assert not torch.allclose(out, plain)  # the bias matters once tokens were merged
    with pytest.raises(vitrim.VitrimError, match="attention pooling is weighted"):
        model.forward_head(tokens.clone())


def test_masked_training_pools_the_alive_tokens():
    model = vitrim.apply(siglip_like(), "dynamicvit", keep_rate=0.5)
    model.train()
    out, state = model.forward_with_state(X)
    assert state.policy is not None and state.policy.shape == (2, 64, 1)
    out.sum().backward()
    assert all(p.grad is not None for p in model.vitrim.predictors.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_batch_independence(method):
    model = vitrim.apply(siglip_like(), method, **STRONG[method])
    with torch.no_grad():
        both = model(X)
        alone = model(X[1:])
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- class-token-free IdleViT
def test_idle_without_class_token_ranks_with_the_average_query():
    model = siglip_like(qk_norm=True)
    block = model.blocks[1]
    z = block.norm1(model._pos_embed(model.patch_embed(X)))
    attn = block.attn
    w, b = attn.qkv.weight, attn.qkv.bias
    A = attn.attn_dim
    q = attn.q_norm((z.mean(1) @ w[:A].T + b[:A]).reshape(2, attn.num_heads, 1, attn.head_dim))
    k = attn.k_norm((z @ w[A:2 * A].T + b[A:2 * A]).reshape(2, -1, attn.num_heads, attn.head_dim).transpose(1, 2))
    expected = ((q * attn.scale) @ k.transpose(-2, -1))[:, :, 0].mean(1)      # head-mean pre-softmax logits
    score, _ = rank_scores(attn, z, 0, mean_query=True)
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-5)
    no_norm = siglip_like()
    z = no_norm.blocks[0].norm1(no_norm._pos_embed(no_norm.patch_embed(X)))
    low_rank, _ = rank_scores(no_norm.blocks[0].attn, z, 0, mean_query=True)   # through W_k^T q_bar
    attn = no_norm.blocks[0].attn
    q = z.mean(1) @ attn.qkv.weight[:A].T + attn.qkv.bias[:A]
    k = z @ attn.qkv.weight[A:2 * A].T + attn.qkv.bias[A:2 * A]
    torch.testing.assert_close(low_rank, (k * q[:, None]).sum(-1) * attn.scale / attn.num_heads,
                               rtol=1e-5, atol=1e-5)


def test_idle_masked_training_equals_gather_without_class_token():
    model = vitrim.apply(siglip_like(), "idle", keep_rate=0.5)
    with torch.no_grad():
        model.eval()
        ref, st_eval = model.forward_with_state(X)
        model.train()
        out, st_train = model.forward_with_state(X)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert [r.keep for r in st_eval.records] == [r.keep for r in st_train.records]


# ---------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("method", METHODS)
def test_flops_match_the_counter(method, kind):
    kw = {"qk_norm": True} if method == "idle" else {}  # with qk-norm IdleViT computes the keys it counts
    model = MAKERS[kind](**kw)
    unreduced = vitrim.flops(model)
    assert vitrim.traced_flops(model) == pytest.approx(unreduced, rel=1e-2)
    vitrim.apply(model, method, **ZERO[method])
    assert vitrim.flops(model) == unreduced
    assert vitrim.traced_flops(model) == pytest.approx(unreduced, rel=1e-2)
    vitrim.update(model, **STRONG[method])
    assert vitrim.traced_flops(model) == pytest.approx(vitrim.flops(model), rel=2e-2)


def test_pool_flops_follow_the_final_tokens():
    model = siglip_like()
    pool = model.attn_pool
    head = lambda m: vitrim.flops_report(m).head_macs
    assert head(model) == latent_pool_macs(pool, 64) + model.head.in_features * model.head.out_features
    vitrim.apply(model, "tome", r=6)
    final = model.vitrim.final_tokens(64)
    assert final < 64 and head(model) == latent_pool_macs(pool, final) + model.head.in_features * model.head.out_features


# ---------------------------------------------------------------------- refusals
def test_pool_with_its_own_position_embedding_is_refused_for_methods_that_remove_tokens():
    from timm.layers import AttentionPoolLatent
    model = siglip_like()
    torch.manual_seed(0)
    model.attn_pool = AttentionPoolLatent(32, num_heads=2, pos_embed="abs", feat_size=64).eval()
    with pytest.raises(vitrim.UnsupportedModelError, match="position embedding"):
        vitrim.apply(model, "tome", r=2)
    with torch.no_grad():
        ref = model(X)
        vitrim.apply(model, "idle", keep_rate=0.5)  # every token stays in place
        assert model(X).shape == ref.shape


def test_other_attention_pools_are_refused():
    from timm.layers import AttentionPoolLatent

    class MyPool(AttentionPoolLatent):
        def forward(self, x, attn_mask=None):
            return super().forward(x)[..., :32]

    model = siglip_like()
    model.attn_pool = MyPool(32, num_heads=2)
    with pytest.raises(vitrim.UnsupportedModelError, match="AttentionPoolLatent"):
        vitrim.apply(model, "tome", r=2)


# ---------------------------------------------------------------------- torch.compile
def test_tome_on_a_map_model_compiles_to_one_graph():
    torch._dynamo.reset()
    try:
        model = vitrim.apply(siglip_like(depth=3), "tome", r=(6, -1))
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(X)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------- vitrim compare on a MAP model
def test_compare_cli_on_a_map_model_without_class_token(tmp_path, capsys):
    import timm
    from vitrim.cli import main
    from vitrim.zoo import is_digits_model

    name = "vitrim_siglip_digits"  # timm ViT, no class token, MAP head (vitrim.zoo)
    assert is_digits_model(name) and not is_digits_model("vit_base_patch16_siglip_224")
    torch.manual_seed(0)
    ckpt = tmp_path / "random.pth"
    torch.save(timm.create_model(name, pretrained=False).state_dict(), ckpt)  # random weights stand in
    out = tmp_path / "report"
    sweep = "tome:r=4;evit:keep_rate=0.5;etps:keep_rate=0.5;dynamicvit:keep_rate=0.5;dtps:keep_rate=0.5;idle:keep_rate=0.5"
    assert main(["compare", "--model", name, "--checkpoint", str(ckpt), "--sweep", sweep, "--batch-size", "2",
                 "--warmup", "0", "--repeats", "1", "--iters", "1", "--max-images", "20", "--device", "cpu",
                 "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for method in METHODS:
        assert f"\n{method} " in printed
    for method in ("evit", "etps", "idle"):  # class-token-free scoring is labelled
        assert f"* {method}: no class token" in printed and "[vitrim extension]" in printed
    assert "* dynamicvit: no class token" not in printed
    md = (out / "results.md").read_text()
    assert "evit: no class token" in md and "[vitrim extension]" in md and "digits" in md


# ---------------------------------------------------------------------- timm Eva with an attention pool
EVA_METHODS = ["tome", "evit", "etps", "dynamicvit", "dtps"]  # the methods the Eva adapter runs with RoPE


def eva_map(fused=True):
    """A tiny DINOv3-layout Eva (RoPE, class token + 4 registers) with a MAP head over every token."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, depth=3, num_classes=5,
                              global_pool="map").eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", EVA_METHODS)
def test_eva_map_zero_reduction_is_bit_identical_and_reduces(method, fused):
    model = eva_map(fused)
    with torch.no_grad():
        ref = model(X)
        vitrim.apply(model, method, **ZERO[method])
        assert torch.equal(model(X), ref)
        vitrim.update(model, **STRONG[method])
        out = model(X)
        assert torch.equal(model.forward_head(model.forward_features(X)), out)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)


def test_eva_map_tome_pools_with_log_size_and_prices_the_pool():
    model = eva_map()
    plain = vitrim.flops_report(model)
    assert plain.head_macs == latent_pool_macs(model.attn_pool, 21) + model.head.in_features * model.head.out_features
    vitrim.apply(model, "tome", r=4)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, X)
        pooled = latent_pool(model.attn_pool, tokens, state.size)       # Eva pools every token, prefix included
        torch.testing.assert_close(model(X), model.head(model.fc_norm(pooled)), rtol=0, atol=0)
    assert vitrim.flops_report(model).head_macs == latent_pool_macs(model.attn_pool, tokens.shape[1]) \
        + model.head.in_features * model.head.out_features
    assert vitrim.traced_flops(model) == pytest.approx(vitrim.flops(model), rel=2e-2)
