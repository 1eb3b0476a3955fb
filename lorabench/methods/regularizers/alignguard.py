"""AlignGuard-LoRA's alignment-preserving regularizer (Das, Borah, Jain & Chadha, 2025, "AlignGuard-LoRA:
Alignment-Preserving Fine-Tuning via Fisher-Guided Decomposition and Riemannian-Geodesic Collision
Regularization", arXiv:2508.02079).

Every LoRA layer's update dW = s B A (d_out x d_in) is split by a Fisher matrix F of an alignment loss,
estimated once at the pretrained weights. With u_1..u_k the top-k eigen-directions of the layer's F
(d_out x d_in matrices, orthonormal under <X, Y> = sum_ij X_ij Y_ij) and lambda_1..lambda_k their
eigenvalues, c_i = <u_i, dW>:

    dW_A = sum_i c_i u_i   (alignment-critical),   dW_T = dW - dW_A   (task)
    L = L_task + lambda_A sum_l ||F^{1/2} dW_A||^2 + lambda_T sum_l ||dW_T||_F^2 + lambda_NC sum_l E_col
    ||F^{1/2} dW_A||^2 = sum_i lambda_i c_i^2
    E_col = alpha mean_ij[(1 + beta sigmoid(|dW_ij| - tau)) |dW_A,ij| |dW_T,ij|]               (overlap)
          + (1 - alpha) <dW_A, dW_T>^2 / (||dW_A||^2 ||dW_T||^2 + 1e-12)                       (geodesic)

logged as the terms ``align``, ``task`` and ``collision`` (each weighted). All are 0 at the start (B = 0).
Under this orthogonal split <dW_A, dW_T> = 0, so the geodesic part is 0 up to rounding and only the
overlap part acts; it is kept, as the blend is the paper's.

The Fisher, per target layer (block-diagonal across layers): F = (1/N) sum_n g_n g_n^T with g_n the
gradient of sample n's alignment loss with respect to the layer's weight (= with respect to dW), at the
pretrained weights; the top-k directions come from the N x N Gram matrix of the g_n (F has rank <= N),
so neither F nor any d x d matrix is formed. The alignment loss, offline (``state()["signal"]``):

* decoders (``causal_lm``): the sequence's negative log-likelihood, sum_t -log p(x_t | x_<t), on
  ``alignguard_data`` (a .txt/.jsonl file, read as ``analysis.forgetting_data`` is) or, when that is
  null, on N texts sampled from the base model by lorabench/analysis/forgetting.py's sampler; on the
  model's own samples the estimate is of the true Fisher.
* encoders with a classification head (Track A: the head is random, there is no LM head): a Gaussian
  model of the pretrained last hidden state, -log N(y; h(x), I) with y = h_0(x) + eps, eps ~ N(0, I)
  drawn once (fixed seed), on the first N calibration inputs; its Fisher is J^T J, J the Jacobian of
  the hidden states: the directions that move the pretrained representations most.

A file is read with the run's tokenizer (``ctx.tokenizer``); sampling without one falls back on the
start/end/pad ids of the model's config. Memory: N
per-sample gradients of every target weight while the Fisher is estimated (on the model's device at
setup), k copies afterwards (float32).

Drift on the alignment data (``state()["alignment"]``, in ``method_report.regularizer``): before (at
setup, again before the first step's forward, where the model is still the pretrained one but runs on
the device and under the precision the "after" value will see; the encoders' reference hidden states
are taken again there) and after training, with their ratio:
the mean next-token NLL of the alignment texts (decoders), the mean per-token squared distance of the
last hidden state from the pretrained one (encoders; 0 before, so no ratio). The "after" value is
computed in ``on_train_end``, on the trained model after the final evaluation.

Where this comes from: the authors' repository (abhilekhborah/AlignGuard-LoRA@f2143d1a4b00) holds a
different method (a silhouette-coefficient and null-space penalty, renamed from "SafeLoRA") whose
model.py ends mid-loop in a line that does not parse; it has no Fisher, split or collision term
(tests/fixtures/parity/alignguard.json records this). The paper's text could not be read here. The
split and the alignment term follow the paper's abstract and METHODS.md; the exact collision forms, and
beta, tau, alpha and lambda_NC, follow a third party's reading of the paper's Appendix C
(Sirhan1/modelFineTuneRiskAssessment@1d8a8e61859a, ``mitigation.py``), against which the terms, the
split and the Fisher directions are pinned. Left out: the paper's DriftCheck safety benchmark (no safe
/unsafe data offline), its task curvature H in R_task (identity here: a trust region), and any
per-layer choice of k. The hyper-parameters, and where each default comes from:
lorabench/method_params/regularizers_alignguard.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.errors import ConfigError
from lorabench.fingerprint import portable_path
from lorabench.method_params.regularizers_alignguard import AlignGuardParams
from lorabench.methods.base import MethodContext, Regularizer
from lorabench.methods.fidelity import Fidelity
from lorabench.methods.regularizers.mgpo import lora_layers
from lorabench.registry import REGULARIZERS

REFERENCE = "abhilekhborah/AlignGuard-LoRA@f2143d1a4b00"
THIRD_PARTY = "Sirhan1/modelFineTuneRiskAssessment@1d8a8e61859a"
GEODESIC_EPS = 1e-12
NULL_EIGENVALUE = 1e-10  # eigenvalues below this share of the largest are rounding, not directions
NOISE_SEED = 1234  # the encoders' Gaussian targets


# ---- the rule on one layer ------------------------------------------------------------------------


@dataclass
class Directions:
    """One layer's protected subspace: ``basis`` (k x d_out x d_in, orthonormal), its Fisher
    ``eigenvalues`` (k) and the share of the Fisher's trace they hold."""

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    captured: float

    def to(self, device) -> Directions:
        return Directions(self.basis.to(device), self.eigenvalues.to(device), self.captured)


def top_directions(grads: torch.Tensor, k: int) -> Directions:
    """The top-``k`` eigenpairs of F = (1/N) sum_n vec(g_n) vec(g_n)^T for per-sample gradients
    ``grads`` (N x d_out x d_in), from the N x N Gram matrix (float64); null directions are dropped."""
    n, shape = grads.shape[0], grads.shape[1:]
    g = grads.reshape(n, -1).double()
    values, vectors = torch.linalg.eigh(g @ g.T / n)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    total = float(values.clamp(min=0).sum())
    floor = NULL_EIGENVALUE * max(float(values[0]), 0.0)
    keep = int(((values > floor) & (values > 0)).sum().clamp(max=k))
    values, vectors = values[:keep], vectors[:, :keep]
    basis = (vectors.T @ g) / torch.sqrt(n * values)[:, None]  # u_i = G^T v_i / sqrt(N lambda_i)
    captured = float(values.sum()) / total if total > 0 else 0.0
    return Directions(basis.float().reshape(keep, *shape), values.float(), captured)


def split(delta: torch.Tensor, directions: Directions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, dW_A, dW_T): the coordinates of ``delta`` on the directions, its projection and the rest."""
    coords = torch.einsum("kij,ij->k", directions.basis, delta)
    aligned = torch.einsum("k,kij->ij", coords, directions.basis)
    return coords, aligned, delta - aligned


def fisher_energy(coords: torch.Tensor, eigenvalues: torch.Tensor) -> torch.Tensor:
    """||F^{1/2} dW_A||^2 = sum_i lambda_i c_i^2."""
    return (eigenvalues * coords.square()).sum()


def overlap_energy(aligned: torch.Tensor, task: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """mean_ij (1 + beta sigmoid(|dW_ij| - tau)) |dW_A,ij dW_T,ij|, with dW = dW_A + dW_T."""
    weight = 1.0 + beta * torch.sigmoid((aligned + task).abs() - tau)
    return (weight * (aligned * task).abs()).mean()


def geodesic_energy(aligned: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """<dW_A, dW_T>^2 / (||dW_A||^2 ||dW_T||^2 + eps): the squared cosine of their angle."""
    return (aligned * task).sum().square() / (aligned.square().sum() * task.square().sum() + GEODESIC_EPS)


def layer_energies(delta: torch.Tensor, directions: Directions, beta: float, tau: float) -> dict[str, torch.Tensor]:
    """The unweighted terms of one layer's update ``delta``."""
    coords, aligned, task = split(delta, directions)
    return {
        "align": fisher_energy(coords, directions.eigenvalues),
        "task": task.square().sum(),
        "overlap": overlap_energy(aligned, task, beta, tau),
        "geodesic": geodesic_energy(aligned, task),
    }


# ---- the Fisher estimate ---------------------------------------------------------------------------

PerSampleLoss = Callable[[nn.Module, dict], torch.Tensor]  # (model, batch) -> one loss per sample (B,)


def per_sample_gradients(
    model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[dict], loss: PerSampleLoss
) -> dict[str, torch.Tensor]:
    """name -> (N x d_out x d_in) gradients of each sample's loss with respect to the layer's weight,
    from the layer's input x and the gradient d of its output: g_n = sum_t d_nt x_nt^T (summed over the
    layer's calls). In eval mode (no dropout, no gradient checkpointing); no parameter's .grad is touched."""
    calls: dict[str, list] = {name: [] for name in layers}

    def capture(name):
        return lambda module, args, output: calls[name].append((args[0], output))

    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            for found in calls.values():
                found.clear()
            total = loss(model, batch).sum()
            outputs = [out for name in layers for _, out in calls[name]]
            deltas = iter(torch.autograd.grad(total, outputs, allow_unused=True))
            for name in layers:
                if not calls[name]:
                    raise RuntimeError(f"alignguard: target layer {name} took no part in the alignment loss")
                g = 0.0
                for x, out in calls[name]:
                    d = next(deltas)
                    d = torch.zeros_like(out) if d is None else d
                    x2, d2 = x.reshape(x.shape[0], -1, x.shape[-1]).float(), d.reshape(d.shape[0], -1, d.shape[-1])
                    g = g + torch.einsum("bto,bti->boi", d2.float(), x2)
                grads[name].append(g.detach())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        for found in calls.values():
            found.clear()
    return {name: torch.cat(parts) for name, parts in grads.items()}


def sequence_nll(model: nn.Module, batch: dict) -> torch.Tensor:
    """sum_t -log p(x_t | x_<t) of each sequence (padding masked), float32."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return (nll * mask[:, 1:].to(nll.dtype)).sum(dim=1)


def last_hidden(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs, output_hidden_states=True).hidden_states[-1].float()


def hidden_gaussian_nll(model: nn.Module, batch: dict) -> torch.Tensor:
    """(1/2) sum_t ||h_t - y_t||^2 over real tokens, y = h (no gradient) + ``batch["noise"]``: at the
    pretrained weights its gradient is -J^T eps, whose second moment is the Gaussian model's Fisher."""
    inputs = {k: v for k, v in batch.items() if k != "noise"}
    h = last_hidden(model, inputs)
    mask = inputs["attention_mask"][..., None].to(h.dtype)
    return 0.5 * ((h - (h.detach() + batch["noise"])).square() * mask).sum(dim=(1, 2))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ---- the alignment data ----------------------------------------------------------------------------


class TextProbe:
    """Decoders: alignment texts (token ids), scored by the language-model head."""

    signal = "lm_nll"
    measure = "mean next-token negative log-likelihood of the alignment texts"

    def __init__(self, sequences: list[list[int]], pad_token_id: int, batch_size: int, source: dict):
        self.sequences, self.pad, self.batch_size, self.source = sequences, pad_token_id, batch_size, source
        self.tokens = sum(len(s) - 1 for s in sequences)

    def batches(self, device) -> Iterable[dict]:
        from lorabench.data.base import collate

        for begin in range(0, len(self.sequences), self.batch_size):
            chunk = self.sequences[begin : begin + self.batch_size]
            yield _to(collate([{"input_ids": s} for s in chunk], self.pad), device)

    per_sample_loss = staticmethod(sequence_nll)

    def drift(self, model: nn.Module) -> float:
        from lorabench.analysis.forgetting import perplexity

        ppl, _ = perplexity(model, self.sequences, model_device(model), self.batch_size, self.pad)
        return math.log(ppl)

    def baseline(self, model: nn.Module) -> float:
        """The drift of the (still pretrained) ``model``: the reference the "after" value is set against."""
        return self.drift(model)


class RepresentationProbe:
    """Encoders with a classification head: calibration inputs and their pretrained last hidden states."""

    signal = "hidden_state"
    measure = "mean per-token squared distance of the last hidden state from the pretrained one"

    def __init__(self, model: nn.Module, inputs: list[dict], source: dict):
        self.inputs, self.source, self.tokens = inputs, source, int(sum(b["attention_mask"].sum() for b in inputs))
        generator = torch.Generator().manual_seed(NOISE_SEED)
        self.reference = self._hidden(model)
        self.noise = [torch.randn(h.shape, generator=generator) for h in self.reference]

    def _hidden(self, model: nn.Module) -> list[torch.Tensor]:
        device = model_device(model)
        with _evaluating(model), torch.no_grad():
            return [last_hidden(model, _to(b, device)).cpu() for b in self.inputs]

    def baseline(self, model: nn.Module) -> float:
        """The pretrained hidden states again, as ``model`` computes them now (device, precision): 0."""
        self.reference = self._hidden(model)
        return self.drift(model)

    def batches(self, device) -> Iterable[dict]:
        for inputs, noise in zip(self.inputs, self.noise):
            yield {**_to(inputs, device), "noise": noise.to(device)}

    per_sample_loss = staticmethod(hidden_gaussian_nll)

    def drift(self, model: nn.Module) -> float:
        device, total, count = model_device(model), 0.0, 0
        with _evaluating(model), torch.no_grad():
            for inputs, reference in zip(self.inputs, self.reference):
                inputs = _to(inputs, device)
                mask = inputs["attention_mask"].to(torch.float32)
                sq = (last_hidden(model, inputs) - reference.to(device)).square().sum(dim=-1)
                total += float((sq * mask).sum(dtype=torch.float64))
                count += int(mask.sum())
        return total / count


def _token_ids(model: nn.Module, tokenizer):
    """The tokenizer, or its start/end/pad ids from the model's config when the context carries none."""
    if tokenizer is not None:
        return tokenizer, "tokenizer"
    config = model.config if hasattr(model, "config") else model.get_base_model().config

    def first(value):
        return value[0] if isinstance(value, (list, tuple)) else value

    eos = first(config.eos_token_id)
    pad = first(config.pad_token_id) if config.pad_token_id is not None else eos
    return SimpleNamespace(bos_token_id=first(config.bos_token_id), eos_token_id=eos, pad_token_id=pad), "model config"


def text_probe(model: nn.Module, params: AlignGuardParams, ctx: MethodContext) -> TextProbe:
    from lorabench.analysis.forgetting import SAMPLE_SEED, SAMPLE_TOKENS, _file_sequences, sample_sequences

    tokenizer = ctx.tokenizer
    n = params.alignguard_samples
    if params.alignguard_data:
        if tokenizer is None:
            raise ConfigError(
                f"method.alignguard_data={params.alignguard_data!r} needs the run's tokenizer, and this method "
                "context carries none; pass one (MethodContext.tokenizer) or set method.alignguard_data=null (texts "
                "sampled from the base model)"
            )
        sequences = _file_sequences(params.alignguard_data, n, tokenizer, params.alignguard_max_length)
        source = {"kind": "file", "path": portable_path(params.alignguard_data)}
    else:
        ids, ids_from = _token_ids(model, tokenizer)
        sequences = sample_sequences(model, ids, n, model_device(model))
        source = {"kind": "sampled", "seed": SAMPLE_SEED, "new_tokens": SAMPLE_TOKENS, "temperature": 1.0}
        source["token_ids_from"] = ids_from
        tokenizer = ids
    return TextProbe(sequences, tokenizer.pad_token_id, params.alignguard_batch_size, source)


def representation_probe(model: nn.Module, params: AlignGuardParams, ctx: MethodContext) -> RepresentationProbe:
    if params.alignguard_data:
        raise ConfigError(
            f"method.alignguard_data={params.alignguard_data!r} is for decoders: a classification model has no "
            "language-model head to score texts with; its alignment signal is its pretrained hidden states on "
            "the calibration inputs, so set method.alignguard_data=null"
        )
    inputs, left = [], params.alignguard_samples
    for batch in ctx.calibration_batches():
        if left <= 0:
            break
        kept = {k: v[:left] for k, v in batch.items() if k != "labels"}
        inputs.append(kept)
        left -= kept["input_ids"].shape[0]
    if not inputs:
        raise ConfigError("regularizer alignguard: no calibration batch to estimate the Fisher on (train.init_batches)")
    source = {"kind": "calibration", "batches": len(inputs), "noise_seed": NOISE_SEED}
    return RepresentationProbe(model, inputs, source)


PROBES = {"causal_lm": text_probe, "classification": representation_probe}


# ---- the regularizer -------------------------------------------------------------------------------


def _update(layer) -> torch.Tensor:
    """dW = s B A of a peft LoRA layer's active adapter, in float32."""
    name = layer.active_adapters[0]
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return float(layer.scaling[name]) * (b.float() @ a.float())


@REGULARIZERS.register("alignguard")
class AlignGuard(Regularizer):
    Params = AlignGuardParams
    paper = "Das et al., 2025, arXiv:2508.02079"
    backed_by = "lorabench"
    requires_adapter = ("lora",)
    fidelity = Fidelity(
        reference=f"{REFERENCE}: its code does not implement this rule (and does not parse); the terms are "
        f"pinned against a third party's reading of the paper, {THIRD_PARTY} mitigation.py and fisher.py",
        status="rule",
        deviations=(
            "lambda_A 0.5, lambda_T 0.1 and k 8 are ours (the paper's values could not be read); lambda_NC 0.1, "
            "alpha 0.5, beta 4, tau 0.01 are the third party's",
            "R_task(dW_T) = ||dW_T||_F^2 (a trust region): the paper's task curvature H is not available offline",
            "the Fisher is per target layer (block-diagonal) and empirical, of each sequence's summed NLL "
            "(decoders) or of a Gaussian model of the pretrained last hidden state (encoders: no LM head)",
            "alignment data: a local file or texts sampled from the base model, not the paper's safety data",
        ),
        unchecked=(
            "the paper's own equations (its text could not be read here) and anything of the authors' code, "
            "which holds another method",
        ),
    )

    def setup(self, model: nn.Module, optimizer, params: AlignGuardParams, ctx: MethodContext) -> None:
        self.params, self.model = params, model
        self.layers = lora_layers(model)
        if not self.layers:
            raise ConfigError("regularizer alignguard found no LoRA layer in the model")
        self.probe = PROBES[ctx.head](model, params, ctx)
        grads = per_sample_gradients(
            model, self.layers, self.probe.batches(model_device(model)), self.probe.per_sample_loss
        )
        self.samples = next(iter(grads.values())).shape[0]
        self.directions = {name: top_directions(g, params.alignguard_top_k) for name, g in grads.items()}
        del grads
        self._placed: dict[str, Directions] = {}
        self.before: float = self.probe.baseline(model)
        self.after: float | None = None
        self.last: dict[str, dict[str, float]] = {}

    def _on(self, name: str, device) -> Directions:
        placed = self._placed.get(name)
        if placed is None or placed.basis.device != device:
            placed = self._placed[name] = self.directions[name].to(device)
        return placed

    def loss_terms(self, model: nn.Module, batch: dict, outputs) -> dict[str, torch.Tensor]:
        p = self.params
        sums: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            delta = _update(layer)
            for key, value in layer_energies(
                delta, self._on(name, delta.device), p.alignguard_beta, p.alignguard_tau
            ).items():
                sums[key] = sums.get(key, 0.0) + value
        collision = p.alignguard_alpha * sums["overlap"] + (1.0 - p.alignguard_alpha) * sums["geodesic"]
        terms = {
            "align": p.alignguard_lambda_a * sums["align"],
            "task": p.alignguard_lambda_t * sums["task"],
            "collision": p.alignguard_lambda_nc * collision,
        }
        self.last = {
            "terms": {k: float(v.detach()) for k, v in terms.items()},
            "energies": {k: float(v.detach()) for k, v in sums.items()},  # unweighted, summed over layers
        }
        return terms

    def before_forward(self, model: nn.Module, step: int, pass_index: int = 0) -> None:
        if step == 0 and pass_index == 0:  # still the pretrained model, now on the run's device and precision
            self.before = self.probe.baseline(self.model)  # so that before and after are measured alike

    def on_train_end(self, model: nn.Module) -> None:
        """The drift on the alignment data of the trained model."""
        self.after = self.probe.drift(model)

    def state(self) -> dict:
        p, before, after = self.params, self.before, self.after
        counts = [len(d.eigenvalues) for d in self.directions.values()]
        return {
            "signal": self.probe.signal,
            "source": self.probe.source,
            "samples": self.samples,
            "tokens": self.probe.tokens,
            "top_k": p.alignguard_top_k,
            "directions": {"layers": len(counts), "total": sum(counts), "fewest": min(counts)},
            "fisher_share_captured": sum(d.captured for d in self.directions.values()) / len(counts),
            "weights": {
                "lambda_a": p.alignguard_lambda_a,
                "lambda_t": p.alignguard_lambda_t,
                "lambda_nc": p.alignguard_lambda_nc,
                "alpha": p.alignguard_alpha,
                "beta": p.alignguard_beta,
                "tau": p.alignguard_tau,
            },
            "last_terms": self.last,
            "alignment": {
                "measure": self.probe.measure,
                "before": before,
                "after": after,
                "ratio": after / before if after is not None and before > 0 else None,
            },
        }

    def state_dict(self) -> dict:
        return {"before": self.before, "after": self.after}

    def load_state_dict(self, state: dict) -> None:
        self.before, self.after = state.get("before", self.before), state.get("after")
