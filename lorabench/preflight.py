"""Pre-flight checks of one run: everything that can be refused from the model's config, the data
files and the tokenizer, before any weight is loaded or any step is trained.

``lorabench.launch.run_one`` calls :func:`preflight` after the config validated and before
``train()``. It builds the model on the meta device from its config alone (``config.json``, a GGUF
file's metadata or a tiny config builder: :func:`lorabench.models.model_blueprint`), so every shape
is the real one and no memory is spent on weights, then checks, each failure a ``ConfigError``
(``DataError`` for the data) that names the offending value and the valid choices:

* head: the method's components support the task's head (X-LoRA: causal LMs only);
* targets: ``method.target_modules`` (or the model's default list) is non-empty and every name
  matches a linear layer of the model (the same ``resolve_targets`` the training loop uses);
* rank: a method's ``rank`` is at most min(d_out, d_in) of every target (the rank of a product of
  rank-r factors cannot exceed it), except for the components in ``RANK_IS_NOT_A_FACTOR_RANK``;
  components that take singular vectors of each target (PiSSA, LoRA-GA, ...) get their own,
  stricter limit (``methods.build.check_rank_fits``); a size budget is solved on the meta model;
* size: the method trains no more parameters than the whole model holds;
* data: the splits load (a file error is left to ``train()``, which reads the data before the
  model and records the failure with the file and line), neither is empty, the training split
  holds at least one micro-batch per process, and every training example becomes features within
  ``dataset.max_length`` (the prompt fits). The loaded splits and the tokenized features are kept
  (``data.base.preload``, the feature cache) so the run does not read or tokenize them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorabench.config import RunConfig
from lorabench.errors import ConfigError, DataError
from lorabench.registry import DATASETS

if TYPE_CHECKING:
    from lorabench.methods.spec import MethodSpec

# (axis, component) -> the task heads it supports; components may also declare ``supported_heads``.
HEAD_SUPPORT: dict[tuple[str, str], tuple[str, ...]] = {
    ("adapter", "xlora"): ("causal_lm",),  # peft's X-LoRA supports causal LMs only
}
# Components whose ``rank`` is not the rank of the weight update, so min(d_out, d_in) does not bound
# it: VeRA's r is the width of shared random projections (the paper uses r > d), RandLoRA's r the
# rank of each random basis (n = ceil(min(d) / r) bases), MiSS's r the size of a shared shard. The
# size check (no more trainable parameters than the model) still applies to them.
RANK_IS_NOT_A_FACTOR_RANK = {("adapter", "vera"), ("adapter", "randlora"), ("adapter", "miss")}
HEAD_WORDS = {"classification": "a classification head", "causal_lm": "a causal language model (generation)"}


@dataclass
class PreflightReport:
    """What the checks saw: the resolved targets, the predicted and total parameter counts."""

    targets: list[str]
    expected_trainable: int | None
    total_params: int
    train_examples: int
    eval_examples: int


def preflight(cfg: RunConfig, spec: MethodSpec) -> PreflightReport | None:
    """Refuse a run that cannot work, before any weight loads. Returns None when ``train()`` will
    skip the run anyway (a completed record exists and ``force`` is off)."""
    from lorabench.train import existing_record

    if not cfg.force:
        _, _, previous = existing_record(_cfg_dict(cfg), cfg.results_dir)
        if previous and previous.get("status") == "completed":
            return None
    task = DATASETS.get(cfg.dataset.name, where="dataset")
    check_heads(spec, cfg, task.head)
    model, tokenizer = _meta_model(cfg, task)
    targets = check_targets(spec, cfg, model)
    ctx = _context(cfg, spec, task.head, targets)
    spec = check_budget(cfg, spec, model, ctx)
    check_rank(spec, cfg, model, ctx)
    expected, total = check_size(spec, cfg, model, ctx)
    splits = check_data(cfg, task, tokenizer)
    sizes = (len(splits.train), len(splits.eval)) if splits is not None else (0, 0)
    return PreflightReport(targets, expected, total, *sizes)


def _cfg_dict(cfg: RunConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def _meta_model(cfg: RunConfig, task) -> tuple[Any, Any]:
    from lorabench.models import meta_model, model_blueprint

    blueprint = model_blueprint(cfg.model, task.head, task.num_labels)
    return meta_model(blueprint, task.head, cfg.model.trust_remote_code), blueprint.tokenizer


def _context(cfg: RunConfig, spec: MethodSpec, head: str, targets: list[str]):
    from lorabench.methods.base import MethodContext

    return MethodContext(targets, head, spec.lr or cfg.train.lr, cfg.train.weight_decay, cfg.train.max_steps, cfg.seed)


# -- the checks ---------------------------------------------------------------------------------------
def check_heads(spec: MethodSpec, cfg: RunConfig, head: str) -> None:
    """Every component supports the task's head (``HEAD_SUPPORT`` or its ``supported_heads``)."""
    for axis, component in spec.components.items():
        name = spec.names[axis]
        heads = getattr(component, "supported_heads", None) or HEAD_SUPPORT.get((axis, name))
        if heads and head not in heads:
            fitting = [n for n, t in DATASETS.items() if getattr(t, "head", None) in heads]
            raise ConfigError(
                f"method.{axis}={name!r} (method {spec.label!r}) supports {', '.join(HEAD_WORDS[h] for h in heads)} "
                f"only; dataset={cfg.dataset.name!r} trains {HEAD_WORDS[head]}; valid datasets: {', '.join(fitting)}"
            )


def check_targets(spec: MethodSpec, cfg: RunConfig, model) -> list[str]:
    """The module-name suffixes the method targets, as the training loop resolves them."""
    import torch

    from lorabench.train import resolve_targets

    where = (
        f"model.target_modules={cfg.model.target_modules!r} (with method.target_modules=default)"
        if spec.target_modules == "default"
        else f"method.target_modules={spec.target_modules!r}"
    )
    chosen = cfg.model.target_modules if spec.target_modules == "default" else spec.target_modules
    if isinstance(chosen, list) and not chosen:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"{where} is empty, so the method would adapt nothing; valid choices: 'default', 'all-linear' "
            f"or a list of linear-layer names of model {cfg.model.name!r}: {', '.join(names)}"
        )
    try:
        return resolve_targets(spec, cfg.model.target_modules, model)
    except ValueError as exc:
        raise ConfigError(f"{where} on model {cfg.model.name!r}: {exc}") from None


def check_budget(cfg: RunConfig, spec: MethodSpec, model, ctx) -> MethodSpec:
    """With a size budget: the spec with the knob solved on the meta model (as train.py solves it). A
    size formula that needs weight values (LaMDA++'s ranks from the spectrum of W0) cannot run on the
    meta model: train.py solves that budget on the loaded weights."""
    if not cfg.budget.active():
        return spec
    from lorabench.budget import apply_budget, solve_run_budget

    try:
        solved = solve_run_budget(model, spec, ctx, cfg.budget)
    except (NotImplementedError, RuntimeError):  # a formula that needs weight values, not shapes
        return spec
    return apply_budget(spec, solved)


def smallest_target(model, targets: list[str]) -> tuple[str, tuple[int, ...]] | None:
    """The targeted linear weight with the smallest min(d_out, d_in), with its shape."""
    from lorabench.methods.base import target_linear_weights

    weights = target_linear_weights(model, targets)
    if not weights:
        return None
    name, weight = min(weights, key=lambda item: min(item[1].shape))
    return name, tuple(weight.shape)


def check_rank(spec: MethodSpec, cfg: RunConfig, model, ctx) -> None:
    """``rank`` <= min(d_out, d_in) of every target (components in ``RANK_IS_NOT_A_FACTOR_RANK``
    excepted), and the singular-vector components' own limit."""
    from lorabench.methods.build import check_rank_fits

    smallest = smallest_target(model, ctx.target_modules)
    for axis, params in spec.params.items():
        rank = getattr(params, "rank", None)
        if smallest is None or not isinstance(rank, int) or (axis, spec.names[axis]) in RANK_IS_NOT_A_FACTOR_RANK:
            continue
        name, shape = smallest
        if rank > min(shape):
            raise ConfigError(
                f"method.rank={rank} is too large for method {spec.label!r} on model {cfg.model.name!r}: "
                f"valid choices are 1..{min(shape)} (min(d_out, d_in) of the smallest target, {name}, {shape})"
            )
    check_rank_fits(model, spec, ctx)


def _knob(spec: MethodSpec) -> str:
    for axis in ("procedure", "adapter", "init", "optimizer"):
        knob = getattr(spec.components.get(axis), "size_knob", None)
        if knob:
            names = (knob,) if isinstance(knob, str) else knob
            return ", ".join(f"method.{k}={getattr(spec.params[axis], k, '?')}" for k in names)
    return "its size settings"


def check_size(spec: MethodSpec, cfg: RunConfig, model, ctx) -> tuple[int | None, int]:
    """The method's closed-form trainable count on the meta model is at most the model's size."""
    from lorabench.methods.build import expected_trainable

    total = sum(p.numel() for p in model.parameters())
    try:
        expected = expected_trainable(model, spec, ctx)
    except (NotImplementedError, RuntimeError):  # a formula that needs weight values, not shapes
        return None, total
    if expected is not None and expected > total:
        raise ConfigError(
            f"method {spec.label!r} with {_knob(spec)} would train {expected:,} parameters, more than the "
            f"whole model {cfg.model.name!r} holds ({total:,}); lower it"
        )
    return expected, total


def check_data(cfg: RunConfig, task, tokenizer):
    """Load the splits (kept for the run), check their sizes, and turn the training examples into
    features (kept in the feature cache), which refuses a ``max_length`` shorter than a prompt.

    A file that cannot be read (missing, not UTF-8, a bad row, an empty split) is left to ``train()``:
    it loads the data before the model, so the run stops there with a failed record naming the file
    and line (a failed run always leaves a record). Returns None in that case."""
    from lorabench.data.base import preload
    from lorabench.data.cache import cached_features

    try:
        splits = preload(task, cfg.dataset)
    except DataError:  # train() loads the data first, before the model, and records the failure
        return None
    where = splits.source.get("path") or splits.source.get("hub_id") or splits.source.get("kind")
    if not splits.eval:
        raise DataError(f"dataset {cfg.dataset.name!r} ({where}): the {splits.eval_split} split is empty")
    per_step = cfg.hardware.micro_batch_size * cfg.hardware.num_processes
    if len(splits.train) < per_step:
        raise ConfigError(
            f"hardware.micro_batch_size={cfg.hardware.micro_batch_size} x hardware.num_processes="
            f"{cfg.hardware.num_processes} needs {per_step} training examples per step, but dataset "
            f"{cfg.dataset.name!r} ({where}) has {len(splits.train)} in its {splits.train_split} split; "
            f"valid choices: hardware.micro_batch_size 1..{len(splits.train) // cfg.hardware.num_processes}"
        )
    cached_features(task, splits.train, tokenizer, cfg.dataset)
    return splits
