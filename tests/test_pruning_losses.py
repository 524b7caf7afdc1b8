"""Keep-ratio loss, token distillation (dynamicvit.md §6, tps.md §5) and EViT's keep-rate schedule (evit.md §3)."""
import math

import pytest
import torch

import vitrim
from vitrim.errors import OptionError
from vitrim.losses import (final_keep_mask, keep_ratio_loss, kl_logit_distillation, pruning_decisions,
                           token_distillation)
from vitrim.methods.evit import keep_rate_schedule
from conftest import small_vit


def test_ratio_loss_value():
    decisions = [torch.tensor([[1.0] * 7 + [0.0] * 3]), torch.tensor([[1.0] * 5 + [0.0] * 5]),
                 torch.tensor([[1.0] * 3 + [0.0] * 7])]
    loss = keep_ratio_loss(decisions, [0.7, 0.7 ** 2, 0.7 ** 3])
    assert loss.item() == pytest.approx(6.4967e-4, rel=1e-4)
    with pytest.raises(ValueError, match="2 decisions but 3 targets"):
        keep_ratio_loss(decisions[:2], [0.7, 0.49, 0.343])


def test_ratio_loss_is_per_image_then_batch_mean():
    d = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # per image (0.5 - 0.5)^2 and (1 - 0.5)^2, mean 0.125 (not (0.75 - 0.5)^2 of the pooled fraction)
    assert keep_ratio_loss([d], [0.5]).item() == pytest.approx(0.125)


def test_token_distillation_mse_and_kl():
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0.0]])
    sel = keep.bool()
    assert token_distillation(s, t, keep).item() == pytest.approx(((s[sel] - t[sel]) ** 2).mean().item(), rel=1e-6)
    kl = torch.nn.functional.kl_div(s[sel].log_softmax(-1), t[sel].log_softmax(-1), reduction="batchmean",
                                    log_target=True)
    assert token_distillation(s, t, keep, mode="kl").item() == pytest.approx(kl.item(), rel=1e-5)
    # dropped positions do not matter, nothing kept gives 0, equal student and teacher give 0
    s2 = s.clone()
    s2[~sel] = 100.0
    assert token_distillation(s2, t, keep).item() == token_distillation(s, t, keep).item()
    assert token_distillation(s, t, torch.zeros(2, 5)).item() == 0.0
    assert token_distillation(t, t, keep, mode="kl").item() == pytest.approx(0.0, abs=1e-7)
    assert token_distillation(t, t, None).item() == 0.0
    with pytest.raises(ValueError, match="mode"):
        token_distillation(s, t, keep, mode="l1")


def test_losses_wire_to_a_training_forward():
    model = vitrim.apply(small_vit(depth=4), "dtps", keep_rate=0.6, locations=(1, 2)).train()
    teacher = small_vit(depth=4)
    x = torch.randn(2, 3, 64, 64)
    tokens, state = vitrim.forward_tokens(model, x)
    logits = model.forward_head_with_state(tokens, state) if hasattr(model, "forward_head_with_state") \
        else model.forward_head(tokens)
    decisions, targets = pruning_decisions(state)
    with torch.no_grad():
        t_tokens = teacher.forward_features(x)
        t_logits = teacher.forward_head(t_tokens)
    keep = final_keep_mask(state)
    assert keep.shape == (2, 64) and targets == pytest.approx([0.6, 0.36])
    loss = (2.0 * keep_ratio_loss(decisions, targets) + 0.5 * kl_logit_distillation(logits, t_logits)
            + 0.5 * token_distillation(tokens[:, 1:], t_tokens[:, 1:], keep, mode="kl"))
    loss.backward()
    assert all(p.grad is not None for p in vitrim.get_method(model).predictors.parameters())
    model.eval()
    with torch.no_grad():
        _, state = vitrim.forward_with_state(model, x)
    assert pruning_decisions(state) == ([], []) and final_keep_mask(state) is None


def test_evit_keep_rate_schedule():
    ipe = 10
    kw = dict(iters_per_epoch=ipe, keep_rate=0.7, shrink_start_epoch=10, shrink_epochs=100)
    assert keep_rate_schedule(0, **kw) == 1.0 and keep_rate_schedule(10 * ipe - 1, **kw) == 1.0
    assert keep_rate_schedule(10 * ipe, **kw) == pytest.approx(1.0)
    assert keep_rate_schedule(60 * ipe, **kw) == pytest.approx((1 + 0.7) / 2)  # midpoint
    t = 35 * ipe
    assert keep_rate_schedule(t, **kw) == pytest.approx(0.7 + 0.3 * (1 + math.cos(math.pi * 25 / 100)) / 2)
    assert keep_rate_schedule(110 * ipe, **kw) == 0.7 and keep_rate_schedule(10 ** 6, **kw) == 0.7
    assert keep_rate_schedule(0, ipe, 0.7) == 0.7  # fine-tune recipe: the rate from the first step
    rates = [keep_rate_schedule(i, **kw) for i in range(0, 120 * ipe, 7)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    with pytest.raises(OptionError):
        keep_rate_schedule(0, 0, 0.7)
    with pytest.raises(OptionError):
        keep_rate_schedule(0, ipe, 1.5)


def test_schedule_drives_the_model_through_update():
    model = vitrim.apply(small_vit(depth=4), "evit", keep_rate=0.7, locations=(1, 2))
    before = vitrim.flops(model)
    vitrim.update(model, keep_rate=keep_rate_schedule(0, 10, 0.7, shrink_start_epoch=1, shrink_epochs=1))
    assert vitrim.get_method(model).keep_rate == 1.0 and vitrim.flops(model) > before
