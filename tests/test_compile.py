"""torch.compile sees one graph per forward: no graph break from Python-side state (tome.md §17.16)."""
import pytest
import torch

import vitrim
from conftest import small_vit


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "qk_norm": True}, {"class_token": False, "global_pool": "avg"}])
def test_no_graph_breaks(kw):
    model = vitrim.apply(small_vit(depth=5, **kw), "tome", r=(6, -1))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_equals_eager_without_recompiling():
    model = vitrim.apply(small_vit(depth=5), "tome", r=7)
    compiled = torch.compile(model, backend="aot_eager")
    frames = []
    with torch.no_grad():
        for seed in range(3):  # different content, same shape: decisions change, shapes do not
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
            frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[0] == frames[-1]


@pytest.mark.slow
def test_inductor_compiles_and_matches():
    model = vitrim.apply(small_vit(depth=4), "tome", r=6)
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
