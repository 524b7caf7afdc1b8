"""LV-ViT: registration, the released key set, the output rule, methods' defaults and token sets, FLOPs."""
import math

import pytest
import timm
import torch

import vitrim
from vitrim.adapters import get_adapter
from vitrim.lvvit import LVViT
from vitrim.models import create_model, load_checkpoint


def _small(**kw):
    """A 16-block LV-ViT-S layout at width 48 (fast), 224 px so the papers' counts hold."""
    args = dict(embed_dim=48, num_heads=2, num_classes=7)
    args.update(kw)
    return timm.create_model("lvvit_s", **args).eval()


def _randomise_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _released_keys(depth, stem=64):
    keys = ["cls_token", "pos_embed", "patch_embed.conv1.weight"]
    for i in (1, 2, 3):
        if i > 1:
            keys.append(f"patch_embed.conv{i}.weight")
        keys += [f"patch_embed.bn{i}.{n}" for n in ("weight", "bias", "running_mean", "running_var",
                                                   "num_batches_tracked")]
    keys += ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    for b in range(depth):
        keys += [f"blocks.{b}.{n}" for n in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight",
                                            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                                            "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    return keys + ["norm.weight", "norm.bias", "head.weight", "head.bias", "aux_head.weight", "aux_head.bias"]


@pytest.mark.parametrize("name,depth,params", [("lvvit_t", 12, 8_534_720), ("lvvit_s", 16, 26_151_824),
                                               ("lvvit_m", 20, 55_830_544)])
def test_registration_keys_and_parameter_counts(name, depth, params):
    model = timm.create_model(name)
    sd = model.state_dict()
    assert sorted(sd) == sorted(_released_keys(depth))
    assert len(sd) == {12: 160, 16: 204, 20: 248}[depth]
    assert not any(k.endswith("qkv.bias") for k in sd)
    assert sum(p.numel() for p in model.parameters()) == params


def test_lvvit_l_defaults_to_448_and_counts():
    cfg = timm.models.get_pretrained_cfg("lvvit_l")
    assert cfg.input_size == (3, 448, 448)
    model = timm.create_model("lvvit_l", img_size=224)
    assert sum(p.numel() for p in model.parameters()) == 150_021_968


def test_shapes_of_released_keys_s():
    sd = timm.create_model("lvvit_s").state_dict()
    assert sd["pos_embed"].shape == (1, 197, 384)
    assert sd["patch_embed.conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["patch_embed.proj.weight"].shape == (384, 64, 8, 8)
    assert sd["blocks.3.attn.qkv.weight"].shape == (1152, 384)
    assert sd["blocks.3.mlp.fc1.weight"].shape == (1152, 384)
    assert sd["aux_head.weight"].shape == (1000, 384)


@pytest.mark.parametrize("wrap", ["flat", "flat_no_nbt", "model", "state_dict", "module"])
def test_strict_loading_of_the_released_layout(tmp_path, wrap):
    src = _randomise_bn(_small())
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    if wrap == "flat_no_nbt":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        dst = _small()
        dst.load_state_dict(sd, strict=True)
    else:
        saved = {"flat": sd, "model": {"model": sd}, "state_dict": {"state_dict": sd},
                 "module": {f"module.{k}": v for k, v in sd.items()}}[wrap]
        path = tmp_path / "ckpt.pth"
        torch.save(saved, path)
        dst = load_checkpoint(_small(), str(path))
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked") or wrap != "flat_no_nbt":
            assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_checkpoint_option_and_pretrained_file(tmp_path):
    src = _randomise_bn(_small(num_classes=1000))
    path = tmp_path / "lvvit.pth"
    torch.save(src.state_dict(), path)
    a = create_model("lvvit_s", checkpoint=str(path), embed_dim=48, num_heads=2).eval()
    b = timm.create_model("lvvit_s", pretrained=True, embed_dim=48, num_heads=2,
                          pretrained_cfg_overlay={"file": str(path)}).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = src(x)
        assert torch.equal(a(x), ref) and torch.equal(b(x), ref)


def test_pretrained_cfgs():
    for name, crop in [("lvvit_t", 0.9), ("lvvit_s", 0.9), ("lvvit_m", 1.0)]:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.crop_pct == crop and cfg.interpolation == "bicubic"
        assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
        assert cfg.url.startswith("https://github.com/zihangJiang/TokenLabeling/releases/download/")
        assert cfg.first_conv == "patch_embed.conv1"


def test_numerics_eps_skip_lam_and_batch_independence():
    model = _randomise_bn(_small())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    assert all(b.ls1(torch.ones(1)).item() == 0.5 and b.ls2(torch.ones(1)).item() == 0.5 for b in model.blocks)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)
    # branches divided by 2: one block by hand
    blk = model.blocks[0]
    t = torch.randn(1, 197, 48)
    with torch.no_grad():
        y = t + blk.attn(blk.norm1(t)) / 2
        assert torch.allclose(blk(t), y + blk.mlp(blk.norm2(y)) / 2, atol=1e-6)


def test_token_order_is_row_major():
    stem = _small().patch_embed
    x = torch.zeros(1, 3, 224, 224)
    x[..., 16:32, 48:64] = 5.0  # patch at row 1, column 3
    with torch.no_grad():
        base, hit = stem(torch.zeros_like(x)), stem(x)
    changed = (hit - base).abs().sum(-1)[0]
    assert changed.argmax().item() == 1 * 14 + 3


def test_output_rule_and_reset_classifier():
    model = _randomise_bn(_small())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        t = model.forward_features(x)
        want = model.head(t[:, 0]) + 0.5 * model.aux_head(t[:, 1:]).max(dim=1).values
        assert torch.allclose(model(x), want, atol=1e-6)
        assert torch.equal(model.forward_head(t, pre_logits=True), t[:, 0])
    model.reset_classifier(10)
    assert model.head.out_features == model.aux_head.out_features == 10
    assert model(x).shape == (2, 10)
    model.reset_classifier(0)
    assert model(x).shape == (2, 48)


def test_adapter_family_and_refusals():
    model = _small()
    assert get_adapter(model).family == "lvvit"
    model.patch_embed = timm.layers.PatchEmbed(224, 16, 3, 48)
    with pytest.raises(vitrim.UnsupportedModelError):
        get_adapter(model)


def _aux_rows(model, x):
    seen = []
    handle = model.aux_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    return out, seen[-1]


def test_keep_one_is_identity():
    model = _randomise_bn(_small())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
    for method, kw in [("dynamicvit", dict(keep_rate=1.0, locations=(4, 8, 12))), ("idle", dict(keep_rate=1.0))]:
        vitrim.apply(model, method, **kw)
        with torch.no_grad():
            assert torch.equal(model(x), ref), method
        vitrim.remove(model)


@pytest.mark.parametrize("rate,kept", [(0.7, (137, 96, 67)), (0.5, (98, 49, 24))])
def test_dynamicvit_defaults_counts_and_aux_tokens(rate, kept):
    model = _small()
    vitrim.apply(model, "dynamicvit", keep_rate=rate)
    assert model.vitrim.locations == (4, 8, 12)
    lengths = [t.q for t in model.vitrim.block_tokens(197)]
    assert lengths == [197] * 4 + [kept[0] + 1] * 4 + [kept[1] + 1] * 4 + [kept[2] + 1] * 4
    scored = []
    hooks = [p.register_forward_hook(lambda m, i, o: scored.append(o.shape[1])) for p in model.vitrim.predictors]
    out, rows = _aux_rows(model, torch.randn(2, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert rows == kept[2]
    assert scored == [196, kept[0], kept[1]]  # the predictors score the patch tokens entering each stage
    # the output rule on the kept tokens
    with torch.no_grad():
        t, _ = vitrim.forward_tokens(model, torch.randn(1, 3, 224, 224))
    assert t.shape[1] == kept[2] + 1


def test_default_locations_m_and_deit():
    m = timm.create_model("lvvit_m", embed_dim=64, num_heads=2, num_classes=5)
    for method in ("dynamicvit", "dtps", "etps", "evit"):
        vitrim.apply(m, method)
        assert m.vitrim.locations == (5, 10, 15), method
        vitrim.remove(m)
    vitrim.apply(m, "dynamicvit", keep_rate=0.7)
    assert [t.q for t in m.vitrim.block_tokens(197)] == [197] * 5 + [138] * 5 + [97] * 5 + [68] * 5
    vitrim.remove(m)
    vitrim.apply(m, "idle", keep_rate=0.7)
    assert m.vitrim.layers == tuple(range(5, 20))
    assert [m.vitrim.keep(i, 196) for i in range(5, 20)] == [137] * 5 + [96] * 5 + [67] * 5
    assert all(t.tokens_out == 197 for t in m.vitrim.block_tokens(197))
    deit = timm.create_model("deit_tiny_patch16_224")
    vitrim.apply(deit, "dynamicvit")
    assert deit.vitrim.locations == (3, 6, 9)


@pytest.mark.parametrize("rate,ks", [(0.7, [137] * 4 + [96] * 4 + [67] * 4), (0.5, [98] * 4 + [49] * 4 + [24] * 4)])
def test_idle_defaults_and_all_tokens_at_the_aux_head(rate, ks):
    model = _small()
    vitrim.apply(model, "idle", keep_rate=rate)
    assert model.vitrim.layers == tuple(range(4, 16))
    assert [model.vitrim.keep(i, 196) for i in range(4, 16)] == ks
    assert all(t.tokens_out == 197 for t in model.vitrim.block_tokens(197))
    out, rows = _aux_rows(model, torch.randn(2, 3, 224, 224))
    assert rows == 196


def test_tome_and_evit_aux_sees_every_final_non_prefix_token():
    model = _small()
    for method, kw in [("tome", dict(r=8)), ("evit", dict(keep_rate=0.7)), ("dtps", dict(keep_rate=0.5))]:
        vitrim.apply(model, method, **kw)
        final = model.vitrim.block_tokens(197)[-1].tokens_out
        _, rows = _aux_rows(model, torch.randn(1, 3, 224, 224))
        assert rows == final - 1, method
        vitrim.remove(model)


def test_reduced_batch_independence():
    model = _randomise_bn(_small())
    x = torch.randn(3, 3, 224, 224)
    for method, kw in [("dynamicvit", dict(keep_rate=0.7)), ("idle", dict(keep_rate=0.7)), ("dtps", dict(keep_rate=0.5)),
                       ("etps", dict(keep_rate=0.5)), ("evit", dict(keep_rate=0.7)), ("tome", dict(r=8))]:
        vitrim.apply(model, method, **kw)
        with torch.no_grad():
            assert torch.allclose(model(x)[1:2], model(x[1:2]), atol=1e-5), method
        vitrim.remove(model)


def test_masked_training_excludes_dropped_tokens_from_the_aux_max():
    model = _small()
    vitrim.apply(model, "dynamicvit", keep_rate=0.5)
    model.train()
    x = torch.randn(2, 3, 224, 224)
    t, state = vitrim.forward_tokens(model, x)
    out = model.forward_head_with_state(t, state)
    keep = model.vitrim.pool_weights(state)[:, 1:]  # [B, 196, 1], 0 = dropped
    aux = model.aux_head(t[:, 1:]).masked_fill(keep <= 0, float("-inf")).max(dim=1).values
    assert torch.allclose(out, model.head(t[:, 0]) + 0.5 * aux, atol=1e-6)
    assert (keep[0] <= 0).any()


@pytest.mark.parametrize("name,method,kw,want", [
    ("lvvit_s", None, {}, 6.551), ("lvvit_m", None, {}, 12.678),
    ("lvvit_s", "dynamicvit", dict(keep_rate=0.7), 4.650), ("lvvit_s", "dynamicvit", dict(keep_rate=0.5), 3.790),
    ("lvvit_m", "dynamicvit", dict(keep_rate=0.7), 8.593),
    ("lvvit_s", "idle", dict(keep_rate=0.7), 4.769), ("lvvit_s", "idle", dict(keep_rate=0.5), 4.023),
    ("lvvit_m", "idle", dict(keep_rate=0.7), 8.859),
    ("lvvit_s", "dtps", dict(keep_rate=0.5, locations=(4, 8, 12)), 3.800),
])
def test_flops_protocol_convention(name, method, kw, want):
    model = timm.create_model(name)
    if method:
        vitrim.apply(model, method, **kw)
    assert abs(vitrim.flops(model) - want) < 0.01


@pytest.mark.parametrize("method,kw", [(None, {}), ("dynamicvit", dict(keep_rate=0.7)), ("idle", dict(keep_rate=0.5)),
                                       ("dtps", dict(keep_rate=0.5))])
def test_traced_flops_match_analytic(method, kw):
    model = timm.create_model("lvvit_s", embed_dim=96, num_heads=2)
    saved = 0
    if method:
        vitrim.apply(model, method, **kw)
    if method == "idle":  # the executed ranking uses W_k^T q_cls: (T - S - 1) C^2 fewer MACs per idle layer
        saved = sum((197 - l.tokens_in - 1) * 96 * 96 for l in vitrim.flops_report(model).layers if l.tokens_in < 197)
    assert math.isclose(vitrim.traced_flops(model), vitrim.flops(model) - saved / 1e9, abs_tol=0.001)


@pytest.mark.parametrize("name,method,kw,want", [
    ("lvvit_s", None, {}, 6.572), ("lvvit_m", None, {}, 12.738),
    ("lvvit_s", "dynamicvit", dict(keep_rate=0.7), 4.576), ("lvvit_s", "dynamicvit", dict(keep_rate=0.5), 3.739),
    ("lvvit_m", "dynamicvit", dict(keep_rate=0.7), 8.467), ("lvvit_s", "idle", dict(keep_rate=0.7), 4.749),
])
def test_flops_paper_convention(name, method, kw, want):
    model = timm.create_model(name)
    if method:
        vitrim.apply(model, method, **kw)
    assert abs(get_adapter(model).paper_gmacs((224, 224), getattr(model, "vitrim", None)) - want) < 0.001


def test_cli_flops_paper_convention(capsys):
    from vitrim.cli import main
    assert main(["flops", "--model", "lvvit_s", "--method", "dynamicvit", "--keep-rate", "0.7",
                 "--convention", "paper", "--json"]) == 0
    import json
    out = json.loads(capsys.readouterr().out)
    assert abs(out["paper_gmacs"] - 4.576) < 0.001 and abs(out["unreduced_paper_gmacs"] - 6.572) < 0.001
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--convention", "paper"]) != 0
    assert "no separate publication FLOPs convention" in capsys.readouterr().err


def test_dynamicvit_lvvit_token_kl_vector():
    from vitrim.losses.pruning import token_distillation
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    got = token_distillation(student, teacher, torch.tensor([[1.0, 0.0]]), mode="kl")
    assert math.isclose(got.item(), 0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs_tol=1e-6)
    assert math.isclose(got.item(), 0.130812, abs_tol=1e-6)
    assert token_distillation(student, student.clone(), None, mode="kl").item() == 0.0


def test_idlevit_lvvit_feature_loss_vector():
    from vitrim.losses.idle import idle_feature_loss
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    ones = torch.ones(1, 2, 1)
    assert math.isclose(idle_feature_loss(student, teacher, ones).item(), 0.5, abs_tol=1e-6)
    assert math.isclose(idle_feature_loss(student, teacher, ones, normalize="tokens").item(),
                        1 - 1 / math.sqrt(2), abs_tol=1e-6)
    # a masked-out token does not count
    masked = idle_feature_loss(student, teacher, torch.tensor([[[1.0], [0.0]]]))
    assert math.isclose(masked.item(), 2 / 4, abs_tol=1e-6)


def test_aux_logits_for_losses_through_the_reduced_model():
    model = _small()
    vitrim.apply(model, "dynamicvit", keep_rate=0.7)
    model.train()
    t, state = vitrim.forward_tokens(model, torch.randn(2, 3, 224, 224))
    cls_out, aux_out = model.forward_aux(t)
    assert cls_out.shape == (2, 7) and aux_out.shape == (2, 196, 7)  # masked form: every position
