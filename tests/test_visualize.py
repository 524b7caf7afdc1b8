"""vitrim visualize: panels read from the methods' provenance, and the PNG grid."""
import argparse

import numpy as np
import pytest
import torch

import vitrim
from vitrim.models import create_model
from vitrim.cli.visualize import add_visualize_parser
from vitrim.visual import load_image, method_panels, visualize


@pytest.fixture(scope="module")
def digits_model():
    return create_model("vitrim_vit_digits", pretrained=True).eval()


def _reduced(model, method, **opts):
    import copy

    return vitrim.apply(copy.deepcopy(model), method, **opts)


def test_tome_groups_match_the_source(digits_model):
    model = _reduced(digits_model, "tome", r=4)
    x, _ = load_image(model, None, "vitrim_vit_digits")
    panels = method_panels(model, x, layers=[11])
    vitrim.update(model, trace_source=True)
    _, state = vitrim.forward_tokens(model, x)
    assert len(np.unique(panels[0].groups)) == 65 - 12 * 4 - 1  # 16 patch tokens after 12 blocks
    assert (panels[0].groups.reshape(-1) == state.source[0, :, 1:].argmax(0).numpy()).all()
    assert model.vitrim.r == 4 and model.vitrim.trace_source  # options restored (True set above)


def test_pruning_panels_follow_the_records(digits_model):
    model = _reduced(digits_model, "etps", keep_rate=0.5)
    x, _ = load_image(model, None, "vitrim_vit_digits")
    panels = method_panels(model, x)
    assert [int((p.state == 0).sum()) for p in panels] == [32, 16, 8]
    assert [int((p.state == 1).sum()) for p in panels] == [32, 16, 8]
    assert int((panels[2].state == 2).sum()) == 48


def test_evit_fused_token_is_not_a_patch(digits_model):
    from vitrim.methods._pruning import prune_records

    model = _reduced(digits_model, "evit", keep_rate=0.5)
    x, _ = load_image(model, None, "vitrim_vit_digits")
    panels = method_panels(model, x)
    with torch.no_grad():
        _, state = vitrim.forward_with_state(model, x)
    for panel, rec in zip(panels, prune_records(state)):
        pos = rec.positions[0]
        assert pos[-1] == -1  # the fused token, appended after the kept ones, is no patch
        kept = np.zeros(64, dtype=bool)
        kept[pos[pos >= 0].numpy()] = True
        assert ((panel.state == 0).reshape(-1) == kept).all()


def test_idle_panels(digits_model):
    model = _reduced(digits_model, "idle", keep_rate=0.7)
    x, _ = load_image(model, None, "vitrim_vit_digits")
    panels = method_panels(model, x, layers=[3, 11])
    assert [int((p.state == 0).sum()) for p in panels] == [44, 21]  # floor(64 * 0.7), floor(64 * 0.7^3)


@pytest.mark.parametrize("method, opts", [("tome", ["--r", "4"]), ("dtps", ["--keep-rate", "0.7"]), ("idle", [])])
def test_cli_writes_png(tmp_path, capsys, method, opts):
    p = argparse.ArgumentParser()
    add_visualize_parser(p.add_subparsers())
    out = tmp_path / f"{method}.png"
    args = p.parse_args(["visualize", "--method", method, *opts, "--output", str(out)])
    assert args.func(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5_000
    assert f"vitrim_vit_digits + {method}" in capsys.readouterr().out


def test_photo_and_target_gmacs(tmp_path):
    model = create_model("deit_tiny_patch16_224").eval()
    vitrim.apply(model, "tome", target_gmacs=0.8)
    x, pic = load_image(model, None, "deit_tiny_patch16_224")
    assert x.shape == (1, 3, 224, 224) and pic.shape == (224, 224, 3)
    path = visualize(model, str(tmp_path / "astronaut.png"), layers=[5])
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_errors(tmp_path, digits_model):
    from vitrim.errors import NotReducedError, VitrimError

    with pytest.raises(NotReducedError):
        visualize(digits_model, str(tmp_path / "x.png"))
    model = _reduced(digits_model, "tome", r=2)
    with pytest.raises(VitrimError, match="cannot read image"):
        visualize(model, str(tmp_path / "x.png"), image=str(tmp_path / "missing.jpg"))
