"""IncreLoRA (Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning", arXiv:2308.12043), our own layer.

Update rule (the authors' ``SVDLinear``, FeiyuZhang98/IncreLoRA@51a2d734af78
loralib/loralib/increlora.py): y = W0 x + drop(x) Delta W^T with

    Delta W = P diag(g) Q * alpha / (r_a + 1e-5)

P (d_out x r_max), lambda (r_max x 1), Q (r_max x d_in), r_a the number of active components (the
authors' ``ranknum``: the scale follows the active rank, not r_max), and gates g = lambda * m +
sg(lambda) * v: m the 0/1 mask of active components, v that of created but inactive ones (reserves,
whose lambda is frozen; sg = stop-gradient). A component that does not exist yet in the authors' model
has gate 0. Init: the ``init_r`` initial components have lambda = 0 and P, Q ~ N(0, 0.02^2) (so
Delta W = 0 at step 0); every later component is drawn the same way when preallocated. The
``increlora`` procedure (lorabench/methods/procedures/increlora.py) creates, activates and releases
components and supplies the importance scores' gradient hook.

Importance score (the authors' ``backward_hook``): while the procedure scores modules
(``track_score``), the forward builds the dense Delta W and keeps, from the backward, score =
sum |Delta W * dL/dDelta W| / sqrt(d_out d_in); otherwise it runs the factorised product.

Components are preallocated up to r_max, so the parameter count is fixed: r_max (d_in + d_out + 1)
per target, plus the task head. ``rank: 0`` (default) sizes r_max so that no module can run out of
room under the authors' schedule: init_r + a (R + 1), with a components per module per round, R the
number of rounds that spend the budget (``allocation_rounds``, lorabench/method_params/adapters.py)
and a more for the reserves. The masks are saved buffers (the allocation cannot be regenerated).
lambda is stored as r_max x 1 (the authors' shape), so AdamW decays it like the authors' trainer does.
Hyper-parameters (the authors' SST-2 rank-8 script, NLU/scripts/rank=8/run_sst2.sh): init_r = 1,
alpha = 16, dropout 0.3; target_r, add_per_round and incre_rank_num are the procedure's (the adapter
reads them to size r_max).
Deviations kept: P and Q are drawn from a generator seeded by the run seed and the layer name when
preallocated (the authors draw each component from torch's global generator when it is created;
same distribution); with an explicit ``rank`` below what the schedule may need, a module without
room for a round is left out of the selection (the authors' modules have no cap).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lorabench.method_params.adapters import IncreLoraParams, components_per_round  # noqa: F401  (re-exported)
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator, target_shapes
from lorabench.methods.base import MethodContext, head_parameter_count
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS

REPO = "FeiyuZhang98/IncreLoRA@51a2d734af78"


class IncreLoraLayer(AdapterLayer):
    def __init__(
        self,
        base: nn.Linear,
        r_max: int,
        init_r: int,
        alpha: float,
        generator: torch.Generator,
        dropout: float = 0.0,
    ):
        super().__init__(base)
        dtype, device = self.adapter_dtype, base.weight.device
        self.lora_P = nn.Parameter(
            (torch.randn(base.out_features, r_max, generator=generator) * 0.02).to(device, dtype)
        )
        self.lora_E = nn.Parameter(torch.zeros(r_max, 1, device=device, dtype=dtype))
        self.lora_Q = nn.Parameter((torch.randn(r_max, base.in_features, generator=generator) * 0.02).to(device, dtype))
        mask = torch.zeros(r_max, device=device, dtype=dtype)
        mask[:init_r] = 1
        self.register_buffer("rank_mask", mask)  # active components; persistent (saved with the adapter)
        # created but inactive components (reserves, released reserves): frozen lambda; persistent
        self.register_buffer("reserve_mask", torch.zeros(r_max, device=device, dtype=dtype))
        self.alpha, self.dropout = alpha, dropout
        self.track_score = False  # set by the procedure while it scores modules
        self.score: torch.Tensor | None = None

    @property
    def r_max(self) -> int:
        return self.rank_mask.numel()

    def rank(self) -> int:
        return int(self.rank_mask.sum().item())

    def created(self) -> torch.Tensor:
        """Bool mask of the components that exist in the authors' model (active or reserved)."""
        return self.rank_mask.bool() | self.reserve_mask.bool()

    def reserved(self) -> list[int]:
        return [int(i) for i in self.reserve_mask.nonzero()[:, 0]]

    def gates(self) -> torch.Tensor:
        """lambda on active components, the frozen lambda (no gradient) on reserved ones, 0 elsewhere."""
        e = self.lora_E[:, 0]
        return e * self.rank_mask + e.detach() * self.reserve_mask

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_P @ (self.lora_Q * self.gates()[:, None])) * self.alpha / (self.rank_mask.sum() + 1e-5)

    def _keep_score(self, w: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            self.score = (w.float().abs() * grad.float()).abs().sum() / math.sqrt(w.numel())

        return hook

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lora_Q.dtype)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, training=True)
        if self.track_score and self.training and torch.is_grad_enabled():
            w = self.delta_weight()
            if w.requires_grad:
                w.register_hook(self._keep_score(w.detach()))
            return (h @ w.T).to(x.dtype)
        scale = self.alpha / (self.rank_mask.sum() + 1e-5)
        return ((((h @ self.lora_Q.T) * self.gates()) @ self.lora_P.T) * scale).to(x.dtype)

    @torch.no_grad()
    def create(self, count: int, gate: float) -> list[int]:
        """Reserve the next ``count`` components (after every created one) with lambda frozen at
        ``gate``; returns their indices."""
        start = int(self.created().nonzero()[-1, 0]) + 1 if self.created().any() else 0
        idx = list(range(start, start + count))
        if idx and idx[-1] >= self.r_max:
            raise RuntimeError(f"IncreLoRA layer has r_max={self.r_max}, too few for {start + count} components")
        self.reserve_mask[idx] = 1
        self.lora_E[idx] = gate
        return idx

    @torch.no_grad()
    def activate(self) -> list[int]:
        """The reserves become active (lambda keeps its value and starts training); returns their indices."""
        idx = self.reserved()
        self.reserve_mask[idx] = 0
        self.rank_mask[idx] = 1
        return idx

    @torch.no_grad()
    def release(self) -> None:
        """Budget spent: the reserves' lambda is set to 0 (they stay created: frozen, gate 0)."""
        self.lora_E[self.reserve_mask.bool()] = 0


@ADAPTERS.register("increlora")
class IncreLoraAdapter(OwnAdapter):
    Params = IncreLoraParams
    paper = "Zhang et al., 2023, arXiv:2308.12043"
    fidelity = Fidelity(
        reference=f"{REPO} loralib/loralib/increlora.py (SVDLinear)",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12-16 AdamW steps (fp32, CPU, dropout masks shared); scores 1e-4 relative",
        fixture="tests/fixtures/parity/increlora.json",
        deviations=(
            "P and Q are preallocated from a generator seeded by the run seed and the layer name, not drawn from"
            " torch's global generator at creation: same distribution (the trajectory is compared from the"
            " reference's values)",
            "an explicit method.rank (r_max) below what the schedule may need leaves full modules out of the"
            " selection; the default rank 0 sizes r_max so that this cannot happen",
        ),
        revision=2,
    )

    def apply(self, model: nn.Module, params: IncreLoraParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        ctx.extras["increlora_r_max"] = params.r_max(len(target_shapes(model, ctx.target_modules)))
        return super().apply(model, params, ctx, init_kwargs)

    def make_layer(self, name: str, linear: nn.Linear, params: IncreLoraParams, ctx: MethodContext) -> IncreLoraLayer:
        gen = seeded_generator(ctx.seed, name)
        r_max = ctx.extras["increlora_r_max"]  # set by apply from the number of targets
        return IncreLoraLayer(linear, r_max, params.init_r, params.alpha, gen, params.dropout)

    def layer_trainable(self, d_out: int, d_in: int, params: IncreLoraParams, r_max: int | None = None) -> int:
        return (params.rank if r_max is None else r_max) * (d_in + d_out + 1)

    def expected_trainable(self, base_model: nn.Module, params: IncreLoraParams, ctx: MethodContext) -> int:
        shapes = target_shapes(base_model, ctx.target_modules)
        r_max = params.r_max(len(shapes))
        own = sum(self.layer_trainable(d_out, d_in, params, r_max) for _, d_out, d_in in shapes)
        return own + head_parameter_count(base_model, ctx.head)
