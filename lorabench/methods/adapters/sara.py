"""SaRA (Hu, Zhang, Yi, Huang, Wang and Ma, 2024, "SaRA: High-Efficient Diffusion Model Fine-tuning with
Progressive Sparse Low-Rank Adaptation", arXiv:2409.06633, ICLR 2025), our own layer. Authors' code:
sjtuplayer/SaRA (optim/adamw.py, the default "unstructural backprop" optimizer, and optim/adamw2.py, the
dense one behind ``--disable_ub``).

Rule. Train only the "ineffective" entries of each pretrained weight, those of smallest |W0|, as a sparse
update on a fixed support Omega; everything else stays W0:
    Omega = {(i, j): |W0_ij| among the smallest},   W = W0 + Delta W,   Delta W_ij = 0 off Omega,
    h = W0 x + b0 + Delta W x.
The trainable tensor ``sara_value`` holds the current weight values on Omega (flat row-major indices
``sara_index``, ascending, the order of the authors' ``param[mask]``), starting at W0 there, so Delta W =
scatter(sara_value - W0|Omega) is 0 at step 0 and weight decay pulls the selected weights themselves towards
0, as the authors' AdamW does on them. Only those |Omega| values get a gradient (dense dL/dW gathered on
Omega) and optimizer state: the memory saving of the authors' unstructural backprop. The ``sara`` procedure
adds the rest of the method: the nuclear norm lambda ||M * W||_* of one drawn layer per step and the one
progressive re-selection (its docstring). ``sara_active`` (a persistent buffer, all true at first) marks
the entries still training after that re-selection; ``sara_bound`` is the |w| bound it keeps them under.

Selection. The authors keep |w| < threshold with one absolute threshold (2e-3 in their script) for every
tensor of the Stable Diffusion UNet. Here, by default, each target keeps its
floor(per_mille d_out d_in / 1000) entries of smallest |W0| (ties by flat index), the bound being the
smallest |W0| left out: a share is scale-free (text models' weights are not on SD's scale) and the count
follows from the shapes, so budgets size it exactly (``size_knob``). ``sara_threshold`` restores the
absolute rule, with a count that only the weights can tell (``expected_trainable`` counts them).

From diffusion to text linears: the authors select among every parameter of the UNet (convolutions,
attention and feed-forward linears, norms, biases, embeddings); here the selection runs on the weights of
the target linears (``target_modules``: the model's default list; ``all-linear`` is closer to theirs),
never on biases, norms or embeddings. Left out of the Stable Diffusion setting: the VAE and text encoder
(frozen there too), the noise-prediction objective and their image metrics.

Deviations (Fidelity below) are listed there; the forward adds Delta W x as its own term (Delta W dense,
fp32, autocast off, then one matmul) beside W0 x, where the authors write the values into W itself: the same
function in fp32, and bf16-safe (tests/test_bf16_safety.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters_sara import SaraParams
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, _is_target, as_linear
from lorabench.methods.base import MethodContext, head_parameter_count
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS

SARA_REPO = "sjtuplayer/SaRA@ea21192477eb"


def share_count(d_out: int, d_in: int, per_mille: int) -> int:
    """|Omega| of a d_out x d_in target under the share rule: floor(per_mille * d_out * d_in / 1000)."""
    return per_mille * d_out * d_in // 1000


def select(weight: torch.Tensor, params: SaraParams) -> tuple[torch.Tensor, float]:
    """(ascending flat indices of Omega, the bound |w| must stay under at re-selection)."""
    flat = weight.detach().float().abs().flatten()
    if params.sara_threshold is not None:  # the authors' rule: |w| < threshold
        return torch.nonzero(flat < params.sara_threshold).flatten(), float(params.sara_threshold)
    k = share_count(weight.shape[0], weight.shape[1], params.sara_per_mille)
    order = torch.argsort(flat, stable=True)
    bound = float(flat[order[k]]) if k < flat.numel() else math.inf
    return torch.sort(order[:k]).values, bound


class SaraLayer(AdapterLayer):
    """y = W0 x + b0 + Delta W x, Delta W = scatter(sara_value - W0|Omega) on the fixed support Omega."""

    def __init__(self, base: nn.Linear, index: torch.Tensor, bound: float):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        index = index.to(device, torch.long).contiguous()
        w0 = base.weight.detach().flatten()[index].to(dtype)
        # both regenerate from W0 when the model is wrapped again: not saved with the adapter
        self.register_buffer("sara_index", index, persistent=False)
        self.register_buffer("sara_w0", w0, persistent=False)
        self.register_buffer("sara_active", torch.ones(index.numel(), dtype=torch.bool, device=device))
        self.sara_value = nn.Parameter(w0.clone())
        self.sara_bound = bound

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` on Omega as a dense d_out x d_in matrix, zero elsewhere (differentiable in them)."""
        flat = values.new_zeros(self.out_features * self.in_features).scatter(0, self.sara_index, values)
        return flat.view(self.out_features, self.in_features)

    def delta_weight(self) -> torch.Tensor:
        with torch.autocast(self.sara_value.device.type, enabled=False):
            return self.scatter(self.sara_value - self.sara_w0)

    def masked_weight(self) -> torch.Tensor:
        """M * W with M the entries still training: what the authors' nuclear norm is taken of."""
        return self.scatter(self.sara_value * self.sara_active)


@ADAPTERS.register("sara")
class SaraAdapter(OwnAdapter):
    Params = SaraParams
    size_knob = "sara_per_mille"  # what a size budget sets (lorabench/budget.py); an integer share, exact count
    paper = "Hu et al., 2024, arXiv:2409.06633"
    fidelity = Fidelity(
        reference=f"{SARA_REPO} optim/adamw.py (AdamW, Sparse: the default unstructural-backprop path) and"
        " optim/adamw2.py (--disable_ub), run on CPU on two bias-free linears",
        status="parity",
        tolerance="max |Δ| <= 1e-6 of outputs, gradients and weights over 12 AdamW steps with a re-selection"
        " after step 6 (fp32, CPU); masks equal exactly",
        fixture="tests/fixtures/parity/sara.json",
        deviations=(
            "the selection runs on the target linears' weights only (target_modules); the authors' optimizer"
            " selects among every tensor of the UNet (convolutions, norms, biases, embeddings too)",
            "by default each target keeps its floor(per_mille d_out d_in / 1000) entries of smallest |W0| (100 per"
            " mille: the paper's 'smallest 10% to 20%'), not one absolute threshold for every tensor (theirs: 2e-3,"
            " a value tied to SD's weight scale; a share sizes exactly from shapes); sara_threshold restores it",
            "the trainable tensor is the selected weights' current values and Delta W x is its own term beside the"
            " frozen W0 x; the authors write the values into W (one dense weight): the same function in fp32",
            "the authors' optim/adamw.py writes |value| into W at each selection (Sparse.apply(..., trainable.abs(),"
            " mask)): for the next forward the selected negative weights flip sign and their first gradient is"
            " multiplied by sign(w); not reproduced (optim/adamw2.py has no such step); the parity case runs"
            " adamw.py with that .abs() removed",
            "ties in |W0| at the share's boundary go to the lower flat index (stable sort)",
        ),
        unchecked=(
            "the Stable Diffusion pipeline (diffusers UNet, VAE, text encoder, noise objective): not run",
            "the share that the authors' threshold 2e-3 selects on SD weights: not measured (no weights offline)",
            "mixed precision: the authors' fp16/bf16 runs are not compared; ours: tests/test_bf16_safety.py",
        ),
    )

    def make_layer(self, name: str, linear: nn.Linear, params: SaraParams, ctx: MethodContext) -> SaraLayer:
        index, bound = select(linear.weight, params)
        return SaraLayer(linear, index, bound)

    def layer_trainable(self, d_out: int, d_in: int, params: SaraParams) -> int:
        if params.sara_threshold is not None:
            raise ConfigError(
                "with method.sara_threshold set, a target's count follows from its weights, not its shape"
            )
        return share_count(d_out, d_in, params.sara_per_mille)

    def expected_trainable(self, base_model: nn.Module, params: SaraParams, ctx: MethodContext) -> int | None:
        if params.sara_threshold is None:
            return super().expected_trainable(base_model, params, ctx)
        own = 0
        for name, module in base_model.named_modules():
            linear = as_linear(module) if _is_target(name, ctx.target_modules) else None
            if linear is None:
                continue
            if linear.weight.is_meta:
                return None  # no values to count on the meta device
            own += int((linear.weight.detach().float().abs() < params.sara_threshold).sum())
        return own + head_parameter_count(base_model, ctx.head)

    def size_limit(self, shapes: list[tuple[int, int]], params: SaraParams) -> int:
        if params.sara_threshold is not None:
            raise ConfigError(
                "budget.trainable_params sets method.sara_per_mille; with method.sara_threshold set the count is"
                " fixed by the weights: set method.sara_threshold=null to size SaRA by a budget"
            )
        return 1000
