"""IdleViT on Swin with score="predictor": learned per-block predictors, per-window top-K at inference,
straight-through Gumbel masks and the keep-ratio loss in training (docs/methods/idlevit.md, "Swin Transformer")."""
import copy

import pytest
import timm
import torch

import vitrim
from vitrim.errors import OptionError
from vitrim.ops import swin as sw
from vitrim.train.recipes import get_recipe

SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=10)


def small(**kw):
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **{**SMALL, **kw}).eval()


def predicted(model, **opts):
    r = copy.deepcopy(model)
    vitrim.apply(r, "idle", score="predictor", **{"keep_rate": 0.5, **opts})
    torch.manual_seed(1)
    for p in r.vitrim.predictors.parameters():  # away from the near-uniform initial scores
        p.data.normal_(0, 0.3)
    return r


def img(b=2, size=224, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def stage3_input(m, x):
    with torch.no_grad():
        return m.layers[2].downsample(m.layers[1](m.layers[0](m.patch_embed(x))))


def test_gather_equals_masked_on_selected_rows():
    r = predicted(small(drop_path_rate=0.0), layers=range(4, 6))
    x = stage3_input(r, img(2))
    with torch.no_grad():
        for index, block in zip((4, 5), r.layers[2].blocks):           # W-MSA, then SW-MSA
            B, H, W, C = x.shape
            logp = r.vitrim.predictors[str(index)](x.reshape(B, H * W, C))
            g, pos = sw.swin_idle_block_gather(block, x, 24, scores=logp[..., 0])
            sel = torch.zeros(B, H * W)
            for b in range(B):
                sel[b, pos[b][pos[b] >= 0]] = 1.0
            mk, none, mask = sw.swin_idle_block_masked(block, x, 24, mask=sel.view(B, H, W))
            assert none is None and mask is not None
            keep = sel.bool()
            gf, mf, xf = g.view(B, -1, C), mk.view(B, -1, C), x.view(B, -1, C)
            assert (gf[keep] - mf[keep]).abs().max() <= 1e-5
            assert torch.equal(gf[~keep], xf[~keep]) and torch.equal(mf[~keep], xf[~keep])
            assert (gf[keep] - xf[keep]).abs().min() > 0              # selected rows did change
            x = g


def test_masked_form_rolls_the_keep_mask():
    """SW-MSA: the keys are the tokens the (rolled) mask selects; an idle token's value reaches no output."""
    m = small(img_size=112)
    block = m.layers[0].blocks[1]                                     # 28x28, shift 3
    assert any(block.shift_size)
    x = torch.randn(1, 28, 28, 32)
    mask = (torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    with torch.no_grad():
        base, _, _ = sw.swin_idle_block_masked(block, x, 24, mask=mask)
        idle = (mask.view(-1) == 0).nonzero()[:20, 0]
        x2 = x.clone().view(-1, 32)
        x2[idle] += 5.0
        out, _, _ = sw.swin_idle_block_masked(block, x2.view_as(x), 24, mask=mask)
    d = (out - base).view(-1, 32).abs().amax(-1)
    d[idle] = 0
    assert d.max() == 0
    assert torch.equal(base.view(-1, 32)[mask.view(-1) == 0], x.view(-1, 32)[mask.view(-1) == 0])


def test_gradients_reach_the_predictors():
    r = predicted(small(drop_path_rate=0.1)).train()
    out, state = r.forward_with_state(img(2))
    out.logsumexp(-1).sum().backward()                                # the task loss alone: straight-through
    for name, p in r.vitrim.predictors.named_parameters():
        if name.endswith("weight") and "norm" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    r.zero_grad()
    terms = r.vitrim.loss_terms(state, out, None, {"ratio": 1.0}, get_recipe("swin-idle"))
    assert set(terms) == {"ratio"}
    out2, state2 = r.forward_with_state(img(2))
    r.vitrim.loss_terms(state2, out2, None, {"ratio": 1.0}, None)["ratio"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in r.vitrim.predictors.named_parameters() if n.endswith("head.4.weight"))


def test_training_masks_vary_per_window_inference_counts_are_fixed():
    r = predicted(small(), keep_rate=0.7)
    x = img(2)
    with torch.no_grad():
        _, state = r.forward_with_state(x)
        assert [rec.layer for rec in state.records] == list(range(2, 8))
        for rec in state.records:
            assert rec.keep == 34 and rec.mask is None
            per_window = rec.index.view(2, -1, 34)
            assert (per_window >= 0).all() and (per_window.sort(-1).values.diff(dim=-1) > 0).all()   # K distinct
        r.train()
        _, train = r.forward_with_state(x)
    for rec in train.records:
        assert rec.mask.dtype == torch.float32 and set(rec.mask.unique().tolist()) <= {0.0, 1.0}
        assert rec.index is None


def test_at_least_one_per_window():
    r = predicted(small(), keep_rate=0.01)
    with torch.no_grad():
        _, state = r.forward_with_state(img(1))
    assert all(rec.keep == 1 and rec.index.shape[1] == rec.index.numel() for rec in state.records)
    assert vitrim.flops(r) < vitrim.flops(small())


def test_ratio_loss_formula():
    r = predicted(small(), keep_rate=(1.0, 0.5, 0.7, 0.6)).train()
    out, state = r.forward_with_state(img(3))
    got = r.vitrim.loss_terms(state, out, None, {"ratio": 2.0}, None)["ratio"]
    rates = {2: 0.5, 3: 0.5, 4: 0.7, 5: 0.7, 6: 0.6, 7: 0.6}
    per_block = [((rec.mask.view(3, -1).mean(1) - rates[rec.layer]) ** 2).mean() for rec in state.records]
    assert [rec.layer for rec in state.records] == list(rates)
    assert got.item() == pytest.approx(2.0 * torch.stack(per_block).mean().item(), rel=1e-6)


def test_batch_independence():
    r = predicted(small())
    x = img(3)
    with torch.no_grad():
        yb, sb = r.forward_with_state(x)
        y1, s1 = r.forward_with_state(x[1:2])
    assert (yb[1:2] - y1).abs().max() <= 1e-5
    for a, b in zip(sb.records, s1.records):
        assert torch.equal(a.index[1:2], b.index)


def test_new_parameters_only_with_predictor():
    m = small()
    sd = m.state_dict()
    r = predicted(m, keep_rate=0.7)
    new = [k for k in r.state_dict() if k not in sd]
    assert new and all(k.startswith("vitrim.predictors.") for k in new)
    assert {k.split(".")[2] for k in new} == {str(i) for i in range(2, 8)}
    assert all(torch.equal(r.state_dict()[k], v) for k, v in sd.items())
    before = {k: v.clone() for k, v in r.vitrim.state_dict().items()}
    r.load_state_dict(sd, strict=True)                                # a timm checkpoint: predictors kept
    assert all(torch.equal(r.vitrim.state_dict()[k], v) for k, v in before.items())
    again = predicted(m, keep_rate=0.7)
    again.load_state_dict(r.state_dict(), strict=True)
    attention = vitrim.apply(copy.deepcopy(m), "idle", keep_rate=0.7)
    assert list(attention.state_dict()) == list(sd)


def test_flops_predictor_swin_t():
    with torch.device("meta"):
        m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    for rate, want in ((0.7, 3.857), (0.5, 3.129)):
        r = vitrim.apply(copy.deepcopy(m), "idle", keep_rate=rate, score="predictor")
        assert abs(vitrim.flops(r) - want) <= 1e-3


def test_option_errors():
    with pytest.raises(OptionError, match="score must be one of"):
        vitrim.apply(small(), "idle", score="window")
    vit = timm.create_model("vitrim_vit_digits", depth=2)
    with pytest.raises(OptionError, match="windowed models"):
        vitrim.apply(vit, "idle", score="predictor")
    r = predicted(small())
    r.vitrim.update(keep_rate=0.7)
    assert r.vitrim.keep(2, 49) == 34
    with pytest.raises(OptionError, match="fixed when applied"):
        r.vitrim.update(layers=[2, 3])
    with pytest.raises(OptionError, match="fixed when applied"):
        r.vitrim.update(score="attention")
    with pytest.raises(OptionError, match="fixed when applied"):
        vitrim.apply(small(), "idle").vitrim.update(score="predictor")


def test_training_recipe_checks():
    r = predicted(small())
    r.vitrim.begin_training(get_recipe("swin-idle"))
    with pytest.raises(OptionError, match="cut_weight=20"):
        r.vitrim.begin_training(get_recipe("idlevit"))
    with pytest.raises(OptionError, match="ratio"):
        r.vitrim.begin_training(get_recipe("swin-idle").replace(ratio_weight=0.0))


def test_swin_idle_recipe_values_and_objective():
    from vitrim.losses import kl_logit_distillation
    from vitrim.train.objective import Objective, StudentOutput, TeacherOutput

    rec = get_recipe("swin-idle")
    assert (rec.epochs, rec.warmup_epochs, rec.weight_decay, rec.clip_grad, rec.drop_path) == (30, 5, 0.05, 5.0, 0.2)
    assert rec.schedule_lrs(2048) == pytest.approx((2e-3, 4e-6, 4e-5))   # 5e-4 x batch/512, warm-up and min alike
    assert (rec.mixup, rec.cutmix, rec.reprob, rec.smoothing, rec.auto_augment) == \
        (0.8, 1.0, 0.25, 0.1, "rand-m9-mstd0.5-inc1")
    assert (rec.ce_weight, rec.kd_weight, rec.ratio_weight, rec.cut_weight, rec.feature_weight) == (0.5, 0.5, 1, 0, 0)
    obj = Objective("idle", rec, teacher=torch.nn.Identity(), mixup_active=False)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    _, terms = obj(StudentOutput(s, torch.zeros(4, 3, 8), None), torch.arange(4), TeacherOutput(t, None))
    assert terms["ce"] == pytest.approx(0.5 * float(obj.criterion(s, torch.arange(4))), rel=1e-6)
    deit = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum() / s.numel()   # sum / (B * classes)
    assert terms["kd"] == pytest.approx(0.5 * float(deit), rel=1e-5)
    assert float(kl_logit_distillation(s, t)) == pytest.approx(float(deit) * 10, rel=1e-5)
    plain = Objective("idle", get_recipe("digits-finetune"), teacher=None, mixup_active=False)
    assert plain.weights["ce"] == 1.0


def test_cli_train_swin_idle_recipe(tmp_path, capsys):
    import json

    from test_train import tiny_imagefolder
    from vitrim.cli import main

    data = tiny_imagefolder(tmp_path / "data", per_class=2, val_per_class=1)   # 20 images: 2 steps of 8
    out = tmp_path / "run"
    kwargs = "{'embed_dim': 16, 'depths': (2, 2, 2, 2), 'num_heads': (1, 1, 2, 2), 'img_size': 112, 'num_classes': 10}"
    assert main(["train", "--model", "swin_tiny_patch4_window7_224", "--model-kwargs", kwargs, "--data", str(data),
                 "--recipe", "swin-idle", "--method", "idle", "--score", "predictor", "--keep-rate", "0.5",
                 "--output", str(out), "--workers", "0", "--no-progress", "--batch-size", "8", "--epochs", "1"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"ce", "kd", "ratio", "loss"} <= set(row["train"]) and "cut" not in row["train"]
    saved = torch.load(out / "last.pt", weights_only=False)
    assert any(k.startswith("vitrim.predictors.2.") for k in saved["model"])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(data), "--json", "--workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert len(res) == 2 and all(v["images"] == 10 for v in res.values())


def test_cli_bench_flops_visualize_on_swin(tmp_path, capsys):
    import json

    from vitrim.cli import main

    swin = ["--model", "swin_tiny_patch4_window7_224", "--method", "idle", "--keep-rate", "0.5"]
    assert main(["bench", *swin, "--score", "predictor", "--batch-size", "1", "--img-size", "112", "--warmup", "0",
                 "--repeats", "1", "--iters", "1", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    base, red = result["timings"]
    assert red["gmacs"] < base["gmacs"]
    assert main(["flops", *swin]) == 0
    out = capsys.readouterr().out
    assert "total 2.672 GMACs" in out and "1.68x" in out
    assert main(["visualize", *swin, "--img-size", "112", "-o", str(tmp_path / "v.png")]) == 0
    assert (tmp_path / "v.png").stat().st_size > 0
    assert main(["bench", "--model", "swin_tiny_patch4_window7_224", "--method", "tome"]) == 2
    assert "cannot reduce a Swin Transformer" in capsys.readouterr().err


def test_forward_dense_on_swin():
    r = vitrim.apply(small(), "idle", keep_rate=0.5)
    x = img(1)
    with torch.no_grad():
        dense = vitrim.forward_dense(r, x)
        assert torch.equal(dense, r.forward_features(x))


def test_keep_at_rates_moves_fresh_predictors_to_the_computed_fraction():
    """A fresh predictor's training sample keeps about half of the slots; after ``keep_at_rates`` about
    the block's ``K / M`` (0.7 here), as the keep-ratio loss would pull it; the attention score has nothing to set."""
    r = vitrim.apply(small(), "idle", score="predictor", keep_rate=0.7).train()
    x = img(4)

    def kept():
        with torch.no_grad():
            _, state = r.forward_with_state(x)
        return torch.stack([rec.mask.float().mean() for rec in state.records])

    assert (kept() - 0.5).abs().max() < 0.08
    assert vitrim.get_method(r).keep_at_rates() is True
    assert (kept() - 0.7).abs().max() < 0.08
    assert vitrim.get_method(vitrim.apply(small(), "idle", keep_rate=0.7)).keep_at_rates() is False
