"""Analytic GMACs of the pruning family against the spec tables (tps.md §7, evit.md §5, dynamicvit.md §8)."""
import copy
import functools

import pytest
import timm
import torch

import vitrim
from vitrim.cli import main

CONFIGS = [((3, 6, 9), 0.7), ((3, 5, 7, 9), 0.7), ((2, 4, 6, 8), 0.7),
           ((3, 6, 9), 0.5), ((3, 5, 7, 9), 0.5), ((2, 4, 6, 8), 0.5)]
# tps.md §7: every comparison point of the paper's figure (computed values), per model and method
TABLE = {
    "deit_small_patch16_224": {
        "dynamicvit": [2.981, 2.696, 2.404, 2.229, 1.986, 1.631],
        "dtps": [2.992, 2.707, 2.415, 2.239, 1.996, 1.641],
        "evit": [3.029, 2.746, 2.462, 2.309, 2.073, 1.723],
        "etps": [3.008, 2.720, 2.431, 2.292, 2.055, 1.701],
    },
    "deit_tiny_patch16_224": {
        "dynamicvit": [0.801, 0.725, 0.645, 0.602, 0.539, 0.442],
        "dtps": [0.807, 0.731, 0.651, 0.606, 0.543, 0.447],
        "evit": [0.821, 0.745, 0.667, 0.629, 0.568, 0.473],
        "etps": [0.817, 0.741, 0.662, 0.627, 0.566, 0.470],
    },
}
_META = {}


def meta_model(name):
    """Weightless (meta-device) timm model: FLOPs need shapes only."""
    if name not in _META:
        with torch.device("meta"):
            _META[name] = timm.create_model(name)
    return _META[name]


def reduced(name, method, **opts):
    model = meta_model(name)
    if vitrim.is_reduced(model):
        vitrim.remove(model)
    with torch.device("meta"):  # predictors are built weightless too
        return vitrim.apply(model, method, **opts)


@pytest.mark.parametrize("model", list(TABLE))
@pytest.mark.parametrize("method", ["dynamicvit", "dtps", "evit", "etps"])
def test_tps_comparison_points(model, method):
    for (locations, rho), expected in zip(CONFIGS, TABLE[model][method]):
        got = vitrim.flops(reduced(model, method, keep_rate=rho, locations=locations))
        assert got == pytest.approx(expected, abs=0.001), (locations, rho)


@pytest.mark.parametrize("rate,fused,unfused,readme", [
    (0.9, 4.022, 3.988, 4.0), (0.8, 3.477, 3.444, 3.5), (0.7, 3.029, 2.997, 3.0), (0.6, 2.635, 2.608, 2.6),
    (0.5, 2.309, 2.282, 2.3),
])
def test_evit_deit_s_table(rate, fused, unfused, readme):
    got = vitrim.flops(reduced("deit_small_patch16_224", "evit", keep_rate=rate))
    assert got == pytest.approx(fused, abs=0.001) and round(got, 1) == readme
    got = vitrim.flops(reduced("deit_small_patch16_224", "evit", keep_rate=rate, fuse=False))
    assert got == pytest.approx(unfused, abs=0.001)


@pytest.mark.parametrize("name,fused,unfused", [
    ("deit_base_patch16_224", [15.395, 13.327, 11.610, 10.088, 8.820], [15.268, 13.201, 11.485, 9.984, 8.716]),
    ("deit_tiny_patch16_224", [1.092, 0.942, 0.821, 0.715, 0.629], [1.083, 0.933, 0.812, 0.708, 0.622]),
])
def test_evit_deit_b_and_t(name, fused, unfused):
    for rate, f, u in zip([0.9, 0.8, 0.7, 0.6, 0.5], fused, unfused):
        assert vitrim.flops(reduced(name, "evit", keep_rate=rate)) == pytest.approx(f, abs=0.001)
        assert vitrim.flops(reduced(name, "evit", keep_rate=rate, fuse=False)) == pytest.approx(u, abs=0.001)


@pytest.mark.parametrize("name,with_pred,without", [
    ("deit_small_patch16_224", 2.981, 2.878), ("deit_base_patch16_224", 11.476, 11.064),
    ("deit_tiny_patch16_224", 0.801, 0.775),
])
def test_dynamicvit_predictor_counted(name, with_pred, without):
    report = vitrim.flops_report(reduced(name, "dynamicvit"))
    assert report.gmacs == pytest.approx(with_pred, abs=0.001)
    assert (report.macs - report.extra_macs) / 1e9 == pytest.approx(without, abs=0.001)
    if name == "deit_small_patch16_224":
        assert round(report.gmacs, 2) == 2.98 and round((report.macs - report.extra_macs) / 1e9, 2) == 2.88
    C = report.layers[0].tokens_in and meta_model(name).embed_dim
    assert report.extra_macs == (196 + 137 + 96) * (C * C + C * C // 2 + C * C // 8 + C // 2)


@pytest.mark.parametrize("rate,expected", [(0.9, 4.041), (0.8, 3.463), (0.6, 2.565), (0.5, 2.229)])
def test_dynamicvit_other_rates(rate, expected):
    assert vitrim.flops(reduced("deit_small_patch16_224", "dynamicvit", keep_rate=rate)) == \
        pytest.approx(expected, abs=0.001)


def test_report_rows_and_squeeze_cost():
    report = vitrim.flops_report(reduced("deit_small_patch16_224", "etps"))
    assert [l.tokens_in for l in report.layers] == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert [report.layers[i].tokens_mlp for i in (3, 6, 9)] == [139, 98, 69]
    assert report.layers[3].macs - vitrim.flops_report(reduced("deit_small_patch16_224", "evit", fuse=False)) \
        .layers[3].macs == 2 * 58 * 138 * 384
    report = vitrim.flops_report(reduced("deit_small_patch16_224", "dtps"))
    assert [l.tokens_in for l in report.layers] == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3


def test_rate_one_costs_the_unreduced_model():
    for method in ("evit", "etps", "dynamicvit", "dtps"):
        assert vitrim.flops(reduced("deit_small_patch16_224", method, keep_rate=1.0)) == pytest.approx(4.599, abs=0.001)


@functools.lru_cache(maxsize=None)
def _deit_s():
    return timm.create_model("deit_small_patch16_224").eval()


@pytest.mark.parametrize("method", ["evit", "dynamicvit", "etps", "dtps"])
def test_traced_count_agrees(method):
    model = vitrim.apply(copy.deepcopy(_deit_s()), method)
    # the tracer also sees the class-attention side product and the similarity matmul; the
    # convention counts the squeeze as 2 N_p N_r C, the gather form computes about half of it
    assert vitrim.traced_flops(model) == pytest.approx(vitrim.flops(model), abs=0.02)


def test_cli_flops(capsys):
    assert main(["flops", "--method", "evit", "--keep-rate", "0.7", "--locations", "(3,6,9)"]) == 0
    out = capsys.readouterr().out
    assert "total 3.029 GMACs" in out and "ratio 1.52x" in out
    tiny = ["--model", "deit_tiny_patch16_224"]
    assert main(["flops", *tiny, "--method", "dtps", "--keep-rate", "0.5", "--locations", "[2, 4, 6, 8]"]) == 0
    assert "total 0.447 GMACs" in capsys.readouterr().out
    assert main(["flops", *tiny, "--method", "dynamicvit", "--locations", "(3, 3)"]) == 2
    assert "duplicates" in capsys.readouterr().err
