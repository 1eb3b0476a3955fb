"""The merges of ``protocol=compose`` (``protocol.compose.merges``): K experts' LoRA updates of one
layer in, one merged update out. Importing this module does not import torch (config validation
reads ``MERGES``); a merge's function runs with torch.

Every merge gets the layer's K task vectors ΔW_k = s B_k A_k (s the LoRA scaling, in the layer's
``B @ A`` orientation) and the factors (s B_k, A_k), and returns the merged ΔW:

* ``average``: (1/K) Σ_k ΔW_k, the plain weight average (model soups). peft's ``linear`` combination
  averages A and B separately, whose product is not the average of the products; here the average
  is taken on ΔW.
* ``task_arithmetic``: λ Σ_k ΔW_k (Ilharco et al., 2023, arXiv:2212.04089), λ = ``weight``; λ = 1
  is the concatenation of the experts (peft's ``cat``).
* ``ties``: TIES-Merging (Yadav et al., 2023, arXiv:2306.01708): each λ ΔW_k trimmed to its top
  ``density`` share by magnitude, a majority sign elected per entry by total mass, the agreeing
  entries averaged.
* ``dare_linear`` / ``dare_ties``: DARE (Yu et al., 2024, arXiv:2311.03099): each ΔW_k keeps a random
  ``density`` share of its entries, rescaled by 1 / density, then the weighted sum (``dare_linear``) or
  TIES' sign election and disjoint mean (``dare_ties``). Seeded from the run's seed.
* ``lego``: LoRA-LEGO (Zhao et al., 2025, arXiv:2409.16167; lorabench.protocols.compose.lego): the
  experts' rank-1 units clustered into ``lego_rank`` centroids with its dual reweighting.

The trimming, sign election and random dropping are peft's own (``peft.utils.merge_utils``, the
functions behind ``add_weighted_adapter``), applied here to the full task vectors ΔW_k as the TIES
and DARE papers define them; peft's ``add_weighted_adapter`` applies them to A and B separately
unless an ``*_svd`` combination is chosen, which then truncates the merged ΔW to a rank (no
truncation here: the merged update is kept dense, and its stored size is reported).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lorabench.registry import Registry

MERGES: Registry = Registry("merge")


@dataclasses.dataclass(frozen=True)
class MergeInput:
    """One layer's experts: ``deltas`` the K task vectors ΔW_k, ``factors`` the K pairs (s B_k, A_k),
    ``settings`` the run's ``protocol.compose``, ``seed`` the merge's seed for this layer."""

    deltas: list[Any]
    factors: list[tuple[Any, Any]]
    settings: Any
    seed: int


@dataclasses.dataclass(frozen=True)
class Merge:
    """A merge's rule (``fn``: MergeInput -> merged ΔW) and how its result is stored: ``dense`` (a
    d_out x d_in matrix), ``concatenated`` (the experts' factors stacked, K r (d_in + d_out)) or
    ``factored`` (the merge's own rank-k factors, k (d_in + d_out))."""

    fn: Callable
    storage: str
    paper: str


def _weights(inp: MergeInput):
    import torch

    return torch.full((len(inp.deltas),), float(inp.settings.weight), dtype=inp.deltas[0].dtype)


def _seeded(inp: MergeInput, fn: Callable):
    """``fn()`` with torch's global generator seeded from the merge's seed, and restored after (DARE's
    random drop draws from the global generator inside peft)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(inp.seed)
        return fn()


def average(inp: MergeInput):
    return sum(inp.deltas[1:], inp.deltas[0]) / len(inp.deltas)


def task_arithmetic(inp: MergeInput):
    from peft.utils.merge_utils import task_arithmetic as merge

    return merge(list(inp.deltas), _weights(inp))


def ties(inp: MergeInput):
    from peft.utils.merge_utils import ties as merge

    return merge(list(inp.deltas), _weights(inp), inp.settings.density, majority_sign_method="total")


def dare_linear(inp: MergeInput):
    from peft.utils.merge_utils import dare_linear as merge

    return _seeded(inp, lambda: merge(list(inp.deltas), _weights(inp), inp.settings.density))


def dare_ties(inp: MergeInput):
    from peft.utils.merge_utils import dare_ties as merge

    return _seeded(
        inp, lambda: merge(list(inp.deltas), _weights(inp), inp.settings.density, majority_sign_method="total")
    )


def lego_rank(settings, factors: list[tuple[Any, Any]]) -> int:
    """LoRA-LEGO's merged rank: ``lego_rank``, else the experts' rank."""
    return settings.lego_rank or factors[0][1].shape[0]


def lego(inp: MergeInput):
    from lorabench.protocols.compose.lego import lego_merge

    b, a = lego_merge(inp.factors, lego_rank(inp.settings, inp.factors), seed=inp.seed)
    return b @ a


MERGES.register("average")(Merge(average, "concatenated", "weight averaging (Wortsman et al., 2022, arXiv:2203.05482)"))
MERGES.register("task_arithmetic")(Merge(task_arithmetic, "concatenated", "Ilharco et al., 2023, arXiv:2212.04089"))
MERGES.register("ties")(Merge(ties, "dense", "Yadav et al., 2023, arXiv:2306.01708"))
MERGES.register("dare_linear")(Merge(dare_linear, "dense", "Yu et al., 2024, arXiv:2311.03099"))
MERGES.register("dare_ties")(Merge(dare_ties, "dense", "Yu et al., 2024, arXiv:2311.03099"))
MERGES.register("lego")(Merge(lego, "factored", "Zhao et al., 2025, arXiv:2409.16167"))


def stored_params(merge: Merge, merged, factors: list[tuple[Any, Any]], settings) -> int:
    """Entries the merged update of one layer takes to store (see :class:`Merge`); a dense merge counts
    its non-zero entries (TIES and DARE zero most of them)."""
    d_out, d_in = merged.shape
    if merge.storage == "concatenated":
        return sum(b.shape[1] for b, _ in factors) * (d_in + d_out)
    if merge.storage == "factored":
        return lego_rank(settings, factors) * (d_in + d_out)
    return int((merged != 0).sum())
