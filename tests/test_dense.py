"""Dense features (``vitrim.forward_dense`` / ``vitrim.restore_grid``): one feature per original patch for
every registered method; identity at zero reduction; each method's rule (merge groups broadcast, fused
token, host, nearest survivor, idle tokens in place)."""
import pytest
import torch

import vitrim
from conftest import small_vit
from test_compile_methods import reduced_options, zero_options
from vitrim.methods._pruning import prune_records

METHODS = vitrim.methods()
GRID = (8, 8)  # 64 px, patch 8


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _needs_hosts(state) -> bool:
    """A squeezing stage whose record lacks the host index (see ``vitrim.dense``)."""
    return any(r.method in ("etps", "dtps") and getattr(r, "hosts", None) is None for r in prune_records(state))


@pytest.mark.parametrize("name", METHODS)
def test_zero_reduction_is_the_patch_tokens(name, images):
    base = small_vit(depth=4)
    with torch.no_grad():
        ref = base.forward_features(images)[:, base.num_prefix_tokens:].reshape(2, *GRID, -1)
        model = vitrim.apply(base, name, **zero_options(name))
        grid = vitrim.forward_dense(model, images)
    assert torch.equal(grid, ref)


@pytest.mark.parametrize("name", METHODS)
def test_reduced_grid_shape_and_provenance(name, images):
    model = vitrim.apply(small_vit(depth=4, reg_tokens=1), name, **reduced_options(name)).eval()
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, images)
    if _needs_hosts(state):
        with pytest.raises(vitrim.VitrimError, match="host"):
            vitrim.restore_grid(model, tokens, state)
        return
    with torch.no_grad():
        grid = vitrim.forward_dense(model, images)
    assert grid.shape == (2, *GRID, 48)
    flat = grid.reshape(2, 64, 48)
    P = state.num_prefix_tokens
    # every patch feature is one of the final patch tokens
    match = (flat[:, :, None, :] == tokens[:, None, P:, :]).all(-1)             # [B, 64, T - P]
    assert match.any(-1).all()
    for rec in prune_records(state)[-1:]:  # a surviving patch keeps its own final token
        for b in range(2):
            for row, pos in enumerate(rec.positions[b].tolist()):
                if pos >= 0:
                    assert torch.equal(flat[b, pos], tokens[b, P + row])


def test_tome_groups_broadcast_without_trace_source(images):
    model = vitrim.apply(small_vit(depth=4), "tome", r=6)
    with torch.no_grad():
        grid = vitrim.forward_dense(model, images)
        assert model.vitrim.trace_source is False and model.vitrim.source is None  # option restored
        vitrim.update(model, trace_source=True)
        tokens, state = vitrim.forward_tokens(model, images)
    owners = state.source[:, :, 1:].argmax(dim=1)                                # [B, 64]
    expected = vitrim.visual.tokens_to_grid(tokens, state.source, GRID, 1)
    assert torch.equal(grid, expected)
    for b in range(2):  # patches of one group share the group's token; groups = patch tokens left
        assert owners[b].unique().numel() == tokens.shape[1] - 1
        for j in owners[b].unique():
            assert torch.equal(grid[b].reshape(64, -1)[owners[b] == j], tokens[b, j].expand(int((owners[b] == j).sum()), -1))


def test_tome_state_without_provenance_is_refused(images):
    model = vitrim.apply(small_vit(depth=4), "tome", r=6)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, images)
    with pytest.raises(vitrim.VitrimError, match="trace_source"):
        vitrim.restore_grid(model, tokens, state)


def test_evit_pruned_patches_take_the_fused_token(images):
    model = vitrim.apply(small_vit(depth=4), "evit", keep_rate=0.5, locations=(1, 2), fuse=True)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, images)
        grid = vitrim.restore_grid(model, tokens, state).reshape(2, 64, -1)
    survivors = prune_records(state)[-1].positions                              # [B, n], -1 = fused token
    for b in range(2):
        gone = torch.ones(64, dtype=torch.bool)
        gone[survivors[b][survivors[b] >= 0]] = False
        assert gone.sum() > 0
        assert torch.equal(grid[b, gone], tokens[b, -1].expand(int(gone.sum()), -1))


def test_dropped_patches_take_the_nearest_survivor(images):
    model = vitrim.apply(small_vit(depth=4), "evit", keep_rate=0.5, locations=(1, 2), fuse=False)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, images)
        grid = vitrim.restore_grid(model, tokens, state).reshape(2, 64, -1)
    survivors = prune_records(state)[-1].positions
    for b in range(2):
        kept = survivors[b].tolist()
        for p in range(64):
            if p in kept:
                continue
            dist = [((p // 8 - q // 8) ** 2 + (p % 8 - q % 8) ** 2, row) for row, q in enumerate(kept)]
            row = min(dist)[1]
            assert torch.equal(grid[b, p], tokens[b, 1 + row])


def test_idle_tokens_stay_in_place(images):
    model = vitrim.apply(small_vit(depth=4), "idle", keep_rate=0.5)
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, images)
        grid = vitrim.restore_grid(model, tokens, state)
    assert torch.equal(grid, tokens[:, 1:].reshape(2, *GRID, -1))


def test_masked_training_form_keeps_positions(images):
    model = vitrim.apply(small_vit(depth=4), "dynamicvit", keep_rate=0.7, locations=(1, 2)).train()
    tokens, state = vitrim.forward_tokens(model, images)
    grid = vitrim.restore_grid(model, tokens, state)
    assert torch.equal(grid, tokens[:, 1:].reshape(2, *GRID, -1))


def test_hf_model_dense_features(images):
    pytest.importorskip("transformers")
    from test_hf import hf_model

    model = vitrim.apply(hf_model("deit"), "tome", r=6)
    with torch.no_grad():
        grid = vitrim.forward_dense(model, images)
    assert grid.shape == (2, *GRID, 48)
    with torch.no_grad():  # zero reduction: DeiT's own patch tokens (after the class and distillation tokens)
        vitrim.update(model, r=0)
        ref = model.deit(images).last_hidden_state[:, 2:].reshape(2, *GRID, -1)
        assert torch.equal(vitrim.forward_dense(model, images), ref)


def test_squeezed_patches_follow_their_hosts():
    """The host rule on a hand-built two-stage trail (the record fields the squeezing methods are to add)."""
    from dataclasses import dataclass
    from typing import Optional

    @dataclass(frozen=True)
    class Stage:  # the PruneRecord fields restore_grid reads, plus the host index
        method: str
        block: int
        index: torch.Tensor
        positions: torch.Tensor
        scores: torch.Tensor
        hosts: torch.Tensor
        rest: Optional[torch.Tensor] = None

    # 2x2 patches, class token in front. Stage 1 keeps patches 2, 0 (score order); 1 -> host row 1
    # (patch 0), 3 -> host row 0 (patch 2); the rest order comes from the scores. Stage 2 keeps row 1
    # (patch 0) and squeezes row 0 (patch 2, holding 3) into it.
    first = Stage("etps", 1, index=torch.tensor([[2, 0]]), positions=torch.tensor([[2, 0]]),
                  scores=torch.tensor([[0.5, 0.2, 0.9, 0.1]]), hosts=torch.tensor([[1, 0]]))
    second = Stage("etps", 2, index=torch.tensor([[1]]), positions=torch.tensor([[0]]),
                   scores=torch.tensor([[0.3, 0.7]]), hosts=torch.tensor([[0]]), rest=torch.tensor([[0]]))
    tokens = torch.arange(6.0).reshape(1, 2, 3)                                   # [cls, final patch token]
    one = vitrim.ForwardState(num_prefix_tokens=1, num_patches=4, records=(first,))
    two = vitrim.ForwardState(num_prefix_tokens=1, num_patches=4, records=(first, second))
    three_tokens = torch.arange(9.0).reshape(1, 3, 3)                              # [cls, patch 2, patch 0]
    grid = vitrim.restore_grid(None, three_tokens, one, grid_size=(2, 2)).reshape(4, 3)
    assert torch.equal(grid, three_tokens[0, [2, 2, 1, 1]])
    grid = vitrim.restore_grid(None, tokens, two, grid_size=(2, 2)).reshape(4, 3)
    assert torch.equal(grid, tokens[0, [1, 1, 1, 1]])


@pytest.mark.parametrize("method", ["etps", "dtps"])
def test_real_squeezing_models_record_hosts(method):
    """TPS records each pruned token's host, so dense output fills it from that host's final token."""
    import vitrim
    from conftest import small_vit
    from vitrim.methods._pruning import prune_records

    model = vitrim.apply(small_vit(depth=4), method, keep_rate=0.5, locations=(3,)).eval()
    with torch.no_grad():
        tokens, state = vitrim.forward_tokens(model, torch.randn(2, 3, 64, 64))
        grid = vitrim.restore_grid(model, tokens, state)
    (rec,) = prune_records(state)
    assert rec.hosts.shape == rec.rest.shape == (2, 64 - rec.kept)
    assert int(rec.hosts.min()) >= 0 and int(rec.hosts.max()) < rec.kept
    flat = grid.reshape(2, 64, -1)
    for b in range(2):
        for row, host in zip(rec.rest[b].tolist(), rec.hosts[b].tolist()):
            torch.testing.assert_close(flat[b, row], tokens[b, 1 + host])  # 1 = class token
