"""Hugging Face DINOv2 (with and without registers, base and classifier) under every method: zero
reduction bit-identical (SDPA and eager), hidden states follow the reduction, the classifier's patch
mean weighted by token sizes, FLOPs against FlopCounterMode, remove, refusals (DINOv3, backbones)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitrim  # noqa: E402
from test_compile_methods import reduced_options, zero_options  # noqa: E402
from conftest import assert_traced_matches_analytic  # noqa: E402

METHODS = vitrim.methods()
SHAPE = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=2)


def dino(kind: str = "base", registers: int = 0, attn: str = "sdpa", seed: int = 0, **kw):
    torch.manual_seed(seed)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(**SHAPE, num_register_tokens=registers, attn_implementation=attn, **kw)
        cls = (transformers.Dinov2WithRegistersModel if kind == "base"
               else transformers.Dinov2WithRegistersForImageClassification)
    else:
        cfg = transformers.Dinov2Config(**SHAPE, attn_implementation=attn, **kw)
        cls = transformers.Dinov2Model if kind == "base" else transformers.Dinov2ForImageClassification
    if kind != "base":
        cfg.num_labels = 5
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind,registers,extra", [("base", 0, {}), ("cls", 2, {}), ("cls", 0, {"use_swiglu_ffn": True})])
@pytest.mark.parametrize("name", METHODS)
def test_zero_reduction_is_bit_identical(name, kind, registers, extra, attn, images):
    model = dino(kind, registers, attn, **extra)
    with torch.no_grad():
        ref = model(images, output_hidden_states=True)
        vitrim.apply(model, name, **zero_options(name))
        out = model(images, output_hidden_states=True)
    assert type(out) is type(ref)
    first = "last_hidden_state" if kind == "base" else "logits"
    assert torch.equal(getattr(out, first), getattr(ref, first))
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))


@pytest.mark.parametrize("name", METHODS)
def test_reduced_forward_hidden_states_and_head(name, images):
    model = dino("cls", registers=2)
    plain = dino("cls", registers=2)
    vitrim.apply(model, name, **reduced_options(name))
    with torch.no_grad():
        out = model(images, output_hidden_states=True)
        head, state = vitrim.forward_with_state(model, images)
        tokens, _ = vitrim.forward_tokens(model, images)
    counts = [h.shape[1] for h in out.hidden_states]
    assert counts[0] == 3 + 64 and out.hidden_states[-1].shape[1] == tokens.shape[1]
    assert name == "idle" or counts[-1] < counts[0]
    torch.testing.assert_close(head, out.logits)
    assert vitrim.flops(model) < vitrim.flops(plain)


def test_classifier_patch_mean_is_size_weighted(images):
    """ToMe's logits equal the classifier applied to [class token, size-weighted mean of the patch tokens]."""
    model = vitrim.apply(dino("cls", registers=2), "tome", r=6)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, images)
        logits = model(images).logits
        w = state.size[:, 3:]
        mean = (tokens[:, 3:] * w).sum(1) / w.sum(1)
        expected = model.classifier(torch.cat([tokens[:, 0], mean], dim=1))
        assert not torch.allclose(mean, tokens[:, 3:].mean(1))  # the weights matter
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("name", ["tome", "evit", "idle"])
def test_flops_match_flop_counter(name):
    model = dino("cls", registers=1, attn="eager")
    assert vitrim.traced_flops(model) == pytest.approx(vitrim.flops(model), rel=0.01)
    vitrim.apply(model, name, **reduced_options(name))
    assert_traced_matches_analytic(model, 48)


def test_other_sizes_interpolate_and_remove_restores():
    model = dino("base")
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        vitrim.apply(model, "tome", r=5)
        out = model(x).last_hidden_state
        assert out.shape == (1, 1 + 12 * 10 - 4 * 5, 48)
        assert vitrim.flops(model, (48, 40)) < vitrim.flops(dino("base"), (48, 40))
        vitrim.remove(model)
        assert type(model) is transformers.Dinov2Model and torch.equal(model(x).last_hidden_state, ref)


def test_refusals(images):
    model = vitrim.apply(dino("base"), "tome", r=2)
    with pytest.raises(vitrim.VitrimError, match="output_attentions"):
        model(images, output_attentions=True)
    with pytest.raises(vitrim.VitrimError, match="attention_mask"):
        model(images, attention_mask=torch.ones(2, 65))
    if hasattr(transformers, "DINOv3ViTModel"):
        cfg = transformers.DINOv3ViTConfig(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2,
                                           num_attention_heads=3, intermediate_size=96)
        with pytest.raises(vitrim.UnsupportedModelError, match="rotary.*vit_\\*_dinov3"):
            vitrim.apply(transformers.DINOv3ViTModel(cfg), "tome", r=1)
    with pytest.raises(vitrim.UnsupportedModelError, match="backbone"):
        vitrim.apply(transformers.Dinov2Backbone(transformers.Dinov2Config(**SHAPE)), "tome", r=1)

    class Custom(transformers.Dinov2Model):
        def forward(self, pixel_values, **kw):
            return super().forward(pixel_values, **kw)

    with pytest.raises(vitrim.UnsupportedModelError, match="overrides"):
        vitrim.apply(Custom(transformers.Dinov2Config(**SHAPE)), "tome", r=1)


def test_masked_positions_and_pickle(images):
    import copy
    model = vitrim.apply(dino("base"), "tome", r=0)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    plain = dino("base")
    with torch.no_grad():
        assert torch.equal(model(images, bool_masked_pos=mask).last_hidden_state,
                           plain(images, bool_masked_pos=mask).last_hidden_state)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(images).last_hidden_state, model(images).last_hidden_state)
