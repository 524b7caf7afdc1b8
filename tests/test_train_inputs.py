"""Bad input to `vitrim train`, `vitrim eval` and `vitrim data`: a clear error before any work starts,
never a traceback or a silently wrong result (issue 12)."""
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitrim.cli import main
from vitrim.errors import VitrimError
from vitrim.train.recipes import get_recipe

TINY = "{'depth': 2, 'embed_dim': 32, 'num_heads': 2}"


def image_folder(root: Path, classes, per_class: int, splits=("train", "val")) -> Path:
    """Random 64 x 64 PNGs in class folders (under each split; ``splits=("",)``: at the root)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("fx")
    image_folder(root / "small", DIGITS, 4)
    image_folder(root / "twelve", [str(i) for i in range(12)], 1, splits=("",))
    image_folder(root / "three", ["a", "b", "c"], 1, splits=("",))
    image_folder(root / "lettered", list("abcdefghij"), 1, splits=("",))
    image_folder(root / "onlytrain", DIGITS, 1, splits=("train",))
    image_folder(root / "trainflat" / "train", [""], 2, splits=("",))  # images directly in train/
    image_folder(root / "val9", DIGITS, 4, splits=("train",))
    image_folder(root / "val9", DIGITS[:9], 1, splits=("val",))
    torch.save([1, 2, 3], root / "list.pt")
    (root / "text.pt").write_text("not a checkpoint")
    (root / "afile").write_text("x")
    return root


def train_argv(data, out, *extra):
    return ["train", "--model", "vitrim_vit_digits", "--model-kwargs", TINY, "--data", str(data), "--recipe",
            "digits", "--output", str(out), "--workers", "0", "--no-progress", "--epochs", "1", *extra]


@pytest.fixture(scope="module")
def run1(fx, tmp_path_factory):
    """One finished 1-epoch run (depth 2, no method)."""
    out = tmp_path_factory.mktemp("runs") / "run1"
    assert main(train_argv(fx / "small", out, "--batch-size", "8")) == 0
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a model is built or a dataset scanned."""
    import vitrim.models
    import vitrim.train.engine as engine

    def refuse(*a, **k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(vitrim.models, "create_model", refuse)
    monkeypatch.setattr(engine, "image_dataset", refuse)


# ---------------------------------------------------------------------- vitrim data
def _fake_digits(monkeypatch, n=40):
    """scikit-learn's digits cut to ``n`` images (4 per class): a build takes a fraction of a second."""
    import sklearn.datasets

    real = sklearn.datasets.load_digits()
    idx = np.concatenate([np.flatnonzero(real.target == c)[: n // 10] for c in range(10)])
    fake = type("Digits", (), {"images": real.images[idx], "target": real.target[idx]})()
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda *a, **k: fake)


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.") or
                  p.name.startswith(folder.name + "."))


def test_data_never_replaces_what_vitrim_did_not_write(fx, tmp_path, monkeypatch, capsys):
    _fake_digits(monkeypatch)
    mine = tmp_path / "photos"
    image_folder(mine, ["cat"], 2, splits=("",))
    (mine / "notes.txt").write_text("keep me")
    before = sorted(str(p.relative_to(mine)) for p in mine.rglob("*"))
    assert main(["data", "--output", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "vitrim did not write" in err and "left untouched" in err
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == before
    assert _siblings(mine) == []

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["data", "--output", str(afile)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert afile.read_text() == "x" and _siblings(afile) == []

    assert main(["data", "--output", "/proc/x/y"]) == 2
    assert "cannot be" in capsys.readouterr().err


def test_data_replaces_its_own_dataset_and_cleans_up_a_failed_build(tmp_path, monkeypatch, capsys):
    from vitrim.train.data import build_digits, is_digits_dataset

    _fake_digits(monkeypatch)
    out = tmp_path / "digits"
    out.mkdir()  # an empty folder is accepted
    assert main(["data", "--output", str(out)]) == 0
    assert is_digits_dataset(out) and len(list((out / "train").rglob("*.png"))) == 30 * 4  # 3 per class x 4
    (out / "train" / "0" / "stale.png").write_bytes(b"")
    assert main(["data", "--output", str(out), "--seed", "1"]) == 0  # vitrim's own: replaced
    assert not (out / "train" / "0" / "stale.png").exists() and "seed 1" in (out / "VERSION").read_text()
    assert _siblings(out) == []

    calls = []
    real_save = Image.Image.save

    def failing_save(self, *a, **k):
        calls.append(1)
        if len(calls) > 5:
            raise OSError("disk full")
        return real_save(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        build_digits(out, seed=2)
    assert _siblings(out) == [], "the temporary folder of a failed build is removed"
    assert "seed 1" in (out / "VERSION").read_text(), "the previous dataset is kept"


# ---------------------------------------------------------------------- splits and classes
def test_resolve_split_does_not_fall_back_to_the_root(fx, tmp_path):
    from vitrim.train.data import resolve_split

    with pytest.raises(VitrimError, match="has a train/ folder but no val/ folder"):
        resolve_split(fx / "onlytrain", "val")
    with pytest.raises(VitrimError, match="has a train/ folder but no val/ folder"):
        resolve_split(fx / "trainflat", "val")
    with pytest.raises(VitrimError, match="holds no images in class sub-folders"):
        resolve_split(fx / "trainflat", "train")  # not a dataset with one class named 'train'
    image_folder(tmp_path / "onlyval", DIGITS, 1, splits=("val",))
    with pytest.raises(VitrimError, match="has a val/ folder but no train/ folder"):
        resolve_split(tmp_path / "onlyval", "train")
    assert resolve_split(tmp_path / "onlyval", "val") == tmp_path / "onlyval" / "val"
    assert resolve_split(fx / "twelve", "val") == fx / "twelve"  # a class-folder root is still accepted
    loose = image_folder(tmp_path / "loose", ["a", "b"], 1, splits=("",))
    Image.new("RGB", (8, 8)).save(loose / "stray.png")
    with pytest.raises(VitrimError, match="holds images directly .*stray.png"):
        resolve_split(loose, "val")


def test_check_classes_counts_and_names(fx):
    import timm

    from vitrim.train.data import check_classes

    model = timm.create_model("vitrim_vit_digits", depth=1)
    assert check_classes(fx / "small" / "val", model) == DIGITS
    with pytest.raises(VitrimError, match=r"has 12 classes .* the model has 10 outputs.*--num-classes 12"):
        check_classes(fx / "twelve", model)
    with pytest.raises(VitrimError, match=r"has 3 classes \(a, b, c\) but the model has 10 outputs"):
        check_classes(fx / "three", model)
    if model.pretrained_cfg.get("label_names"):
        with pytest.raises(VitrimError, match="label 0 is folder 'a', the model's class 0 is '0'"):
            check_classes(fx / "lettered", model)
    check_classes(fx / "lettered", model, match_names=False)  # a new head: the count only
    with pytest.raises(VitrimError, match="label 0 is folder '0', the model's class 0 is 'zero'"):
        check_classes(fx / "small" / "val", model, names=["zero", *DIGITS[1:]])


@pytest.mark.parametrize("data,match", [
    ("twelve", "has 12 classes"),
    ("three", "has 3 classes"),
    ("onlytrain", "no val/ folder"),
    ("trainflat", "no val/ folder"),
])
def test_eval_refuses_data_that_does_not_fit_before_evaluating(data, match, fx, monkeypatch, capsys):
    import vitrim.train.evaluate

    monkeypatch.setattr(vitrim.train.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluation started"))
    assert main(["eval", "--data", str(fx / data), "--workers", "0", "--no-progress"]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--batch-size", "0"], "--batch-size must be an int >= 1"),
    (["--workers", "-1"], "--workers must be an int >= 0"),
    (["--device", "foo"], "unknown device 'foo'"),
    (["--img-size", "0"], "--img-size must be an int >= 1"),
])
def test_eval_numbers_and_device_before_the_model(argv, match, fx, no_work, capsys):
    assert main(["eval", "--data", str(fx / "small"), "--workers", "0", *argv]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu(fx, tmp_path, no_work, capsys):
    assert main(["eval", "--data", str(fx / "small"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(train_argv(fx / "small", tmp_path / "r", "--device", "cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_eval_random_weights_note_and_progress_when_piped(fx, capsys):
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    import timm
    if not timm.is_model("vitrim_test_random_vit"):
        @register_model
        def vitrim_test_random_vit(pretrained=False, **kwargs):
            return VisionTransformer(img_size=224, patch_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=10)

    assert main(["eval", "--model", "vitrim_test_random_vit", "--data", str(fx / "small"), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "random weights" in err and "accuracy is not meaningful" in err
    assert "vitrim_test_random_vit: 1/1" in err and "\r" not in err  # a plain progress line, not a bar


# ---------------------------------------------------------------------- vitrim train: before any work
@pytest.mark.parametrize("extra,match", [
    (["--output", "/proc/x/y"], "cannot be"),
    (["--output", "{afile}"], "is an existing file"),
    (["--output", "{afile}/sub"], "cannot be"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--set", "batch_size=abc"], "recipe field batch_size must be an int, got 'abc'"),
    (["--set", "lr=-1"], "recipe field lr must be > 0"),
    (["--lr", "nan"], "recipe field lr must be a finite number"),
    (["--min-lr", "-1"], "recipe field min_lr must be >= 0"),
    (["--weight-decay", "-0.1"], "recipe field weight_decay must be >= 0"),
    (["--warmup-epochs", "-1"], "recipe field warmup_epochs must be >= 0"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--set", "opt=foo"], "unknown optimiser 'foo'"),
    (["--set", "opt=sdg"], "close: sgd"),
    (["--set", "sched=foo"], "unknown or unsupported scheduler 'foo'"),
    (["--set", "sched=plateau"], "plateau needs a validation metric"),
    (["--set", "amp=1"], "recipe field amp must be True or False"),
    (["--set", "opt_betas=(0.9,)"], "recipe field opt_betas must be a list of 2 numbers"),
    (["--set", "batch_size=9", "--mixup", "0.8"], "must be even when Mixup"),
    (["--batch-size", "8", "--set", "batch_size=16"], "batch_size given twice: --batch-size 8 and --set"),
    (["--set", "lr=1e-3", "--set", "lr=2e-3"], "lr given twice by --set"),
    (["--workers", "-1"], "workers (--workers) must be an int >= 0"),
    (["--device", "foo"], "unknown device 'foo'"),
    (["--num-classes", "0"], "num_classes (--num-classes) must be an int >= 1"),
    (["--img-size", "0"], "img_size (--img-size) must be an int >= 1"),
    (["--model-kwargs", "foo"], "--model-kwargs must be a dict literal"),
    (["--model-kwargs", "{'img_size': 65}", "--img-size", "64"], "img_size given twice"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--data", "{fx}/twelve"], "validation would use the training images"),
    (["--data", "{fx}/onlytrain"], "no val/ folder"),
    (["--resume", "{fx}/text.pt"], "is not a PyTorch checkpoint"),
    (["--resume", "{fx}/list.pt"], "holds a list, not a training run"),
])
def test_train_refuses_before_any_work(extra, match, fx, tmp_path, no_work, capsys):
    extra = [e.replace("{afile}", str(fx / "afile")).replace("{fx}", str(fx)) for e in extra]
    assert main(train_argv(fx / "small", tmp_path / "run", *extra)) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_yaml_values_are_typed_and_the_command_line_overrides_them(fx, tmp_path, no_work, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: fast\n")
    assert main(train_argv(fx / "small", tmp_path / "run", "--config", str(bad))) == 2
    assert "recipe field lr must be a number, got 'fast'" in capsys.readouterr().err
    bad.write_text("batch_size: abc\n")
    assert main(train_argv(fx / "small", tmp_path / "run", "--config", str(bad))) == 2
    assert "recipe field batch_size must be an int, got 'abc'" in capsys.readouterr().err


def test_recipe_replace_checks_every_type():
    from vitrim.errors import OptionError

    r = get_recipe("digits")
    assert r.replace(lr="5e-4").lr == 5e-4           # YAML reads 5e-4 as a string
    assert r.replace(lr=1).lr == 1.0 and isinstance(r.replace(lr=1).lr, float)
    assert r.replace(opt_betas=[0.9, 0.99]).opt_betas == (0.9, 0.99)
    assert r.replace(frozen="cls_token").frozen == ("cls_token",)
    assert r.replace(clip_grad=None).clip_grad is None and r.replace(auto_augment=None).auto_augment is None
    for field, value, match in [
            ("batch_size", "abc", "must be an int"), ("epochs", 2.5, "must be an int"),
            ("batch_size", True, "must be an int"), ("clip_grad", "x", "must be a number or None"),
            ("scale", [0.5], "must be a list of 2 numbers"), ("frozen", [1], "must be a list of strings"),
            ("distill", "yes", "must be True or False"), ("loss_weights", 3, "must be a dict")]:
        with pytest.raises(OptionError, match=f"recipe field {field} {match}"):
            r.replace(**{field: value})
    for name in ("idlevit", "evit", "evit-scratch", "dynamicvit", "dtps", "tps", "etps", "tome", "digits",
                 "digits-finetune"):
        get_recipe(name).check()


def test_model_kwarg_errors_name_the_kwarg(fx, tmp_path, capsys):
    assert main(train_argv(fx / "small", tmp_path / "a", "--model-kwargs", "{'depht': 2}")) == 2
    assert "depht" in capsys.readouterr().err
    assert main(train_argv(fx / "small", tmp_path / "b", "--model-kwargs", "{'img_size': 32}")) == 0  # no conflict
    capsys.readouterr()


def test_train_checks_data_against_the_model(fx, tmp_path, capsys):
    assert main(train_argv(fx / "val9", tmp_path / "a", "--batch-size", "8")) == 2
    assert "validation classes" in capsys.readouterr().err and not (tmp_path / "a" / "last.pt").exists()
    assert main(train_argv(fx / "small", tmp_path / "b", "--num-classes", "12")) == 2
    assert "has 10 classes" in capsys.readouterr().err


# ---------------------------------------------------------------------- resume and last.pt
def test_last_pt_is_weights_only_and_usable_as_a_checkpoint(run1, fx, tmp_path, capsys):
    from vitrim.train.checkpoint import rng_state, set_rng_state

    ckpt = torch.load(run1 / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["classes"] == DIGITS
    import random
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(_roundtrip(state, tmp_path), weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run1 / "last.pt"), "--data", str(fx / "small"), "--workers", "0",
                 "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert list(res) == ["vitrim_vit_digits"] and res["vitrim_vit_digits"]["images"] == 40
    assert main(train_argv(fx / "small", tmp_path / "ft", "--batch-size", "8", "--checkpoint",
                           str(run1 / "last.pt"))) == 0


def _roundtrip(obj, tmp_path):
    path = tmp_path / "rng.pt"
    torch.save(obj, path)
    return path


def test_resume_validates_the_file_and_the_run(run1, fx, tmp_path, no_work, capsys):
    last = str(run1 / "last.pt")
    cases = [
        (["--resume", str(run1 / "best.pt")], "best.pt, which holds the weights only"),
        (["--resume", last, "--method", "tome", "--r", "2"], "method: the run used 'none', this one asks for 'tome'"),
        (["--resume", last, "--model-kwargs", "{'depth': 3}"], "model_kwargs: the run used {'depth': 2"),
        (["--resume", last, "--num-classes", "10"], "num_classes: the run used None"),
        (["--resume", last, "--img-size", "32"], "img_size: the run used None, this one asks for 32"),
    ]
    for extra, match in cases:
        argv = train_argv(fx / "small", tmp_path / "r", *extra)  # a second --model-kwargs wins in argparse
        assert main(argv) == 2, extra
        assert match in capsys.readouterr().err, extra


def test_resume_of_a_finished_run_says_so(run1, fx, tmp_path, no_work, capsys):
    before = (run1 / "config.json").read_text()
    assert main(train_argv(fx / "small", run1, "--batch-size", "8", "--resume", str(run1 / "last.pt"))) == 0
    captured = capsys.readouterr()
    assert "already finished 1 of 1 epoch(s)" in captured.err and "--epochs N with N > 1" in captured.err
    assert captured.out == "" and (run1 / "config.json").read_text() == before


def test_resume_continues(run1, fx, tmp_path, capsys):
    import shutil

    out = tmp_path / "cont"
    shutil.copytree(run1, out)
    assert main(train_argv(fx / "small", out, "--batch-size", "8", "--resume", str(out / "last.pt"),
                           "--epochs", "2")) == 0
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------------- progress and Ctrl-C
def test_train_progress_is_plain_lines_when_piped(fx, tmp_path, capsys):
    argv = [a for a in train_argv(fx / "small", tmp_path / "p", "--batch-size", "8") if a != "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch 1/1: 1/5 loss" in err and "epoch 1/1: 5/5 loss" in err


def test_interrupt_says_where_the_last_epoch_is(fx, tmp_path, monkeypatch, capsys):
    import vitrim.train.engine as engine
    from vitrim.train.engine import TrainConfig, train

    real = engine._train_epoch

    def interrupted_at(stop):
        def step(cfg, epoch, *a, **k):
            if epoch == stop:
                raise KeyboardInterrupt
            return real(cfg, epoch, *a, **k)
        return step

    recipe = get_recipe("digits").replace(epochs=3, batch_size=8)
    cfg = lambda out: TrainConfig(model="vitrim_vit_digits", data=str(fx / "small"), output=str(out), recipe=recipe,
                                  model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, workers=0,
                                  progress=False)
    monkeypatch.setattr(engine, "_train_epoch", interrupted_at(1))
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "a"))
    err = capsys.readouterr().err
    last = tmp_path / "a" / "last.pt"
    assert f"interrupted: the last complete epoch (1/3) is saved in {last} (resume with --resume {last})" in err
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(engine, "_train_epoch", interrupted_at(0))
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "b"))
    assert "interrupted before the first epoch completed: nothing was saved" in capsys.readouterr().err


def test_interrupt_is_held_during_the_checkpoint_writes():
    from vitrim.train.engine import _interrupt_held

    done = []
    with pytest.raises(KeyboardInterrupt):
        with _interrupt_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block finished")
    assert done == ["the block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
