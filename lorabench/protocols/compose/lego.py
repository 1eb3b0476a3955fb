"""LoRA-LEGO: merge K LoRAs of one layer by rank-wise clustering of their rank-1 units.

Paper: Zhao, Shen, Zhu, Li, Su, Wang, Kuang, Wu, "Merging LoRAs like Playing LEGO: Pushing the
Modularity of LoRA to Extremes Through Rank-Wise Clustering", arXiv:2409.16167 (ICLR 2025),
https://arxiv.org/abs/2409.16167. No official code was found (repository searches for "LoRA-LEGO",
"LoRA_LEGO", "loralego" found nothing), so every detail below is either a statement of the paper
(abstract, https://arxiv.org/html/2409.16167v3, and the reviews of it quoted below) or our reading,
and is marked as such.

The rule, for one layer (one weight matrix; the pool never mixes layers, since the units of
different layers have different shapes):

1. Units (paper). LoRA k's update is ΔW_k = B_k A_k with B_k: d_out x r_k, A_k: r_k x d_in and the
   LoRA scaling already folded in. It is the sum of r_k "minimal semantic units" (MSUs) b_i a_iᵀ,
   b_i = column i of B_k, a_i = row i of A_k. The paper states two properties: permutation
   invariance (reordering the ranks of a LoRA does not change ΔW_k) and concatenation-summation
   equivalence (stacking the LoRAs along the rank axis gives Σ_k ΔW_k). All N = Σ_k r_k units of the
   K LoRAs form one pool; unit i is the vector u_i = [b_i; a_i] of length d_out + d_in.
2. Clustering (paper: "grouping MSUs from different LoRAs into k clusters"; k-means, Euclidean, on
   the raw, un-normalised u_i is our reading). Lloyd's k-means (scikit-learn ``KMeans``, k-means++
   initialisation, ``N_INIT`` restarts, ``random_state=seed``, one OpenMP thread) partitions the pool into k clusters
   S_1..S_k. Our detail: the pool is first put in a canonical (lexicographic) order and the
   clusters are numbered by their first unit in that order, so the result does not depend on the
   order of the ranks inside a LoRA nor on the order of the LoRAs, exactly rather than up to the
   local optimum k-means happens to reach. k = N skips k-means: each unit is its own cluster.
3. Centroids (paper: "the centroid of each cluster serves as a representative MSU, enabling the
   assembly of a merged LoRA with an adjusted rank of k"). c_j = mean_{i in S_j} u_i = [b̄_j; ā_j];
   the merged LoRA has B_m = [b̄_1 .. b̄_k] (d_out x k) and A_m = [ā_1; ..; ā_k] (k x d_in).
4. Dual reweighting. The paper's statement, as its reviewers summarise it: "parameter reweighting
   for norm decay and output reweighting for variance expansion" (liner.com review,
   https://liner.com/review/merging-loras-like-playing-lego-pushing-the-modularity-of-lora) and
   "dual scaling to address norm decay and variance expansion"
   (https://www.sciencestack.ai/paper/2409.16167). The formulas below are our reading of those two
   names; the paper's exact equations could not be read from any stored source.

   * Parameter reweighting (norm decay): a mean of vectors that do not point the same way is
     shorter than they are, ||b̄_j|| <= mean_{i in S_j} ||b_i||. Our reading restores the members'
     mean norm, separately for the B part and the A part (a *parameter* reweighting, and immune to
     the usual scale gap between trained B and A):
         b_j = b̄_j · mean_{i in S_j} ||b_i|| / ||b̄_j||,   a_j = ā_j · mean_{i in S_j} ||a_i|| / ||ā_j||
     (a zero part stays zero). A cluster of identical units is left unchanged.
   * Output reweighting (variance expansion): with its k rank-1 terms roughly independent and
     zero-mean, the variance of the output ΔW x of a rank-k LoRA grows linearly in k (the argument
     behind rsLoRA's α/√r, Kalajdzievski 2023, arXiv:2312.03732). The source LoRAs have r̄ = N / K
     terms on average, so our reading scales the merged output by
         s = √(r̄ / k),
     folded into B_m (the output side). s = 1 when k = r̄ (K LoRAs of rank r merged to rank r).

   Merged update: ΔW_m = s · Σ_j b_j a_jᵀ. Checks that follow from it (tests/test_lora_lego.py):
   K identical LoRAs of rank r merged at k = r give that LoRA back (each cluster holds the K copies
   of one unit: no norm decay, s = 1); k = N is the identity partition, ΔW_m = Σ_k ΔW_k / √K (the
   concatenation, scaled by √(1/K)); without the output reweighting it is the concatenation.

Choices of ours, not the paper's: k is the caller's (``rank``; the paper treats k as a free knob, we
found no stated default); units are not sign-canonicalised (b aᵀ = (-b)(-a)ᵀ, so two units of one
update with opposite signs sit far apart and average towards zero: the paper's clustering is on
the parameters, and so is ours); k may not exceed the number of distinct units (k-means cannot
make more non-empty clusters than there are distinct points). Clustering and reweighting run in
float64 on the CPU; the factors come back in the inputs' (promoted) dtype, on the first B's device.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
from torch import Tensor

from lorabench.errors import ConfigError

N_INIT = 10  # k-means++ restarts; the run with the lowest inertia is kept

Factors = Sequence[tuple[Tensor, Tensor]]


def check_factors(factors: Factors) -> tuple[int, int, list[int]]:
    """(d_out, d_in, [r_1..r_K]) of K LoRAs of one layer; ConfigError naming the shapes if they disagree."""
    if len(factors) == 0:
        raise ConfigError("LoRA-LEGO needs the (B, A) factors of at least one LoRA, got none")
    ranks: list[int] = []
    d_out = d_in = -1
    for k, pair in enumerate(factors):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ConfigError(f"LoRA-LEGO factors #{k}: expected a (B, A) pair of tensors, got {type(pair).__name__}")
        b, a = pair
        if not (isinstance(b, Tensor) and isinstance(a, Tensor)):
            raise ConfigError(
                f"LoRA-LEGO factors #{k}: B and A must be torch tensors, got {type(b).__name__} and {type(a).__name__}"
            )
        if b.dim() != 2 or a.dim() != 2:
            raise ConfigError(
                f"LoRA-LEGO factors #{k}: B (d_out x r) and A (r x d_in) must be matrices, "
                f"got B {tuple(b.shape)} and A {tuple(a.shape)}"
            )
        if b.shape[1] != a.shape[0]:
            raise ConfigError(
                f"LoRA-LEGO factors #{k}: B's columns must match A's rows (the LoRA rank r), "
                f"got B {tuple(b.shape)} and A {tuple(a.shape)}"
            )
        if b.shape[1] < 1:
            raise ConfigError(f"LoRA-LEGO factors #{k}: the LoRA rank r must be >= 1, got B {tuple(b.shape)}")
        if k == 0:
            d_out, d_in = b.shape[0], a.shape[1]
        elif (b.shape[0], a.shape[1]) != (d_out, d_in):
            first_b, first_a = factors[0]
            raise ConfigError(
                f"LoRA-LEGO factors #{k}: B {tuple(b.shape)} and A {tuple(a.shape)} do not fit LoRA #0's "
                f"d_out={d_out}, d_in={d_in} (B {tuple(first_b.shape)}, A {tuple(first_a.shape)}); "
                "the LoRAs merged together must belong to one layer"
            )
        ranks.append(int(b.shape[1]))
    return d_out, d_in, ranks


def semantic_units(factors: Factors) -> Tensor:
    """The pool of MSUs, float64 on the CPU: N x (d_out + d_in), row i = [b_i; a_i], LoRA by LoRA, rank by rank."""
    check_factors(factors)
    rows = [torch.cat([b.detach().T, a.detach()], dim=1).to("cpu", torch.float64) for b, a in factors]
    return torch.cat(rows, dim=0)


def check_rank(rank: int, n_units: int, n_loras: int) -> None:
    """ConfigError unless 1 <= rank <= n_units (the pool's size)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= n_units:
        raise ConfigError(
            f"LoRA-LEGO rank (the number of clusters k) must be an integer in [1, {n_units}] "
            f"(the total number of rank-1 units of the {n_loras} LoRA(s)), got {rank!r}"
        )


def cluster_units(units: Tensor, k: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(labels, centroids): k-means of the N units into k clusters, labels (N,) int64, centroids k x D float64.

    Clusters are numbered by their first unit in the lexicographic order of the units; each centroid is
    the exact mean of its members. k = N gives the identity partition without running k-means.
    """
    x = units.detach().to("cpu", torch.float64).numpy()
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ConfigError(f"LoRA-LEGO k (the number of clusters) must be an integer in [1, {n}] (the units), got {k!r}")
    distinct = np.unique(x, axis=0).shape[0]
    if k > distinct:
        raise ConfigError(
            f"LoRA-LEGO rank={k} exceeds the number of distinct rank-1 units ({distinct} of {n}); "
            f"k-means cannot fill more clusters than that: choose a rank in [1, {distinct}]"
        )
    order = np.lexsort(x.T[::-1])  # canonical order: by the first coordinate, then the second, ...
    xs = x[order]
    if k == n:
        raw = np.arange(n)
    else:
        # one OpenMP thread: the pool is small (N = sum of the ranks), and threads only add start-up time
        with threadpool_limits(limits=1, user_api="openmp"):
            km = KMeans(n_clusters=int(k), n_init=N_INIT, random_state=seed, algorithm="lloyd").fit(xs)
        raw = km.labels_
    found, first = np.unique(raw, return_index=True)
    if found.shape[0] != k:
        raise RuntimeError(f"LoRA-LEGO: k-means left {k - found.shape[0]} of {k} clusters empty")
    remap = np.empty(int(found.max()) + 1, dtype=np.int64)
    remap[found[np.argsort(first)]] = np.arange(k)
    sorted_labels = remap[raw]
    centroids = np.stack([xs[sorted_labels == j].mean(axis=0) for j in range(k)])
    labels = np.empty(n, dtype=np.int64)
    labels[order] = sorted_labels
    return torch.from_numpy(labels), torch.from_numpy(centroids)


def reweight_parameters(units: Tensor, labels: Tensor, centroids: Tensor, d_out: int) -> Tensor:
    """Parameter reweighting (our reading): each centroid's B part and A part rescaled to its members' mean norm."""
    out = centroids.clone()
    for j in range(centroids.shape[0]):
        members = units[labels == j]
        for part in (slice(0, d_out), slice(d_out, units.shape[1])):
            norm = torch.linalg.vector_norm(centroids[j, part])
            if norm > 0:
                target = torch.linalg.vector_norm(members[:, part], dim=1).mean()
                out[j, part] = centroids[j, part] * (target / norm)
    return out


def output_scale(ranks: Sequence[int], k: int) -> float:
    """Output reweighting (our reading): √(r̄ / k), r̄ = the source LoRAs' mean rank."""
    return math.sqrt(sum(ranks) / len(ranks) / k)


def lego_merge(
    factors: Factors,
    rank: int,
    seed: int = 0,
    *,
    reweight_params: bool = True,
    reweight_output: bool = True,
) -> tuple[Tensor, Tensor]:
    """(B_m, A_m), d_out x rank and rank x d_in: the LoRA-LEGO merge of the (B_k, A_k) of one layer.

    ``reweight_params``/``reweight_output`` switch the two halves of the dual reweighting off (ablation);
    both off gives the plain k-means centroids.
    """
    d_out, _, ranks = check_factors(factors)
    check_rank(rank, sum(ranks), len(ranks))
    units = semantic_units(factors)
    labels, centroids = cluster_units(units, rank, seed)
    if reweight_params:
        centroids = reweight_parameters(units, labels, centroids, d_out)
    b_m, a_m = centroids[:, :d_out].T, centroids[:, d_out:]
    if reweight_output:
        b_m = b_m * output_scale(ranks, rank)
    dtype = factors[0][0].dtype
    for b, a in factors:
        dtype = torch.promote_types(torch.promote_types(dtype, b.dtype), a.dtype)
    device = factors[0][0].device
    return b_m.to(device, dtype).contiguous(), a_m.to(device, dtype).contiguous()
