"""IdleViT losses (specs/idlevit.md §6-7, properties 7-10): token cut loss, alternate layers, total loss."""
import pytest
import torch
import torch.nn.functional as F

import vitrim
from vitrim.losses import (idle_cut_loss, idle_feature_loss, idle_total_loss, kl_logit_distillation,
                           token_cut_loss)
from vitrim.ops.idle import IdleRecord
from conftest import small_vit

W_HAND = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
M_HAND = torch.tensor([[True, True, False]])


def closed_form(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row loop of §6.3: selected rows 2 * (mass to idle)^2, idle rows (mass to selected non-class)^2."""
    w = logits.softmax(-1)
    total, count = 0.0, 0
    for b in range(w.shape[0]):
        for i in range(w.shape[1]):
            if mask[b, i]:
                total += 2 * float(w[b, i][~mask[b]].sum()) ** 2
            else:
                sel = mask[b].clone()
                sel[0] = False
                total += float(w[b, i][sel].sum()) ** 2
            count += 1
    return torch.tensor(total / count)


def test_hand_example():
    logits = W_HAND.log()[None]
    inter = token_cut_loss(logits, M_HAND, "inter")
    intra = token_cut_loss(logits, M_HAND, "intra")
    assert inter.item() == pytest.approx(0.056667, abs=1e-6)
    assert intra.item() == pytest.approx(0.043333, abs=1e-6)
    assert token_cut_loss(logits, M_HAND).item() == pytest.approx(0.1, abs=1e-6)
    assert token_cut_loss(logits, M_HAND, "none").item() == 0.0
    # a single-head [B, H, T, T] input is averaged over heads before the softmax
    assert token_cut_loss(logits[:, None], M_HAND).item() == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_definition_equals_closed_form(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 11
    logits = torch.randn(B, T, T, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(B, T, generator=g) < 0.5
    mask[:, 0] = True
    got = token_cut_loss(logits, mask)
    assert got.item() == pytest.approx(closed_form(logits, mask).item(), abs=1e-6)


def test_head_mean_of_logits_then_one_softmax():
    g = torch.Generator().manual_seed(0)
    per_head = torch.randn(2, 4, 7, 7, generator=g)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [1, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    assert token_cut_loss(per_head, mask).item() == pytest.approx(token_cut_loss(per_head.mean(1), mask).item())
    mean_of_probs = per_head.softmax(-1).mean(1).log()
    assert token_cut_loss(mean_of_probs, mask).item() != pytest.approx(token_cut_loss(per_head, mask).item())


def test_zero_set_and_positive_otherwise():
    mask = torch.tensor([[True, True, True, False, False]])
    sel, idle = mask[0], ~mask[0]
    w = torch.zeros(5, 5)
    w[0, :3] = 1 / 3
    w[1, :3] = torch.tensor([0.2, 0.5, 0.3])
    w[2, :3] = 1 / 3
    w[3] = torch.tensor([0.5, 0, 0, 0.25, 0.25])  # idle rows: class token and idle tokens only
    w[4] = torch.tensor([0.0, 0, 0, 0.5, 0.5])
    logits = w.clamp_min(1e-30).log()[None]
    assert token_cut_loss(logits, mask).item() == pytest.approx(0.0, abs=1e-12)
    w2 = w.clone()
    w2[4] = torch.tensor([0.0, 0.1, 0, 0.4, 0.5])  # an idle row attends to a selected non-class token
    assert token_cut_loss(w2.clamp_min(1e-30).log()[None], mask).item() > 1e-4
    assert sel.sum() == 3 and idle.sum() == 2


def test_inputs_not_mutated_and_differentiable():
    logits = torch.randn(2, 6, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    before = (logits.detach().clone(), mask.clone())
    loss = token_cut_loss(logits, mask)
    loss.backward()
    assert torch.equal(logits.detach(), before[0]) and torch.equal(mask, before[1])
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def _fake_records(n, layer0=3):
    """Idle records whose cut losses are known: layer i gets a mask/logit pair with loss v_i."""
    recs, values = [], []
    for i in range(n):
        logits = torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(i))
        mask = torch.tensor([[True, i % 2 == 0, True, False, i % 3 == 0]])
        recs.append(IdleRecord(layer0 + i, 2, torch.zeros(1, 3, dtype=torch.long), mask, logits))
        values.append(token_cut_loss(logits, mask).item())
    return recs, values


def test_all_layers_default_and_alternate_compat():
    recs, v = _fake_records(9)
    assert idle_cut_loss(recs).item() == pytest.approx(sum(v) / 9, rel=1e-6)
    # official loop: list positions 0, 2, 4, 6, 8 (layers 3, 5, 7, 9, 11), still divided by 9
    assert idle_cut_loss(recs, layers="alternate").item() == pytest.approx(sum(v[0::2]) / 9, rel=1e-6)
    assert [r.layer for r in recs[0::2]] == [3, 5, 7, 9, 11]
    recs8, v8 = _fake_records(8, layer0=4)  # published main.py layers 4..11: positions 0, 2, 4, 6, divided by 8
    assert idle_cut_loss(recs8, layers="alternate").item() == pytest.approx((v8[0] + v8[2] + v8[4] + v8[6]) / 8,
                                                                             rel=1e-6)
    with pytest.raises(ValueError, match="one of all, alternate"):
        idle_cut_loss(recs, layers="odd")
    assert len(recs) == 9  # not mutated


def test_cut_loss_from_a_training_forward():
    model = vitrim.apply(small_vit(depth=5), "idle", keep_rate=0.5).train()
    x = torch.randn(2, 3, 64, 64)
    _, state = vitrim.forward_with_state(model, x)
    per_layer = [token_cut_loss(r.logits, r.mask) for r in state.records]
    assert len(per_layer) == 4
    loss = idle_cut_loss(state)
    assert loss.item() == pytest.approx(sum(l.item() for l in per_layer) / 4, rel=1e-6) and loss.item() > 0
    model.eval()
    with torch.no_grad():
        _, eval_state = vitrim.forward_with_state(model, x)
    assert idle_cut_loss(eval_state).item() == 0.0  # inference records carry no cut-loss inputs


def test_feature_loss():
    s = torch.randn(4, 8)
    assert idle_feature_loss(s, s * 3).item() == pytest.approx(0.0, abs=1e-12)  # scale-invariant (L2-normalised)
    t = torch.randn(4, 8)
    expected = ((F.normalize(s, dim=-1) - F.normalize(t, dim=-1)) ** 2).mean()
    assert idle_feature_loss(s, t).item() == pytest.approx(expected.item())


def test_total_loss_weights_and_zero_distillation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=g, requires_grad=True)
    teacher = torch.randn(4, 10, generator=g)
    fs, ft = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    y = torch.tensor([1, 2, 3, 4])
    recs, v = _fake_records(9)
    out = idle_total_loss(logits, y, recs, teacher, fs, ft)
    ce = F.cross_entropy(logits, y)
    expected = ce + 20 * sum(v) / 9 + 10 * kl_logit_distillation(logits, teacher) + 1000 * idle_feature_loss(fs, ft)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out) == {"loss", "ce", "cut", "kl", "feature"}
    same = idle_total_loss(logits, y, recs, logits.detach(), fs, fs.clone())
    assert same["kl"].item() == pytest.approx(0.0, abs=1e-6) and same["feature"].item() == pytest.approx(0.0, abs=1e-9)
    # soft targets (Mixup / CutMix): soft-target cross-entropy
    soft = F.one_hot(y, 10).float() * 0.9 + 0.01
    ce_soft = idle_total_loss(logits, soft, recs)["ce"]
    assert ce_soft.item() == pytest.approx((-(soft * logits.log_softmax(-1)).sum(-1)).mean().item(), rel=1e-6)
    # the teacher never receives a gradient
    teacher_logits = torch.randn(4, 10, requires_grad=True)
    idle_total_loss(logits, y, recs, teacher_logits, fs, ft.requires_grad_())["loss"].backward()
    assert teacher_logits.grad is None and ft.grad is None and logits.grad is not None


def test_losses_exported():
    import vitrim.losses as L
    for name in ("token_cut_loss", "idle_cut_loss", "idle_feature_loss", "idle_total_loss"):
        assert name in L.__all__ and callable(getattr(L, name))
