"""S2-LoRA, Sparsely Shared LoRA (Liu, Qin, Peng and Lee, 2024, "Sparsely Shared LoRA on Whisper for
Child Speech Recognition", ICASSP 2024, arXiv:2309.11756), our own layer. No authors' code was found
(GitHub search by title and name; awesome-lists link only huggingface/peft, which has no S2-LoRA).

Update rule, from the abstract ("the two low-rank decomposed matrices are globally shared. Each weight
matrix only has to maintain its specific rank coefficients that are constrained to be sparse") and its
AdaLoRA starting point (Delta W = P Lambda Q with learnable singular values Lambda): for every target l
with weight shape (d_out, d_in),

    Delta W_l = s B diag(c_l) A,        s = alpha / r,
    h = W0_l x + s ((x A^T) * c_l) B^T,
    loss += lambda sum_l ||c_l||_1      (the ``s2_lora_l1`` regularizer, regularizers/s2_lora_l1.py)

with ONE pair A (r x d_in), B (d_out x r) per weight shape, shared by every target of that shape (the
same ``nn.Parameter`` object registered in each of their layers: it trains once, its gradient is the sum
over the layers that use it, it is counted once and saved once), and a per-target coefficient vector
c_l (r). Targets of different shapes (e.g. an FFN's d x 4d and 4d x d, or GQA's narrow k/v) cannot share
one pair, so "globally shared" is read as one pair per shape. Init as peft's AdaLoRA (P, Q ~ N(0, 0.02),
Lambda = 0): A, B ~ N(0, ``s2_init_std``^2) from a generator seeded by the run seed and the shape, c_l = 0,
so the model is unchanged at step 0 and c gets the first gradient (s diag(B^T G_l A^T)); A and B train by
default (``s2_train_shared: false`` keeps them at their draw). c_l is 1-D, so AdamW gives it no weight decay.

Trainable parameters: r per target (``layer_trainable``) plus r (d_in + d_out) once per distinct target
shape (``shared_trainable``; 0 with ``s2_train_shared: false``), plus the task head.
Saving and loading: ``trainable_state_dict`` lists each shared tensor once, under the name of the first
layer that holds it (``model.named_parameters()`` skips repeats); loading copies into that one tensor,
which every layer of the shape sees. Merging folds each layer's s B diag(c_l) A into its own W0; the
shared factors are left as they are, so layers merged one after another stay exact.

How the speech method maps here: the paper adapts Whisper's encoder and decoder linears for child ASR;
here the same rule runs on a text model's ``target_modules`` (query/value by default). Left out: the
paper's exact choice of adapted modules and its hyper-parameters (rank, L1 weight, learning rate),
which were not available without the paper's method section; any dropout on the adapter input.
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters_s2_lora import S2LoraParams
from lorabench.methods.adapters.layer import AdapterLayer, OwnAdapter, seeded_generator, target_shapes, wrap_targets
from lorabench.methods.base import MethodContext, head_parameter_count
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS

Shared = dict[tuple[int, int], tuple[nn.Parameter, nn.Parameter]]


class S2LoraLayer(AdapterLayer):
    """y = W0 x + s ((x A^T) * c) B^T with A, B shared by every layer of this shape."""

    def __init__(self, base: nn.Linear, shared_a: nn.Parameter, shared_b: nn.Parameter, scale: float):
        super().__init__(base)
        r = shared_a.shape[0]
        if shared_a.shape != (r, base.in_features) or shared_b.shape != (base.out_features, r):
            raise ValueError(
                f"shared factors {tuple(shared_b.shape)} x {tuple(shared_a.shape)} do not fit a "
                f"{base.out_features} x {base.in_features} layer"
            )
        self.s2_A = shared_a  # the same Parameter object in every layer of this shape
        self.s2_B = shared_b
        self.s2_coef = nn.Parameter(torch.zeros(r, device=shared_a.device, dtype=shared_a.dtype))
        self.scale = scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.s2_B * self.s2_coef) @ self.s2_A

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x.to(self.s2_A.dtype) @ self.s2_A.T) * self.s2_coef
        return (self.scale * (h @ self.s2_B.T)).to(x.dtype)


def draw_shared(d_out: int, d_in: int, params: S2LoraParams, seed: int, device, dtype) -> tuple[nn.Parameter, ...]:
    """The shared (A, B) of one weight shape: N(0, std^2), from a generator of the seed and the shape."""
    gen = seeded_generator(seed, f"s2_lora/{d_out}x{d_in}")
    a = torch.randn(params.rank, d_in, generator=gen) * params.s2_init_std
    b = torch.randn(d_out, params.rank, generator=gen) * params.s2_init_std
    train = params.s2_train_shared
    return (
        nn.Parameter(a.to(device, dtype), requires_grad=train),
        nn.Parameter(b.to(device, dtype), requires_grad=train),
    )


@ADAPTERS.register("s2_lora")
class S2LoraAdapter(OwnAdapter):
    Params = S2LoraParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py); the count grows with r
    paper = "Liu et al., ICASSP 2024, arXiv:2309.11756"
    fidelity = Fidelity(
        reference="no released code found (searched by title and name); rule read from arXiv:2309.11756's abstract",
        status="rule",
        deviations=(
            "one shared (A, B) per weight shape: targets of different shapes cannot share one pair",
            "init and scale follow peft's AdaLoRA (A, B ~ N(0, 0.02), c = 0, s = alpha / r), the method the paper"
            " builds on; the paper's own init, rank and L1 weight were not available",
        ),
        unchecked=(
            "the paper's method section (which Whisper modules, whether A and B train, the L1 weight) could not be"
            " read; the rule follows the abstract",
        ),
    )

    def apply(self, model: nn.Module, params: S2LoraParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        if init_kwargs:
            raise ConfigError(
                f"adapter 's2_lora' takes no initializer arguments (got {sorted(init_kwargs)}); use method.init=none"
            )
        shared: Shared = {}  # one per apply: every target of a shape gets the same pair
        return wrap_targets(
            model, ctx.target_modules, lambda n, lin: self.make_layer(n, lin, params, ctx, shared), ctx.head
        )

    def make_layer(
        self, name: str, linear: nn.Linear, params: S2LoraParams, ctx: MethodContext, shared: Shared | None = None
    ) -> S2LoraLayer:
        """The layer of target ``name``; ``shared`` maps (d_out, d_in) to that shape's (A, B), filled on
        first use (None: a pair of its own)."""
        shared = {} if shared is None else shared
        key = (linear.out_features, linear.in_features)
        dtype = torch.float32 if linear.weight.dtype in (torch.float16, torch.bfloat16) else linear.weight.dtype
        if key not in shared:
            shared[key] = draw_shared(*key, params, ctx.seed, linear.weight.device, dtype)
        a, b = shared[key]
        if a.device != linear.weight.device:
            raise ConfigError(
                f"s2_lora shares one (A, B) per weight shape, but {name} is on {linear.weight.device} and the "
                f"shared pair of shape {key} on {a.device}: place the targeted layers on one device"
            )
        return S2LoraLayer(linear, a, b, params.alpha / params.rank)

    def layer_trainable(self, d_out: int, d_in: int, params: S2LoraParams) -> int:
        """The per-target part: the coefficient vector c_l."""
        return params.rank

    def shared_trainable(self, d_out: int, d_in: int, params: S2LoraParams) -> int:
        """The part counted once per distinct target shape: the shared A and B."""
        return params.rank * (d_in + d_out) if params.s2_train_shared else 0

    def expected_trainable(self, base_model: nn.Module, params: S2LoraParams, ctx: MethodContext) -> int:
        shapes = [(d_out, d_in) for _, d_out, d_in in target_shapes(base_model, ctx.target_modules)]
        own = sum(self.layer_trainable(d_out, d_in, params) for d_out, d_in in shapes)
        shared = sum(self.shared_trainable(d_out, d_in, params) for d_out, d_in in set(shapes))
        return own + shared + head_parameter_count(base_model, ctx.head)
