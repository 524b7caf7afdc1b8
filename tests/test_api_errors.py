"""Every bad input gets a clear error that names what is accepted."""
import pytest
import timm
import torch
from torch import nn

import vitrim
from vitrim.errors import AlreadyReducedError, NotReducedError, OptionError, UnsupportedModelError
from conftest import small_vit


def test_methods_lists_tome():
    assert "tome" in vitrim.methods()


def test_unknown_method():
    with pytest.raises(OptionError, match="unknown method 'fancy'.*accepted: .*tome"):
        vitrim.apply(small_vit(), "fancy")


def test_unknown_option():
    with pytest.raises(OptionError, match="unknown option.*keep_rate.*accepted: r, prop_attn, trace_source"):
        vitrim.apply(small_vit(), "tome", keep_rate=0.7)


@pytest.mark.parametrize("opts,match", [({"r": -2}, "r must be >= 0"), ({"r": [1] * 5}, "5 entries but the model has 4"),
                                        ({"r": (4, 2.0)}, "inflect"), ({"prop_attn": "yes"}, "True or False")])
def test_bad_option_values(opts, match):
    with pytest.raises(OptionError, match=match):
        vitrim.apply(small_vit(), "tome", **opts)


def test_failed_apply_leaves_model_untouched():
    model = small_vit()
    with pytest.raises(OptionError):
        vitrim.apply(model, "tome", r=-1)
    assert not vitrim.is_reduced(model) and type(model).__name__ == "VisionTransformer"


def test_apply_twice():
    model = vitrim.apply(small_vit(), "tome", r=2)
    with pytest.raises(AlreadyReducedError, match="vitrim.remove"):
        vitrim.apply(model, "tome", r=3)


def test_remove_unreduced():
    with pytest.raises(NotReducedError):
        vitrim.remove(small_vit())


def test_update_validates():
    model = vitrim.apply(small_vit(), "tome", r=2)
    with pytest.raises(OptionError):
        vitrim.update(model, r=-5)
    assert vitrim.get_method(model).schedule == [2, 2, 2, 2]
    vitrim.update(model, r=(2, -1))
    assert vitrim.get_method(model).schedule == [4, 2, 1, 0]


def test_unsupported_model_classes():
    with pytest.raises(UnsupportedModelError, match="not supported.*VisionTransformer"):
        vitrim.apply(nn.Linear(3, 3), "tome", r=1)
    with pytest.raises(UnsupportedModelError):
        vitrim.apply(timm.create_model("resnet18"), "tome", r=1)


def test_unsupported_blocks_and_attention():
    from timm.models.vision_transformer import ResPostBlock
    model = small_vit(block_fn=ResPostBlock)
    with pytest.raises(UnsupportedModelError, match="ResPostBlock"):
        vitrim.apply(model, "tome", r=1)

    class MyAttention(timm.layers.Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x) * 2

    model = small_vit()
    old = model.blocks[1].attn
    model.blocks[1].attn = MyAttention(48, num_heads=3)
    with pytest.raises(UnsupportedModelError, match="blocks\\[1\\].attn is a MyAttention"):
        vitrim.apply(model, "tome", r=1)
    model.blocks[1].attn = old


def test_attention_pool_head_is_refused_by_a_method_that_does_not_support_it():
    """Every built-in method pools an attention head (tests/test_map_pool.py); the method is asked."""
    from vitrim.adapters import get_adapter
    from vitrim.methods.tome import ToMe

    class NoMap(ToMe):
        supported_pools = ("token", "avg", "")

    with pytest.raises(OptionError, match="pooling 'map'.*accepted pooling: 'token', 'avg', ''"):
        NoMap.check_model(get_adapter(small_vit(class_token=False, global_pool="map")).info())


def test_flops_img_size_mismatch():
    with pytest.raises(ValueError, match="fixed input size"):
        vitrim.flops(small_vit(), img_size=96)
