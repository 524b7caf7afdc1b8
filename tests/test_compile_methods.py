"""Every registered method's inference path compiles with ``torch.compile``: one graph, no graph break,
compiled outputs equal to eager ones, no recompilation for new content.

Also home of the per-method small-model options the ecosystem tests (HF, ONNX, dense) share.
"""
import pytest
import torch

import vitrim
from conftest import small_vit
from vitrim.methods.base import get_method_class

#: options that reduce tokens on a 4-block, 64-patch test model (locations inside the 4 blocks)
_REDUCED = {
    "tome": {"r": 4},
    "evit": {"keep_rate": 0.5, "locations": (1, 2)},
    "etps": {"keep_rate": 0.5, "locations": (1, 2)},
    "dynamicvit": {"keep_rate": 0.7, "locations": (1, 2)},
    "dtps": {"keep_rate": 0.7, "locations": (1, 2)},
    "idle": {"keep_rate": 0.5},
}


def reduced_options(name: str) -> dict:
    """Options of ``name`` that reduce a small 4-block model (the method's defaults if not listed)."""
    return dict(_REDUCED.get(name, {}))


def zero_options(name: str) -> dict:
    """Options of ``name`` that reduce nothing on the same model (``r=0`` / ``keep_rate=1``)."""
    accepted = get_method_class(name).option_names()
    return {**reduced_options(name), **{k: v for k, v in (("r", 0), ("keep_rate", 1.0)) if k in accepted}}


METHODS = vitrim.methods()


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _reduced_model(name: str, depth: int = 4):
    model = vitrim.apply(small_vit(depth=depth), name, **reduced_options(name)).eval()
    assert vitrim.flops(model) < vitrim.flops(small_vit(depth=depth)), f"{name} options do not reduce"
    return model


@pytest.mark.parametrize("name", METHODS)
def test_no_graph_breaks(name):
    model = _reduced_model(name)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", METHODS)
def test_compiled_equals_eager(name):
    model = _reduced_model(name)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for seed in range(2):  # new content, same shapes: new decisions, same graph
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
            if seed == 0:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_inductor_compiles_and_matches(name):
    model = _reduced_model(name, depth=3)
    compiled = torch.compile(model)  # default mode (inductor)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
