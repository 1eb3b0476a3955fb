"""Size budgets: pick the hyper-parameter that sets a method's size so that it fits a budget.

    budget.trainable_params=N      adapters and layer-wise procedures: the largest knob value whose
                                   closed-form trainable count (``expected_trainable``) is <= N
    budget.optimizer_state_mb=M    GaLore-family optimizers (all weights train, so the trainable count
                                   does not move): the largest rank (or FRUGAL density) whose predicted
                                   optimizer-state size is <= M MiB

Components declare their knob with a class attribute, ``size_knob = "rank"`` (or a tuple of fields
that take the same value, e.g. NOLA's ``("num_basis_a", "num_basis_b")``). The search assumes the
size grows with the knob and checks it: integers by doubling then bisection, floats (FRUGAL's
density) by bisection to ``FLOAT_TOL``. Ranks are capped at the largest ``min(d_out, d_in)`` of the
targeted weights (a larger rank adds nothing; the smallest for adapters that declare
``rank_at_most_every_target``, whose rank may not exceed any target's; half of it for LoRA-GA),
LISA's layer count at the model's layers. A knob with another natural limit has
``size_limit(shapes, params)``, the largest value that still adds something on targets of those
(d_out, d_in) shapes (SALT's residual rank, NOLA's basis count), so an unreachable budget caps
instead of asking for millions. A component whose knob also has shape constraints defines
``size_is_valid(model, params, ctx)``: the integer search then steps down from its answer to the
largest valid value (Bone's block size must divide every target's d_in and d_out); so it does for a
regularizer's ``check_adapter`` (PEGO's rank must be a multiple of its group size).

The training loop calls, before ``apply_method`` (on the loaded base model, or one built on the
meta device):

    result = solve_budget(model, spec, ctx, trainable_params=N)     # or optimizer_state_mb=M
    spec = apply_budget(spec, result)                                # re-validated Params

Optimizer-state formulas (bytes, fp32 state; ``step`` counters are Python ints in these optimizers):
a projected weight m x n with rank r keeps its basis (r x d, d the projected side) and two moments
(r x the other side); Fira adds a 0-d residual norm per projected weight; every other parameter
keeps two moments of its own shape. galore-torch differs: its moments take the weight's dtype, and
with fp32 weights its basis is a slice of the SVD factor, so the whole d x d factor stays allocated
(measured: that is what ``optimizer_state_bytes`` counts). Supported: galore (svd / randomized_svd / random projectors),
galore_torch, fira, frugal (svd / random projectors). Not supported: q_galore (quantized bases) and
dct_adamw (shared DCT matrices, index projectors): ``solve_budget`` says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext, rank_limit, target_linear_weights
from lorabench.methods.build import expected_trainable
from lorabench.methods.spec import MethodSpec

FLOAT_TOL = 1e-4
INT_LIMIT = 1 << 22
AXIS_ORDER = ("procedure", "adapter", "optimizer")


def knob_fields(component: Any) -> tuple[str, ...]:
    knob = getattr(component, "size_knob", None)
    return () if not knob else ((knob,) if isinstance(knob, str) else tuple(knob))


def method_knob(spec: MethodSpec) -> tuple[str, tuple[str, ...]] | None:
    """(axis, fields) of the first component that declares a size knob, or None."""
    for axis in AXIS_ORDER:
        comp = spec.components.get(axis)
        if comp is not None and knob_fields(comp):
            return axis, knob_fields(comp)
    return None


def describe_knob(spec: MethodSpec) -> str:
    """For ``lorabench methods``: e.g. ``rank (params)``, ``rank (optimizer state)`` or ``-``."""
    found = method_knob(spec)
    if found is None:
        return "-"
    axis, fields = found
    kind = "params"
    if axis == "optimizer":
        kind = "optimizer state" if spec.names["optimizer"] in STATE_FORMULAS else "no budget formula"
    return f"{'='.join(fields)} ({kind})"


def with_value(spec: MethodSpec, axis: str, fields: tuple[str, ...], value) -> MethodSpec:
    """A copy of ``spec`` with the knob set; the component's Params validate the value again."""
    params = dataclasses.replace(spec.params[axis], **dict.fromkeys(fields, value))
    return dataclasses.replace(spec, params={**spec.params, axis: params})


def knob_value_is_valid(
    base_model: nn.Module, spec: MethodSpec, axis: str, fields: tuple[str, ...], value, ctx
) -> bool:
    """Whether the knob may take ``value``: the component's shape constraint (``size_is_valid``, e.g.
    Bone's block size must divide every target) and the regularizer's check of the adapter's settings
    (``check_adapter``, e.g. PEGO's rank must split into its group)."""
    params = with_value(spec, axis, fields, value).params
    valid = getattr(spec.components[axis], "size_is_valid", None)
    if valid is not None and not valid(base_model, params[axis], ctx):
        return False
    check_adapter = getattr(params.get("regularizer"), "check_adapter", None)
    if check_adapter is not None and axis == "adapter":
        try:
            check_adapter(params[axis])
        except ConfigError:
            return False
    return True


def apply_budget(spec: MethodSpec, result: dict) -> MethodSpec:
    return with_value(spec, result["axis"], tuple(result["knob"].split("=")), result["value"])


# -- optimizer-state formulas -------------------------------------------------------------------------
def _sides(m: int, n: int, proj_type: str) -> tuple[int, int]:
    """(projected dimension, other dimension) for galore's side rules."""
    from lorabench.methods.optimizers.projectors import SIDE_RULES

    if proj_type not in SIDE_RULES:
        raise ConfigError(
            f"optimizer-state budget: proj_type={proj_type!r} is not supported; use one of {', '.join(SIDE_RULES)}"
        )
    left = SIDE_RULES[proj_type](m, n) == "left"
    return (m, n) if left else (n, m)


def _projected_state_bytes(
    base_model: nn.Module,
    ctx: MethodContext,
    rank_for: Callable[[int], int],
    extra_per_projected: int = 0,
    proj_type: str = "std",
    package: bool = False,
) -> int:
    projected = {id(p) for _, p in target_linear_weights(base_model, ctx.target_modules) if p.requires_grad}
    seen, total = set(), 0
    for p in base_model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if id(p) in projected and p.ndim == 2:
            dim, other = _sides(p.shape[0], p.shape[1], proj_type)
            r = max(1, min(rank_for(dim), dim))
            if package:  # galore-torch: moments in the weight's dtype; an fp32 basis is a view of the SVD factor
                size = p.element_size()
                basis = 4 * dim * dim if size == 4 else size * r * dim
                total += basis + 2 * size * r * other
            else:
                total += 4 * r * dim + 2 * 4 * r * other + extra_per_projected
        else:
            total += 2 * p.numel() * p.element_size()
    return total


def _galore(base_model, params, ctx) -> int:
    if getattr(params, "projector", "svd") not in ("svd", "randomized_svd", "random"):
        raise ConfigError(f"optimizer-state budget: projector={params.projector!r} is not supported")
    return _projected_state_bytes(base_model, ctx, lambda d: params.rank, proj_type=params.proj_type)


def _galore_torch(base_model, params, ctx) -> int:
    if params.proj_type not in ("std", "reverse_std", "left", "right"):
        raise ConfigError(f"optimizer-state budget: galore_torch proj_type={params.proj_type!r} is not supported")
    return _projected_state_bytes(base_model, ctx, lambda d: params.rank, proj_type=params.proj_type, package=True)


def _fira(base_model, params, ctx) -> int:
    return _projected_state_bytes(
        base_model, ctx, lambda d: params.rank, extra_per_projected=4, proj_type=params.proj_type
    )


def _frugal(base_model, params, ctx) -> int:
    if params.projector not in ("svd", "random"):
        raise ConfigError(
            f"optimizer-state budget: FRUGAL projector={params.projector!r} is not supported (supported: svd, random)"
        )
    return _projected_state_bytes(
        base_model, ctx, lambda d: max(1, round(params.density * d)), proj_type=params.proj_type
    )


STATE_FORMULAS: dict[str, Callable] = {
    "galore": _galore,
    "galore_torch": _galore_torch,
    "fira": _fira,
    "frugal": _frugal,
}


def optimizer_state_bytes(base_model: nn.Module, spec: MethodSpec, ctx: MethodContext) -> int:
    """Predicted optimizer-state bytes after the first step (every parameter has a gradient)."""
    name = spec.names["optimizer"]
    formula = STATE_FORMULAS.get(name)
    if formula is None or spec.names["adapter"] != "none" or spec.names["procedure"] != "none":
        raise ConfigError(
            f"budget.optimizer_state_mb is not supported for method {spec.label!r} (optimizer "
            f"{name!r}); supported optimizers without adapter or procedure: "
            f"{', '.join(sorted(STATE_FORMULAS))}"
        )
    return formula(base_model, spec.params["optimizer"], ctx)


# -- the search ---------------------------------------------------------------------------------------
# knobs that count transformer layers: capped at the model's number of layers
LAYER_COUNT_KNOBS = (("lisa_activated_layers",), ("flexora_keep_layers",))


def _cap(base_model: nn.Module, spec: MethodSpec, ctx: MethodContext, axis: str, fields: tuple[str, ...]) -> int:
    if fields in LAYER_COUNT_KNOBS:
        from lorabench.methods.procedures.lisa import transformer_layers

        return len(transformer_layers(base_model)[1])
    shapes = [tuple(w.shape) for _, w in target_linear_weights(base_model, ctx.target_modules)]
    if not shapes:
        return INT_LIMIT
    size_limit = getattr(spec.components[axis], "size_limit", None)
    if size_limit is not None:
        return size_limit(shapes, spec.params[axis])
    if "rank" in fields:
        # SVD-based components (rank_at_most_every_target) need r <= min(d_out, d_in) of every target / k
        # (LoRA-GA: 2r); every other factor rank r <= min(d_out, d_in) of every target, as the preflight
        # check (lorabench.preflight.check_rank) requires of any run, so that a solved budget is a rank the
        # run accepts (e.g. SmolLM2's 192-wide GQA v_proj); only ranks that are not a factor rank
        # (RANK_IS_NOT_A_FACTOR_RANK: VeRA, RandLoRA, MiSS) may go up to the largest target's
        from lorabench.preflight import RANK_IS_NOT_A_FACTOR_RANK

        limit = rank_limit(base_model, spec.components.values(), ctx.target_modules)
        if limit is not None:
            return limit[0]
        widest = (axis, spec.names[axis]) in RANK_IS_NOT_A_FACTOR_RANK
        return (max if widest else min)(min(shape) for shape in shapes)
    return INT_LIMIT


def solve_budget(
    base_model: nn.Module,
    spec: MethodSpec,
    ctx: MethodContext,
    trainable_params: int | None = None,
    optimizer_state_mb: float | None = None,
) -> dict:
    """The knob value whose predicted size is as close as possible to the budget without exceeding it.

    Returns ``{"knob", "axis", "value", "predicted", "budget", "unit", "capped"}``; ``capped`` is
    True when the largest meaningful value still fits (the budget is not the binding limit).
    Raises ``ConfigError`` when the method has no knob for that budget or even the smallest value
    exceeds it."""
    if (trainable_params is None) == (optimizer_state_mb is None):
        raise ConfigError("give exactly one of budget.trainable_params and budget.optimizer_state_mb")
    found = method_knob(spec)
    if found is None:
        raise ConfigError(f"method {spec.label!r} declares no size knob, so a budget cannot size it")
    axis, fields = found
    if trainable_params is not None:
        if axis == "optimizer":
            raise ConfigError(
                f"method {spec.label!r} trains every weight; its knob {'='.join(fields)!r} sets the "
                "optimizer state, not the trainable count: use budget.optimizer_state_mb"
            )
        budget, unit = int(trainable_params), "params"

        def predict(s):
            return expected_trainable(base_model, s, ctx)
    else:
        if axis != "optimizer":
            raise ConfigError(
                f"budget.optimizer_state_mb sizes GaLore-family optimizers; method {spec.label!r} "
                "has an adapter or procedure knob: use budget.trainable_params"
            )
        budget, unit = int(float(optimizer_state_mb) * 2**20), "bytes"

        def predict(s):
            return optimizer_state_bytes(base_model, s, ctx)

    def size(value):
        try:
            s = with_value(spec, axis, fields, value)
        except ConfigError:
            return None
        return predict(s)

    is_float = isinstance(getattr(spec.params[axis], fields[0]), float)
    if is_float:
        lo, hi = FLOAT_TOL, 1.0
        if (size(lo) or budget + 1) > budget:
            raise ConfigError(
                f"budget {budget:,} {unit} is below method {spec.label!r}'s smallest size "
                f"({size(lo):,} {unit} at {'='.join(fields)}={lo})"
            )
        capped = size(hi) is not None and size(hi) <= budget
        if capped:
            lo = hi
        while hi - lo > FLOAT_TOL and not capped:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (size(mid) or budget + 1) <= budget else (lo, mid)
        value = round(lo, 6)
        while size(value) is None or size(value) > budget:  # rounding must not push it over
            value = round(value - FLOAT_TOL, 6)
    else:
        cap = _cap(base_model, spec, ctx, axis, fields)
        first = size(1)
        if first is None or first > budget:
            raise ConfigError(
                f"budget {budget:,} {unit} is below method {spec.label!r}'s smallest size "
                f"({first if first is None else f'{first:,}'} {unit} at {'='.join(fields)}=1)"
            )
        lo, hi = 1, 2
        while hi <= cap and (size(hi) or budget + 1) <= budget:
            lo, hi = hi, hi * 2
        hi = min(hi, cap + 1)
        while hi - lo > 1:  # size(lo) <= budget < size(hi), or hi is past the cap
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if (size(mid) or budget + 1) <= budget else (lo, mid)
        value = lo
        capped = value >= cap
        while value > 1 and not knob_value_is_valid(base_model, spec, axis, fields, value, ctx):
            value -= 1  # the largest valid value; capped keeps its meaning (the budget is out of reach)
    predicted = size(value)
    return {
        "knob": "=".join(fields),
        "axis": axis,
        "value": value,
        "predicted": predicted,
        "budget": budget,
        "unit": unit,
        "capped": capped,
    }


def solve_run_budget(base_model: nn.Module, spec: MethodSpec, ctx: MethodContext, budget) -> dict:
    """``solve_budget`` for a run's ``budget`` config group (trainable_params or optimizer_state_mb)."""
    return solve_budget(
        base_model,
        spec,
        ctx,
        trainable_params=budget.trainable_params,
        optimizer_state_mb=budget.optimizer_state_mb,
    )
