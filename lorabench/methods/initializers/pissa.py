"""PiSSA (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
Large Language Models", arXiv:2404.02948), backed by peft (``init_lora_weights="pissa"``).

Init: SVD W0 = U S V^T; B = U_r S_r^{1/2} / sqrt(s), A = S_r^{1/2} V_r^T / sqrt(s) (the top-r
principal components, s = alpha / r) and the frozen residual W_res = W0 - s B A, so W_res + s B A =
W0 at step 0; then train as LoRA. Hyper-parameters: ``niter`` = 0 uses the exact SVD (the paper);
niter > 0 uses peft's randomized fast SVD with that many subspace iterations ("pissa_niter_K";
the paper reports K = 16 as close to exact in seconds on 7B models). The paper sets alpha = r and
dropout 0.
"""

from __future__ import annotations

from lorabench.method_params.initializers import PissaParams
from lorabench.methods.base import Initializer
from lorabench.registry import INITIALIZERS


@INITIALIZERS.register("pissa")
class PissaInit(Initializer):
    Params = PissaParams
    paper = "Meng et al., 2024, arXiv:2404.02948"
    backed_by = "peft"
    requires_adapter = ("lora",)
    rank_at_most_every_target = True  # its factors come from W (or W C): r <= min(d_out, d_in) (budget cap)

    def adapter_kwargs(self, params: PissaParams) -> dict:
        return {"init_lora_weights": f"pissa_niter_{params.niter}" if params.niter else "pissa"}
