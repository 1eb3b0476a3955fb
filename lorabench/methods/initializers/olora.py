"""OLoRA (Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
arXiv:2406.01775), backed by peft (``init_lora_weights="olora"``).

Init: thin QR of W0 = Q R; B = Q[:, :r], A = R[:r, :] (orthonormal columns of B), and the frozen
residual W_res = W0 - s B A so the model is unchanged at step 0; then train as LoRA.
No hyper-parameters beyond the LoRA adapter's (paper: r 32..64, alpha = r *(uncertain)*).
"""

from __future__ import annotations

from lorabench.methods.base import Initializer
from lorabench.registry import INITIALIZERS


@INITIALIZERS.register("olora")
class OloraInit(Initializer):
    paper = "Büyükakyüz, 2024, arXiv:2406.01775"
    backed_by = "peft"
    requires_adapter = ("lora",)
    rank_at_most_every_target = True  # its factors come from W (or W C): r <= min(d_out, d_in) (budget cap)

    def adapter_kwargs(self, params) -> dict:
        return {"init_lora_weights": "olora"}
