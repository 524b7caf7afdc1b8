"""``vitrim bench --train`` and ``benchmark_training``: the training step of reduced vs unreduced models."""
import copy
import json

import pytest
import timm
import torch

import vitrim
from vitrim.cli import main
from vitrim.cli.measure import training_loss
from vitrim.measure.bench import benchmark_training


@pytest.mark.parametrize("method", ["tome", "dynamicvit", "idle"])
def test_bench_train_json(method, capsys):
    rc = main(["bench", "--train", "--model", "deit_tiny_patch16_224", "--img-size", "32", "--method", method,
               "--batch-size", "2", "--warmup", "1", "--repeats", "2", "--iters", "1", "--json"])
    assert rc == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["mode"] == "train" and r["precision"] == "fp32"
    base, red = r["timings"]
    assert base["speedup"] == 1.0 and red["speedup"] > 0 and red["gmacs"] < base["gmacs"]
    assert len(red["runs"]) == 2


def test_training_step_updates_every_model_and_uses_method_terms():
    torch.manual_seed(0)
    base = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5)
    reduced = vitrim.apply(copy.deepcopy(base), "dynamicvit", keep_rate=0.5)
    before = {n: p.detach().clone() for n, p in reduced.named_parameters()}
    res = benchmark_training({"base": base, "dyn": reduced}, batch_size=2, input_size=(3, 32, 32), num_classes=5,
                             warmup=0, repeats=1, iters=1, lr=1e-3, loss_fns={"dyn": training_loss})
    assert res.mode == "train" and "training step" in res.table()
    moved = {n for n, p in reduced.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("vitrim.") for n in moved)  # the predictors train: their loss reached them
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    reduced.train()
    torch.manual_seed(1)
    full = training_loss(reduced, x, y)
    torch.manual_seed(1)
    tokens, state = reduced.forward_tokens(x)
    ce = torch.nn.functional.cross_entropy(reduced.forward_head_with_state(tokens, state), y)
    assert full.item() > ce.item()  # the keep-ratio term is added


def test_benchmark_training_rejects_bad_input():
    with pytest.raises(ValueError, match="precision"):
        benchmark_training({"m": torch.nn.Linear(2, 2)}, precision="fp8")
    with pytest.raises(ValueError, match="at least one model"):
        benchmark_training({})
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        benchmark_training({"m": frozen}, input_size=(2,), batch_size=2)


@pytest.mark.parametrize("method", ["dynamicvit", "dtps"])
def test_keep_at_rates_makes_fresh_predictors_keep_the_rates(method):
    """A fresh predictor keeps about half of the alive tokens at every stage; after keep_at_rates the
    straight-through samples keep about the stage rates (0.7, 0.49, 0.343 of the patches at rho = 0.7)."""
    from vitrim.ops.prune import prune_records
    torch.manual_seed(0)
    model = vitrim.apply(timm.create_model("deit_tiny_patch16_224", pretrained=False), method).train()
    images = torch.randn(8, 3, 224, 224)

    def alive():
        with torch.no_grad():
            _, state = model.forward_tokens(images)
        return [float(r.keep.float().mean()) for r in prune_records(state)]

    fresh = alive()
    assert all(abs(a - 0.5 ** (s + 1)) < 0.06 for s, a in enumerate(fresh))
    assert vitrim.get_method(model).keep_at_rates() is True
    for a, target in zip(alive(), vitrim.get_method(model).stage_rates):
        assert abs(a - target) < 0.06
    other = vitrim.apply(timm.create_model("deit_tiny_patch16_224", pretrained=False), "evit")
    assert vitrim.get_method(other).keep_at_rates() is False  # nothing learned to set


def test_bench_train_sets_fresh_predictors_to_their_rates(capsys):
    rc = main(["bench", "--train", "--model", "deit_tiny_patch16_224", "--img-size", "32", "--method", "dynamicvit",
               "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--iters", "1", "--json"])
    assert rc == 0
    assert "keep its rates" in capsys.readouterr().err


def test_bench_train_keeps_predictors_a_checkpoint_brought(tmp_path, capsys):
    """A reduced model's checkpoint (with its ``vitrim.*`` predictor weights) is timed as trained: no bias change."""
    model = vitrim.apply(timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32), "dynamicvit")
    path = tmp_path / "reduced.pth"
    torch.save(model.state_dict(), path)
    rc = main(["bench", "--train", "--model", "deit_tiny_patch16_224", "--img-size", "32", "--method", "dynamicvit",
               "--checkpoint", str(path), "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--iters", "1",
               "--json"])
    assert rc == 0
    assert "keep its rates" not in capsys.readouterr().err


def test_bench_train_compile_compiles_each_models_loss(monkeypatch, capsys):
    """``--train --compile`` compiles each model's whole training loss (forward, head, method terms),
    not the module alone, whose wrapper the loss would unwrap (torch.compile itself stubbed: its work
    is torch's)."""
    import functools

    from vitrim.cli import measure
    compiled = []

    def record(fn, *args, **kwargs):
        compiled.append(fn)
        return fn
    monkeypatch.setattr(torch, "compile", record)
    rc = main(["bench", "--train", "--compile", "--model", "deit_tiny_patch16_224", "--img-size", "32", "--method",
               "evit", "--batch-size", "2", "--warmup", "0", "--repeats", "1", "--iters", "1"])
    assert rc == 0 and "compile=on" in capsys.readouterr().out
    assert len(compiled) == 2
    assert all(isinstance(f, functools.partial) and f.func is measure.training_loss for f in compiled)
    assert [vitrim.is_reduced(f.args[0]) for f in compiled] == [False, True]
