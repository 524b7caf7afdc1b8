"""Training and evaluation: recipes, objective, bad input, exact resume after SIGKILL, DDP, eval."""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitrim.cli import main
from vitrim.train.recipes import RECIPES, get_recipe

TINY = "{'depth': 2, 'embed_dim': 32, 'num_heads': 2}"


_FULL: list[Path] = []


def tiny_imagefolder(root: Path, per_class: int, val_per_class: int = 4) -> Path:
    """A small ImageFolder cut from the digits canvases (built once per test session)."""
    from vitrim.train.data import ensure_digits

    if not _FULL:
        _FULL.append(ensure_digits())
    full = _FULL[0]
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(10):
            src = sorted((full / split / str(c)).iterdir())[:n]
            dst = root / split / str(c)
            dst.mkdir(parents=True, exist_ok=True)
            for f in src:
                shutil.copy(f, dst / f.name)
    return root


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return tiny_imagefolder(tmp_path_factory.mktemp("data") / "small", per_class=12)


def train_argv(data, out, *extra, recipe="digits"):
    return ["train", "--model", "vitrim_vit_digits", "--model-kwargs", TINY, "--data", str(data), "--recipe",
            recipe, "--output", str(out), "--workers", "0", "--no-progress", "--batch-size", "16", *extra]


def test_recipes_hold_the_spec_values():
    assert get_recipe("idlevit").total_lr(2048) == pytest.approx(4e-5)
    assert get_recipe("idlevit").frozen == ("cls_token", "pos_embed")
    assert (get_recipe("idlevit").cut_weight, get_recipe("idlevit").kd_weight, get_recipe("idlevit").feature_weight) \
        == (20.0, 10.0, 1000.0)
    evit = get_recipe("evit")
    assert evit.total_lr(2048) == pytest.approx(8e-5) and evit.min_lr == 2e-6 and evit.weight_decay == 1e-6
    assert evit.warmup_epochs == 0 and not evit.distill and evit.shrink_start_epoch == 0
    dvit = get_recipe("dynamicvit")
    assert dvit.total_lr(1024) == 1e-3 and dvit.backbone_lr_scale == 0.01 and dvit.ratio_weight == 2.0
    dtps = get_recipe("dtps")
    assert dtps.total_lr(1024) == 2.5e-4 and dtps.min_lr == 1e-5 and dtps.warmup_epochs == 5
    assert get_recipe("etps").kd_weight == 0.5 and get_recipe("etps").ratio_weight is None
    assert all(r.epochs == 30 for n, r in RECIPES.items() if n in ("idlevit", "evit", "dynamicvit", "dtps", "etps"))
    with pytest.raises(Exception, match="unknown recipe 'nope'.*accepted"):
        get_recipe("nope")
    with pytest.raises(Exception, match="unknown recipe field"):
        get_recipe("evit").replace(learning_rate=1)


def test_param_groups_scale_and_freeze():
    import timm
    import vitrim
    from vitrim.train.engine import _param_groups

    model = timm.create_model("vitrim_vit_digits", depth=2, embed_dim=32, num_heads=2)
    groups = _param_groups(model, get_recipe("idlevit"))
    assert not model.cls_token.requires_grad and not model.pos_embed.requires_grad
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    groups = _param_groups(vitrim.apply(model, "tome", r=2), get_recipe("dynamicvit"))
    assert {g["lr_scale"] for g in groups} == {0.01}  # no new parameters for ToMe: all backbone


def test_objective_terms():
    from vitrim.train.objective import Objective, StudentOutput, TeacherOutput

    obj = Objective("tome", get_recipe("digits-finetune").replace(kd_weight=0.5), teacher=torch.nn.Identity(),
                    mixup_active=False)
    logits = torch.randn(4, 10)
    total, terms = obj(StudentOutput(logits, torch.zeros(4, 3, 8), None), torch.arange(4),
                       TeacherOutput(logits.clone(), torch.zeros(4, 3, 8)))
    assert set(terms) == {"ce", "kd"} and abs(terms["kd"]) < 1e-6
    assert total.item() == pytest.approx(terms["ce"] + terms["kd"])


@pytest.mark.parametrize("case", ["missing", "empty", "resume", "recipe", "batch", "arch"])
def test_bad_input_fails_before_work(case, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(small_data, out)
    if case == "missing":
        argv[argv.index("--data") + 1] = str(tmp_path / "nowhere")
        expect = "does not exist"
    elif case == "empty":
        (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
        (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
        argv[argv.index("--data") + 1] = str(tmp_path / "empty")
        expect = "holds no images"
    elif case == "resume":
        argv += ["--resume", str(tmp_path / "none.pt")]
        expect = "--resume"
    elif case == "recipe":
        argv[argv.index("--recipe") + 1] = "fast"
        expect = "unknown recipe 'fast'"
    elif case == "batch":
        argv[argv.index("--batch-size") + 1] = "1000"
        expect = "larger than the training set"
    else:
        import timm
        ckpt = tmp_path / "other.pt"
        torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), ckpt)
        argv += ["--checkpoint", str(ckpt)]
        expect = "does not fit"
    assert main(argv) == 2
    assert expect in capsys.readouterr().err
    assert not (out / "last.pt").exists()


def _run(argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "vitrim", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    data = tiny_imagefolder(tmp_path / "data", per_class=80)
    epochs = ["--epochs", "3", "--set", "warmup_epochs=1", "--set", "auto_augment='rand-m9-mstd0.5-inc1'",
              "--set", "reprob=0.25", "--mixup", "0.8", "--cutmix", "1.0", "--model-kwargs",
              "{'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'drop_path_rate': 0.1}"]
    full = _run(train_argv(data, tmp_path / "full", *epochs))
    assert full.wait(timeout=600) == 0, full.stdout.read()

    out = tmp_path / "killed"
    proc = _run(train_argv(data, out, *epochs))
    deadline = time.time() + 600
    while not (out / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    time.sleep(0.1)  # epoch 2 has started (or epoch 1's bookkeeping is ending); it lasts ~50 steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(out / "last.pt", weights_only=False)
    assert saved["epoch"] == 0, "the kill should land before the end of epoch 2"
    log = out / "metrics.jsonl"
    assert not log.exists() or len(log.read_text().splitlines()) <= 1

    resumed = _run(train_argv(data, out, *epochs, "--resume", str(out / "last.pt")))
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(out / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    rows_a = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val"]["top1"] for r in rows_a] == [r["val"]["top1"] for r in rows_b]


def test_existing_run_is_not_overwritten(small_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(small_data, out, "--epochs", "1")) == 0
    assert (out / "last.pt").exists() and (out / "best.pt").exists() and (out / "metrics.csv").exists()
    before = (out / "last.pt").stat().st_mtime_ns
    assert main(train_argv(small_data, out, "--epochs", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "last.pt").stat().st_mtime_ns == before


def test_train_reduced_then_eval(small_data, tmp_path, capsys):
    out = tmp_path / "tome"
    argv = train_argv(small_data, out, "--epochs", "1", "--method", "tome", "--r", "8", "--kd-weight", "0.5",
                      recipe="digits-finetune")
    assert main(argv) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"ce", "kd", "loss"} <= set(row["train"])
    assert row["unreduced_train_img_per_s"] > 0 and row["train_img_per_s"] > 0  # measured once at start-up
    log = capsys.readouterr().out
    assert "unreduced model:" in log and "img/s" in log and "(unreduced " in log
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--data", str(small_data), "--json",
                 "--workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    names = list(res)
    assert len(names) == 2 and "unreduced" in names[0] and "tome" in names[1]
    assert res[names[1]]["gmacs"] < res[names[0]]["gmacs"] and res[names[1]]["images"] == 40


def test_frozen_backbone_trains_only_the_method(small_data, tmp_path, capsys):
    """backbone_lr_scale=0 (how the shipped predictors are trained; only the method's parts learn, see
    test_param_groups_scale_and_freeze): the start-up speed check says why it times no unreduced step."""
    out = tmp_path / "frozen"
    argv = train_argv(small_data, out, "--epochs", "1", "--method", "dynamicvit", "--keep-rate", "0.7",
                      "--set", "backbone_lr_scale=0", recipe="digits-finetune")
    assert main(argv) == 0
    assert "training speed not measured (the backbone is frozen" in capsys.readouterr().out
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_img_per_s"] > 0 and row.get("unreduced_train_img_per_s") is None


def test_yaml_config_with_cli_override(small_data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: vitrim_vit_digits\nmodel_kwargs: {{depth: 2, embed_dim: 32, num_heads: 2}}\n"
                   f"data: {small_data}\nrecipe: digits\nepochs: 5\nbatch_size: 16\nworkers: 0\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--output", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["recipe"]["epochs"] == 1 and saved["recipe"]["batch_size"] == 16


@pytest.mark.slow
def test_ddp_two_cpu_processes(small_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitrim",
           *train_argv(small_data, out, "--epochs", "2", "--batch-size", "8")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2
    # each process saw half of each epoch: 2 x 8 per step, 120 images -> 7 steps of 16
    assert rows[0]["train_img_per_s"] > 0


def test_embedded_default_eval(capsys):
    """`vitrim eval` with no model or data: the shipped checkpoint on the digits validation split."""
    from vitrim.zoo import EMBEDDED_CHECKPOINT

    assert EMBEDDED_CHECKPOINT.is_file() and EMBEDDED_CHECKPOINT.stat().st_size < 10 * 2**20
    assert main(["eval", "--json", "--workers", "0"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]["vitrim_vit_digits"]
    assert res["images"] == 359 and res["top1"] > 90.0


def test_evit_keep_rate_warmup_is_stepped(small_data, tmp_path, monkeypatch):
    evit = importlib.import_module("vitrim.methods.evit")

    rates = []
    real = evit.keep_rate_schedule
    monkeypatch.setattr(evit, "keep_rate_schedule", lambda *a, **k: rates.append(real(*a, **k)) or rates[-1])
    out = tmp_path / "evit"
    argv = train_argv(small_data, out, "--epochs", "2", "--method", "evit", "--keep-rate", "0.5", "--locations",
                      "(1,)", "--set", "shrink_start_epoch=1", "--set", "shrink_epochs=1", recipe="digits-finetune")
    assert main(argv) == 0
    steps = len(rates) // 2
    assert rates[:steps] == [1.0] * steps                      # epoch 0: before the shrink start
    assert rates[steps] == 1.0 and 0.5 < rates[-1] < 1.0          # epoch 1: cosine descent towards 0.5
    assert all(a >= b for a, b in zip(rates[steps:], rates[steps + 1:]))


def test_randaugment_posterize_zero_bits_does_not_crash():
    """timm's PosterizeIncreasing reaches 0 bits; Pillow >= 13 rejects that; vitrim's transform copes."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    from vitrim.train.data import _fix_posterize, train_transform
    import timm

    model = timm.create_model("vitrim_vit_digits", depth=1)
    transform = train_transform(model, get_recipe("dtps"))
    ops = [op for t in transform.transforms for op in (getattr(t, "ops", None) or [])]
    assert any(op.name.startswith("Posterize") for op in ops)
    img = Image.new("RGB", (64, 64), (200, 100, 50))
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    _fix_posterize(type("T", (), {"transforms": [type("R", (), {"ops": [op]})()]})())
    assert op(img).getextrema() == ((0, 0), (0, 0), (0, 0))
