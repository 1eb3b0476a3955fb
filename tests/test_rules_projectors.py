"""Rules of the shared projectors (projectors.py, and DCT-AdamW's in dct_adamw.py) that the parity
cases leave open: ``state_tensors`` is what the memory accounting counts, checkpoints round-trip (a
restored projector projects as before and can be checkpointed again), the randomized SVD and the
random / RandK projectors draw from their own seeded stream (seed * 1_000_003 + step) with the
documented settings and leave the training RNG alone, and the refresh schedule follows the gap."""

from __future__ import annotations

import pytest
import torch

from lorabench.measure import optimizer_state_bytes
from lorabench.methods.optimizers.dct_adamw import DCTCache, DCTProjector
from lorabench.methods.optimizers.galore_family import GaLoreFamily
from lorabench.methods.optimizers.projectors import (
    PROJECTORS,
    Projector,
    RandKProjector,
    RandomizedSVDProjector,
    RandomProjector,
    make_projector,
)

SHAPE = (12, 9)  # right side (m >= n), d = 9


def grad(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make(name: str, rank: int = 3, gap: int = 4, **kw):
    if name == "dct":
        return DCTProjector(SHAPE, rank, gap, dct_cache=DCTCache(), **kw)
    return make_projector(name, SHAPE, rank, gap, **kw)


# q_galore keeps INT4 codes and scales instead of one basis: tests/test_q_galore.py checks its state
@pytest.mark.parametrize("name", sorted(set(PROJECTORS) - {"q_galore"}))
def test_state_tensors_are_what_the_memory_accounting_counts(name):
    proj = make(name)
    assert proj.state_tensors() == []
    proj.refresh(grad(), 0)
    tensors = proj.state_tensors()
    assert len(tensors) == 1
    kept = tensors[0]
    assert kept is (proj.indices if hasattr(proj, "indices") else proj.basis_fp32)
    w = torch.nn.Parameter(torch.zeros(SHAPE))
    opt = GaLoreFamily([{"params": [w]}])
    opt.state[w]["projector"] = proj
    assert optimizer_state_bytes(opt) == kept.untyped_storage().nbytes()  # DCT's shared matrix: the optimizer's


@pytest.mark.parametrize("name", ["svd", "random", "randk", "blocks", "dct"])
def test_a_restored_projector_projects_as_before_and_checkpoints_again(name):
    proj = make(name, seed=2)
    proj.refresh(grad(1), 0)
    state = proj.to_state()
    restored = Projector.from_state(state)
    assert restored.shape == SHAPE and isinstance(restored.shape, tuple)
    if name == "dct":
        restored.cache = proj.cache  # the optimizer re-attaches its shared cache when it loads
    g = grad(2)
    torch.testing.assert_close(restored.project(g), proj.project(g), rtol=0, atol=0)
    low = proj.project(g)
    torch.testing.assert_close(restored.project_back(low), proj.project_back(low), rtol=0, atol=0)
    again = Projector.from_state(state).to_state()  # before any cache is attached
    assert again.keys() == state.keys()


def test_dct_checkpoint_holds_no_cache():
    proj = make("dct")
    proj.refresh(grad(), 0)
    assert "cache" not in proj.to_state()


def test_randomized_svd_follows_the_gap_and_takes_the_projector_options():
    proj = RandomizedSVDProjector(SHAPE, 3, 4, proj_type="left", seed=5)
    assert (proj.side, proj.dim, proj.seed, proj.gap) == ("left", 12, 5, 4)
    assert proj.due(0)
    proj.refresh(grad(), 0)
    assert [proj.due(step) for step in range(1, 9)] == [False, False, False, True, False, False, False, True]


@pytest.mark.parametrize("shape,rank", [(SHAPE, 3), ((40, 30), 8)])
def test_randomized_svd_is_svd_lowrank_with_oversample_8_and_2_power_iterations(shape, rank):
    g = grad(3, shape)
    proj = RandomizedSVDProjector(shape, rank, 10, seed=7)
    state = torch.random.get_rng_state()
    proj.refresh(g, 20)
    assert torch.equal(torch.random.get_rng_state(), state)  # the training stream is left alone
    assert proj.oversample == 8
    with torch.random.fork_rng():
        torch.manual_seed(7 * 1_000_003 + 20)
        u, _, _ = torch.svd_lowrank(g.T, q=min(rank + 8, min(shape)), niter=2)
    torch.testing.assert_close(proj.basis(), u[:, :rank].T, rtol=0, atol=0)
    assert proj.basis().shape == (rank, shape[1])


def test_random_projector_draws_a_float64_gaussian_from_its_own_stream():
    proj = RandomProjector(SHAPE, 3, 10, seed=4)
    state = torch.random.get_rng_state()
    proj.refresh(grad(), 30)
    assert torch.equal(torch.random.get_rng_state(), state)
    gauss = torch.randn(9, 3, generator=torch.Generator().manual_seed(4 * 1_000_003 + 30), dtype=torch.float64)
    q, _ = torch.linalg.qr(gauss)
    torch.testing.assert_close(proj.basis(), q.T.float(), rtol=0, atol=0)
    assert proj.basis().dtype == torch.float32 and proj.basis().device == grad().device


def test_projectors_of_different_weights_draw_different_bases():
    """Each weight's seed is its own (group seed * 100_003 + index): equal seeds repeat, others differ."""
    bases = {}
    for seed in (0, 1, 2):
        for cls in (RandomizedSVDProjector, RandomProjector):
            proj = cls(SHAPE, 3, 10, seed=seed)
            proj.refresh(grad(), 0)
            bases[cls, seed] = proj.basis()
    for cls in (RandomizedSVDProjector, RandomProjector):
        assert not torch.allclose(bases[cls, 0], bases[cls, 1]) and not torch.allclose(bases[cls, 1], bases[cls, 2])
        again = cls(SHAPE, 3, 10, seed=1)
        again.refresh(grad(), 0)
        assert torch.equal(again.basis(), bases[cls, 1])


def test_randk_draws_its_rows_from_its_own_stream():
    proj = RandKProjector(SHAPE, 3, 10, seed=6)
    proj.refresh(grad(), 40)
    expected = torch.randperm(9, generator=torch.Generator().manual_seed(6 * 1_000_003 + 40))[:3].sort().values
    assert torch.equal(proj.indices, expected)


@pytest.mark.parametrize("name", ["svd", "randomized_svd", "random", "randk", "blocks"])
def test_refresh_reports_a_change_and_counts_it(name):
    proj = make(name)
    assert [proj.refresh(grad(s), s) for s in range(3)] == [True, True, True] and proj.refreshes == 3


@pytest.mark.parametrize("shape", [(9, 12), (12, 9), (9, 9)])
def test_a_full_rank_basis_is_stored_contiguous(shape):
    proj = make_projector("svd", shape, 9, 4)
    proj.refresh(grad(0, shape), 0)
    assert proj.basis_fp32.is_contiguous() and proj.basis_fp32.shape == (9, 9)


def test_make_projector_passes_the_options_and_names_the_valid_ones():
    proj = make_projector("random", SHAPE, 3, 4, proj_type="left", seed=9)
    assert (proj.side, proj.seed) == ("left", 9)
    with pytest.raises(ValueError) as err:
        make_projector("pca", SHAPE, 3, 4)
    assert str(err.value).startswith("unknown projector 'pca'; valid: svd, randomized_svd, random, randk, blocks")
