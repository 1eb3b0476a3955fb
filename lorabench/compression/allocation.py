"""LQ-LoRA's bit allocation under a memory budget (Guo et al. 2023, section 3.2; HanGuo97/lq-lora
``compute_qconfig_assignments`` / ``mip_solve``): every compressed matrix i gets exactly one
configuration c of a candidate set, minimising the total reconstruction error Σ cost[i, c] x[i, c]
subject to Σ bytes[i, c] x[i, c] ≤ budget, x binary with Σ_c x[i, c] = 1: an integer linear
program, solved with scipy's HiGHS MILP (the reference's scipy backend; its default backend is
Gurobi, which gives the same optimum when both solve to optimality).

cost[i, c] is ‖W_i - Ŵ_i‖²_F with Ŵ_i what the run ends with under configuration c: the compressed
weight alone, or Q + B A when the compensation is LQ-LoRA's decomposition (as the reference
prepares its costs with its decomposition when it has ranks). Here the candidates are HQQ bit
widths at the run's group size (the reference's grid also varies NormalFloat block sizes).
"""

from __future__ import annotations

import numpy as np


def solve_assignment(costs: np.ndarray, weights: np.ndarray, budget: float) -> np.ndarray:
    """The 0/1 matrix x (matrices x candidates) of the ILP above; raises ValueError when even the
    cheapest candidate of every matrix exceeds ``budget``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, k = costs.shape
    minimum = float(weights.min(axis=1).sum())
    if minimum > budget:
        raise ValueError(f"the budget of {budget:,.0f} bytes is below the {minimum:,.0f} the smallest choices take")
    one_each = np.zeros((n, n * k))
    for i in range(n):
        one_each[i, i * k : (i + 1) * k] = 1.0
    result = milp(
        c=costs.reshape(-1),
        constraints=[
            LinearConstraint(weights.reshape(1, -1), lb=0, ub=budget),
            LinearConstraint(one_each, lb=1, ub=1),
        ],
        integrality=np.ones(n * k),
        bounds=Bounds(0, 1),
    )
    if result.x is None:
        raise ValueError(f"the bit-allocation ILP found no solution: {result.message}")
    return np.round(result.x).reshape(n, k)
