"""IntTune, intermediate tuning (Guo et al., 2025, "NLoRA: Nystrom-Initiated Low-Rank Adaptation for
Large Language Models", arXiv:2502.14482), our own layer.

Update rule: NLoRA's init (nlora.py: B = W0[:, J], M0 = W0[I, J], A = W0[I, :], W0 untouched, so the
model starts at W0 + s B M0 A) with B and A frozen and only the r x r intermediate matrix M training
(as the authors' ``inttune.py``, which sets requires_grad = False on lora_A and lora_B):
W = W0 + s B M A, s = alpha / r. Trainable parameters per target: r^2, plus the task head.
Hyper-parameters: rank r, alpha (as NLoRA: the authors' lora_alpha = lora_rank). The paper reports
+7.45% average NLG over LoRA with 1.25% of its parameters.
"""

from __future__ import annotations

from lorabench.methods.adapters.nlora import NLORA_FIXTURE, NLORA_TOLERANCE, NloraAdapter, NloraParams
from lorabench.methods.adapters.slora import NLORA_REPO
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import ADAPTERS


@ADAPTERS.register("inttune")
class IntTuneAdapter(NloraAdapter):
    Params = NloraParams
    paper = "Guo et al., 2025, arXiv:2502.14482"
    train = ("M",)
    fidelity = Fidelity(
        reference=f"{NLORA_REPO} (inttune.py: Linear with init_lora_weights='n_lora', lora_A and lora_B frozen)",
        status="parity",
        tolerance=NLORA_TOLERANCE,
        fixture=NLORA_FIXTURE,
        deviations=NloraAdapter.fidelity.deviations,
        unchecked=NloraAdapter.fidelity.unchecked,
        revision=2,
    )

    def layer_trainable(self, d_out: int, d_in: int, params: NloraParams) -> int:
        return params.rank**2
