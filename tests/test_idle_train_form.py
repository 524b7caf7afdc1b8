"""IdleViT's training form (selected rows only, all rows' logits) equals the masked form: loss and gradients."""
import copy

import pytest
import timm
import torch

import vitrim
import importlib
from vitrim.losses.idle import token_cut_loss
from vitrim.ops.idle import idle_block_masked, idle_block_train

idle_method = importlib.import_module("vitrim.methods.idle")  # vitrim.methods is also a function


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("qk_norm", [False, True])
def test_block_train_form_equals_masked(qk_norm):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, qk_norm=qk_norm)
    block = m.blocks[1].train()
    x0 = torch.randn(3, 17, m.embed_dim)
    results = []
    for form in (idle_block_masked, idle_block_train):
        block.zero_grad()
        x = x0.clone().requires_grad_(True)
        out, index, mask, logits = form(block, x, 9, 1)
        loss = (out.sin() ** 2).mean() + token_cut_loss(logits, mask)
        loss.backward()
        results.append((loss.detach(), out.detach(), index, mask, logits.detach(), x.grad, _grads(block)))
    (la, oa, ia, ma, ga, xa, pa), (lb, ob, ib, mb, gb, xb, pb) = results
    assert torch.equal(ia, ib) and torch.equal(ma, mb)
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ob, oa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xb, xa, atol=1e-5, rtol=1e-5)
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], atol=1e-5, rtol=1e-5)
    # idle rows leave the block exactly as they entered
    assert torch.equal(ob[~mb], x0[~mb])


def test_model_training_loss_and_gradients_equal_masked(monkeypatch):
    torch.manual_seed(0)
    base = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=4)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    runs = []
    for form in (idle_block_masked, idle_block_train):
        monkeypatch.setattr(idle_method, "idle_block_train", form)
        model = vitrim.apply(copy.deepcopy(base), "idle", keep_rate=0.6).train()
        method = vitrim.get_method(model)
        tokens, state = model.forward_tokens(x)
        logits = model.forward_head_with_state(tokens, state)
        terms = method.loss_terms(state, tokens, None, dict(method.loss_weights), None)
        assert "cut" in terms and terms["cut"] > 0
        loss = torch.nn.functional.cross_entropy(logits, y) + sum(terms.values())
        loss.backward()
        runs.append((loss.detach(), _grads(model)))
    (la, ga), (lb, gb) = runs
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-5)
