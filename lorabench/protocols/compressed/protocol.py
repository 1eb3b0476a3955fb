"""The compressed-base protocol's run body: the base model's linear layers compressed in place, the
run's LoRA started from the compression error, then the single-run loop.

Steps (each rule with its reason):

1. the run's parts are built as for a single run (lorabench.train.build_run_parts);
2. the layers to compress are every ``nn.Linear`` whose name matches ``protocol.compressed.modules``
   (default: those inside the numbered transformer blocks; the task head, embeddings and pooler
   stay in float, as QLoRA keeps them);
3. on the first ``train.init_batches`` training batches (the calibration batches every
   data-driven initialiser sees), the uncompressed model's last hidden states are kept as the
   reference, and the compensation's input moments gathered (EoRA) for the layers that will be
   compensated: those compressed and targeted by the LoRA;
4. each layer is compressed (lorabench.compression.compressors), its relative error
   ‖W - W_c‖_F / ‖W‖_F recorded, and its compensation factors B A ≈ W - W_c computed at the LoRA's
   rank; the uncompressed weight is dropped right after, so that the model is never held twice;
5. the method is applied (peft wraps an HQQ layer as ``HqqLoraLinear``); every compensated LoRA
   layer gets B/√s and A/√s (s its scaling), so that s B A is the compensation; the model's output
   error against the reference is measured before and after: the quality the compensation buys;
6. training as in a single run (``train.max_steps=0``: the training-free result), evaluation, record.
   With an adapter-free method (``compressor=welore``, e.g. ``method=full``) only the low-rank
   components' factors (and a classification head) train: WeLore's LRC fine-tuning. With
   ``recover=true`` (LoRAM) the trained LoRA is scored on the uncompressed weights (:func:`recovery`).

Resume rebuilds steps 1–5 (compression and compensation are deterministic) and then loads the
checkpoint's adapter, as a single run does.

The record's ``protocol_report``: {name, version, compressor, compensation, settings, layers
{compressed, compensated}, dense_bytes, compressed_bytes, bits_per_weight (stored bits per weight
entry), weight_error {mean, max}, output_error {compressed, compensated}, compress_time_s,
compensation_time_s, per_layer {name: {params, dense_bytes, stored_bytes, weight_error, compensated}}}.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import numpy as np
import torch
from torch import nn

from lorabench.compression import COMPENSATIONS, COMPRESSORS
from lorabench.compression.allocation import solve_assignment
from lorabench.compression.compensation import InputMoments, loftq_decompose, lq_decompose
from lorabench.train import build_run_parts, prepare_run, train_prepared

PROTOCOL_VERSION = "1"  # bump when the compression, compensation or report rules change
ADAPTER = "default"  # the peft adapter the run's method builds
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # hardware.mixed_precision -> HQQ's compute dtype


def train_compressed(session) -> None:
    """The compressed-base protocol (see the module docstring), inside lorabench.train.run_with_record."""
    cfg, settings = session.cfg, session.cfg.protocol.compressed
    precision = cfg.hardware.mixed_precision
    parts = build_run_parts(cfg, session.spec, session.task, session.accelerator, session.record)
    layers = compressed_layers(parts.model, settings.modules)
    compensated = [name for name in layers if targeted(name, parts.targets)]
    compensation = COMPENSATIONS.get(settings.compensation, where="protocol.compressed.compensation")
    if compensation.fn is None:
        compensated = []
    batches = [model_inputs(b) for b in parts.ctx.calibration_batches()]
    autocast = session.accelerator.autocast  # the calibration passes compute as training will
    with autocast():
        reference = last_hidden_states(parts.model, batches)
        moments = {}
        if compensation.needs_inputs:
            moments = input_moments(parts.model, {n: layers[n] for n in compensated}, batches)
    rank = getattr(session.spec.params.get("adapter"), "rank", 0)
    originals = {n: (m.weight.detach().clone(), _bias(m)) for n, m in layers.items()} if settings.recover else {}
    t0 = time.perf_counter()
    per_layer, factors, compensation_s = compress_layers(
        parts.model, layers, settings, compensated, compensation, moments, rank, MIXED_DTYPES.get(precision)
    )
    compress_s = time.perf_counter() - t0 - compensation_s
    with autocast():
        error_compressed = output_error(parts.model, batches, reference)
    factor_only = session.spec.names.get("adapter", "none") == "none"  # WeLore: only the factors train
    if factor_only:
        expected = train_only_factors(parts.model, session.task.head)
    run = prepare_run(parts, session.accelerator, session.recorder, session.tracker, session.stop, session.state.timers)
    if factor_only:
        run.record["cost"]["expected_trainable_params"] = expected
    load_compensation(run.model, factors)
    with autocast():
        error_compensated = output_error(run.model, batches, reference) if factors else error_compressed
    run.record["protocol_report"] = protocol_report(
        settings, per_layer, error_compressed, error_compensated, compress_s, compensation_s
    )
    if session.accelerator.is_main_process:
        r = run.record["protocol_report"]
        print(
            f"[lorabench] compressed {r['layers']['compressed']} layers by {settings.compressor}: "
            f"{r['bits_per_weight']:.2f} bits/weight, output error {error_compressed:.4f}; "
            f"{settings.compensation} compensation of {r['layers']['compensated']} layers: {error_compensated:.4f}"
        )
    run.recorder.write()
    train_prepared(session, run, recovery(originals) if settings.recover else None)


# -- LoRAM's recovery ---------------------------------------------------------------------------
def recovery(originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
    """The step LoRAM (Zhang et al. 2025, "Train Small, Infer Large"; junzhang-zj/LoRAM) ends
    training with: the LoRA trained on the compressed base is put on the *uncompressed* weights,
    after the run's scores on the compressed base are kept in ``protocol_report.before_recovery``.
    The compressors here keep every matrix's shape, so LoRAM's scatter of pruned rows and columns
    back to full size is the identity; its optional alignment pre-training is not run."""

    def recover(run, state) -> None:
        from lorabench.train import _scores

        report = run.record["protocol_report"]
        report["before_recovery"] = {k: v for k, v in _scores(run).items() if k != "missing"}
        restore_weights(run.model, originals)
        report["recovered"] = True
        run.recorder.write()

    return recover


@torch.no_grad()
def restore_weights(model: nn.Module, originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """Every compressed layer (a peft LoRA layer's base, or the module itself) replaced by an
    ``nn.Linear`` holding its original weight and bias."""
    from peft.tuners.lora import LoraLayer

    found = set()
    for name, module in list(model.named_modules()):
        key = next((k for k in originals if name == k or name.endswith("." + k)), None)
        if key is None or key in found:
            continue
        weight, bias = originals[key]
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        dense = dense.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
        if isinstance(module, LoraLayer):
            module.base_layer = dense
        else:
            set_module(model, name, dense)
        found.add(key)
    if len(found) != len(originals):
        raise RuntimeError(f"protocol=compressed: {len(originals) - len(found)} compressed layers were not found")


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()


def train_only_factors(model: nn.Module, head: str) -> int:
    """Every parameter frozen but the low-rank components' factors (and a classification head,
    which starts untrained): WeLore's fine-tuning of the LRCs only. Returns the trainable count."""
    from lorabench.compression.compressors import LowRankLinear
    from lorabench.methods.base import HEAD_MODULES

    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.requires_grad_(True)
    if head == "classification":
        for name, p in model.named_parameters():
            if name.split(".")[0] in HEAD_MODULES:
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- which layers -------------------------------------------------------------------------------
def compressed_layers(model: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` layers whose module name matches ``pattern`` (re.search)."""
    regex = re.compile(pattern)
    layers = {name: m for name, m in model.named_modules() if type(m) is nn.Linear and regex.search(name)}
    if not layers:
        raise RuntimeError(f"protocol.compressed.modules={pattern!r} matches no nn.Linear layer of the model")
    return layers


def targeted(name: str, targets: list[str]) -> bool:
    """Whether peft's LoRA wraps module ``name`` for target list ``targets`` (peft's rule for a list:
    the name is a target or ends with '.' + a target)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# -- calibration --------------------------------------------------------------------------------
def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


@torch.no_grad()
def last_hidden_states(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """The model's last hidden state on each batch (padding positions kept; :func:`output_error` masks them)."""
    was_training = model.training
    model.eval()
    out = [model(**b, output_hidden_states=True).hidden_states[-1].float() for b in batches]
    model.train(was_training)
    return out


def output_error(model: nn.Module, batches: list[dict], reference: list[torch.Tensor]) -> float:
    """‖H - H_ref‖_F / ‖H_ref‖_F over the non-padding positions of every calibration batch, H the
    model's last hidden states now and H_ref the uncompressed model's."""
    hidden = last_hidden_states(model, batches)
    num = den = 0.0
    for h, ref, b in zip(hidden, reference, batches):
        keep = b["attention_mask"].bool() if "attention_mask" in b else torch.ones(h.shape[:2], dtype=torch.bool)
        num += float((h - ref)[keep].pow(2).sum())
        den += float(ref[keep].pow(2).sum())
    return math.sqrt(num / den) if den else float("nan")


@torch.no_grad()
def input_moments(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Each layer's calibration input second moments (lorabench.compression.compensation.InputMoments)."""
    sequences = sum(b["input_ids"].shape[0] for b in batches)
    hooks = InputMoments(layers, sequences)
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            hooks.mask = b.get("attention_mask")
            model(**b)
    finally:
        hooks.remove()
        model.train(was_training)
    return hooks.moments


# -- compression and compensation ---------------------------------------------------------------
def fresh_linear(like: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` shaped as ``like``, holding ``weight`` and a copy of its bias (compressors
    change or consume the layer they get)."""
    out = nn.Linear(like.in_features, like.out_features, bias=like.bias is not None)
    out = out.to(device=like.weight.device, dtype=like.weight.dtype)
    out.weight.copy_(weight)
    if like.bias is not None:
        out.bias.copy_(like.bias)
    return out


def compress_one(linear, original, settings, compensation, moments, rank, alternate: bool, plan: dict):
    """(Compressed, factors or None, LQ iterations or None) of one layer: the compressor alone (with
    the keyword arguments its ``plan`` gave the layer), or LQ-LoRA's alternation around
    rank-``rank`` factors when ``alternate``."""
    compress = COMPRESSORS.get(settings.compressor, where="protocol.compressed.compressor")
    if alternate:
        decompose = loftq_decompose if compensation.quantize_first else lq_decompose
        iterations = settings.loftq_iterations if compensation.quantize_first else settings.iterations
        result, factors, done, _ = decompose(
            original, lambda w: compress(fresh_linear(linear, w), settings, **plan), rank, iterations
        )
        return result, factors, done
    return compress(linear, settings, **plan), None, None


@torch.no_grad()
def compress_layers(model, layers, settings, compensated, compensation, moments, rank, compute_dtype=None):
    """Compress every layer in place (at the bits :func:`allocated_bits` chose, with a bit budget);
    returns (per-layer stats, compensation factors by layer name, seconds spent on the compensation:
    its factors, and for LQ-LoRA the whole alternation). ``compute_dtype``: HQQ's dequantized dtype
    under mixed precision (lorabench.compression.compressors.hqq_quantize)."""
    dtype = {"compute_dtype": compute_dtype} if compute_dtype is not None and settings.compressor == "hqq" else {}
    bits = allocated_bits(layers, settings, compensation, compensated, rank, dtype) if settings.bit_budget else {}
    planner = getattr(COMPRESSORS.get(settings.compressor, where="protocol.compressed.compressor"), "plan", None)
    plans = planner(layers, settings) if planner else {}
    per_layer, factors, compensation_s = {}, {}, 0.0
    for name, linear in layers.items():
        layer_settings = dataclasses.replace(settings, bits=bits[name]) if name in bits else settings
        original = linear.weight.detach().clone()
        alternate = compensation.alternating and name in compensated
        t0 = time.perf_counter()
        plan = plans.get(name, {})
        result, lq_factors, iterations = compress_one(
            linear,
            original,
            layer_settings,
            compensation,
            moments,
            rank_for(rank, original),
            alternate,
            {**plan, **dtype},
        )
        if alternate:
            factors[name] = lq_factors
            compensation_s += time.perf_counter() - t0
        if result.module is not linear:
            set_module(model, name, result.module)
        delta = original.float() - result.weight.float()
        per_layer[name] = {
            "params": original.numel(),
            "dense_bytes": original.numel() * original.element_size(),
            "stored_bytes": result.stored_bytes,
            "weight_error": float(delta.norm() / original.float().norm()),
            "compensated": name in compensated,
        }
        if name in bits:
            per_layer[name]["bits"] = bits[name]
        if iterations is not None:
            per_layer[name]["alternations"] = iterations
        per_layer[name].update(plan)
        if name in compensated and not alternate:
            t0 = time.perf_counter()
            factors[name] = compensation.fn(delta, moments.pop(name, None), rank_for(rank, original))
            compensation_s += time.perf_counter() - t0
        del original, delta
    return per_layer, factors, compensation_s


def rank_for(rank: int, weight: torch.Tensor) -> int:
    return min(rank, *weight.shape)


@torch.no_grad()
def allocated_bits(layers, settings, compensation, compensated, rank, dtype: dict) -> dict[str, int]:
    """LQ-LoRA's ILP (lorabench.compression.allocation): each layer's bit width among
    ``settings.bit_choices`` minimising the total ‖W - Ŵ‖²_F with the stored bytes of all layers
    at most ``bit_budget`` bits per weight; Ŵ = Q + B A for layers LQ-LoRA's decomposition fits."""
    names = list(layers)
    costs = np.zeros((len(names), len(settings.bit_choices)))
    weights = np.zeros_like(costs)
    for i, name in enumerate(names):
        linear = layers[name]
        original = linear.weight.detach().clone()
        alternate = compensation.alternating and name in compensated
        for c, bits in enumerate(settings.bit_choices):
            trial = dataclasses.replace(settings, bits=bits)
            result, lq, _ = compress_one(
                fresh_linear(linear, original),
                original,
                trial,
                compensation,
                {},
                rank_for(rank, original),
                alternate,
                dtype,
            )
            approx = result.weight.float() + (lq[0] @ lq[1] if lq is not None else 0)
            costs[i, c] = float((original.float() - approx).norm() ** 2)
            weights[i, c] = result.stored_bytes
    params = sum(layers[n].weight.numel() for n in names)
    budget = settings.bit_budget * params / 8
    try:
        x = solve_assignment(costs, weights, budget)
    except ValueError as exc:
        smallest = 8 * weights.min(axis=1).sum() / params
        raise RuntimeError(
            f"protocol.compressed.bit_budget={settings.bit_budget}: {exc}; the smallest of bit_choices="
            f"{list(settings.bit_choices)} takes {smallest:.3f} bits per weight here"
        ) from None
    return {name: int(settings.bit_choices[int(x[i].argmax())]) for i, name in enumerate(names)}


@torch.no_grad()
def load_compensation(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each compensated layer's LoRA set to B/√s, A/√s (s its scaling), so that s B A = B_c A_c."""
    if not factors:
        return
    from peft.tuners.lora import LoraLayer

    found = 0
    for name, m in model.named_modules():
        key = next((k for k in factors if name == k or name.endswith("." + k)), None)
        if key is None or not isinstance(m, LoraLayer) or ADAPTER not in m.lora_A:
            continue
        b, a = factors[key]
        root = math.sqrt(float(m.scaling[ADAPTER]))
        lora_b, lora_a = m.lora_B[ADAPTER].weight, m.lora_A[ADAPTER].weight
        lora_b.zero_()[:, : b.shape[1]] = (b / root).to(lora_b.dtype)
        lora_a.zero_()[: a.shape[0]] = (a / root).to(lora_a.dtype)
        found += 1
    if found != len(factors):
        raise RuntimeError(f"protocol=compressed: {found} of the {len(factors)} compensated layers have a LoRA layer")


def protocol_report(settings, per_layer, error_compressed, error_compensated, compress_s, compensation_s) -> dict:
    dense = sum(v["dense_bytes"] for v in per_layer.values())
    stored = sum(v["stored_bytes"] for v in per_layer.values())
    params = sum(v["params"] for v in per_layer.values())
    errors = [v["weight_error"] for v in per_layer.values()]
    return {
        "name": "compressed",
        "version": PROTOCOL_VERSION,
        "compressor": settings.compressor,
        "compensation": settings.compensation,
        "settings": settings_of(settings),
        "layers": {"compressed": len(per_layer), "compensated": sum(v["compensated"] for v in per_layer.values())},
        "dense_bytes": dense,
        "compressed_bytes": stored,
        "bits_per_weight": 8 * stored / params,
        "weight_error": {"mean": sum(errors) / len(errors), "max": max(errors)},
        "output_error": {"compressed": error_compressed, "compensated": error_compensated},
        "allocation": allocation(settings, per_layer, params),
        "low_rank": low_rank(per_layer),
        "compress_time_s": compress_s,
        "compensation_time_s": compensation_s,
        "per_layer": per_layer,
    }


def allocation(settings, per_layer: dict, params: int) -> dict | None:
    """The bit budget and what the ILP gave (None without a budget)."""
    if not settings.bit_budget:
        return None
    counts: dict[str, int] = {}
    for v in per_layer.values():
        counts[str(v["bits"])] = counts.get(str(v["bits"]), 0) + 1
    achieved = 8 * sum(v["stored_bytes"] for v in per_layer.values()) / params
    return {
        "bit_budget": settings.bit_budget,
        "bit_choices": list(settings.bit_choices),
        "layers_by_bits": counts,
        "bits_per_weight": achieved,
    }


def low_rank(per_layer: dict) -> dict | None:
    """WeLore's split: how many layers became low-rank components and the share of rank they keep
    (None for the other compressors)."""
    lrc = {n: v for n, v in per_layer.items() if v.get("keep_rank") is not None}
    if not any("keep_rank" in v for v in per_layer.values()):
        return None
    return {"layers": len(lrc), "dense_layers": len(per_layer) - len(lrc)}


def settings_of(settings) -> dict:
    """The settings the chosen compressor reads (the others do not describe the run)."""
    used = {
        "hqq": ("bits", "group_size", "bit_budget", "bit_choices"),
        "magnitude": ("sparsity",),
        "semi_structured": ("n_of_m",),
        "welore": ("welore_reduction", "welore_min_ratio"),
    }
    alternation = {"lq_lora": ("iterations",), "loftq": ("loftq_iterations",)}.get(settings.compensation, ())
    keys = [*used.get(settings.compressor, ()), *alternation]
    return {"modules": settings.modules, "recover": settings.recover, **{k: getattr(settings, k) for k in keys}}
