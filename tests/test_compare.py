"""vitrim compare on the embedded default: rows, CSV, Markdown and the plots."""
import argparse
import csv

import pytest

from vitrim.cli.compare import add_compare_parser
from vitrim.compare import compare, default_sweep, markdown_table, pareto_front, parse_checkpoints, parse_sweep
from vitrim.errors import VitrimError
from vitrim.zoo import DIGITS_MODELS, shipped_method_weights


def test_default_sweeps_fit_the_model():
    assert default_sweep("tome", 12, 196) == [{"r": 8}, {"r": 13}, {"r": 16}]   # DeiT-S
    assert default_sweep("tome", 12, 64) == [{"r": 2}, {"r": 4}, {"r": 5}]      # the embedded model
    assert default_sweep("idle", 12, 64) == [{"keep_rate": 0.9}, {"keep_rate": 0.7}, {"keep_rate": 0.5}]


def test_parsers():
    assert parse_sweep("tome:r=2,4; evit:keep_rate=0.7") == {"tome": [{"r": 2}, {"r": 4}],
                                                             "evit": [{"keep_rate": 0.7}]}
    with pytest.raises(VitrimError, match="METHOD:OPTION"):
        parse_sweep("tome=2")
    with pytest.raises(VitrimError, match="does not exist"):
        parse_checkpoints(["idle:0.7=/nonexistent/best.pt"])


def test_pareto_front():
    pts = [(1.0, 80.0), (2.0, 90.0), (1.5, 70.0), (3.0, 90.0), (0.5, 60.0)]
    assert pareto_front(pts, lower_x_better=True) == [4, 0, 1]
    assert pareto_front(pts, lower_x_better=False) == [3]


def test_compare_embedded_default(tmp_path):
    out = tmp_path / "report"
    sweeps = {"tome": [{"r": 4}], "evit": [{"keep_rate": 0.7}], "etps": [{"keep_rate": 0.7}],
              "dtps": [{"keep_rate": 0.7}], "dynamicvit": [{"keep_rate": 0.7}], "idle": [{"keep_rate": 0.7}]}
    res = compare(sweeps=sweeps, batch_sizes=[2], warmup=1, repeats=1, iters=1, max_images=40,
                  output=str(out), progress=False)
    assert res.batch_sizes == [1, 2] and res.images == 40
    assert [(r.method, r.setting) for r in res.rows] == [
        ("none", "-"), ("tome", "r=4"), ("evit", "keep_rate=0.7"), ("etps", "keep_rate=0.7"),
        ("dtps", "keep_rate=0.7"), ("dynamicvit", "keep_rate=0.7"), ("idle", "keep_rate=0.7")]
    base = res.rows[0]
    assert base.top1 > 80 and all(0 <= r.top1 <= 100 for r in res.rows)
    assert all(r.gmacs < base.gmacs for r in res.rows[1:])
    assert base.speedup[2] == 1.0 and all(r.latency_ms > 0 and r.img_per_s[2] > 0 for r in res.rows)
    assert res.rows[5].params_m > base.params_m  # DynamicViT's predictors are counted
    assert [r.weights for r in res.rows[4:6]] == ["shipped fine-tune"] * 2  # the shipped predictors, not random ones
    with open(out / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert [l["method"] for l in lines] == [r.method for r in res.rows]
    assert float(lines[1]["gmacs"]) == pytest.approx(res.rows[1].gmacs)
    md = (out / "results.md").read_text()
    assert markdown_table(res) in md and md.count("\n| ") == len(res.rows) + 1
    for name in ("acc_vs_gmacs.png", "acc_vs_throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name).stat().st_size > 10_000


def test_cli_checkpoint_row(tmp_path, capsys):
    import torch

    import vitrim
    from vitrim.models import create_model

    ckpt = tmp_path / "idle.pt"
    torch.save(vitrim.apply(create_model("vitrim_vit_digits", pretrained=True), "idle", keep_rate=0.9).state_dict(),
               ckpt)
    p = argparse.ArgumentParser()
    add_compare_parser(p.add_subparsers())
    args = p.parse_args(["compare", "--methods", "idle", "--sweep", "idle:keep_rate=0.5", "--batch-size", "2",
                         "--repeats", "1", "--warmup", "0", "--iters", "1", "--max-images", "20",
                         "--checkpoint", f"idle:0.9={ckpt}", "--output", str(tmp_path / "r")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(l.split()[:2] == ["idle", "keep_rate=0.9"] and l.endswith("checkpoint [1]") for l in lines)
    assert f"[1] {ckpt}" in lines
    off = next(l for l in lines if l.split()[:2] == ["idle", "keep_rate=0.5"])
    assert "checkpoint" not in off and "untrained" not in off  # off the shelf
    assert "wrote " + str(tmp_path / "r" / "acc_vs_gmacs.png") in out


@pytest.mark.parametrize("model", sorted(DIGITS_MODELS))
def test_shipped_predictors_fit_their_model(model):
    """Every digits model ships DynamicViT and dTPS predictors at the default sweep's keep rates, and each
    file holds exactly the learned parts the method adds to that model."""
    import timm
    import torch

    import vitrim

    for method in ("dynamicvit", "dtps"):
        for keep in (0.9, 0.7, 0.5):
            path = shipped_method_weights(model, method, {"keep_rate": keep})
            assert path is not None and path.parent.name == model
            reduced = vitrim.apply(timm.create_model(model), method, keep_rate=keep)
            state = torch.load(path, map_location="cpu", weights_only=True)
            expected = {k: v.shape for k, v in reduced.state_dict().items() if k.startswith("vitrim.")}
            assert {k: v.shape for k, v in state.items()} == expected
    assert shipped_method_weights(model, "dynamicvit", {"keep_rate": 0.8}) is None
    assert shipped_method_weights("deit_tiny_patch16_224", "dynamicvit", {"keep_rate": 0.7}) is None


def test_compare_default_methods_are_those_the_model_accepts(tmp_path):
    """Without ``methods`` a pyramid model is compared with the methods that can reduce it (idle); the
    others are listed with the reason. Asked for by name (or by a sweep), a refused method is an error."""
    from vitrim.compare import skipped_note
    from vitrim.errors import UnsupportedModelError
    kw = dict(batch_sizes=[1], img_size=64, warmup=0, repeats=1, iters=1, progress=False)
    res = compare("pvt_v2_b0", sweeps={"idle": [{"keep_rate": 0.5}]}, output=str(tmp_path), plots=False, **kw)
    assert [(r.method, r.setting) for r in res.rows] == [("none", "-"), ("idle", "keep_rate=0.5")]
    assert sorted(res.skipped) == ["dtps", "dynamicvit", "etps", "evit", "tome"]
    assert "cannot reduce a pyramid model" in res.skipped["tome"]
    note = skipped_note(res)
    assert note.startswith("not run: tome, evit") and note.endswith("compared: idle.")
    md = (tmp_path / "results.md").read_text()
    assert note in md and "no top-1 (no data)" in md
    with pytest.raises(UnsupportedModelError, match="cannot reduce a pyramid model"):
        compare("pvt_v2_b0", methods=["tome"], output=None, **kw)
    with pytest.raises(UnsupportedModelError, match="cannot reduce a pyramid model"):
        compare("pvt_v2_b0", sweeps={"tome": [{"r": 1}]}, output=None, **kw)
