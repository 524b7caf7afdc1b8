import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

torch.set_num_threads(min(2, torch.get_num_threads()))


def small_vit(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, fused=True, seed=0, **kw):
    """A random-init timm VisionTransformer small enough for CPU tests."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, num_classes=10, **kw).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model


@pytest.fixture
def make_vit():
    return small_vit


def assert_traced_matches_analytic(model, width: int, rel: float = 0.02) -> None:
    """``vitrim.traced_flops`` equals ``vitrim.flops`` within ``rel``. Under IdleViT the analytic count has
    the paper's keys of every token while the model executes ``W_k^T q`` (see test_idle.py): that
    difference, ``width^2`` MACs per idle token per reduced layer, is taken off first."""
    import vitrim

    saved = 0.0
    if is_reduced_with(model, "idle"):
        report = vitrim.flops_report(model)
        saved = sum((report.num_tokens - l.tokens_in - 1) * width * width for l in report.layers
                    if l.tokens_in < report.num_tokens) / 1e9
    assert vitrim.traced_flops(model) == pytest.approx(vitrim.flops(model) - saved, rel=rel)


def check_cli_on_folder(model_arg: str, r: int, tmp_path, classifier: bool = True) -> None:
    """``vitrim flops --traced``, ``bench`` (inference and ``--train``: refused with a clear error for a
    model without class logits), ``visualize`` and ``export --verify`` (when onnxscript is installed) on
    one model argument (e.g. ``hf:FOLDER``) with ToMe at ``r``."""
    from vitrim.cli import main

    assert main(["flops", "--model", model_arg, "--r", str(r), "--traced"]) == 0
    bench = ["bench", "--model", model_arg, "--r", str(r), "--batch-size", "2", "--repeats", "1", "--iters", "1",
             "--warmup", "0", "--device", "cpu"]
    assert main(bench) == 0
    assert main(bench + ["--train"]) == (0 if classifier else 2)
    assert main(["visualize", "--model", model_arg, "--r", str(r), "-o", str(tmp_path / "v.png")]) == 0
    assert (tmp_path / "v.png").stat().st_size > 0
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return
    assert main(["export", "--model", model_arg, "--r", str(r), "-o", str(tmp_path / "m.onnx"), "--verify"]) == 0


def is_reduced_with(model, method: str) -> bool:
    vitrim_part = getattr(model, "vitrim", None)
    return getattr(vitrim_part, "name", None) == method


def record_token_counts(model):
    """Forward hooks that record the rows each block's attention and MLP see."""
    counts = {"attn": [], "mlp": []}
    handles = []
    for block in model.blocks:
        handles.append(block.norm1.register_forward_hook(lambda m, i, o: counts["attn"].append(o.shape[1])))
        handles.append(block.mlp.register_forward_hook(lambda m, i, o: counts["mlp"].append(o.shape[1])))
    return counts, handles


@pytest.fixture(autouse=True, scope="session")
def _vitrim_home(tmp_path_factory):
    """Built datasets go to a per-session folder, not the user's cache."""
    import os
    old = os.environ.get("VITRIM_HOME")
    os.environ["VITRIM_HOME"] = str(tmp_path_factory.mktemp("vitrim_home"))
    yield
    if old is None:
        os.environ.pop("VITRIM_HOME", None)
    else:
        os.environ["VITRIM_HOME"] = old
