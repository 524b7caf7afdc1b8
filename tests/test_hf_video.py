"""Hugging Face VideoMAE and AST under vitrim: zero reduction bit-identical, hidden states follow the
reduction, VideoMAE's size-weighted mean pooling, FLOPs against FlopCounterMode, large constant r and
vitrim.solve, the CLI (flops, bench, export, visualize) on save_pretrained folders, refusals."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitrim  # noqa: E402
from vitrim.adapters import get_adapter  # noqa: E402
from conftest import check_cli_on_folder  # noqa: E402

VIDEO = dict(image_size=32, patch_size=8, num_frames=8, tubelet_size=2, hidden_size=48, num_hidden_layers=4,
             num_attention_heads=3, intermediate_size=96)
AUDIO = dict(max_length=64, num_mel_bins=32, patch_size=8, frequency_stride=6, time_stride=6, hidden_size=48,
             num_hidden_layers=4, num_attention_heads=3, intermediate_size=96)
ZERO = {"tome": {"r": 0}, "evit": {"keep_rate": 1.0}, "etps": {"keep_rate": 1.0}, "dynamicvit": {"keep_rate": 1.0},
        "dtps": {"keep_rate": 1.0}, "idle": {"keep_rate": 1.0}}
REDUCED = {"tome": {"r": 6}, "evit": {"keep_rate": 0.5, "locations": (1, 2)},
           "etps": {"keep_rate": 0.5, "locations": (1, 2)}, "dynamicvit": {"keep_rate": 0.7, "locations": (1, 2)},
           "dtps": {"keep_rate": 0.7, "locations": (1, 2)}, "idle": {"keep_rate": 0.5}}
VIDEO_METHODS = vitrim.methods()   # every method: no class token needed (average-token query, live-token mean)


def video(cls=True, attn="sdpa", **kw):
    torch.manual_seed(0)
    cfg = transformers.VideoMAEConfig(**{**VIDEO, **kw}, num_labels=5, attn_implementation=attn)
    return (transformers.VideoMAEForVideoClassification if cls else transformers.VideoMAEModel)(cfg).eval()


def audio(cls=True, attn="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.ASTConfig(**AUDIO, num_labels=5, attn_implementation=attn)
    return (transformers.ASTForAudioClassification if cls else transformers.ASTModel)(cfg).eval()


CLIP = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
SPEC = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["video", "video-base", "audio", "audio-base"])
@pytest.mark.parametrize("name", vitrim.methods())
def test_zero_reduction_is_bit_identical(name, kind, attn):
    model = (video if kind.startswith("video") else audio)(cls=not kind.endswith("base"), attn=attn)
    x = CLIP if kind.startswith("video") else SPEC
    if kind.startswith("video") and name not in VIDEO_METHODS:
        with pytest.raises(vitrim.VitrimError, match="class token"):
            vitrim.apply(model, name, **ZERO[name])
        return
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        vitrim.apply(model, name, **ZERO[name])
        out = model(x, output_hidden_states=True)
    assert type(out) is type(ref)
    assert torch.equal(out.to_tuple()[0], ref.to_tuple()[0])
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))


@pytest.mark.parametrize("kind", ["video", "audio"])
@pytest.mark.parametrize("name", vitrim.methods())
def test_reduced_forward_and_flops(name, kind):
    if kind == "video" and name not in VIDEO_METHODS:
        pytest.skip("needs a class token")
    model, x = (video(attn="eager"), CLIP) if kind == "video" else (audio(attn="eager"), SPEC)
    base = vitrim.flops(model)
    vitrim.apply(model, name, **REDUCED[name])
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        head, _ = vitrim.forward_with_state(model, x)
    torch.testing.assert_close(head, out.logits)
    counts = [h.shape[1] for h in out.hidden_states]
    assert name == "idle" or counts[-1] < counts[0]
    if name == "tome":
        assert counts == [counts[0] - 6 * i for i in range(5)]
    assert vitrim.flops(model) < base
    if name != "idle":
        assert vitrim.traced_flops(model) == pytest.approx(vitrim.flops(model), rel=0.02)
    else:  # the analytic count prices the keys of every token (the paper's); the forward ranks through
        # W_k^T q (one C x C product: (T - S - 1) C^2 fewer per idle layer, as in test_idle.py) and takes
        # the T C logits as a multiply-and-sum, which FlopCounterMode does not count
        layers = vitrim.flops_report(model).layers
        t, c = layers[0].tokens_in, 48
        idle = [l.tokens_in for l in layers if l.tokens_in < t]
        unseen = sum((t - s - 1) * c * c + t * c for s in idle)
        assert vitrim.traced_flops(model) == pytest.approx(vitrim.flops(model) - unseen / 1e9, abs=1e-9)


def test_videomae_mean_pooling_is_size_weighted():
    model = vitrim.apply(video(), "tome", r=8)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, CLIP)
        w = state.size
        expected = model.classifier(model.fc_norm((tokens * w).sum(1) / w.sum(1)))
        assert not torch.allclose((tokens * w).sum(1) / w.sum(1), tokens.mean(1))
        torch.testing.assert_close(model(CLIP).logits, expected)


def test_large_constant_r_and_solve():
    """The paper's video / audio settings: a large constant r over many tokens; solve halves GMACs."""
    with torch.device("meta"):
        big = transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=400))
        ast = transformers.ASTForAudioClassification(transformers.ASTConfig(num_labels=527))
    assert get_adapter(big).num_patches() == 1568 and get_adapter(ast).num_patches() == 1212
    full = vitrim.flops(big)
    vitrim.apply(big, "tome", r=100)
    report = vitrim.flops_report(big)
    assert [l.tokens_in for l in report.layers] == [1568 - 100 * i for i in range(12)]
    vitrim.remove(big)
    solved = vitrim.solve(big, "tome", target_gmacs=full / 2)
    assert vitrim.flops(vitrim.apply(big, "tome", r=solved["r"] if isinstance(solved, dict) else solved.options["r"])) \
        <= full / 2 * 1.02
    vitrim.apply(ast, "tome", r=90)
    assert vitrim.flops_report(ast).layers[-1].tokens_in == 2 + 1212 - 90 * 11


def test_refusals():
    model = vitrim.apply(video(cls=False), "tome", r=2)
    with pytest.raises(vitrim.VitrimError, match="bool_masked_pos"):
        model(CLIP, bool_masked_pos=torch.zeros(2, 64, dtype=torch.bool))
    with pytest.raises(vitrim.UnsupportedModelError, match="mean pooling"):
        vitrim.apply(video(use_mean_pooling=False), "tome", r=2)
    with pytest.raises(vitrim.UnsupportedModelError, match="32x32 only"):
        vitrim.flops(model, 64)
    with pytest.raises(vitrim.UnsupportedModelError, match="mel bins only"):
        vitrim.flops(audio(), 64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    video().save_pretrained(root / "vm")
    audio().save_pretrained(root / "ast")
    return root


@pytest.mark.parametrize("which", ["vm", "ast"])
def test_cli(which, folders, tmp_path, capsys):
    check_cli_on_folder(f"hf:{folders / which}", 4, tmp_path)
    text = capsys.readouterr().out
    assert "traced" in text and "speedup" in text and ("(1, 8, 3, 32, 32)" in text or "(1, 64, 32)" in text)
    assert "training step, batch 2" in text


@pytest.mark.parametrize("which,shape", [("vm", "(8, 3, 32, 32)"), ("ast", "(64, 32)")])
def test_image_folder_commands_refuse_video_and_audio(which, shape, folders, tmp_path, capsys):
    """eval and compare --data read ImageFolder images: they refuse a clip or spectrogram model up front,
    naming its sample shape (no traceback, nothing measured or written)."""
    from PIL import Image

    from vitrim.cli import main
    for c in range(5):
        (tmp_path / "val" / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "val" / f"c{c}" / "a.png")
    model = f"hf:{folders / which}"
    for argv in (["eval", "--model", model, "--data", str(tmp_path)],
                 ["compare", "--model", model, "--data", str(tmp_path), "--methods", "tome", "-o", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is an image folder, but" in err and f"takes samples of shape {shape}" in err, argv
    assert not (tmp_path / "o" / "results.md").exists()


@pytest.mark.parametrize("make,x,grid", [(video, CLIP, (4, 4, 4)), (audio, SPEC, (5, 10))])
def test_forward_dense(make, x, grid):
    """forward_dense on a clip ([B, T', h, w, C]) and a spectrogram ([B, f', t', C]): at zero reduction the
    model's own patch tokens; merged tokens spread back over their patches; a sample without its batch
    dimension gets a clear error naming the sample shape."""
    from vitrim.errors import OptionError
    zero = vitrim.apply(make(), "tome", r=0)
    tokens, _ = zero.forward_tokens(x)
    dense = vitrim.forward_dense(zero, x)
    assert tuple(dense.shape) == (2, *grid, 48)
    assert torch.equal(dense.reshape(2, -1, 48), tokens[:, tokens.shape[1] - dense[0, ..., 0].numel():])
    merged = vitrim.forward_dense(vitrim.apply(make(), "tome", r=4), x)
    assert tuple(merged.shape) == tuple(dense.shape)
    rows = merged.reshape(2, -1, 48)
    assert len(torch.unique(rows[0], dim=0)) < rows.shape[1]  # merged patches share their token's feature
    with pytest.raises(OptionError, match=r"one sample: .*add the batch dimension"):
        vitrim.forward_dense(zero, x[0])
