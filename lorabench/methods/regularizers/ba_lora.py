"""BA-LoRA's three output regularizers (Chang et al., 2024, arXiv:2408.04556), as the authors'
trainer computes them (cyp-jlu-ai/BA-LoRA ``train.py``, ``CustomTrainer.compute_loss`` and
``svd_regularization``).

With z the fine-tuned model's logits and z0 the pretrained model's logits on the same batch (no
gradient, the model in eval mode), the loss is

    L = L_task + lambda1 L_cons + lambda2 L_div + lambda3 L_svd

over every position of the batch (the reference uses no mask: prompt and padding positions count).
The variant follows the head: classification logits (B x C) take the NLU terms, causal-LM logits
(B x T x V) the NLG terms.

* NLU: L_cons = mean((z/|z| - z0/|z0|)^2), rows normalised to unit l2 norm; L_div = sum_{i != j}
  C_ij^2 / C with C = z_c^T z_c / (B - 1) the covariance of the batch-centred logits z_c.
* NLG: L_cons = KL(p0 || p) summed over positions and vocabulary, divided by B (``batchmean``),
  p = softmax(z), p0 = softmax(z0); L_div = -mean_{b,t} H(p_bt), H(p) = -sum_v p log(p + 1e-10).
* L_svd = -(sum of the top-k singular values) / (sum of all + 1e-10) of z reshaped to B x (rest).

Pretrained outputs: the reference loads a second, frozen copy of ``model_name_or_path``, which under
its PiSSA initialisation is the residual model W0 - BA; here they come from the same model with the
adapter disabled (peft's ``disable_adapter``), which is that residual model too, without a second copy.

Deviation: the reference's ``svd_regularization`` raises IndexError on every input (it takes
``s.size(1)`` of the 1-D spectrum of the 2-D reshaped logits), so its loss never runs. We take the
smallest fix that keeps its reshape: the spectrum's last dimension (the fixture's ``patched_svd_1d``).
With a batch of at most k rows this term is -1 whatever the weights (no gradient), as in the
reference's own setting of batch 1. Every term is computed in fp32.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.method_params.regularizers import BaLoraParams
from lorabench.methods.base import MethodContext, Regularizer
from lorabench.methods.fidelity import Fidelity
from lorabench.registry import REGULARIZERS

REFERENCE = "cyp-jlu-ai/BA-LoRA@e119f2feb138"
ENTROPY_EPS = 1e-10
SVD_EPS = 1e-10


def nlu_consistency(z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(F.normalize(z, p=2, dim=-1), F.normalize(z0, p=2, dim=-1))


def nlu_diversity(z: torch.Tensor) -> torch.Tensor:
    centred = z - z.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / (z.shape[0] - 1)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / z.shape[1]


def nlg_consistency(z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(z, dim=-1), F.softmax(z0, dim=-1), reduction="batchmean")


def nlg_diversity(z: torch.Tensor) -> torch.Tensor:
    p = F.softmax(z, dim=-1)
    return (p * torch.log(p + ENTROPY_EPS)).sum(dim=-1).mean()


def svd_share(z: torch.Tensor, k: int) -> torch.Tensor:
    sigma = torch.linalg.svdvals(z.reshape(z.shape[0], -1))
    top = sigma[: min(k, sigma.shape[-1])]
    return -(top.sum() / (sigma.sum() + SVD_EPS))


TERMS = {  # head -> (consistency, diversity)
    "classification": (nlu_consistency, nlu_diversity),
    "causal_lm": (nlg_consistency, nlg_diversity),
}


def ba_lora_terms(z: torch.Tensor, z0: torch.Tensor, head: str, params: BaLoraParams) -> dict[str, torch.Tensor]:
    """The three weighted terms for logits ``z`` (with gradient) and ``z0`` (pretrained)."""
    consistency, diversity = TERMS[head]
    z, z0 = z.float(), z0.float()
    return {
        "consistency": params.consistency_weight * consistency(z, z0),
        "diversity": params.diversity_weight * diversity(z),
        "svd": params.svd_weight * svd_share(z, params.svd_top_k),
    }


@contextlib.contextmanager
def adapter_disabled_eval(model: nn.Module):
    """peft's ``disable_adapter`` in eval mode and without gradient (through a DDP wrapper)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), inner.disable_adapter():
            yield inner
    finally:
        inner.train(was_training)


@REGULARIZERS.register("ba_lora")
class BaLora(Regularizer):
    Params = BaLoraParams
    paper = "arXiv:2408.04556"
    backed_by = "lorabench"
    needs_outputs = "logits"
    requires_adapter = ("lora",)
    fidelity = Fidelity(
        reference=f"{REFERENCE} train.py (CustomTrainer.compute_loss, svd_regularization)",
        status="parity",
        tolerance="each term <= 1e-6 relative, NLU and NLG (fp64 inputs)",
        fixture="tests/fixtures/parity/ba_lora.json",
        deviations=(
            "the reference's SVD term raises IndexError on every input; we use its smallest fix "
            "(the spectrum's last dimension, keeping the reshape)",
            "pretrained logits from the adapter-disabled model (the PiSSA residual) instead of a second "
            "loaded copy of it: the same model, one copy",
        ),
        unchecked=("the end-to-end training run, which the reference cannot execute",),
    )

    def setup(self, model: nn.Module, optimizer, params: BaLoraParams, ctx: MethodContext) -> None:
        self.params, self.head = params, ctx.head

    def loss_terms(self, model: nn.Module, batch: dict, outputs) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with adapter_disabled_eval(model) as inner:
            pretrained = inner(**inputs).logits
        return ba_lora_terms(outputs.logits, pretrained, self.head, self.params)

    def state(self) -> dict:
        p = self.params
        return {
            "variant": "nlu" if self.head == "classification" else "nlg",
            "weights": {"consistency": p.consistency_weight, "diversity": p.diversity_weight, "svd": p.svd_weight},
            "svd_top_k": p.svd_top_k,
        }
