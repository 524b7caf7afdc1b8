"""Hugging Face SigLIP (SiglipVisionModel, SiglipForImageClassification) under every method: zero reduction
bit-identical (SDPA and eager), hidden states follow the reduction, the attention-pool head's proportional
attention (log(size) on its keys equals pooling duplicates), pruning pools what remains, the classifier's
size-weighted mean, FLOPs against FlopCounterMode, batch independence, other input sizes, torch.compile,
the CLI on save_pretrained folders, refusals."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

import vitrim  # noqa: E402
from test_compile_methods import reduced_options, zero_options  # noqa: E402
from vitrim.adapters import get_adapter  # noqa: E402
from vitrim.adapters.hf_siglip import SiglipPool  # noqa: E402
from vitrim.ops.attention import latent_pool  # noqa: E402
from conftest import assert_traced_matches_analytic, check_cli_on_folder  # noqa: E402

METHODS = vitrim.methods()
SHAPE = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
             intermediate_size=96)
TEXT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
OPTIONS = {**{n: reduced_options(n) for n in METHODS}, "tome": {"r": 3}}


def siglip(kind: str = "vision", attn: str = "sdpa", **kw):
    """A tiny random SigLIP vision tower (16 tokens of 48 channels, 4 layers), or its classifier."""
    torch.manual_seed(0)
    if kind == "vision":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            **SHAPE, attn_implementation=attn, **kw)).eval()
    cfg = transformers.SiglipConfig(vision_config={**SHAPE, **kw}, text_config=TEXT, num_labels=5,
                                    attn_implementation=attn)
    return transformers.SiglipForImageClassification(cfg).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["vision", "cls"])
@pytest.mark.parametrize("name", METHODS)
def test_zero_reduction_is_bit_identical(name, kind, attn):
    model = siglip(kind, attn)
    with torch.no_grad():
        ref = model(X, output_hidden_states=True)
        vitrim.apply(model, name, **zero_options(name))
        out = model(X, output_hidden_states=True)
        tuple_out = model(X, return_dict=False)
    assert type(out) is type(ref)
    fields = ["last_hidden_state", "pooler_output"] if kind == "vision" else ["logits"]
    assert all(torch.equal(getattr(out, f), getattr(ref, f)) for f in fields)
    assert torch.equal(tuple_out[0], ref.to_tuple()[0])
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))
    vitrim.remove(model)
    with torch.no_grad():
        assert torch.equal(model(X).to_tuple()[0], ref.to_tuple()[0])


@pytest.mark.parametrize("name", METHODS)
def test_reduced_forward_hidden_states_head_and_flops(name):
    model, plain = siglip(attn="eager"), siglip(attn="eager")
    vitrim.apply(model, name, **OPTIONS[name])
    with torch.no_grad():
        out = model(X, output_hidden_states=True)
        head, state = vitrim.forward_with_state(model, X)
        tokens, _ = vitrim.forward_tokens(model, X)
    counts = [h.shape[1] for h in out.hidden_states]
    assert counts[0] == 16 and out.last_hidden_state.shape[1] == tokens.shape[1] == counts[-1]
    assert name == "idle" or counts[-1] < counts[0]
    if name == "tome":
        assert counts == [16, 13, 10, 7, 4]
    torch.testing.assert_close(head, out.pooler_output)
    assert vitrim.flops(model) < vitrim.flops(plain)
    assert_traced_matches_analytic(model, 48)


@pytest.mark.parametrize("kind", ["vision", "cls"])
def test_unreduced_flops_count_the_pool(kind):
    model = siglip(kind, attn="eager")
    trunk = get_adapter(model).trunk
    assert vitrim.traced_flops(model) == pytest.approx(vitrim.flops(model), rel=0.01)
    without_head = siglip(kind, attn="eager", vision_use_head=False)
    assert vitrim.flops(model) - vitrim.flops(without_head) == pytest.approx(
        SiglipPool(trunk.head, trunk.config).macs(16) / 1e9, rel=1e-9)
    vitrim.apply(model, "tome", r=3)
    assert vitrim.flops_report(model).head_macs - vitrim.flops_report(without_head).head_macs == \
        SiglipPool(trunk.head, trunk.config).macs(4)


def test_pool_macs_formula_equals_the_counter():
    head = siglip().head.requires_grad_(False)
    pool = SiglipPool(head, siglip().config)
    for n in (16, 7):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            head(torch.randn(1, n, 48))
        assert counter.get_total_flops() // 2 == pool.macs(n)


# ---------------------------------------------------------------------- the attention-pool head
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pool_over_merged_duplicates_equals_pooling_the_duplicates(attn):
    """Spec property 4 on HF's head: with log(size) on the keys a token of size s counts as s copies."""
    model = siglip(attn=attn)
    pool = SiglipPool(model.head, model.config)
    assert pool.fused_attn == (attn == "sdpa")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 48, generator=g)
    sizes = torch.randint(1, 5, (2, 12, 1), generator=g).float()
    with torch.no_grad():
        torch.testing.assert_close(latent_pool(pool, x), model.head(x), rtol=1e-5, atol=1e-5)  # the façade is the head
        merged = latent_pool(pool, x, sizes)
        for b in range(2):
            dups = torch.repeat_interleave(x[b], sizes[b, :, 0].long(), dim=0)
            torch.testing.assert_close(merged[b], model.head(dups[None])[0], rtol=1e-5, atol=1e-5)
        keep = torch.ones(2, 12, 1)
        keep[:, 5:] = 0  # a zero weight removes a key (the masked training form's dead tokens)
        torch.testing.assert_close(latent_pool(pool, x, keep), model.head(x[:, :5]), rtol=1e-5, atol=1e-5)


def test_tome_pools_with_log_size_and_pruning_pools_what_remains():
    model = vitrim.apply(siglip(), "tome", r=3)
    with torch.no_grad():
        out = model(X)
        tokens, state = vitrim.forward_tokens(model, X)
        expected = latent_pool(SiglipPool(model.head, model.config), out.last_hidden_state, state.size)
        torch.testing.assert_close(out.pooler_output, expected, rtol=0, atol=0)
        assert not torch.allclose(out.pooler_output, model.head(out.last_hidden_state))  # the bias matters
    model = vitrim.apply(siglip(), "evit", **OPTIONS["evit"])
    with torch.no_grad():
        out = model(X)
        assert out.last_hidden_state.shape[1] < 16
        assert torch.equal(out.pooler_output, model.head(out.last_hidden_state))  # the kept tokens, no bias


@pytest.mark.parametrize("name", ["dynamicvit", "dtps"])
def test_masked_training_pools_the_live_tokens(name):
    model = vitrim.apply(siglip(), name, **OPTIONS[name])
    model.train()
    tokens, state = vitrim.forward_tokens(model, X)  # the Gumbel decisions are sampled: one forward
    head = model.forward_head_with_state(tokens, state)
    assert state.policy is not None and state.policy.shape == (2, 16, 1)
    live = state.policy[0, :, 0] > 0
    torch.testing.assert_close(head[0], model.head(tokens[:1, live])[0], rtol=1e-5, atol=1e-5)
    head.sum().backward()
    assert all(p.grad is not None for p in model.vitrim.predictors.parameters())


def test_classifier_mean_is_size_weighted():
    model = vitrim.apply(siglip("cls"), "tome", r=3)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, X)
        mean = (tokens * state.size).sum(1) / state.size.sum(1)
        assert not torch.allclose(mean, tokens.mean(1))
        torch.testing.assert_close(model(X).logits, model.classifier(mean))
        labels = torch.tensor([0, 3])
        assert model(X, labels=labels).loss.ndim == 0


@pytest.mark.parametrize("name", METHODS)
def test_batch_independence(name):
    model = vitrim.apply(siglip("cls"), name, **OPTIONS[name])
    with torch.no_grad():
        both, alone = model(X).logits, model(X[1:]).logits
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_other_sizes_interpolate_positions():
    model, plain = siglip(), siglip()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = plain(x, interpolate_pos_encoding=True).last_hidden_state
        vitrim.apply(model, "tome", r=0)
        assert torch.equal(model(x, interpolate_pos_encoding=True).last_hidden_state, ref)
        assert torch.equal(model(x).last_hidden_state, ref)  # not said: interpolated, as the size is not the model's
        vitrim.update(model, r=5)
        assert model(torch.randn(1, 3, 48, 40)).last_hidden_state.shape == (1, 30 - 4 * 5, 48)
    assert vitrim.flops(model, (48, 40)) < vitrim.flops(plain, (48, 40))


def test_compiles_as_one_graph():
    torch._dynamo.reset()
    model = vitrim.apply(siglip(), "tome", r=3)  # the pool with log(size) on its keys inside the graph
    explained = torch._dynamo.explain(lambda x: model(x).pooler_output)(X)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()


# ---------------------------------------------------------------------- refusals
def test_inputs_a_reduced_model_cannot_honour_are_refused():
    model = vitrim.apply(siglip(), "tome", r=2)
    with pytest.raises(vitrim.VitrimError, match="output_attentions"):
        model(X, output_attentions=True)
    with pytest.raises(vitrim.VitrimError, match="attention_mask"):
        model(X, attention_mask=torch.ones(2, 16))
    with pytest.raises(TypeError, match="pixel_attention_mask"):
        model(X, pixel_attention_mask=torch.ones(2, 16))


def test_siglip2_is_refused():
    cfg = transformers.Siglip2VisionConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                           intermediate_size=96, patch_size=8, num_patches=16)
    with pytest.raises(vitrim.UnsupportedModelError, match="NaFlex.*vit_\\*_siglip_\\*"):
        vitrim.apply(transformers.Siglip2VisionModel(cfg), "tome", r=1)


def test_dual_tower_is_refused_with_the_vision_tower_named():
    torch.manual_seed(0)
    model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=SHAPE, text_config=TEXT))
    with pytest.raises(vitrim.UnsupportedModelError, match="model.vision_model"):
        vitrim.apply(model, "tome", r=1)
    vitrim.apply(model.vision_model, "tome", r=2)  # what the message says works
    assert model.get_image_features(pixel_values=X).pooler_output.shape == (2, 48)


def test_pool_head_vitrim_cannot_bias_is_refused():
    model = siglip()
    model.head.attention.add_zero_attn = True
    with pytest.raises(vitrim.UnsupportedModelError, match="attention-pool head"):
        vitrim.apply(model, "tome", r=1)


# ---------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    siglip().save_pretrained(root / "vision")
    siglip("cls").save_pretrained(root / "cls")
    return root


@pytest.mark.parametrize("which", ["vision", "cls"])
def test_cli(which, folders, tmp_path, capsys):
    check_cli_on_folder(f"hf:{folders / which}", 3, tmp_path, classifier=which == "cls")
    out = capsys.readouterr()
    assert "traced" in out.out and "speedup" in out.out
    assert ("training step" in out.out) == (which == "cls")
    if which == "vision":  # no head: bench --train says why it cannot time a training step
        assert "needs class logits, but the model returns BaseModelOutputWithPooling" in out.err
