"""The command line: flops, bench (JSON), methods, and its errors."""
import json
import subprocess
import sys

import pytest
import torch

from vitrim.cli import main


def test_flops_table(capsys):
    assert main(["flops", "--model", "deit_small_patch16_224", "--r", "13"]) == 0
    out = capsys.readouterr().out
    assert "total 2.703 GMACs" in out and "ratio 1.70x" in out


def test_flops_json_traced(capsys):
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--r", "(16, -1)", "--traced", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reduced"]["gmacs"] == pytest.approx(0.421, abs=0.001)
    assert data["traced_gmacs"] == pytest.approx(0.421, abs=0.02)
    assert [l["tokens_mlp"] for l in data["reduced"]["layers"]][-1] == 10


def test_bench_json(capsys):
    rc = main(["bench", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--r", "4", "--batch-size", "2", "1",
               "--warmup", "1", "--repeats", "2", "--iters", "1", "--json"])
    assert rc == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in results] == [2, 1]
    for r in results:
        base, red = r["timings"]
        assert base["speedup"] == 1.0 and red["speedup"] > 0 and red["gmacs"] < base["gmacs"]
        assert r["env"]["torch"] == torch.__version__ and len(base["runs"]) == 2


@pytest.mark.parametrize("img_size", [None, 64])
def test_bench_pyramid_model(img_size, capsys):
    # PVT-v2 has no patch_embed.img_size and takes no img_size argument: its size is the input's
    size = [] if img_size is None else ["--img-size", str(img_size)]
    rc = main(["bench", "--model", "pvt_v2_b0", "--method", "idle", "--keep-rate", "0.5", "--batch-size", "1",
               "--warmup", "0", "--repeats", "1", "--iters", "1", "--json", *size])
    assert rc == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["input_size"][1:] == [img_size or 224] * 2
    base, red = result["timings"]
    assert red["gmacs"] < base["gmacs"]


def test_methods(capsys):
    assert main(["methods"]) == 0
    assert "tome" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["flops", "--model", "no_such_model"], "unknown timm model"),
    (["flops", "--r", "-3"], "r must be >= 0"),
    (["flops", "--method", "magic"], "unknown method"),
    (["flops", "--checkpoint", "/nonexistent.pt"], "does not exist"),
])
def test_errors_exit_2(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_checkpoint_with_more_than_weights(tmp_path, capsys):
    # a training run's last.pt carries numpy RNG state: not loaded with weights_only, said clearly
    import numpy as np
    import timm
    path = tmp_path / "last.pt"
    torch.save({"model": timm.create_model("deit_tiny_patch16_224").state_dict(), "rng": np.random.get_state()}, path)
    for cmd in ("flops", "eval"):
        assert main([cmd, "--model", "deit_tiny_patch16_224", "--checkpoint", str(path)]) == 2
        assert "holds objects other than weights" in capsys.readouterr().err


def test_checkpoint_of_other_architecture(tmp_path, capsys):
    import timm
    path = tmp_path / "tiny.pt"
    torch.save(timm.create_model("deit_tiny_patch16_224").state_dict(), path)
    assert main(["flops", "--model", "deit_tiny_patch16_224", "--checkpoint", str(path), "--r", "1"]) == 0
    assert main(["flops", "--model", "deit_small_patch16_224", "--checkpoint", str(path)]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "vitrim", "methods"], capture_output=True, text=True, check=True)
    assert "tome" in out.stdout
