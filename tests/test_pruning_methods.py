"""EViT, DynamicViT, eTPS and dTPS on timm ViTs: counts, identity, masked = gather, prefix tokens,
predictor gradients, checkpoints, options (evit.md §11, dynamicvit.md §12, tps.md §12)."""
import copy
import functools

import pytest
import timm
import torch

import vitrim
from vitrim.methods.base import get_method_class
from vitrim.errors import OptionError
from vitrim.losses import final_keep_mask, keep_ratio_loss, pruning_decisions
from vitrim.methods._pruning import prune_records
from vitrim.ops.prune import rank_tokens
from conftest import record_token_counts, small_vit

METHODS = ["evit", "dynamicvit", "etps", "dtps"]
LEARNED = ["dynamicvit", "dtps"]
X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=None)
def _cached(**kw):
    return small_vit(**kw)


def vit(**kw):
    """A fresh copy of a small random ViT (built once per configuration: creation dominates test time)."""
    return copy.deepcopy(_cached(**kw))


@functools.lru_cache(maxsize=None)
def _distilled():
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, num_classes=10, depth=4).eval()


def deit_shaped(**kw):
    """12 blocks, 224 px, /16 patches (196 tokens) but narrow: DeiT token counts, fast on CPU."""
    return vit(img_size=224, patch_size=16, embed_dim=24, depth=12, num_heads=2, **kw)


def counts_of(model, x=None):
    counts, handles = record_token_counts(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224) if x is None else x)
    for h in handles:
        h.remove()
    return counts


# ---------------------------------------------------------------------- keep counts
@pytest.mark.parametrize("r,fused,unfused", [
    (0.9, [177, 161, 146], [177, 160, 144]), (0.8, [157, 127, 103], [157, 126, 101]),
    (0.7, [138, 98, 70], [138, 97, 68]), (0.6, [118, 72, 44], [118, 71, 43]), (0.5, [98, 50, 26], [98, 49, 25]),
])
def test_evit_counts(r, fused, unfused):
    model = vitrim.apply(deit_shaped(), "evit", keep_rate=r)
    c = counts_of(model)
    assert [c["mlp"][i] - 1 - 1 for i in (3, 6, 9)] == fused  # minus class and fused tokens
    assert c["attn"][3] == 197 and c["mlp"][3] == fused[0] + 2  # attention sees all, the MLP the reduced set
    assert [b.mlp for b in vitrim.get_method(model).block_tokens(197)] == c["mlp"]
    vitrim.update(model, fuse=False)
    c = counts_of(model)
    assert [c["mlp"][i] - 1 for i in (3, 6, 9)] == unfused
    assert [b.mlp for b in vitrim.get_method(model).block_tokens(197)] == c["mlp"]


def test_evit_sequence_lengths_and_tokens_override():
    model = vitrim.apply(deit_shaped(), "evit", keep_rate=0.7)
    assert [counts_of(model)["mlp"][i] for i in (3, 6, 9)] == [140, 100, 72]
    vitrim.update(model, tokens=[100, 50, 20])
    assert [counts_of(model)["mlp"][i] for i in (3, 6, 9)] == [102, 52, 22]


@pytest.mark.parametrize("locations,rho,kept", [
    ((3, 6, 9), 0.7, [137, 96, 67]), ((3, 6, 9), 0.5, [98, 49, 24]),
    ((3, 5, 7, 9), 0.7, [137, 96, 67, 47]), ((3, 5, 7, 9), 0.5, [98, 49, 24, 12]),
    ((2, 4, 6, 8), 0.7, [137, 96, 67, 47]), ((2, 4, 6, 8), 0.5, [98, 49, 24, 12]),
])
@pytest.mark.parametrize("method", LEARNED)
def test_dynamicvit_dtps_counts(method, locations, rho, kept):
    model = vitrim.apply(deit_shaped(), method, keep_rate=rho, locations=locations)
    c = counts_of(model)
    assert [c["attn"][l] - 1 for l in locations] == kept  # the sequence after a stage is exactly 1 + K
    assert c["attn"][:locations[0]] == [197] * locations[0]
    assert [b.q for b in vitrim.get_method(model).block_tokens(197)] == c["attn"]


@pytest.mark.parametrize("locations,rho,kept", [
    ((3, 6, 9), 0.7, [138, 97, 68]), ((3, 6, 9), 0.5, [98, 49, 25]),
    ((3, 5, 7, 9), 0.7, [138, 97, 68, 48]), ((2, 4, 6, 8), 0.5, [98, 49, 25, 13]),
])
def test_etps_counts(locations, rho, kept):
    model = vitrim.apply(deit_shaped(), "etps", keep_rate=rho, locations=locations)
    c = counts_of(model)
    assert [c["mlp"][l] - 1 for l in locations] == kept  # no fused token
    assert [b.mlp for b in vitrim.get_method(model).block_tokens(197)] == c["mlp"]


def test_per_stage_ratio_lists():
    model = vitrim.apply(deit_shaped(), "dynamicvit", keep_rate=[0.8, 0.5, 0.25])
    assert [counts_of(model)["attn"][l] - 1 for l in (3, 6, 9)] == [156, 98, 49]
    model = vitrim.apply(deit_shaped(), "evit", keep_rate=[0.5, 1.0, 0.5], fuse=False)
    assert [counts_of(model)["mlp"][l] - 1 for l in (3, 6, 9)] == [98, 98, 49]


def test_counts_follow_the_input_size():
    model = vitrim.apply(vit(img_size=64, patch_size=8, depth=4, dynamic_img_size=True), "dynamicvit",
                         keep_rate=0.5, locations=(1, 2))
    c = counts_of(model, torch.randn(1, 3, 96, 96))  # N0 = 144
    assert c["attn"] == [145, 73, 37, 37]


# ---------------------------------------------------------------------- identity
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("opts", [{"keep_rate": 1.0}, {"keep_rate": [1, 1]}, {"locations": ()}])
def test_keep_rate_one_is_the_unmodified_model(method, opts):
    model = vit(depth=4)
    with torch.no_grad():
        ref = model(X)
        vitrim.apply(model, method, **{"locations": (1, 2), **opts})
        assert torch.equal(model(X), ref)
        vitrim.remove(model)
        assert torch.equal(model(X), ref)
        vitrim.apply(model, method, keep_rate=0.5, locations=(1, 2))
        assert not torch.allclose(model(X), ref)


# ---------------------------------------------------------------------- masked training = gather inference
def topk_decision(logp, prev, k):
    """Fixed decisions for the masked form: the top k alive tokens by predicted keep score."""
    scores = logp[..., 0].masked_fill(prev[..., 0] <= 0, float("-inf"))
    keep_index, _ = rank_tokens(scores, k)
    return torch.zeros_like(prev).scatter(1, keep_index.unsqueeze(-1), 1.0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", LEARNED)
def test_masked_training_forward_equals_gather_inference(method, fused):
    model = vitrim.apply(vit(depth=5, fused=fused, reg_tokens=1), method, keep_rate=0.6, locations=(1, 3))
    method_obj = vitrim.get_method(model)
    with torch.no_grad():
        ref, ref_state = vitrim.forward_with_state(model, X)
        method_obj.masked_decision = topk_decision  # fixed top-K decisions instead of Gumbel noise
        model.train()
        out, state = vitrim.forward_with_state(model, X)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert state.policy.shape == (3, 66, 1)
    kept_masked = [set(r.keep[b].nonzero().flatten().tolist()) for r in prune_records(state) for b in range(3)]
    kept_gather = [set(r.positions[b].tolist()) for r in prune_records(ref_state) for b in range(3)]
    assert kept_masked == kept_gather


def test_etps_training_and_inference_share_the_gather_path():
    model = vitrim.apply(vit(depth=4), "etps", keep_rate=0.6, locations=(1, 2))
    with torch.no_grad():
        ref = model(X)
        model.train()
        torch.testing.assert_close(model(X), ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------- training mode
@pytest.mark.parametrize("method", LEARNED)
def test_gumbel_decisions_and_predictor_gradients(method):
    model = vitrim.apply(vit(depth=5), method, keep_rate=0.7, locations=(1, 2, 3)).train()
    logits, state = vitrim.forward_with_state(model, X)
    decisions, targets = pruning_decisions(state)
    assert len(decisions) == 3 and targets == pytest.approx([0.7, 0.49, 0.343])
    for d in decisions:
        assert set(d.detach().unique().tolist()) <= {0.0, 1.0}
    for a, b in zip(decisions, decisions[1:]):
        assert (b <= a).all()  # cumulative
    assert torch.equal(final_keep_mask(state), decisions[-1].detach())
    # the classification loss alone (through masked attention) trains every predictor
    logits.logsumexp(-1).sum().backward(retain_graph=True)
    for p in vitrim.get_method(model).predictors:
        assert p.proj.weight.grad is not None and p.proj.weight.grad.abs().sum() > 0
        assert p.head[4].weight.grad.abs().sum() > 0
    model.zero_grad()
    keep_ratio_loss(decisions, targets).backward()
    assert all(p.head[4].weight.grad.abs().sum() > 0 for p in vitrim.get_method(model).predictors)


def test_masked_forms_differ_by_squeezing_only():
    dyn = vitrim.apply(vit(depth=4), "dynamicvit", keep_rate=0.5, locations=(1,)).train()
    tps = vitrim.apply(vit(depth=4), "dtps", keep_rate=0.5, locations=(1,)).train()
    tps.load_state_dict(dyn.state_dict())
    seen = {}
    for name, m in (("dyn", dyn), ("tps", tps)):
        m.blocks[1].norm1.register_forward_pre_hook(lambda mod, a, name=name: seen.__setitem__(name, a[0]))
    with torch.no_grad():
        torch.manual_seed(1)
        _, s1 = vitrim.forward_with_state(dyn, X)
        torch.manual_seed(1)
        _, s2 = vitrim.forward_with_state(tps, X)
    assert torch.equal(s1.policy, s2.policy)  # same Gumbel draw, same decisions
    alive = s1.policy[..., 0].bool()
    assert torch.equal(seen["dyn"][~alive], seen["tps"][~alive])  # pruned rows untouched (and masked)
    assert torch.equal(seen["dyn"][:, 0], seen["tps"][:, 0])  # class token untouched
    assert not torch.equal(seen["dyn"][alive], seen["tps"][alive])  # hosts absorbed the pruned tokens


@pytest.mark.parametrize("method", LEARNED)
def test_training_avg_pool_uses_alive_tokens_only(method):
    model = vitrim.apply(vit(depth=4, global_pool="avg", fc_norm=False), method, keep_rate=0.5,
                         locations=(1,))
    vitrim.get_method(model).masked_decision = topk_decision
    with torch.no_grad():
        ref = model(X)
        model.train()
        torch.testing.assert_close(model(X), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- prefix tokens
@pytest.mark.parametrize("method", METHODS)
def test_prefix_tokens_never_pruned_scored_or_fused(method):
    model = vit(depth=4, reg_tokens=2)  # class + 2 registers
    vitrim.apply(model, method, keep_rate=0.5, locations=(1, 2))
    inputs = {}  # what each block computes with (its norm1 input), after any pruning before it
    for i, b in enumerate(model.blocks):
        b.norm1.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
    with torch.no_grad():
        out, state = vitrim.forward_with_state(model, X)
        for rec in prune_records(state):
            # the tokens scored: inside the block (EViT, eTPS) or those leaving the previous block
            entering = inputs[rec.block] if method in ("evit", "etps") else inputs[rec.block - 1]
            assert rec.scores.shape[1] == entering.shape[1] - 3  # patch tokens only are scored
            assert ((rec.positions >= 0) & (rec.positions < 64) | (rec.positions == -1)).all()
        for loc in (1, 2):
            blk = model.blocks[loc]
            if method in LEARNED:  # pruned before the block: prefix rows carried over bit-identical
                assert torch.equal(inputs[loc][:, :3], model.blocks[loc - 1](inputs[loc - 1])[:, :3])
            else:  # pruned inside: prefix rows equal the unpruned block's (attention saw every token)
                torch.testing.assert_close(inputs[loc + 1][:, :3], blk(inputs[loc])[:, :3], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_distilled_deit_works(method):
    model = copy.deepcopy(_distilled())
    vitrim.apply(model, method, keep_rate=0.5, locations=(1, 2))
    c = counts_of(model, X)
    assert c["attn"][0] == 18
    with torch.no_grad():
        out, state = vitrim.forward_with_state(model, X)
        tokens, _ = vitrim.forward_tokens(model, X)
    assert out.shape == (3, 10) and tokens.shape[1] == c["mlp"][-1]
    assert all(((r.positions >= 0) | (r.positions == -1)).all() for r in prune_records(state))
    model.train()
    model.set_distilled_training(True)
    cls_out, dist_out = model(X)
    assert cls_out.shape == dist_out.shape == (3, 10)


def test_every_pruning_method_reduces_a_model_without_class_token():
    """EViT and eTPS score with the average token's query, DynamicViT and dTPS's predictors need no class
    token (tests/test_cls_free.py has the scores)."""
    for method in METHODS:
        assert get_method_class(method).scores_without_class_token
        model = vitrim.apply(vit(class_token=False, global_pool="avg"), method)
        assert vitrim.flops(model) < vitrim.flops(vitrim.remove(model) or model)


def test_evit_output_order_and_fused_token():
    model = vit(depth=2)
    vitrim.apply(model, "evit", keep_rate=0.5, locations=(0,))
    blk = model.blocks[0]
    seen = {}
    blk.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0]))
    blk.norm2.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        _, state = vitrim.forward_with_state(model, X)
        x0 = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(X))))
        from vitrim.methods._pruning import attention_residual
        from vitrim.methods.evit import class_attention
        y, xn, keys = attention_residual(blk, x0)
        a = class_attention(blk, xn, keys, 1)
    rec = prune_records(state)[0]
    x = seen["x"]
    assert x.shape[1] == 1 + 32 + 1
    assert torch.equal(rec.index, a.topk(32).indices)  # kept tokens in descending score order
    torch.testing.assert_close(x[:, 1:33], y[:, 1:].gather(1, rec.index[..., None].expand(-1, -1, 48)))
    rest = torch.ones_like(a, dtype=torch.bool).scatter(1, rec.index, False)
    expected = torch.stack([(a[b, rest[b], None] * y[b, 1:][rest[b]]).sum(0) for b in range(3)])
    torch.testing.assert_close(x[:, -1], expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------- batch independence
@pytest.mark.parametrize("method", METHODS)
def test_results_do_not_depend_on_the_batch(method):
    model = vitrim.apply(vit(depth=4), method, keep_rate=0.5, locations=(1, 2))
    with torch.no_grad():
        together = model(X)
        alone = torch.cat([model(X[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", LEARNED)
def test_checkpoints_before_and_after_apply(method, tmp_path):
    backbone = small_vit(depth=4, seed=3).state_dict()
    # before apply: a timm checkpoint, then apply
    before = vit(depth=4)
    before.load_state_dict(backbone)
    vitrim.apply(before, method, keep_rate=0.5, locations=(1, 2))
    # after apply: backbone keys load, the predictors (missing from the checkpoint) stay as they are
    after = vitrim.apply(vit(depth=4), method, keep_rate=0.5, locations=(1, 2))
    predictors = copy.deepcopy(vitrim.get_method(after).predictors.state_dict())
    result = after.load_state_dict(backbone)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in vitrim.get_method(after).predictors.state_dict().items():
        assert torch.equal(v, predictors[k])
    assert any(k.startswith("vitrim.predictors.0.") for k in after.state_dict())
    # a saved reduced model loads back exactly
    path = tmp_path / "reduced.pt"
    torch.save(before.state_dict(), path)
    fresh = vitrim.apply(small_vit(depth=4, seed=9), method, keep_rate=0.5, locations=(1, 2))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(X), before(X))
    # a partial set of predictor keys is an error, not a silent re-init
    partial = {k: v for k, v in before.state_dict().items() if not k.startswith("vitrim.predictors.1.")}
    with pytest.raises(RuntimeError, match="Missing key.*vitrim.predictors.1"):
        fresh.load_state_dict(partial)
    # and a reduced checkpoint does not fit the plain model (documented: strip the vitrim. keys)
    with pytest.raises(RuntimeError, match="Unexpected key.*vitrim.predictors"):
        vit(depth=4).load_state_dict(before.state_dict())


def test_update_keeps_predictors_and_checks_their_number():
    model = vitrim.apply(vit(depth=5), "dtps", keep_rate=0.7, locations=(1, 3))
    w = vitrim.get_method(model).predictors[0].proj.weight.clone()
    vitrim.update(model, keep_rate=0.5, locations=(2, 4))
    assert vitrim.get_method(model).locations == (2, 4)
    assert torch.equal(vitrim.get_method(model).predictors[0].proj.weight, w)
    with pytest.raises(OptionError, match="2 trained predictors.*vitrim.remove"):
        vitrim.update(model, locations=(1, 2, 3))
    assert vitrim.get_method(model).locations == (2, 4) and vitrim.get_method(model).keep_rate == 0.5


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("opts,match", [
    ({"keep_rate": 0.0}, r"outside \(0, 1\].*accepted"), ({"keep_rate": 1.5}, r"outside \(0, 1\]"),
    ({"keep_rate": -0.2}, r"outside \(0, 1\]"), ({"keep_rate": float("nan")}, r"outside \(0, 1\]"),
    ({"keep_rate": True}, "not a number"), ({"keep_rate": "0.7"}, "not a number"),
    ({"keep_rate": [0.7, 0.5]}, "2 entries for 3 locations"), ({"keep_rate": [0.7, 0, 0.5]}, "outside"),
    ({"locations": (3, 6, 12)}, r"\[12\] out of range for a model with 12 blocks.*\[0, 11\]"),
    ({"locations": (-1, 3)}, "out of range"), ({"locations": (6, 3)}, "not sorted.*strictly increasing"),
    ({"locations": (3, 3, 6)}, "duplicates"), ({"locations": (3.0, 6)}, "not a sequence of ints"),
    ({"locations": "3,6,9"}, "not a sequence of ints"), ({"r": 13}, "unknown option.*r.*accepted: keep_rate, locations"),
])
def test_bad_options_name_what_is_accepted(method, opts, match):
    model = deit_shaped()
    with pytest.raises(OptionError, match=match):
        vitrim.apply(model, method, **opts)
    assert not vitrim.is_reduced(model)


@pytest.mark.parametrize("method,opts,match", [
    ("evit", {"fuse": "yes"}, "True or False"), ("evit", {"tokens": 0}, "tokens=0"),
    ("evit", {"tokens": [10, 10]}, "2 entries for 3 locations"), ("etps", {"fuse": True}, "unknown option.*fuse"),
    ("dynamicvit", {"keep_rate": [0.5, 0.7, 0.3]}, "increases"), ("dtps", {"fuse": False}, "unknown option"),
])
def test_method_specific_bad_options(method, opts, match):
    with pytest.raises(OptionError, match=match):
        vitrim.apply(deit_shaped(), method, **opts)


def test_defaults_are_the_papers():
    from vitrim.methods import get_method_class
    for name in METHODS:
        defaults = get_method_class(name).option_defaults()
        assert defaults["keep_rate"] == 0.7 and defaults["locations"] is None  # the depth rule below
    from vitrim.methods._pruning import default_locations
    assert default_locations(12) == (3, 6, 9) and default_locations(16) == (4, 8, 12)
    assert default_locations(20) == (5, 10, 15)
    assert get_method_class("evit").option_defaults()["fuse"] is True


# ---------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("method", METHODS)
def test_no_graph_breaks_in_inference(method):
    torch._dynamo.reset()
    model = vitrim.apply(vit(depth=4, reg_tokens=1), method, keep_rate=0.5, locations=(1, 2))
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


# ---------------------------------------------------------------------- predictor
def test_predictor_follows_the_spec_formula():
    import torch.nn.functional as F
    from vitrim.methods.dynamicvit import ScorePredictor
    torch.manual_seed(0)
    p = ScorePredictor(16).double()
    x = torch.randn(2, 6, 16, dtype=torch.double)
    mask = torch.ones(2, 5, 1, dtype=torch.double)
    mask[0, [1, 3]] = 0
    h = F.gelu(p.proj(p.norm(x[:, 1:])))  # patch tokens only (class excluded)
    g = (h[..., 8:] * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    ref = p.head(torch.cat([h[..., :8], g.expand(-1, 5, -1)], -1)).log_softmax(-1)
    torch.testing.assert_close(p(x, mask, num_prefix_tokens=1), ref)
    torch.testing.assert_close(p(x[:, 1:], mask), ref)
    assert p.macs_per_token() == 16 * 16 + 16 * 8 + 8 * 4 + 4 * 2  # C^2 + C^2/2 + C^2/8 + C/2
    assert all(not m.bias.detach().any() for m in p.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("method", ["dynamicvit", "evit"])
def test_plain_pruning_never_modifies_kept_tokens(method):
    # DynamicViT and unfused EViT only select: the kept tokens are bit-identical copies (no squeeze)
    model = vit(depth=4)
    opts = {"fuse": False} if method == "evit" else {}
    vitrim.apply(model, method, keep_rate=0.5, locations=(2,), **opts)
    seen = {}
    model.blocks[2].norm1.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    model.blocks[2].norm2.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0]))
    model.blocks[1].register_forward_hook(lambda m, a, o: seen.__setitem__("prev", o))
    with torch.no_grad():
        _, state = vitrim.forward_with_state(model, X)
        rec = prune_records(state)[0]
        if method == "dynamicvit":
            kept, source = seen["in"][:, 1:], seen["prev"][:, 1:]
        else:  # inside the block: the kept rows of the post-attention stream enter the MLP unchanged
            blk = model.blocks[2]
            from vitrim.methods._pruning import attention_residual
            kept, source = seen["mid"][:, 1:], attention_residual(blk, seen["in"])[0][:, 1:]
    assert torch.equal(kept, source.gather(1, rec.index[..., None].expand(-1, -1, source.shape[-1])))


@pytest.mark.parametrize("method", METHODS)
def test_bf16_models_and_autocast(method):
    model = vitrim.apply(vit(depth=4).to(torch.bfloat16), method, keep_rate=0.5, locations=(1, 2))
    xb = X.to(torch.bfloat16)
    with torch.no_grad():
        assert model(xb).dtype == torch.bfloat16
    model.train()
    model(xb).float().sum().backward()  # fp32 predictors (built after the cast) run in their own dtype
    model = vitrim.apply(vit(depth=4), method, keep_rate=0.5, locations=(1, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(X)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
