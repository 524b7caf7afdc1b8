"""IdleViT on timm ViTs: the properties of specs/idlevit.md §15 (identity, masked = gather, re-selection,
keep counts, selection rule, FLOPs, options, training, compile)."""
import copy

import pytest
import timm
import torch

import vitrim
from vitrim.errors import OptionError
from vitrim.ops.attention import class_attention_logits, class_attention_scores
from vitrim.ops.idle import IdleRecord, idle_block_gather, idle_block_masked, idle_scores, index_to_mask, rank_scores
from conftest import small_vit

X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
CONFIGS = [{}, {"qk_norm": True, "init_values": 1e-2}, {"reg_tokens": 3}, {"qkv_bias": False},
           {"no_embed_class": True, "reg_tokens": 1}]


def meta_model(name, **kw):
    with torch.device("meta"):
        return timm.create_model(name, **kw)


# ---------------------------------------------------------------------- identity and structure
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kw", CONFIGS)
def test_keep_rate_one_is_identity(fused, kw):
    model = small_vit(fused=fused, **kw)
    with torch.no_grad():
        ref = model(X)
        vitrim.apply(model, "idle", keep_rate=1.0)
        assert torch.equal(model(X), ref)
        vitrim.update(model, keep_rate=0.5)
        assert not torch.allclose(model(X), ref)
        vitrim.remove(model)
        assert type(model) is timm.models.vision_transformer.VisionTransformer
        assert torch.equal(model(X), ref)


def test_alias_and_state_dict_unchanged():
    model = small_vit()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    vitrim.apply(model, "idlevit", keep_rate=0.7)
    assert vitrim.get_method(model).name == "idle" and "idle" in vitrim.methods()
    assert {k: v.shape for k, v in model.state_dict().items()} == keys  # no new parameters
    model.load_state_dict(small_vit(seed=3).state_dict(), strict=True)


def test_length_positions_and_prefix_rows():
    model = vitrim.apply(small_vit(depth=6, reg_tokens=2), "idle", keep_rate=0.5)
    p = model.num_prefix_tokens
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, X)
    assert tokens.shape == (3, 64 + p, 48)  # every token reaches the final norm
    recs = [r for r in state.records if isinstance(r, IdleRecord)]
    assert [r.layer for r in recs] == [1, 2, 3, 4, 5]
    for r in recs:
        assert r.index.shape == (3, r.keep + p)
        assert torch.equal(r.index[:, :p], torch.arange(p).expand(3, p))  # prefix rows always computed, never ranked
        assert (r.index[:, p:] >= p).all()
        assert len(set(r.index[0].tolist())) == r.keep + p


def test_distilled_deit():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, num_classes=10, depth=5).eval()
    ref_model = copy.deepcopy(model)
    vitrim.apply(model, "idle", keep_rate=0.5)
    with torch.no_grad():
        out = model(X)
        _, state = vitrim.forward_tokens(model, X)
    assert out.shape == (3, 10)
    assert all(torch.equal(r.index[:, :2], torch.arange(2).expand(3, 2)) for r in state.records)
    vitrim.update(model, keep_rate=1.0)
    with torch.no_grad():
        assert torch.equal(model(X), ref_model(X))


# ---------------------------------------------------------------------- masked = gather
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kw", CONFIGS)
def test_masked_equals_gather_block(fused, kw):
    model = small_vit(fused=fused, **kw)
    p = model.num_prefix_tokens
    x = torch.randn(4, 64 + p, 48, generator=torch.Generator().manual_seed(2))
    block = model.blocks[2]
    x_before = x.clone()
    with torch.no_grad():
        g, gi = idle_block_gather(block, x, 23, p)
        m, mi, mask, logits = idle_block_masked(block, x, 23, p)
    assert torch.equal(x, x_before)  # no aliasing: the input is never written
    assert torch.equal(gi, mi)  # same selected sets
    assert torch.equal(mask, index_to_mask(gi, 64 + p)) and mask.sum(1).tolist() == [23 + p] * 4
    torch.testing.assert_close(g, m, atol=1e-5, rtol=1e-5)
    idle = ~mask
    assert torch.equal(g[idle], x[idle]) and torch.equal(m[idle], x[idle])  # idle rows bit-identical
    assert not torch.allclose(g[mask], x[mask])
    assert logits.shape == (4, 64 + p, 64 + p)


def test_masked_training_forward_equals_gather_model():
    model = small_vit(depth=6, reg_tokens=1)
    vitrim.apply(model, "idle", keep_rate=0.6)
    with torch.no_grad():
        model.eval()
        out_eval, st_eval = vitrim.forward_with_state(model, X)
        model.train()  # no dropout / drop-path in this model: the masked form must agree
        out_train, st_train = vitrim.forward_with_state(model, X)
    torch.testing.assert_close(out_train, out_eval, atol=1e-5, rtol=1e-5)
    assert len(st_eval.records) == len(st_train.records) == 5
    for e, t in zip(st_eval.records, st_train.records):
        assert e.mask is None and e.logits is None
        assert torch.equal(e.index.sort(1).values, t.index.sort(1).values)
        assert t.mask is not None and t.logits is not None


def test_eval_path_follows_model_mode_not_method_mode():
    # apply() on an eval model leaves the new method module in its default training flag;
    # the model's own mode decides the form
    model = vitrim.apply(small_vit().eval(), "idle", keep_rate=0.5)
    model.vitrim.train()
    with torch.no_grad():
        _, state = vitrim.forward_with_state(model, X)
    assert all(r.mask is None for r in state.records)


# ---------------------------------------------------------------------- selection
@pytest.mark.parametrize("qk_norm", [False, True])  # low-rank scoring without keys / keys of all rows
def test_score_is_head_mean_of_pre_softmax_class_logits(qk_norm):
    model = small_vit(qk_norm=qk_norm, qkv_bias=True)
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.qkv.bias.normal_()  # the key bias shifts every score of a sample by <q, b_k>
    z = torch.randn(2, 65, 48)
    score, keys = rank_scores(attn, z, 1)
    assert (keys is None) != qk_norm
    ref = class_attention_logits(attn, z).mean(1)[:, 1:]
    torch.testing.assert_close(score, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(idle_scores(attn, z, 1), score)


def test_spec_example_pre_softmax_vs_evit():
    # two heads, tokens [cls, a, b]: head logits [0, 0.1, 0] and [0, -50, -40] (idlevit.md §3)
    logits = torch.tensor([[[0.0, 0.1, 0.0], [0.0, -50.0, -40.0]]])  # [B, H, T]
    idle_pick = logits.mean(1)[:, 1:].argmax(-1).item()
    evit_pick = logits.softmax(-1).mean(1)[:, 1:].argmax(-1).item()
    assert (idle_pick, evit_pick) == (1, 0)  # IdleViT selects b, EViT-style scoring selects a
    # the same case through a real attention module: d = 1, two heads, identity projections
    attn = timm.layers.Attention(2, num_heads=2, qkv_bias=True)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        attn.qkv.bias[:2] = 1.0                  # q_cls = (1, 1) for every token
        attn.qkv.weight[2:4] = torch.eye(2)      # k = z
    z = torch.tensor([[[0.0, 0.0], [0.1, -50.0], [0.0, -40.0]]]) / attn.scale
    assert idle_scores(attn, z, 1).argmax(-1).item() == 1
    assert class_attention_scores(attn, z)[:, 1:].argmax(-1).item() == 0


def test_idle_token_can_be_selected_in_the_next_layer():
    """Layer 2 copies layer 1's weights with the class query negated, and layer 1 changes nothing
    (zero output projections): layer 2 ranks the same tokens in reverse, so every token it
    computes was idle in layer 1. A cumulative (hierarchical) mask would make this impossible."""
    model = small_vit(depth=3, qkv_bias=True)
    a = model.blocks[1].attn.attn_dim
    with torch.no_grad():
        for lin in (model.blocks[1].attn.proj, model.blocks[1].mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        model.blocks[2].load_state_dict(model.blocks[1].state_dict())
        model.blocks[2].attn.qkv.weight[:a].neg_()
        model.blocks[2].attn.qkv.bias[:a].neg_()
    vitrim.apply(model, "idle", keep_rate=0.3, layers=[1, 2])
    method = vitrim.get_method(model)
    assert method.keep_counts(64) == [None, 19, 5]
    with torch.no_grad():
        _, state = vitrim.forward_tokens(model, X)
    first, second = state.records
    for b in range(3):
        sel1, sel2 = set(first.index[b, 1:].tolist()), set(second.index[b, 1:].tolist())
        assert sel2 and not (sel2 & sel1)  # selected now, idle one layer before


def test_selection_depends_only_on_the_layer_input():
    model = vitrim.apply(small_vit(depth=5), "idle", keep_rate=0.5)
    inputs = []
    hook = model.blocks[3].norm1.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    with torch.no_grad():
        _, state = vitrim.forward_tokens(model, X)
    hook.remove()
    rec = [r for r in state.records if r.layer == 3][0]
    with torch.no_grad():
        _, index = idle_block_gather(model.blocks[3], inputs[0], rec.keep, 1)
    assert torch.equal(index, rec.index)


def test_batch_independence():
    model = vitrim.apply(small_vit(depth=5), "idle", keep_rate=0.5)
    with torch.no_grad():
        batch, st = vitrim.forward_with_state(model, X)
        for i in range(3):
            one, st1 = vitrim.forward_with_state(model, X[i:i + 1])
            torch.testing.assert_close(one, batch[i:i + 1], atol=1e-5, rtol=1e-5)
            for rb, r1 in zip(st.records, st1.records):
                assert torch.equal(rb.index[i].sort().values, r1.index[0].sort().values)


# ---------------------------------------------------------------------- keep counts
@pytest.mark.parametrize("r,stages", [(0.7, (137, 96, 67)), (0.5, (98, 49, 24)), (0.9, (176, 158, 142)),
                                      (0.8, (156, 125, 100)), (0.6, (117, 70, 42))])
def test_keep_counts_deit(r, stages):
    method = vitrim.get_method(vitrim.apply(meta_model("deit_small_patch16_224"), "idle", keep_rate=r))
    assert method.layers == tuple(range(3, 12))
    assert method.keep_counts() == [None] * 3 + [stages[0]] * 3 + [stages[1]] * 3 + [stages[2]] * 3


def test_keep_counts_published_main_py_layers():
    method = vitrim.get_method(vitrim.apply(meta_model("deit_small_patch16_224"), "idle", keep_rate=0.7,
                                            layers=range(4, 12)))
    assert method.keep_counts() == [None] * 4 + [137] * 3 + [96] * 3 + [67] * 2


@pytest.mark.parametrize("depth,first,group", [(16, 4, 4), (20, 5, 5), (24, 6, 6), (4, 1, 1)])
def test_default_layers_other_depths(depth, first, group):
    model = meta_model("vit_small_patch16_224", depth=depth) if depth != 4 else small_vit(depth=4)
    method = vitrim.get_method(vitrim.apply(model, "idle", keep_rate=0.5))
    assert method.layers == tuple(range(first, depth))
    n = method.info.num_patches
    expected = [None] * first + [int(n * 0.5 ** (1 + i // group)) for i in range(depth - first)]
    assert method.keep_counts() == expected


def test_computed_rows_per_layer():
    model = vitrim.apply(small_vit(depth=6, reg_tokens=2), "idle", keep_rate=0.7)
    rows = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: rows.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(X)
    for h in hooks:
        h.remove()
    # N0 = 64, layers 1..5 in groups of 2: floor(64 * 0.7) = 44, floor(64 * 0.49) = 31, floor(64 * 0.343) = 21
    assert rows == [67, 44 + 3, 44 + 3, 31 + 3, 31 + 3, 21 + 3]


# ---------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("name,r,layers,expected", [
    ("deit_small_patch16_224", 0.9, None, 3.965), ("deit_small_patch16_224", 0.8, None, 3.442),
    ("deit_small_patch16_224", 0.7, None, 3.007), ("deit_small_patch16_224", 0.6, None, 2.634),
    ("deit_small_patch16_224", 0.5, None, 2.333), ("deit_base_patch16_224", 0.7, None, 11.581),
    ("deit_base_patch16_224", 0.5, None, 8.977),
    ("deit_tiny_patch16_224", 0.9, None, 1.073), ("deit_tiny_patch16_224", 0.8, None, 0.927),
    ("deit_tiny_patch16_224", 0.7, None, 0.808), ("deit_tiny_patch16_224", 0.6, None, 0.707),
    ("deit_tiny_patch16_224", 0.5, None, 0.628),
    ("deit_small_patch16_224", 0.7, range(4, 12), 3.243), ("deit_small_patch16_224", 0.5, range(4, 12), 2.641),
    ("deit_base_patch16_224", 0.7, range(4, 12), 12.469), ("deit_tiny_patch16_224", 0.7, range(4, 12), 0.873),
    ("deit_small_patch16_224", 1.0, None, 4.599),
])
def test_flops_spec_tables(name, r, layers, expected):
    model = vitrim.apply(meta_model(name), "idle", keep_rate=r, layers=layers)
    assert vitrim.flops(model) == pytest.approx(expected, abs=0.005)


def test_flops_layers_and_traced_count():
    model = timm.create_model("deit_tiny_patch16_224").eval()
    vitrim.apply(model, "idle", keep_rate=0.7)
    report = vitrim.flops_report(model)
    assert [l.tokens_in for l in report.layers] == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    assert [l.tokens_mlp for l in report.layers][-1] == 68
    # the analytic count is the paper's (keys of every token); the executed forward ranks with
    # W_k^T q_cls instead (one C x C product), so the tracer sees (T - S - 1) C^2 fewer per idle layer
    c = model.embed_dim
    saved = sum((197 - l.tokens_in - 1) * c * c for l in report.layers if l.tokens_in < 197)
    assert vitrim.traced_flops(model) == pytest.approx(vitrim.flops(model) - saved / 1e9, abs=0.001)
    assert vitrim.flops(model) == pytest.approx(0.808, abs=0.001)


def test_cli_flops(capsys):
    from vitrim.cli import main
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--method", "idle", "--keep-rate", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "total 0.808 GMACs" in out and "ratio 1.55x" in out
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--method", "idlevit", "--keep-rate", "0.7",
                 "--layers", "[4, 5, 6, 7, 8, 9, 10, 11]"]) == 0
    assert "total 0.873 GMACs" in capsys.readouterr().out
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--method", "idle", "--layers", "range(4, 12)"]) == 2
    assert "layers must be a sequence" in capsys.readouterr().err  # not a literal: a clear error, not a crash


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("opts,match", [
    ({"keep_rate": 0}, r"keep_rate must be a number in \(0, 1\].*accepted"),
    ({"keep_rate": 1.5}, r"keep_rate must be a number in \(0, 1\]"),
    ({"keep_rate": -0.3}, r"keep_rate must be a number in \(0, 1\]"),
    ({"keep_rate": True}, r"keep_rate must be a number"),
    ({"keep_rate": "0.7"}, r"keep_rate must be a number"),
    ({"layers": [1, 4]}, r"layers \[4\] out of range for a model with 4 blocks.*accepted.*0\.\.3"),
    ({"layers": [-1, 2]}, r"out of range"),
    ({"layers": [2, 1]}, r"strictly increasing without duplicates"),
    ({"layers": [1, 1, 2]}, r"strictly increasing without duplicates"),
    ({"layers": []}, r"layers is empty"),
    ({"layers": [1.0, 2.0]}, r"layers must hold ints"),
    ({"layers": "1,2"}, r"layers must be a sequence"),
    ({"layers": 3}, r"layers must be a sequence"),
    ({"ratio": 0.5}, r"unknown option\(s\) ratio for method 'idle'; accepted: keep_rate, layers"),
])
def test_bad_options(opts, match):
    model = small_vit()
    with pytest.raises(OptionError, match=match):
        vitrim.apply(model, "idle", **opts)
    assert not vitrim.is_reduced(model)


def test_model_without_class_token_ranks_with_the_average_query():
    """No class token: IdleViT ranks with the average patch token's query [vitrim extension]
    (tests/test_cls_free.py checks the scores); the plan counts the same rows."""
    for kw in (dict(class_token=False, global_pool="avg"), dict(class_token=False, reg_tokens=2, global_pool="avg")):
        model = vitrim.apply(small_vit(**kw), "idle", keep_rate=0.7)
        assert not vitrim.get_method(model).info.has_class_token
        assert model(torch.randn(1, 3, 64, 64)).shape[0] == 1
        assert vitrim.flops(model) < vitrim.flops(vitrim.remove(model) or model)


def test_update_validates_and_changes_plan():
    model = vitrim.apply(meta_model("deit_small_patch16_224"), "idle", keep_rate=0.7)
    with pytest.raises(OptionError):
        vitrim.update(model, keep_rate=2.0)
    assert vitrim.flops(model) == pytest.approx(3.007, abs=0.001)
    vitrim.update(model, keep_rate=0.5)
    assert vitrim.flops(model) == pytest.approx(2.333, abs=0.001)
    vitrim.update(model, layers=range(4, 12))
    assert vitrim.flops(model) == pytest.approx(2.641, abs=0.001)
    assert vitrim.get_method(model).options() == {"keep_rate": 0.5, "layers": tuple(range(4, 12)), "score": "attention"}


# ---------------------------------------------------------------------- training and compile
@pytest.mark.parametrize("ckpt", [False, True])
def test_training_forward_backward_finite(ckpt):
    from vitrim.losses import idle_cut_loss

    model = small_vit(depth=5, qk_norm=True, drop_path_rate=0.1)
    vitrim.apply(model, "idle", keep_rate=0.5)
    model.set_grad_checkpointing(ckpt)
    model.train()
    logits, state = vitrim.forward_with_state(model, X)
    loss = logits.logsumexp(-1).mean() + 20 * idle_cut_loss(state)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[2].attn.qkv.weight.grad.abs().sum() > 0


def test_cut_loss_gradient_reaches_queries_and_keys():
    from vitrim.losses import idle_cut_loss

    model = vitrim.apply(small_vit(depth=3), "idle", keep_rate=0.5).train()
    _, state = vitrim.forward_with_state(model, X)
    idle_cut_loss(state).backward()
    g = model.blocks[2].attn.qkv.weight.grad
    a = model.blocks[2].attn.attn_dim
    assert g[:a].abs().sum() > 0 and g[a:2 * a].abs().sum() > 0  # q and k rows
    assert g[2 * a:].abs().sum() == 0  # values do not enter the cut loss


@pytest.fixture
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "qk_norm": True}])
def test_no_graph_breaks(_reset_dynamo, kw):
    model = vitrim.apply(small_vit(depth=5, **kw), "idle", keep_rate=0.5)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_equals_eager(_reset_dynamo):
    model = vitrim.apply(small_vit(depth=4), "idle", keep_rate=0.5)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for seed in range(2):
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_bf16_autocast(train):
    from vitrim.losses import idle_cut_loss

    model = vitrim.apply(small_vit(depth=4), "idle", keep_rate=0.5).train(train)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = vitrim.forward_with_state(model, X)
        cut = idle_cut_loss(state)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert torch.isfinite(cut) and (cut > 0) == train
