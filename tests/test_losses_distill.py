import torch

import vitrim
from vitrim.losses import kl_logit_distillation
from conftest import small_vit


def test_kl_zero_when_equal_and_matches_definition():
    z = torch.randn(4, 7)
    assert kl_logit_distillation(z, z).abs().item() < 1e-7
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    p_t = t.softmax(-1)
    ref = (p_t * (p_t.log() - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(kl_logit_distillation(s, t), ref)


def test_forward_with_state_matches_forward():
    model = vitrim.apply(small_vit(), "tome", r=5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, state = vitrim.forward_with_state(model, x)
        assert torch.equal(logits, model(x))
    assert state.size is not None and state.records == ()
