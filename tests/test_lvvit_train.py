"""LV-ViT training: the recipes dynamicvit-lvvit / idlevit-lvvit, which logits each loss term reads
(asked of the adapter's head parts), the spec's loss vectors through the methods, the teacher in eval
mode, masked training = gather inference, and `vitrim train` on a tiny LV-ViT."""
import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vitrim
from vitrim.adapters import get_adapter
from vitrim.errors import OptionError
from vitrim.losses import final_keep_mask, keep_ratio_loss, kl_logit_distillation, pruning_decisions
from vitrim.losses.idle import idle_feature_loss
from vitrim.losses.pruning import token_distillation
from vitrim.methods._pruning import prune_records
from vitrim.methods.base import HeadParts
from vitrim.ops.idle import IdleRecord
from vitrim.ops.prune import rank_tokens
from vitrim.state import ForwardState
from vitrim.train.engine import StudentForward
from vitrim.train.objective import Objective, StudentOutput
from vitrim.train.recipes import get_recipe

X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def tiny(depth=8, **kw):
    """An LV-ViT-S layout (skip_lam 2, stem + BatchNorm, aux head) at 64 px, width 32: 16 patches."""
    torch.manual_seed(0)
    model = timm.create_model("lvvit_s", img_size=64, embed_dim=32, num_heads=2, depth=depth, stem_dim=8,
                              num_classes=5, **kw)
    for m in model.modules():  # non-trivial running statistics: eval and train BatchNorm differ
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def student_and_teacher(method, **options):
    model = tiny()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    vitrim.apply(model, method, **options)
    return model, teacher


def bn_eval(model):
    """Blocks in training mode (the masked forms) with the stem's BatchNorm on its running statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def topk_decision(logp, prev, k):
    """Fixed decisions for the masked form: the top k alive tokens by predicted keep score."""
    scores = logp[..., 0].masked_fill(prev[..., 0] <= 0, float("-inf"))
    keep_index, _ = rank_tokens(scores, k)
    return torch.zeros_like(prev).scatter(1, keep_index.unsqueeze(-1), 1.0)


# ---------------------------------------------------------------------- recipes
def test_lvvit_recipes_hold_the_spec_values():
    d, base = get_recipe("dynamicvit-lvvit"), get_recipe("dynamicvit")
    assert (d.logits_from, d.token_target) == ("class_head", "token_logits")
    assert (d.ratio_weight, d.kd_weight, d.token_weight) == (2.0, 0.5, 0.5)
    assert (d.epochs, d.lr, d.backbone_lr_scale, d.warmup_epochs, d.weight_decay) == (30, 1e-3, 0.01, 5, 0.05)
    assert d.total_lr(1024) == base.total_lr(1024) and d.drop_path == 0.0
    i = get_recipe("idlevit-lvvit")
    assert (i.logits_from, i.feature_target, i.feature_norm) == ("output", "tokens", "channels")
    assert (i.cut_weight, i.kd_weight, i.feature_weight) == (20.0, 10.0, 1000.0)
    assert i.frozen == ("cls_token", "pos_embed") and i.total_lr(2048) == pytest.approx(4e-5)
    assert i.cut_loss_layers == "all" and i.replace(cut_loss_layers="alternate").check()
    assert i.replace(feature_norm="tokens").check().feature_norm == "tokens"  # the official compat option
    # the DeiT recipes keep the DeiT targets
    for name in ("dynamicvit", "idlevit", "dtps"):
        r = get_recipe(name)
        assert (r.logits_from, r.token_target, r.feature_target, r.feature_norm) == \
            ("output", "tokens", "class_token", "channels")


def test_recipe_targets_are_checked():
    with pytest.raises(OptionError, match="feature_norm='tokens'.*feature_target='tokens'"):
        get_recipe("idlevit").replace(feature_norm="tokens").check()
    with pytest.raises(OptionError, match="logits_from must be one of output, class_head"):
        get_recipe("dynamicvit").replace(logits_from="combined").check()
    with pytest.raises(OptionError, match="token_target must be one of tokens, token_logits"):
        get_recipe("dynamicvit").replace(token_target="aux").check()


def test_token_logits_refused_on_a_model_without_a_token_head():
    deit = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=3)
    teacher = copy.deepcopy(deit).eval()
    vitrim.apply(deit, "dynamicvit", keep_rate=0.5)
    with pytest.raises(OptionError, match="token_target='token_logits'.*has none.*Accepted: token_target='tokens'"):
        Objective(deit.vitrim, get_recipe("dynamicvit-lvvit"), teacher, mixup_active=False)
    # class_head alone is the output on a model with no per-token head
    parts = get_adapter(teacher).head_parts(teacher.forward_features(torch.randn(1, 3, 32, 32)))
    assert parts.token_logits is None and parts.class_logits.shape == (1, 3)


# ---------------------------------------------------------------------- the adapter's head parts
def test_head_parts_are_the_adapters():
    model = tiny()
    adapter = get_adapter(model)
    assert adapter.info().has_token_head
    with torch.no_grad():
        t = model.forward_features(X)
        parts = adapter.head_parts(t)
        assert torch.equal(parts.class_logits, model.head(t[:, 0]))
        assert torch.equal(parts.token_logits, model.aux_head(t[:, 1:]))
        assert torch.allclose(model(X), parts.class_logits + 0.5 * parts.token_logits.max(dim=1).values, atol=1e-6)
    # an LVViT subclass that changes the head is refused, not silently mis-read
    cls = type("MyLVViT", (type(model),), {"forward_aux": lambda self, x: (x[:, 0], x[:, 1:])})
    other = tiny()
    other.__class__ = cls
    with pytest.raises(vitrim.UnsupportedModelError, match="overrides LVViT.forward_aux"):
        get_adapter(other)


# ---------------------------------------------------------------------- DynamicViT on LV-ViT: the loss
def test_dynamicvit_lvvit_token_vector_through_the_method():
    model = vitrim.apply(tiny(depth=4), "dynamicvit", keep_rate=0.5)
    state = ForwardState(num_prefix_tokens=1, num_patches=2, policy=torch.tensor([[[1.0], [1.0], [0.0]]]))
    aux_s = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    aux_t = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    cls = torch.zeros(1, 2)
    tokens = torch.randn(1, 3, 4)
    terms = model.vitrim.loss_terms(state, tokens, tokens + 1, {"token": 1.0}, get_recipe("dynamicvit-lvvit"),
                                    heads=HeadParts(cls, aux_s), teacher_heads=HeadParts(cls, aux_t))
    assert math.isclose(terms["token"].item(), 0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs_tol=1e-6)
    assert math.isclose(terms["token"].item(), 0.130812, abs_tol=1e-6)
    same = model.vitrim.loss_terms(state, tokens, tokens, {"token": 1.0}, get_recipe("dynamicvit-lvvit"),
                                   heads=HeadParts(cls, aux_s), teacher_heads=HeadParts(cls, aux_s.clone()))
    assert same["token"].item() == 0.0
    # the DeiT recipe reads the tokens instead (MSE), and refuses nothing
    deit_terms = model.vitrim.loss_terms(state, tokens, tokens + 1, {"token": 1.0}, get_recipe("dynamicvit"))
    assert math.isclose(deit_terms["token"].item(), 1.0, abs_tol=1e-6)
    with pytest.raises(vitrim.VitrimError, match="token_target='token_logits' needs the per-token head"):
        model.vitrim.loss_terms(state, tokens, tokens + 1, {"token": 1.0}, get_recipe("dynamicvit-lvvit"))


def test_dynamicvit_lvvit_objective_reads_the_right_logits():
    model, teacher = student_and_teacher("dynamicvit", keep_rate=0.5, locations=(2, 4, 6))
    recipe = get_recipe("dynamicvit-lvvit").replace(smoothing=0.0)
    obj = Objective(model.vitrim, recipe, teacher, mixup_active=False)
    assert obj.uses_heads and obj.needs_teacher
    student = StudentForward(model, heads=obj.uses_heads)
    targets = torch.tensor([0, 3, 1])
    model.train()
    torch.manual_seed(3)
    logits, tokens, state, heads = student(X)
    teacher_out = obj.run_teacher(X)
    total, terms = obj(StudentOutput(logits, tokens, state, heads), targets, teacher_out)
    assert set(terms) == {"ce", "kd", "ratio", "token"}
    with torch.no_grad():
        t_tokens = teacher.forward_features(X)
        t_cls, t_aux = teacher.forward_aux(t_tokens)
    cls_out, aux_out = model.forward_aux(tokens)
    keep = final_keep_mask(state)
    assert (keep == 0).any()  # some positions dead: the token term is over kept pairs only
    want = {"ce": F.cross_entropy(cls_out, targets),                                   # head(cls), not the rule
            "kd": 0.5 * kl_logit_distillation(cls_out, t_cls),
            "ratio": 2.0 * keep_ratio_loss(*pruning_decisions(state)),
            "token": 0.5 * token_distillation(aux_out, t_aux, keep, mode="kl")}           # aux class logits
    for k, v in want.items():
        assert math.isclose(terms[k], v.item(), rel_tol=1e-5, abs_tol=1e-6), k
    assert math.isclose(total.item(), sum(terms.values()), rel_tol=1e-5)
    # a wiring that used the combined output would differ
    assert not math.isclose(terms["ce"], F.cross_entropy(logits, targets).item(), rel_tol=1e-3)
    # the gradient reaches the aux head (token term) and the predictors (ratio term)
    total.backward()
    assert model.aux_head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.vitrim.predictors.parameters())


def test_dynamicvit_lvvit_all_kl_terms_vanish_when_student_equals_teacher():
    model, teacher = student_and_teacher("dynamicvit", keep_rate=1.0, locations=(2, 4, 6))
    obj = Objective(model.vitrim, get_recipe("dynamicvit-lvvit"), teacher, mixup_active=False)
    model.vitrim.masked_decision = topk_decision  # keep 1: every token kept (no Gumbel sampling)
    bn_eval(model)  # the stem's BatchNorm as the teacher's: the student is then the teacher
    logits, tokens, state, heads = StudentForward(model, heads=True)(X)
    _, terms = obj(StudentOutput(logits, tokens, state, heads), torch.tensor([0, 1, 2]), obj.run_teacher(X))
    assert abs(terms["kd"]) < 1e-6 and abs(terms["token"]) < 1e-6


# ---------------------------------------------------------------------- IdleViT on LV-ViT: the loss
def test_idlevit_lvvit_feature_vector_through_the_method():
    model = vitrim.apply(tiny(depth=4), "idle", keep_rate=0.5)
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    full = IdleRecord(layer=3, keep=1, index=torch.tensor([[0, 1]]), mask=torch.tensor([[True, True]]))
    state = ForwardState(num_prefix_tokens=1, num_patches=1, records=(full,))
    recipe = get_recipe("idlevit-lvvit")
    got = model.vitrim.loss_terms(state, s, t, {"feature": 1.0}, recipe)["feature"].item()
    assert math.isclose(got, 0.5, abs_tol=1e-6)
    got = model.vitrim.loss_terms(state, s, t, {"feature": 1.0}, recipe.replace(feature_norm="tokens"))
    assert math.isclose(got["feature"].item(), 1 - 1 / math.sqrt(2), abs_tol=1e-6)
    # the mask is the LAST idle layer's: with token 1 differing, it counts only if the last layer computed it
    t2 = torch.tensor([[[0.0, 1.0], [1.0, -1.0]]])
    half = IdleRecord(layer=2, keep=0, index=torch.tensor([[0]]), mask=torch.tensor([[True, False]]))
    last_full = ForwardState(num_prefix_tokens=1, num_patches=1, records=(half, full))
    last_half = ForwardState(num_prefix_tokens=1, num_patches=1, records=(full, half))
    feature = lambda st: model.vitrim.loss_terms(st, s, t2, {"feature": 1.0}, recipe)["feature"].item()  # noqa: E731
    assert math.isclose(feature(last_full), 1.0, abs_tol=1e-6)  # (2 + 2) / 4 elements
    assert math.isclose(feature(last_half), 0.5, abs_tol=1e-6)  # token 1 masked out: 2 / 4
    # the DeiT recipe compares the class token only
    deit = model.vitrim.loss_terms(state, s, t, {"feature": 1.0}, get_recipe("idlevit"))["feature"].item()
    assert math.isclose(deit, idle_feature_loss(s[:, 0], t[:, 0]).item(), abs_tol=1e-7)


def test_idlevit_lvvit_objective_reads_the_combined_output_and_the_token_map():
    model, teacher = student_and_teacher("idle", keep_rate=0.5)
    recipe = get_recipe("idlevit-lvvit").replace(smoothing=0.0, amp=False)
    obj = Objective(model.vitrim, recipe, teacher, mixup_active=False)
    assert not obj.uses_heads
    targets = torch.tensor([4, 0, 2])
    model.train()
    logits, tokens, state, heads = StudentForward(model)(X)
    assert heads is None and tokens.shape == (3, 17, 32)  # every token reaches the final norm
    total, terms = obj(StudentOutput(logits, tokens, state, heads), targets, obj.run_teacher(X))
    with torch.no_grad():
        t_tokens = teacher.forward_features(X)
        t_logits = teacher.forward_head(t_tokens)
    cls_out, aux_out = model.forward_aux(tokens)
    combined = cls_out + 0.5 * aux_out.max(dim=1).values  # all 16 patch tokens, idle ones included
    assert torch.allclose(logits, combined, atol=1e-6)
    mask = [r.mask for r in state.records if isinstance(r, IdleRecord)][-1]
    assert not mask.all()
    want = {"ce": F.cross_entropy(combined, targets), "kd": 10.0 * kl_logit_distillation(combined, t_logits),
            "feature": 1000.0 * idle_feature_loss(tokens, t_tokens, mask[..., None].float())}
    for k, v in want.items():
        assert math.isclose(terms[k], v.item(), rel_tol=1e-5, abs_tol=1e-6), k
    assert terms["cut"] > 0
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher receives no gradient


def test_teacher_runs_in_eval_mode():
    model, teacher = student_and_teacher("idle", keep_rate=0.5)
    obj = Objective(model.vitrim, get_recipe("idlevit-lvvit"), teacher, mixup_active=False)
    stats = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k or "num_batches" in k}
    teacher.train()  # even if someone switched it: the objective runs it in eval mode
    out = obj.run_teacher(X)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in stats.items())  # running stats untouched
    with torch.no_grad():
        assert torch.allclose(out.logits[:1], teacher(X[:1]), atol=1e-5)  # batch-independent: running statistics
    assert not out.logits.requires_grad


def test_prepare_model_teacher_is_frozen_eval_and_unreduced():
    from vitrim.train.engine import TrainConfig, prepare_model
    cfg = TrainConfig(model="lvvit_s", data=None, output="unused", recipe=get_recipe("idlevit-lvvit"), method="idle",
                      method_options={"keep_rate": 0.7},
                      model_kwargs={"img_size": 64, "embed_dim": 32, "num_heads": 2, "depth": 4, "stem_dim": 8})
    model, teacher = prepare_model(cfg)
    assert vitrim.api.is_reduced(model) and not vitrim.api.is_reduced(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# ---------------------------------------------------------------------- masked training = gather inference
@pytest.mark.parametrize("method", ["dynamicvit", "dtps"])
def test_masked_training_equals_gather_inference_on_kept_rows(method):
    model = vitrim.apply(tiny(), method, keep_rate=0.6, locations=(2, 4, 6))
    with torch.no_grad():
        ref_tokens, ref_state = vitrim.forward_tokens(model, X)
        ref = model.forward_head_with_state(ref_tokens, ref_state)
        model.vitrim.masked_decision = topk_decision  # fixed top-K decisions instead of Gumbel noise
        bn_eval(model)
        tokens, state = vitrim.forward_tokens(model, X)
        out = model.forward_head_with_state(tokens, state)
    # the output rule: the aux max over the live rows of the masked form = over the gathered rows
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    positions = [r.positions for r in prune_records(ref_state)][-1]              # [B, K3] original positions
    kept = tokens[:, 1:].gather(1, positions[..., None].expand(-1, -1, tokens.shape[-1]))
    torch.testing.assert_close(kept, ref_tokens[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 0], ref_tokens[:, 0], atol=1e-5, rtol=1e-5)
    assert (final_keep_mask(state).sum(1) == positions.shape[1]).all()


def test_idle_masked_training_equals_gather_inference():
    model = vitrim.apply(tiny(), "idle", keep_rate=0.6)
    with torch.no_grad():
        ref = model(X)
        out = bn_eval(model)(X)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from test_train import tiny_imagefolder
    return tiny_imagefolder(tmp_path_factory.mktemp("data") / "digits", per_class=2, val_per_class=1)


@pytest.mark.parametrize("recipe,method,terms", [
    ("dynamicvit-lvvit", "dynamicvit", {"ce", "kd", "ratio", "token"}),
    ("idlevit-lvvit", "idle", {"ce", "kd", "cut", "feature"}),
])
def test_vitrim_train_with_the_lvvit_recipes(digits, tmp_path, recipe, method, terms):
    from vitrim.cli import main
    out = tmp_path / recipe
    argv = ["train", "--model", "lvvit_s", "--model-kwargs",
            "{'img_size': 64, 'embed_dim': 32, 'num_heads': 2, 'depth': 4, 'stem_dim': 8}", "--num-classes", "10",
            "--data", str(digits), "--recipe", recipe, "--method", method, "--keep-rate", "0.7", "--output",
            str(out), "--workers", "0", "--no-progress", "--batch-size", "10", "--epochs", "1",
            "--set", "warmup_epochs=0", "--set", "amp=False"]
    assert main(argv) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert terms | {"loss"} == set(row["train"]) and all(math.isfinite(v) for v in row["train"].values())
    saved = json.loads((out / "config.json").read_text())["recipe"]
    assert saved["name"] == recipe
