"""ToMe on timm ViTs: identity, removal, trajectories, prefix tokens, pooling, attention (tome.md §17)."""
import copy

import pytest
import timm
import torch
from timm.layers import Attention

import vitrim
from vitrim.ops.attention import attention_with_key_bias, attend, log_size_bias, project, split_qkv
from conftest import record_token_counts, small_vit

X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "init_values": 1e-2}, {"class_token": False, "global_pool": "avg"},
                                {"reg_tokens": 3}, {"no_embed_class": True, "reg_tokens": 1}])
def test_r0_and_remove_are_identity(fused, kw):
    model = small_vit(fused=fused, **kw)
    with torch.no_grad():
        ref = model(X)
        vitrim.apply(model, "tome", r=0)
        assert torch.equal(model(X), ref)
        vitrim.update(model, r=[0, 0])
        assert torch.equal(model(X), ref)
        vitrim.update(model, r=5)
        assert not torch.allclose(model(X), ref)
        vitrim.remove(model)
        assert type(model) is timm.models.vision_transformer.VisionTransformer
        assert not hasattr(model, "vitrim")
        assert torch.equal(model(X), ref)


def test_state_dict_unchanged_by_apply():
    model = small_vit()
    keys = list(model.state_dict())
    vitrim.apply(model, "tome", r=4)
    assert list(model.state_dict()) == keys
    other = small_vit(seed=5)
    model.load_state_dict(other.state_dict())  # checkpoints load before or after apply


def test_distilled_deit_keeps_cls_and_dist():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, num_classes=10).eval()
    vitrim.apply(model, "tome", r=8, trace_source=True)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, X)
        out = model(X)
    assert out.shape == (3, 10)
    assert tokens.shape[1] == vitrim.get_method(model).final_tokens(66) == 3  # 12 blocks clamp down to 2 + 1
    size = state.size[..., 0]
    assert torch.equal(size[:, :2], torch.ones(3, 2))
    src = state.source
    assert torch.equal(src[:, 0, 0], torch.ones(3)) and torch.equal(src[:, 1, 1], torch.ones(3))
    assert src[:, 0].sum().item() == 3 and src[:, 1].sum().item() == 3


def test_register_tokens_stay_first_in_order():
    model = small_vit(reg_tokens=4)
    vitrim.apply(model, "tome", r=10, trace_source=True)
    with torch.no_grad():
        _, state = vitrim.forward_tokens(model, X)
    k = model.num_prefix_tokens
    assert k == 5
    eye = torch.eye(state.source.shape[-1])[:k]
    assert torch.equal(state.source[:, :k], eye.expand(3, k, -1))
    assert torch.equal(state.size[:, :k, 0], torch.ones(3, k))


def test_sizes_conserved_and_integer():
    model = small_vit(depth=6)
    vitrim.apply(model, "tome", r=(6, -1))
    with torch.no_grad():
        _, state = vitrim.forward_tokens(model, X)
    s = state.size[..., 0]
    assert torch.equal(s, s.round()) and (s >= 1).all()
    assert s.sum(1).tolist() == [65.0] * 3


@pytest.mark.parametrize("r,expected_final,trajectory", [
    (13, 41, [197, 184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54]),
    (16, 11, [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]),
    ((16, -1), 10, [197, 165, 136, 110, 87, 67, 50, 36, 25, 17, 12, 10]),
])
def test_trajectories_recorded_by_blocks(r, expected_final, trajectory):
    # width does not change token counts: a narrow 12-block ViT at 224 px has the DeiT/ViT-B trajectories
    model = small_vit(img_size=224, patch_size=16, embed_dim=24, depth=12, num_heads=2)
    vitrim.apply(model, "tome", r=r)
    counts, _ = record_token_counts(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert counts["attn"] == trajectory
    assert counts["mlp"][-1] == expected_final
    assert [b.mlp for b in vitrim.get_method(model).block_tokens(197)] == counts["mlp"]


def test_distilled_trajectory_ends_at_42():
    model = timm.create_model("deit_tiny_distilled_patch16_224", embed_dim=24, num_heads=2).eval()
    vitrim.apply(model, "tome", r=13)
    counts, _ = record_token_counts(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert counts["attn"][0] == 198 and counts["mlp"][-1] == 42


def test_avg_pool_is_size_weighted():
    model = small_vit(class_token=False, global_pool="avg", depth=3)
    vitrim.apply(model, "tome", r=12)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, X)
        w = state.size
        pooled = (tokens * w).sum(1) / w.sum(1)
        expected = model.head(model.fc_norm(pooled))
        torch.testing.assert_close(model(X), expected)
        assert state.size.sum(1).flatten().tolist() == [64.0] * 3


@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_equals_duplication(fused):
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2).eval()
    attn.fused_attn = fused
    x = torch.randn(1, 5, 16)
    size = torch.tensor([1.0, 3.0, 2.0, 1.0, 4.0]).view(1, 5, 1)
    with torch.no_grad():
        out, _ = attention_with_key_bias(attn, x, log_size_bias(size))
        q, k, v = split_qkv(attn, x)
        reps = size.flatten().long()
        k_dup, v_dup = k.repeat_interleave(reps, dim=2), v.repeat_interleave(reps, dim=2)
        attn.fused_attn = False
        dup = project(attn, attend(attn, q, k_dup, v_dup), x)
    torch.testing.assert_close(out, dup, atol=1e-5, rtol=1e-5)


def test_fused_and_explicit_paths_agree():
    model_f, model_e = small_vit(fused=True), small_vit(fused=False)
    for m in (model_f, model_e):
        vitrim.apply(m, "tome", r=9)
    with torch.no_grad():
        torch.testing.assert_close(model_f(X), model_e(X), atol=1e-5, rtol=1e-5)


def test_results_do_not_depend_on_the_batch():
    model = vitrim.apply(small_vit(), "tome", r=9)
    with torch.no_grad():
        together = model(X)
        alone = torch.cat([model(X[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_dynamic_image_size():
    model = vitrim.apply(small_vit(dynamic_img_size=True), "tome", r=6)
    counts, _ = record_token_counts(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 80))
    assert out.shape == (2, 10)
    assert counts["attn"][0] == 1 + 6 * 10
    assert round(vitrim.flops(model, img_size=(48, 80)) * 1e9) == vitrim.flops_report(model, (48, 80)).macs


def test_training_forward_backward():
    model = small_vit(drop_path_rate=0.1, attn_drop_rate=0.1, init_values=0.1)
    vitrim.apply(model, "tome", r=8).train()
    loss = model(X).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gradient_checkpointing():
    model = vitrim.apply(small_vit(), "tome", r=8)
    ref = copy.deepcopy(model).train()
    model.set_grad_checkpointing(True)
    model.train()
    torch.manual_seed(0)
    out = model(X)
    out.sum().backward()
    torch.manual_seed(0)
    ref_out = ref(X)
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, ref.blocks[0].attn.qkv.weight.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_outputs_are_finite(dtype):
    model = vitrim.apply(small_vit(), "tome", r=9)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(X)
    assert torch.isfinite(out.float()).all()
    half = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        assert torch.isfinite(half(X.to(dtype)).float()).all()


def test_trace_source_and_grid():
    model = vitrim.apply(small_vit(), "tome", r=9, trace_source=True)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, X)
    source = vitrim.get_method(model).source
    assert source is state.source and source.shape == (3, tokens.shape[1], 65)
    grid = vitrim.source_to_grid(source, (8, 8), model.num_prefix_tokens)
    assert grid.shape == (3, 8, 8) and int(grid.max()) < tokens.shape[1] and int(grid.min()) >= 1
    from vitrim.visual import tokens_to_grid
    dense = tokens_to_grid(tokens, source, (8, 8), 1)
    assert dense.shape == (3, 8, 8, tokens.shape[-1])
    assert torch.equal(dense[0, 0, 0], tokens[0, grid[0, 0, 0]])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_class_attention_without_full_matrix(qk_norm):
    from vitrim.ops.attention import class_attention_logits, class_attention_scores
    torch.manual_seed(0)
    attn = Attention(24, num_heads=3, qk_norm=qk_norm, qkv_bias=True, norm_layer=torch.nn.LayerNorm).eval()
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        q, k, v = split_qkv(attn, x)
        full = (q * attn.scale) @ k.transpose(-2, -1)  # [B, H, T, T]
        torch.testing.assert_close(class_attention_logits(attn, x), full[:, :, 0])
        torch.testing.assert_close(class_attention_logits(attn, x, k=k), full[:, :, 0])
        torch.testing.assert_close(class_attention_scores(attn, x), full.softmax(-1)[:, :, 0].mean(1))
