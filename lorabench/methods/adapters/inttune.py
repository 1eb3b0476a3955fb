"""IntTune, intermediate tuning (Guo et al., 2025, "NLoRA: Nystrom-Initiated Low-Rank Adaptation for
Large Language Models", arXiv:2502.14482), our own layer.

Update rule: NLoRA's Nystrom-initialised factors (nlora.py) with B = W0[:, J] and A = W0[I, :]
frozen and only the r x r intermediate matrix M training: Delta W = s B (M - M0) A, so the model is
unchanged at step 0. Trainable parameters per target: r^2, plus the task head.
Hyper-parameters: rank r, alpha (s = alpha / r), pinv, pinv_rcond (as NLoRA). The paper reports
+7.45% average NLG over LoRA with 1.25% of its parameters.
"""

from __future__ import annotations

from lorabench.methods.adapters.nlora import NloraAdapter, NloraParams
from lorabench.registry import ADAPTERS


@ADAPTERS.register("inttune")
class IntTuneAdapter(NloraAdapter):
    Params = NloraParams
    paper = "Guo et al., 2025, arXiv:2502.14482"
    train = ("M",)

    def layer_trainable(self, d_out: int, d_in: int, params: NloraParams) -> int:
        return params.rank**2
