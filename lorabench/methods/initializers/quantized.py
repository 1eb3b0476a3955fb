"""Quantized-base initializers: QLoRA and LoftQ. Both need CUDA and bitsandbytes; on a machine
without CUDA their ``check_backend`` fails (a ``ConfigError`` when the method config is resolved,
before any model is loaded; their Params, in lorabench/method_params/initializers.py, cannot ask
torch). Their ``requires_cuda`` field is what the method matrix test reads to skip them on CPU.

* ``nf4`` - QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
  arXiv:2305.14314): every linear layer of the base model except the task head is replaced by a
  frozen bitsandbytes 4-bit layer (NormalFloat4, double quantization of the block scales, compute
  in bf16); the LoRA adapter then trains on top in bf16. Paper defaults: NF4, double_quant True,
  compute bf16, LoRA on all linear layers, r 64, alpha 16, dropout 0.1 (7B-13B), lr 2e-4 (7B).
* ``loftq`` - LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
  Language Models", arXiv:2310.08659), peft ``init_lora_weights="loftq"``: alternate T times
  Q = quant(W0 - B A), (B, A) = rank-r SVD of W0 - Q; the base weight becomes the dequantized Q
  and LoRA starts at (B, A), so Q + B A ~ W0. peft applies B A without the alpha / r scale, so
  the LoRA adapter must have alpha = rank. Defaults (peft ``LoftQConfig``): bits 4, iterations 1
  (the paper also reports T = 5).
"""

from __future__ import annotations

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.initializers import COMPUTE_DTYPES, LoftqParams, Nf4Params
from lorabench.methods.base import HEAD_MODULES, Initializer, MethodContext
from lorabench.registry import INITIALIZERS

DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}  # Nf4Params checks the name


def check_cuda_backend(method: str) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{method} needs CUDA (bitsandbytes 4-bit kernels), but torch.cuda.is_available() is False; "
            "it cannot run on this machine - pick a method without a quantized base (e.g. method=lora)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{method} needs the bitsandbytes package: pip install bitsandbytes") from None


@INITIALIZERS.register("nf4")
class Nf4Init(Initializer):
    Params = Nf4Params
    paper = "Dettmers et al., 2023, arXiv:2305.14314"
    backed_by = "bitsandbytes"
    requires_adapter = ("lora",)

    def check_backend(self, params: Nf4Params) -> None:
        check_cuda_backend("QLoRA (method.init=nf4)")

    def before_adapter(self, model: nn.Module, params: Nf4Params, ctx: MethodContext) -> None:
        import bitsandbytes as bnb

        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                top = (parent_name or child_name).split(".")[0]
                if not isinstance(child, nn.Linear) or top in (*HEAD_MODULES, "lm_head") or child_name == "lm_head":
                    continue  # the task head (trained in full) and the LM head stay in full precision
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=DTYPES[params.compute_dtype],
                    quant_type=params.quant_type,
                    compress_statistics=params.double_quant,
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.cpu(),
                    requires_grad=False,
                    quant_type=params.quant_type,
                    compress_statistics=params.double_quant,
                )
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, child_name, q.to("cuda"))  # quantizes on the move
        model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; peft dispatches its 4-bit LoRA on it
        model.to("cuda")


@INITIALIZERS.register("loftq")
class LoftqInit(Initializer):
    Params = LoftqParams
    paper = "Li et al., 2023, arXiv:2310.08659"
    backed_by = "peft"
    requires_adapter = ("lora",)

    def check_backend(self, params: LoftqParams) -> None:
        check_cuda_backend("LoftQ (method.init=loftq)")

    def adapter_kwargs(self, params: LoftqParams) -> dict:
        from peft import LoftQConfig

        return {
            "init_lora_weights": "loftq",
            "loftq_config": LoftQConfig(loftq_bits=params.loftq_bits, loftq_iter=params.loftq_iter),
        }

    def after_adapter(self, model: nn.Module, params: LoftqParams, ctx: MethodContext) -> None:
        scales = {
            s for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) for s in m.scaling.values()
        }
        if any(abs(s - 1.0) > 1e-6 for s in scales):
            raise ConfigError(
                f"LoftQ needs method.alpha == method.rank (peft's LoftQ init ignores the alpha/r scale); "
                f"got scale(s) {sorted(scales)}"
            )
