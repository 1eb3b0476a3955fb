"""SoMA / MiLoRA: LoRA initialised from the *minor* singular components of W0, our own layer.

* SoMA (Yun et al., 2025, "SoMA: Singular Value Decomposed Minor Components Adaptation for Domain
  Generalizable Representation Learning", arXiv:2412.04077) and
* MiLoRA (Wang et al., 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient
  LLM Fine-Tuning", arXiv:2406.09044) share this init.

Init: full SVD of W0 in float32, W0 = U S V^T; the r *smallest* triplets give
B0 = U_min sqrt(S_min / s) (d_out x r) and A0 = sqrt(S_min / s) V_min^T (r x d_in), s = alpha / r, so
s B0 A0 = U_min S_min V_min^T. B and A train; the residual W0 - s B0 A0 stays frozen. The authors
(ysj9909/SoMA ``rein/peft/sora.py``, ``sora_init("sora")``) fold the residual into the weight; here
W0 is never modified and Delta W = s (B A - B0 A0) with frozen copies of the initial factors (equal
up to float32 rounding; under autocast slora.TriLayer forms the difference factor by factor, so
bf16 rounding applies to the trained difference only). The model is unchanged at step 0.
Trainable parameters per target: r (d_in + d_out), plus the task head.
Hyper-parameters: rank r, alpha (SoMA's released configs: lora_alpha = r, s = 1, the preset's
``alpha: ${.rank}``; their rank 16 is for DINOv2-L, the preset keeps r = 8, SoraConfig's default).

SoMA's recipe adds two parts (both off in ``method=soma``, on in ``method=soma_recipe``):

* Frozen early blocks (adapter ``soma`` only, ``freeze_first_blocks: K``, default 0): no adapter
  layer, hence no trainable parameter, in transformer blocks 0..K-1; targets in blocks K..L-1 are
  wrapped as above. Authors' rule (ysj9909/SoMA, ``rein/peft/sora.py``: ``start_lora_idx``, the
  block index parsed from ``blocks.<N>.`` in the module name; LoRA only where N >= start_lora_idx,
  ``mark_only_lora_as_trainable`` keeps everything else frozen): every released config
  (``configs/sora/*.py``, ``DGOD/configs/sora/*.py``) uses start_lora_idx = 8 on DINOv2-L's 24 blocks,
  i.e. the first third. For LMs the blocks are the model's transformer layer list
  (``lisa.transformer_layers``: ``bert.encoder.layer.N``, ``model.layers.N``, ``transformer.h.N``);
  valid K: 0 <= K < L (K = L would leave no adapter). Targets outside that list (e.g. BERT's pooler
  under ``all-linear``) are not affected by K. ``freeze_first_fraction: f`` sets K = round(f L)
  instead (the two are exclusive); ``soma_recipe`` uses f = 1/3, the authors' 8/24 (our choice for
  LMs: the authors' code only has K = 8 for the 24-block DINOv2-L). Not mapped: the authors also
  train the biases of adapted targets (``bias="all"``); this adapter keeps biases frozen, as
  ``method=soma`` always did.
* Annealed weight decay: the ``soma_wd`` procedure (lorabench/methods/procedures/soma.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters import MinorParams, SomaParams
from lorabench.methods.adapters.layer import OwnAdapter, check_rank, target_shapes, top_svd, wrap_targets
from lorabench.methods.adapters.slora import TriLayer
from lorabench.methods.base import MethodContext, head_parameter_count
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.procedures.lisa import transformer_layers
from lorabench.registry import ADAPTERS


class MinorComponentsAdapter(OwnAdapter):
    Params = MinorParams
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py)
    rank_at_most_every_target = True  # check_rank: r <= min(d_out, d_in) of each target

    def make_layer(self, name: str, linear: nn.Linear, params: MinorParams, ctx: MethodContext) -> TriLayer:
        check_rank(params.rank, linear.out_features, linear.in_features, name)
        scale = params.alpha / params.rank
        u, s, vh = top_svd(linear.weight, params.rank, smallest=True)
        root = torch.sqrt(s / scale)
        b, a = u * root, root[:, None] * vh
        return TriLayer(linear, b, torch.eye(params.rank), a, scale, train=("B", "A"), subtract_init=True)

    def layer_trainable(self, d_out: int, d_in: int, params: MinorParams) -> int:
        return params.rank * (d_in + d_out)


def block_of(name: str, list_name: str) -> int | None:
    """Index N of the transformer block that module ``name`` lies in (``<list_name>.<N>.``), else None."""
    prefix = f"{list_name}." if list_name else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def unfrozen_targets(model: nn.Module, targets: list[str], params: SomaParams) -> list[str]:
    """Targets with the first K transformer blocks removed: for K > 0, the full names of the targeted
    linears that do not lie in blocks 0..K-1 (each matches itself exactly in ``wrap_targets``)."""
    if not params.freeze_first_blocks and not params.freeze_first_fraction:
        return targets
    list_name, blocks = transformer_layers(model)
    freeze_first_blocks = params.frozen_count(len(blocks))
    if freeze_first_blocks >= len(blocks):
        given = (
            f"method.freeze_first_fraction={params.freeze_first_fraction} (K = {freeze_first_blocks})"
            if params.freeze_first_fraction
            else f"method.freeze_first_blocks={freeze_first_blocks}"
        )
        raise ConfigError(
            f"{given} is invalid for {type(model).__name__} with {len(blocks)} transformer blocks "
            f"({list_name}); K must be in 0..{len(blocks) - 1}"
        )
    keep = []
    for name, _, _ in target_shapes(model, targets):
        block = block_of(name, list_name)
        if block is None or block >= freeze_first_blocks:
            keep.append(name)
    return keep


@ADAPTERS.register("soma")
class SomaAdapter(MinorComponentsAdapter):
    """SoMA's minor-component LoRA; ``freeze_first_blocks`` leaves the first K blocks untouched."""

    Params = SomaParams
    paper = "Yun et al., 2025, arXiv:2412.04077"
    fidelity = Fidelity(
        reference="ysj9909/SoMA@7ea8c0e7c2ac rein/peft/sora.py (Linear, sora_init('sora'))",
        status="parity",
        tolerance="max |Δθ| <= 1e-6 over 12 AdamW steps (fp32, CPU), step-0 gradients 1e-6, outputs 4e-6",
        fixture="tests/fixtures/parity/soma.json",
        deviations=(
            "W0 is not modified: the residual W0 - s B0 A0 is kept as W0 x - s B0 A0 x through frozen copies of"
            " the initial factors (the authors fold it into the weight); equal up to float32 rounding, and"
            " delta_weight() stays W - W0 for merging and the spectral metrics",
            "biases of adapted targets stay frozen (the authors' bias='all' trains them)",
            "blocks: freeze_first_blocks / freeze_first_fraction map start_lora_idx onto the LM's layer list",
        ),
        unchecked=(
            "start_lora_idx and bias='all' inside the authors' SoraModel (needs their mmseg DINOv2 backbone);"
            " block freezing is checked by tests/test_soma_recipe.py against the rule only",
            "rank_ramp and the 'sora_niter_N' init (svd_lowrank, which takes the top r components); the released"
            " configs use 'sora' without rank_ramp",
        ),
        revision=2,
    )

    def apply(self, model: nn.Module, params: SomaParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        if init_kwargs or (not params.freeze_first_blocks and not params.freeze_first_fraction):
            return super().apply(model, params, ctx, init_kwargs)
        targets = unfrozen_targets(model, ctx.target_modules, params)
        return wrap_targets(model, targets, lambda n, lin: self.make_layer(n, lin, params, ctx), ctx.head)

    def expected_trainable(self, base_model: nn.Module, params: SomaParams, ctx: MethodContext) -> int:
        targets = unfrozen_targets(base_model, ctx.target_modules, params)
        own = sum(self.layer_trainable(d_out, d_in, params) for _, d_out, d_in in target_shapes(base_model, targets))
        return own + head_parameter_count(base_model, ctx.head)


@ADAPTERS.register("milora")
class MiloraAdapter(MinorComponentsAdapter):
    paper = "Wang et al., 2024, arXiv:2406.09044"
    fidelity = Fidelity(
        reference="MiLoRA's released code (not compared)",
        status="unchecked",
        unchecked=(
            "MiLoRA's released code was not run (METHODS.md lists no verified repository); its init and layer are"
            " SoMA's, which tests/test_parity_soma.py checks against ysj9909/SoMA",
        ),
        revision=2,
    )
