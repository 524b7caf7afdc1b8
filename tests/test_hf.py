"""Hugging Face transformers models (ViT, DeiT with distillation token, CLIP vision tower) under every
registered method: identity at zero reduction, remove restores, live weights, the model's own output
types, FLOPs equal to timm's, and logits equal to the timm model with the same weights."""
import copy
from functools import partial

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import vitrim  # noqa: E402
from test_compile_methods import reduced_options, zero_options  # noqa: E402
from timm.layers import QuickGELU  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

METHODS = vitrim.methods()
FAMILIES = ["vit", "deit", "clip"]
SHAPE = dict(image_size=64, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
             intermediate_size=192)


def hf_model(family: str, attn: str = "sdpa", seed: int = 0, **kw) -> nn.Module:
    """A small random-init HF model: ViT classifier, distilled DeiT (with teacher head), CLIP vision."""
    torch.manual_seed(seed)
    cfg = {**SHAPE, **kw}
    if family == "vit":
        model = transformers.ViTForImageClassification(
            transformers.ViTConfig(**cfg, num_labels=10, layer_norm_eps=1e-6, attn_implementation=attn))
    elif family == "deit":
        model = transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(**cfg, num_labels=10, layer_norm_eps=1e-6, attn_implementation=attn))
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg, attn_implementation=attn))
    return model.eval()


def outputs(out) -> tuple:
    return tuple(out.to_tuple()) if hasattr(out, "to_tuple") else (out,)


def assert_same_outputs(a, b) -> None:
    a, b = outputs(a), outputs(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------- identity, restore, weights
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_zero_reduction_is_bit_identical(name, family, attn, images):
    model = hf_model(family, attn)
    with torch.no_grad():
        ref = model(images)
        vitrim.apply(model, name, **zero_options(name))
        out = model(images)
    assert type(out) is type(ref)
    assert_same_outputs(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_reduced_forward_keeps_output_types(name, family, images):
    model = hf_model(family)
    with torch.no_grad():
        ref = model(images)
        vitrim.apply(model, name, **reduced_options(name))
        out = model(images)
        tokens, state = vitrim.forward_tokens(model, images)
        head, _ = vitrim.forward_with_state(model, images)
    assert type(out) is type(ref)
    first = outputs(out)[0]
    assert first.shape[0] == 2 and not torch.equal(first, outputs(ref)[0])  # it did reduce
    assert tokens.shape[1] < 1 + 64 or name == "idle"
    expected = out.pooler_output if family == "clip" else out.logits
    torch.testing.assert_close(head, expected)
    assert vitrim.flops(model) < vitrim.flops(hf_model(family))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_remove_restores(name, family, images):
    model = hf_model(family)
    cls, keys = type(model), list(model.state_dict())
    trunk = getattr(model, "vit", None) or getattr(model, "deit", None) or model
    trunk_cls = type(trunk)
    with torch.no_grad():
        ref = model(images)
        vitrim.apply(model, name, **reduced_options(name))
        model(images)
        vitrim.remove(model)
        out = model(images)
    assert type(model) is cls and type(trunk) is trunk_cls
    assert not vitrim.is_reduced(model) and not vitrim.is_reduced(trunk)
    assert not any("vitrim" in k for k in trunk.__dict__) and "vitrim" not in model._modules
    assert list(model.state_dict()) == keys
    assert_same_outputs(out, ref)


@pytest.mark.parametrize("name", METHODS)
def test_reduced_model_uses_live_weights(name, images):
    """No copy of a weight can go stale: loading new weights after apply = applying after loading."""
    model = vitrim.apply(hf_model("vit"), name, **reduced_options(name))
    other = hf_model("vit", seed=1)
    model.load_state_dict({**model.state_dict(), **other.state_dict()})
    fresh = vitrim.apply(hf_model("vit", seed=1), name, **reduced_options(name))
    fresh.vitrim.load_state_dict(model.vitrim.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, fresh(images).logits, atol=0, rtol=0)


@pytest.mark.parametrize("cls_name", ["ViTModel", "DeiTModel", "DeiTForImageClassification"])
def test_base_and_single_head_classes(cls_name, images):
    cfg_cls = transformers.ViTConfig if cls_name.startswith("ViT") else transformers.DeiTConfig
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg_cls(**SHAPE)).eval()
    with torch.no_grad():
        ref = model(images)
        vitrim.apply(model, "tome", r=0)
        assert_same_outputs(model(images), ref)
        vitrim.update(model, r=4)
        out = model(images)
        head, _ = vitrim.forward_with_state(model, images)
    prefix = 2 if cls_name.startswith("DeiT") else 1
    first = outputs(out)[0]
    if cls_name.endswith("Model"):
        assert first.shape == (2, prefix + 64 - 4 * 4, 48)  # last_hidden_state after four merging blocks
        torch.testing.assert_close(head, out.pooler_output)
    else:
        torch.testing.assert_close(head, out.logits)
    vitrim.remove(model)
    with torch.no_grad():
        assert_same_outputs(model(images), ref)


def test_state_dict_and_deepcopy(images):
    model = vitrim.apply(hf_model("deit"), "dynamicvit", **reduced_options("dynamicvit"))
    keys = [k for k in model.state_dict() if "vitrim" in k]
    assert keys and all(k.startswith("vitrim.predictors.") for k in keys)  # registered once, on the model
    twin = copy.deepcopy(model)
    assert twin.deit.vitrim is twin.vitrim and twin.vitrim is not model.vitrim
    with torch.no_grad():
        torch.testing.assert_close(twin(images).logits, model(images).logits, atol=0, rtol=0)


def test_hidden_states_return_dict_and_refusals(images):
    model = vitrim.apply(hf_model("vit"), "tome", r=4)
    with torch.no_grad():
        out = model(images, output_hidden_states=True)
        assert [h.shape[1] for h in out.hidden_states] == [65, 61, 57, 53, 49]
        as_tuple = model(images, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    with pytest.raises(vitrim.VitrimError, match="output_attentions"):
        model(images, output_attentions=True)
    with pytest.raises(vitrim.VitrimError, match="head_mask"):  # a tensor: refused, not compared elementwise
        model(images, head_mask=torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads))
    with pytest.raises(vitrim.AlreadyReducedError):
        vitrim.apply(model.vit, "tome", r=1)
    with pytest.raises(vitrim.VitrimError, match="contains it"):
        vitrim.remove(model.vit)


def test_unsupported_models_are_refused():
    cfg = transformers.ViTConfig(**SHAPE)
    with pytest.raises(vitrim.UnsupportedModelError):
        vitrim.apply(transformers.ViTForMaskedImageModeling(cfg), "tome", r=1)

    class Custom(transformers.ViTForImageClassification):
        def forward(self, pixel_values, **kw):
            return super().forward(pixel_values, **kw)

    with pytest.raises(vitrim.UnsupportedModelError, match="overrides"):
        vitrim.apply(Custom(cfg), "tome", r=1)


def test_compiles_without_graph_breaks(images):
    torch._dynamo.reset()
    model = vitrim.apply(hf_model("vit"), "tome", r=4)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(images)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(images).logits, model(images).logits, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------- FLOPs
def test_flops_equal_timm_deit_small():
    """A random-init HF ViT configured as DeiT-S at 224: 4.60 GMACs unreduced, 2.70 with ToMe r = 13."""
    import timm

    with torch.device("meta"):  # shapes only
        hf = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=1000))
        ref = timm.create_model("deit_small_patch16_224")
    assert vitrim.flops(hf) == pytest.approx(4.599, abs=5e-3) and vitrim.flops(hf) == vitrim.flops(ref)
    vitrim.apply(hf, "tome", r=13)
    vitrim.apply(ref, "tome", r=13)
    assert vitrim.flops(hf) == pytest.approx(2.703, abs=5e-3) and vitrim.flops(hf) == vitrim.flops(ref)


@pytest.mark.parametrize("family", ["vit", "deit"])
@pytest.mark.parametrize("name", METHODS)
def test_flops_equal_timm(name, family):
    hf, ref = hf_model(family), timm_twin(family)
    assert vitrim.flops(hf) == vitrim.flops(ref)
    vitrim.apply(hf, name, **reduced_options(name))
    vitrim.apply(ref, name, **reduced_options(name))
    assert vitrim.flops(hf) == vitrim.flops(ref) < vitrim.flops(timm_twin(family))


# ---------------------------------------------------------------------- same logits as timm
def timm_twin(family: str) -> nn.Module:
    """The timm model with the shapes of ``hf_model(family)`` (random weights)."""
    kw = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, mlp_ratio=4.0)
    if family == "vit":
        return VisionTransformer(**kw, num_classes=10).eval()
    if family == "deit":
        return VisionTransformerDistilled(**kw, num_classes=10).eval()
    return VisionTransformer(**kw, num_classes=0, pre_norm=True, act_layer=QuickGELU,
                             norm_layer=partial(nn.LayerNorm, eps=1e-5)).eval()


def _hf_layer_modules(layer: nn.Module) -> dict:
    """The HF layer's linears and norms, whatever the transformers version's layout."""
    if hasattr(layer, "self_attn"):  # CLIP
        a = layer.self_attn
        return dict(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.out_proj, n1=layer.layer_norm1, n2=layer.layer_norm2,
                    fc1=layer.mlp.fc1, fc2=layer.mlp.fc2)
    if hasattr(layer.attention, "q_proj"):  # transformers 5.x ViT / DeiT
        a = layer.attention
        return dict(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj, n1=layer.layernorm_before,
                    n2=layer.layernorm_after, fc1=layer.mlp.fc1, fc2=layer.mlp.fc2)
    a = layer.attention.attention  # transformers 4.x
    return dict(q=a.query, k=a.key, v=a.value, o=layer.attention.output.dense, n1=layer.layernorm_before,
                n2=layer.layernorm_after, fc1=layer.intermediate.dense, fc2=layer.output.dense)


@torch.no_grad()
def copy_timm_into_hf(src: nn.Module, hf: nn.Module, family: str) -> None:
    """Write the timm model's weights into the HF model (the test's own conversion)."""
    trunk = getattr(hf, "vit", None) or getattr(hf, "deit", None) or getattr(hf, "vision_model", None) or hf
    emb = trunk.embeddings
    layers = trunk.encoder.layers if family == "clip" else getattr(trunk, "layers", None) or trunk.encoder.layer
    if family == "clip":
        emb.patch_embedding.weight.copy_(src.patch_embed.proj.weight)
        emb.class_embedding.copy_(src.cls_token.reshape(-1))
        emb.position_embedding.weight.copy_(src.pos_embed[0])
        trunk.pre_layrnorm.load_state_dict(src.norm_pre.state_dict())
        trunk.post_layernorm.load_state_dict(src.norm.state_dict())
    else:
        emb.patch_embeddings.projection.load_state_dict(src.patch_embed.proj.state_dict())
        emb.cls_token.copy_(src.cls_token)
        emb.position_embeddings.copy_(src.pos_embed)
        if family == "deit":
            emb.distillation_token.copy_(src.dist_token)
            hf.cls_classifier.load_state_dict(src.head.state_dict())
            hf.distillation_classifier.load_state_dict(src.head_dist.state_dict())
        else:
            hf.classifier.load_state_dict(src.head.state_dict())
        trunk.layernorm.load_state_dict(src.norm.state_dict())
    for block, layer in zip(src.blocks, layers):
        parts = _hf_layer_modules(layer)
        for i, key in enumerate("qkv"):
            rows = slice(i * 48, (i + 1) * 48)
            parts[key].weight.copy_(block.attn.qkv.weight[rows])
            parts[key].bias.copy_(block.attn.qkv.bias[rows])
        for key, module in (("o", block.attn.proj), ("n1", block.norm1), ("n2", block.norm2),
                            ("fc1", block.mlp.fc1), ("fc2", block.mlp.fc2)):
            parts[key].load_state_dict(module.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_logits_equal_timm_with_same_weights(name, family, images):
    src = timm_twin(family)
    hf = hf_model(family)
    copy_timm_into_hf(src, hf, family)
    with torch.no_grad():
        hf_out = outputs(hf(images))
        torch.testing.assert_close(hf_out[1] if family == "clip" else hf_out[0], src(images), atol=1e-5, rtol=1e-5)
        vitrim.apply(src, name, **reduced_options(name))
        vitrim.apply(hf, name, **reduced_options(name))
        hf.vitrim.load_state_dict(src.vitrim.state_dict())  # learned predictors (DynamicViT, dTPS)
        hf_out, ref = outputs(hf(images)), src(images)
        tokens, _ = vitrim.forward_tokens(hf, images)
        ref_tokens, _ = vitrim.forward_tokens(src, images)
    torch.testing.assert_close(hf_out[1] if family == "clip" else hf_out[0], ref, atol=1e-5, rtol=1e-5)
    if family != "clip":  # CLIP returns its tokens before the final norm
        torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
