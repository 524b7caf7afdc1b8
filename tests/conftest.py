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
