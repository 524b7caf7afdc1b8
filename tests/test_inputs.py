"""No silent wrong results, no raw tracebacks: every public entry point of a reduced model is reduced or
refused, and bad inputs to the API and the CLI get a clear error before any work starts."""
import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch

import vitrim
from conftest import small_vit
from vitrim.cli import main
from vitrim.errors import OptionError, UnsupportedModelError, VitrimError
from vitrim.methods.base import get_method_class

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
REDUCING = {"tome": {"r": 4}, "evit": {"keep_rate": 0.5, "locations": (1, 2)},
            "etps": {"keep_rate": 0.5, "locations": (1, 2)}, "dynamicvit": {"keep_rate": 0.7, "locations": (1, 2)},
            "dtps": {"keep_rate": 0.7, "locations": (1, 2)}, "idle": {"keep_rate": 0.5}}


def digits():
    import timm

    return timm.create_model("vitrim_vit_digits", pretrained=True).eval()


# ---------------------------------------------------------------------- every entry point reduced or refused
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_forward_intermediates_follow_the_reduction(name):
    model = vitrim.apply(small_vit(depth=4), name, **REDUCING[name]).eval()
    with torch.no_grad():
        final, maps = model.forward_intermediates(X)
        tokens, state = vitrim.forward_tokens(model, X)
        nlc = model.forward_intermediates(X, output_fmt="NLC", intermediates_only=True)
        dense = vitrim.forward_dense(model, X)
        last = model.get_intermediate_layers(X, n=1, norm=True)[0]
    assert torch.allclose(final, tokens, atol=1e-6)                      # the final features are the reduced ones
    assert [m.shape for m in maps] == [(2, 48, 8, 8)] * 4               # NCHW: one feature per patch
    assert nlc[-1].shape[1] == tokens.shape[1] - state.num_prefix_tokens  # NLC: the tokens the method leaves
    assert torch.allclose(last, tokens[:, state.num_prefix_tokens:], atol=1e-6)
    with torch.no_grad():
        normed = model.forward_intermediates(X, norm=True, intermediates_only=True)[-1]
    assert torch.allclose(normed.permute(0, 2, 3, 1), dense, atol=1e-6)  # the last map is forward_dense's grid


def test_forward_intermediates_merge_counts():
    model = vitrim.apply(small_vit(depth=4), "tome", r=8)
    with torch.no_grad():
        nlc = model.forward_intermediates(X, output_fmt="NLC", intermediates_only=True)
    assert [t.shape[1] for t in nlc] == [56, 48, 40, 32]
    with pytest.raises(VitrimError, match="attn_mask"):
        model.forward_intermediates(X, attn_mask=torch.zeros(1))


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_forward_head_of_forward_features_equals_forward(pool):
    model = vitrim.apply(small_vit(depth=4, global_pool=pool, class_token=False), "tome", r=6)
    with torch.no_grad():
        whole = model(X)
        split = model.forward_head(model.forward_features(X))
        features = model.forward_head(model.forward_features(X), pre_logits=True)
    assert torch.allclose(whole, split, atol=1e-6)
    assert features.shape == (2, 48)
    with pytest.raises(VitrimError, match="forward_features"):
        model.forward_head(model.forward_features(X) * 1.0)  # the sizes are lost with a new tensor


def test_hybrid_vits_are_refused():
    import timm

    model = timm.create_model("vit_tiny_r_s16_p8_224")
    with pytest.raises(UnsupportedModelError, match="HybridEmbed.*not supported"):
        vitrim.apply(model, "tome")
    with pytest.raises(UnsupportedModelError, match="HybridEmbed"):
        vitrim.flops(model)


def test_compiled_model_is_refused_with_the_order():
    with pytest.raises(UnsupportedModelError, match=r"vitrim.apply\(model, ...\) first and torch.compile"):
        vitrim.apply(torch.compile(small_vit()), "tome", r=2)


@pytest.mark.parametrize("name", sorted(REDUCING))
def test_pickle_save_and_deepcopy_give_identical_outputs(name):
    model = vitrim.apply(small_vit(depth=4), name, **REDUCING[name]).eval()
    with torch.no_grad():
        ref = model(X)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert type(other) is type(model)
        with torch.no_grad():
            assert torch.equal(other.eval()(X), ref)
    restored = vitrim.remove(pickle.loads(pickle.dumps(model)))
    assert type(restored).__name__ == "VisionTransformer"


def test_pickle_hugging_face_and_pyramid_models():
    import timm
    import transformers

    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    hf = vitrim.apply(transformers.ViTForImageClassification(cfg).eval(), "tome", r=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(hf))(x).logits, hf(x).logits)
    pvt = vitrim.apply(timm.create_model("pvt_v2_b0").eval(), "idle", keep_rate=0.5)
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(pvt))(X), pvt(X))


@pytest.mark.parametrize("name", sorted(REDUCING))
@pytest.mark.parametrize("train", [False, True])
def test_empty_batch_gives_an_empty_result(name, train):
    model = vitrim.apply(small_vit(depth=4), name, **REDUCING[name]).train(train)
    assert model(torch.randn(0, 3, 64, 64)).shape == (0, 10)  # as timm's own model


# ---------------------------------------------------------------------- options: honoured, or refused
def test_tome_default_r_is_the_models_own_everywhere(capsys):
    assert vitrim.get_method(vitrim.apply(digits(), "tome")).r == 4          # 0.8 of 64 // 12
    import timm

    with torch.device("meta"):
        deit = timm.create_model("deit_small_patch16_224")
    assert vitrim.get_method(vitrim.apply(deit, "tome")).r == 13
    assert main(["flops", "--model", "vitrim_vit_digits"]) == 0
    out = capsys.readouterr().out
    assert "'r': 4" in out and "tokens=65" in out


def test_impossible_or_conflicting_options_are_refused():
    with pytest.raises(OptionError, match="r=100 asks block 0 to merge 100 tokens, but it can merge at most 32"):
        vitrim.apply(digits(), "tome", r=100)
    with pytest.raises(OptionError, match="both set the kept tokens"):
        vitrim.apply(digits(), "evit", tokens=5, keep_rate=0.3)
    with pytest.raises(OptionError, match="nothing would be pruned"):
        vitrim.apply(digits(), "evit", tokens=64)
    with pytest.raises(OptionError, match="leaves no patch token computed"):
        vitrim.apply(digits(), "idle", keep_rate=0.01)
    model = vitrim.apply(digits(), "evit", tokens=20)
    assert vitrim.get_method(model).options()["keep_rate"] is None
    with pytest.raises(OptionError, match="tokens=None"):
        vitrim.update(model, keep_rate=0.5)
    vitrim.update(model, keep_rate=0.5, tokens=None)
    import numpy as np
    assert vitrim.get_method(vitrim.apply(digits(), "tome", r=np.int64(3))).r == 3


@pytest.mark.parametrize("method, layers, match", [
    ("tome", [20], r"layers \[20\] are not blocks of this model; accepted: 0-based block indices in 0..11"),
    ("tome", [-1], r"layers \[-1\]"),
    ("idle", [0, 1], r"nothing to draw at blocks \[0, 1\]; it reduces tokens at blocks \[3, 4"),
    ("evit", [5], r"at blocks \[5\]; it reduces tokens at blocks \[3, 6, 9\]"),
])
def test_visualize_layers_are_checked(method, layers, match, tmp_path):
    from vitrim.visual import visualize

    with pytest.raises(VitrimError, match=match):
        visualize(vitrim.apply(digits(), method), str(tmp_path / "v.png"), layers=layers)


def test_picture_block_numbers_are_zero_based_like_the_options():
    from vitrim.visual import load_image, method_panels

    model = vitrim.apply(digits(), "evit", keep_rate=0.5)
    x, _ = load_image(model, None, "vitrim_vit_digits")
    assert [p.title.split(":")[0] for p in method_panels(model, x)] == ["block 3", "block 6", "block 9"]


# ---------------------------------------------------------------------- outputs, devices, files: before any work
def _no_model_built(monkeypatch):
    import vitrim.cli.common as common
    import vitrim.compare.run as run

    def refuse(*a, **k):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(run, "create_model", refuse)
    monkeypatch.setattr(common.api, "apply", refuse)


@pytest.mark.parametrize("kwargs, match", [
    ({"output": "/proc/vitrim-x/y"}, "cannot be written"),
    ({"repeats": 0}, "repeats must be an int >= 1"),
    ({"max_images": 0}, "max_images must be an int >= 1"),
    ({"batch_sizes": [2.5]}, "each batch size must be an int >= 1"),
    ({"device": "foo"}, "unknown device 'foo'"),
    ({"methods": ["tome"], "sweeps": {"evit": [{"keep_rate": 0.5}]}}, "not among the compared methods"),
    ({"methods": ["fancy"]}, "unknown method 'fancy'"),
])
def test_compare_checks_inputs_before_any_work(kwargs, match, monkeypatch):
    from vitrim.compare import compare

    _no_model_built(monkeypatch)
    with pytest.raises(VitrimError, match=match):
        compare(**kwargs)


def test_compare_checks_the_data_against_the_model(tmp_path):
    from PIL import Image

    from vitrim.compare import compare

    for c in range(12):
        (tmp_path / "d" / f"c{c:02d}").mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(tmp_path / "d" / f"c{c:02d}" / "a.png")
    with pytest.raises(VitrimError, match="has 12 classes.*the model has 10 outputs"):
        compare(methods=[], data=str(tmp_path / "d"), output=None, progress=False)


def test_compare_reports_progress_when_piped(capsys):
    from vitrim.compare import compare

    compare(methods="tome", sweeps={"tome": [{"r": 4}]}, batch_sizes=[2], warmup=0, repeats=1, iters=1,
            max_images=8, output=None, progress=True)
    err = capsys.readouterr().err  # not a terminal under pytest: plain lines
    assert "compare: 1/" in err and "compare: 4/4" in err


@pytest.mark.parametrize("argv, match", [
    (["export", "--model", "vitrim_vit_digits", "-o", "/proc/vitrim-x/m.onnx"], "cannot be written"),
    (["export", "--model", "vitrim_vit_digits", "-o", "m.txt"], "must end in .onnx"),
    (["visualize", "-o", "/proc/vitrim-x.png"], "cannot be written"),
    (["visualize", "-o", "picture"], "must end in .png"),
    (["bench", "--model", "vitrim_vit_digits", "--device", "foo"], "unknown device 'foo'"),
    (["bench", "--model", "vitrim_vit_digits", "--device", "meta"], "cannot run vitrim here"),
    (["bench", "--model", "vitrim_vit_digits", "--repeats", "0"], "--repeats must be an int >= 1"),
    (["bench", "--model", "vitrim_vit_digits", "--batch-size", "0"], "--batch-size must be an int >= 1"),
])
def test_cli_checks_inputs_before_building_a_model(argv, match, capsys, monkeypatch):
    _no_model_built(monkeypatch)
    import vitrim.cli.visualize as vis
    monkeypatch.setattr(vis, "create_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    assert main(argv) == 2
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["flops", "--model", "vitrim_vit_digits", "--traced"]) == 0  # no device involved
    assert main(["bench", "--model", "vitrim_vit_digits", "--device", "cuda"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err


@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b"this is not a checkpoint\n", "is not a PyTorch checkpoint"),
    (b"# notes\n", "is not a PyTorch checkpoint"),
    (b"PK\x03\x04garbage", "is not a PyTorch checkpoint"),
])
def test_checkpoint_files_of_the_wrong_kind(content, match, tmp_path, capsys):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    assert main(["flops", "--model", "vitrim_vit_digits", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and "RNG" not in err


@pytest.mark.parametrize("obj, match", [([1, 2, 3], "holds list, not a state dict"),
                                        (torch.zeros(3), "holds Tensor, not a state dict"),
                                        ({"a": 1}, "not a state dict")])
def test_checkpoint_objects_that_are_not_state_dicts(obj, match, tmp_path, capsys):
    path = tmp_path / "obj.pt"
    torch.save(obj, path)
    assert main(["flops", "--model", "vitrim_vit_digits", "--checkpoint", str(path)]) == 2
    assert match in capsys.readouterr().err


def test_broken_safetensors_and_mismatched_image_size(tmp_path):
    from vitrim.models import create_model, read_checkpoint

    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"x")
    with pytest.raises(VitrimError, match="not a valid .safetensors file"):
        read_checkpoint(str(bad))
    with pytest.raises(VitrimError, match="do not fit the model") as err:
        create_model("vitrim_vit_digits", pretrained=True, img_size=128)
    assert "network" not in str(err.value)


def test_malformed_config_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1, 2\n")
    assert main(["eval", "--config", str(path)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_source_to_grid_without_a_source_map():
    model = vitrim.apply(small_vit(), "tome", r=2)
    with torch.no_grad():
        model(X)
    with pytest.raises(VitrimError, match="trace_source=True"):
        vitrim.source_to_grid(model.vitrim.source, (8, 8), 1)
    with pytest.raises(VitrimError, match=r"\[B, T, T0\]"):
        vitrim.source_to_grid(torch.ones(4, 4), (2, 2), 0)


@pytest.mark.parametrize("img_size", [0, -64, "64", 64.0, (64,), 63])
def test_image_sizes_are_checked(img_size):
    import timm

    model = timm.create_model("vitrim_vit_digits", dynamic_img_size=True)
    with pytest.raises(OptionError, match="img_size"):
        vitrim.flops(model, img_size)


def test_export_needs_the_onnx_extra(monkeypatch):
    import importlib.util
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"onnx", "onnxscript", "onnxruntime"} <= {d.split(">")[0].split("=")[0] for d in extras["onnx"]}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(VitrimError, match=r"pip install 'vitrim\[onnx\]'"):
        vitrim.export_onnx(vitrim.apply(small_vit(), "tome", r=2), "m.onnx", input_size=(1, 3, 64, 64))


# ---------------------------------------------------------------------- the command line as users expect it
def test_version_and_descriptions(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"vitrim {vitrim.__version__}"
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in vitrim.methods():
        assert f"{name}" in out and get_method_class(name).describe() in out
    assert main(["recipes"]) == 0
    assert all(len(line.split(maxsplit=1)) == 2 for line in capsys.readouterr().out.splitlines())


def test_every_method_option_says_which_methods_use_it(capsys):
    with pytest.raises(SystemExit):
        main(["flops", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--keep-rate VALUE used by dtps, dynamicvit, etps, evit, idle" in text
    assert "--r VALUE used by tome" in text


def test_closed_pipe_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "vitrim", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away at once
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_solve_checks_the_device_before_measuring():
    with pytest.raises(VitrimError, match="unknown device 'tpu'"):
        vitrim.solve(small_vit(), "tome", target_speedup=1.5, device="tpu")


def test_evaluate_refuses_a_missing_gpu_and_an_empty_loader():
    from vitrim.train.evaluate import evaluate
    model = small_vit()
    if not torch.cuda.is_available():
        with pytest.raises(VitrimError, match="CUDA is not available"):
            evaluate(model, [], torch.device("cuda:0"))
    with pytest.raises(VitrimError, match="no images"):
        evaluate(model, [], torch.device("cpu"))


def test_checkpoint_of_another_model_names_the_keys(tmp_path):
    from vitrim.models import load_checkpoint
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(VitrimError, match=r"weights are missing .*not the model's \(encoder.weight\)"):
        load_checkpoint(small_vit(), str(path))


def test_forward_dense_needs_a_batch():
    reduced = vitrim.apply(small_vit(), "tome", r=2)
    with pytest.raises(OptionError, match=r"\[B, 3, H, W\]"):
        vitrim.forward_dense(reduced, torch.randn(3, 32, 32))
