"""LoRA-GA (Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv:2407.05000), backed by peft >= 0.19 (``preprocess_loraga`` + ``init_lora_weights="lora_ga"``).

Init: average the full gradient G of every target W0 over the calibration batches
(``ctx.calibration_batches()``, forward + backward, only target weights require grad), SVD
G = U S V^T, then A0 = c V[:, :r]^T and B0 = c U[:, r:2r] (direction "ArB2r") with the "stable"
scale c ~ d_out^{1/4} / sqrt(gamma), and W0 <- W0 - s B0 A0 so the model output is unchanged at
step 0. The first LoRA step then approximates the first full fine-tuning step.
Hyper-parameters (peft ``LoraGAConfig`` defaults, the paper's): direction "ArB2r", scale "stable",
stable_gamma 16. Authors' Llama-2-7B recipe: r 32, alpha 8 (the paper's tables: r 8, alpha 16),
64 gradient-estimation batches (here ``train.init_batches``).
The estimated gradients are cached (``cache_gradients``, in ``<LORABENCH_CACHE>/lora_ga/<key>.safetensors``,
written to a temporary name and renamed; never a pickle: peft's own cache file is a ``torch.save`` that
it loads without ``weights_only``, so lorabench keeps the cache itself) under a key of the model, the
data, the calibration batches and the target modules. The estimate depends on
the run seed when the model has weights drawn from it (a classification head, which pretrained
checkpoints lack; a model built from a config without pretrained weights) or when dropout is active
(peft estimates in train mode, with the seed's dropout masks): the key then holds the seed, so each
seed estimates its own. Otherwise (a pretrained causal LM without dropout) the runs of a seed sweep
estimate the gradient once. The record's ``lora_ga_gradient_cache`` names the reasons (``per_seed``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lorabench.method_params.initializers import LoraGaParams
from lorabench.methods.base import Initializer, MethodContext
from lorabench.methods.fidelity import Fidelity
from lorabench.models import cache_dir
from lorabench.registry import INITIALIZERS

if TYPE_CHECKING:  # annotations only: peft loads when the method is built
    from peft import LoraConfig, LoraGAConfig


def _peft_version() -> str:
    from importlib.metadata import version

    return version("peft").split("+")[0]


def _dropout_active(model: nn.Module) -> bool:
    """Whether anything in the model drops out in train mode (modules, or rates that attention kernels
    read from the config)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    rates = config.to_dict() if hasattr(config, "to_dict") else {}
    return any(
        ("dropout" in key or "pdrop" in key) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        for key, v in rates.items()
    )


def seed_dependence(model: nn.Module, ctx: MethodContext) -> list[str]:
    """Why the gradient estimate depends on the run seed (empty: it does not)."""
    reasons = []
    if not getattr(getattr(model, "config", None), "_name_or_path", ""):
        reasons.append("weights drawn from the seed (no pretrained checkpoint)")
    if ctx.head == "classification":
        reasons.append("classification head drawn from the seed")
    if _dropout_active(model):
        reasons.append("dropout masks drawn from the seed (peft estimates in train mode)")
    return reasons


def gradient_cache(ctx: MethodContext, model: nn.Module) -> Path | None:
    """The cache file of this run's estimate: per seed when ``seed_dependence`` finds a reason."""
    if not ctx.calibration_key:
        return None
    folder = cache_dir() / "lora_ga"
    folder.mkdir(parents=True, exist_ok=True)
    seed = f"-seed{ctx.seed}" if seed_dependence(model, ctx) else ""
    return folder / f"{ctx.calibration_key}-{'-'.join(sorted(ctx.target_modules))}{seed}.safetensors"


GRAD = "_peft_loraga_grad"  # the attribute peft's preprocess_loraga leaves on every target module


def load_gradients(cache: Path, model: nn.Module, config: LoraConfig) -> int | None:
    """Attach the cached gradient of every target module (what ``preprocess_loraga`` would set) and
    return the number of batches the estimate averaged; None (and nothing attached) when the file
    is missing, unreadable, or lacks a target."""
    from peft.tuners.lora.loraga import get_model_device, get_target_modules

    if not cache.is_file():
        return None
    try:
        tensors = load_file(str(cache), device=str(get_model_device(model)))
        with safe_open(str(cache), framework="pt") as fh:
            batches = int((fh.metadata() or {}).get("batches", 0))
    except (SafetensorError, OSError, ValueError):
        return None
    targets = list(get_target_modules(model, config))
    if any(f"{name}.{GRAD}" not in tensors for name, _ in targets):
        return None
    for name, module in targets:
        setattr(module, GRAD, tensors[f"{name}.{GRAD}"])
    return batches


@contextmanager
def _rng_untouched(model: nn.Module):
    """Run the gradient estimate on a fork of the RNG (its dropout masks are drawn as before) and
    restore the state afterwards: peft's LoRA-GA init takes a randomized SVD (``torch.svd_lowrank``)
    of each gradient, so without this a run that finds the estimate cached (a resumed run, another
    learning rate of a sweep) would draw other singular vectors and another frozen W0 - s B0 A0."""
    from peft.tuners.lora.loraga import get_model_device

    device = get_model_device(model)
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def save_gradients(cache: Path, model: nn.Module, config: LoraConfig, batches: int) -> None:
    """Write the estimated gradients as safetensors, with the number of batches they average in the
    metadata (temporary file + rename: readers see whole files)."""
    from peft.tuners.lora.loraga import get_target_modules

    tensors = {
        f"{name}.{GRAD}": getattr(m, GRAD).detach().cpu().contiguous() for name, m in get_target_modules(model, config)
    }
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"batches": str(batches)})
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@INITIALIZERS.register("lora_ga")
class LoraGaInit(Initializer):
    Params = LoraGaParams
    paper = "Wang et al., 2024, arXiv:2407.05000"
    backed_by = "peft"
    fidelity = Fidelity(
        reference=f"peft=={_peft_version()} (preprocess_loraga, init_lora_weights='lora_ga')",
        status="library",
        deviations=(
            "the gradient estimate is cached across runs; the cache key holds the seed whenever the estimate"
            " depends on it (seeded weights or head, active dropout), so a cached estimate is the one peft computes",
            "the estimate runs on a fork of the RNG, so peft's randomized SVD in the init draws from the same"
            " state whether the estimate was computed or cached (revision 3; before, a cached run had another init)",
        ),
        revision=3,
    )
    requires_adapter = ("lora",)
    rank_at_most_every_target = True  # A0, B0 take 2r singular vectors of each target's gradient:
    singular_vectors_per_rank = 2  # 2r <= min(d_out, d_in) (budget cap, check before calibration)

    def _config(self, params: LoraGaParams) -> LoraGAConfig:
        from peft import LoraGAConfig

        return LoraGAConfig(direction=params.direction, scale=params.scale, stable_gamma=params.stable_gamma)

    def adapter_kwargs(self, params: LoraGaParams) -> dict:
        return {"init_lora_weights": "lora_ga", "lora_ga_config": self._config(params)}

    def before_adapter(self, model: nn.Module, params: LoraGaParams, ctx: MethodContext) -> None:
        # preprocess_loraga reads only target_modules and lora_ga_config from the LoraConfig.
        from peft import LoraConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config = LoraConfig(
            target_modules=ctx.target_modules, init_lora_weights="lora_ga", lora_ga_config=self._config(params)
        )
        seen = []

        def train_step() -> None:
            for batch in ctx.calibration_batches():
                model(**batch).loss.backward()
                seen.append(1)

        with warnings.catch_warnings():  # peft counts backward passes with full backward hooks; the
            warnings.filterwarnings(
                "ignore", message="Full backward hook is firing"
            )  # first layer's input needs no grad
            cache = gradient_cache(ctx, model) if params.cache_gradients else None
            cached_batches = load_gradients(cache, model, config) if cache is not None else None
            hit = cached_batches is not None
            if not hit:
                with _rng_untouched(model):  # a cache hit and a miss leave the same RNG state for the init
                    preprocess_loraga(model, config, train_step=train_step, cache_file=None)
                if cache is not None and seen:
                    save_gradients(cache, model, config, len(seen))
        if not seen and not hit:
            raise ValueError("LoRA-GA needs calibration batches (train.init_batches > 0)")
        ctx.extras["lora_ga_batches"] = cached_batches if hit else len(seen)  # batches the estimate averaged
        ctx.extras["lora_ga_gradient_cache"] = {
            "path": str(cache) if cache else None,
            "hit": hit,
            "per_seed": seed_dependence(model, ctx),
        }
