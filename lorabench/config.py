"""Dataclass schemas for a run. YAML under ``conf/`` only selects options and overrides values.

``cli.py`` composes the Hydra config, converts it once with ``OmegaConf.to_object`` (so each
``__post_init__`` validates its own fields) and then calls :func:`validate_run` for the checks
that span several groups. Nothing downstream sees a Hydra ``DictConfig``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from lorabench.distributed import STRATEGIES
from lorabench.errors import ConfigError
from lorabench.frozen_dtype import FROZEN_DTYPES


def check_choice(where: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{where}={value!r} is invalid; valid choices: {', '.join(map(str, choices))}")


def check_positive(where: str, value: float | int, allow_zero: bool = False) -> None:
    """``value`` is a finite number > 0 (>= 0 with ``allow_zero``); nan and inf are refused."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}={value!r} is invalid; it must be a finite number {bound}")
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}={value!r} is invalid; it must be {bound}")


def check_range(where: str, value: float, low: float, high: float, closed_low: bool = True) -> None:
    """``low <= value < high`` (``low < value < high`` without ``closed_low``); nan is refused."""
    ok = (low <= value if closed_low else low < value) and value < high
    if not ok:  # nan fails every comparison, so it lands here too
        bracket = "[" if closed_low else "("
        raise ConfigError(f"{where}={value!r} is invalid; it must be in {bracket}{low:g}, {high:g})")


def nonfinite_numbers(node: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every nan or +-inf float anywhere in a plain config dict/list."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from nonfinite_numbers(value, f"{prefix}{key}.")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from nonfinite_numbers(value, f"{prefix}{i}.")
    elif isinstance(node, float) and not math.isfinite(node):
        yield prefix.rstrip("."), node


def check_all_finite(cfg_dict: dict) -> None:
    """No config value (schema field or method hyper-parameter) may be nan or inf: a ConfigError
    names the first such key."""
    for where, value in nonfinite_numbers(cfg_dict):
        raise ConfigError(f"{where}={value!r} is invalid; every number in a config must be finite")


@dataclass
class ModelConfig:
    """Which pretrained model to fine-tune and where its weights come from."""

    name: str = "minilm_l6"
    hub_id: Optional[str] = None  # primary source
    name_or_path: Optional[str] = None  # user override: a local folder or another hub id
    revision: Optional[str] = None
    source: str = "auto"  # auto: name_or_path -> hub -> offline package; or force one of them
    offline: Optional[str] = None  # name of an offline source in lorabench.models.OFFLINE_SOURCES
    random_init: Optional[str] = None  # name of a tiny config builder (random weights, for tests)
    architecture: str = "encoder"  # encoder | decoder | encoder_decoder
    target_modules: list[str] = field(default_factory=list)  # default adapter/projection targets
    trust_remote_code: bool = False
    dropout: Optional[float] = None  # override the model's dropout probabilities (None keeps them)

    SOURCES = ("auto", "hub", "local", "offline", "random")
    ARCHITECTURES = ("encoder", "decoder", "encoder_decoder")

    def __post_init__(self) -> None:
        check_choice("model.source", self.source, self.SOURCES)
        check_choice("model.architecture", self.architecture, self.ARCHITECTURES)
        if self.dropout is not None:
            check_range("model.dropout", self.dropout, 0, 1)


@dataclass
class DatasetConfig:
    """Which task, from which source, and the protocol that travels with its score."""

    name: str = "sst2"
    data_dir: Optional[str] = None  # local folder in the dataset's official file format
    eval_data_dir: Optional[str] = None  # separate evaluation data (MetaMathQA -> GSM8K test.jsonl folder)
    hub_id: Optional[str] = None
    source: str = "auto"  # auto: data_dir -> hub; or hub | local | generated
    max_length: int = 128
    train_size: Optional[int] = None  # fixed subset of the training split (None = all)
    eval_size: Optional[int] = None  # fixed subset of the evaluation split (None = all)
    subset_seed: int = 0  # the subsets do not change with the run seed
    prompt_template: str = "plain"
    max_new_tokens: int = 256
    num_beams: int = 1
    eval_batch_size: int = 32
    primary_metric: Optional[str] = None  # override the task's default primary metric

    SOURCES = ("auto", "hub", "local", "generated")

    def __post_init__(self) -> None:
        check_choice("dataset.source", self.source, self.SOURCES)
        check_positive("dataset.max_length", self.max_length)
        check_positive("dataset.max_new_tokens", self.max_new_tokens)
        check_positive("dataset.num_beams", self.num_beams)
        check_positive("dataset.eval_batch_size", self.eval_batch_size)
        for key in ("train_size", "eval_size"):
            if getattr(self, key) is not None:
                check_positive(f"dataset.{key}", getattr(self, key))


@dataclass
class TrainConfig:
    """The science of the optimisation: batch, steps, learning rate and schedule."""

    max_steps: int = 100  # 0 evaluates the untouched model (zero-shot baseline)
    global_batch_size: int = 16
    lr: float = 1e-4  # a method preset may set method.lr to override this default
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_ratio: float = 0.06
    max_grad_norm: Optional[float] = 1.0
    eval_every: int = 0  # steps between evaluations; 0 = evaluate once, at the end
    log_every: int = 10
    report: str = "last"  # which evaluation the table reports: last | best (both are recorded)
    init_batches: int = 8  # training batches that data- and gradient-driven initialisers may see
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    max_skipped_steps: int = 10  # with nonfinite=skip, stop after this many skipped steps

    SCHEDULES = ("linear", "cosine", "constant")
    NONFINITE = ("stop", "skip")
    REPORTS = ("last", "best")

    def __post_init__(self) -> None:
        check_positive("train.max_steps", self.max_steps, allow_zero=True)
        check_positive("train.global_batch_size", self.global_batch_size)
        check_positive("train.lr", self.lr)
        check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        check_choice("train.schedule", self.schedule, self.SCHEDULES)
        check_choice("train.report", self.report, self.REPORTS)
        check_choice("train.nonfinite", self.nonfinite, self.NONFINITE)
        check_positive("train.max_skipped_steps", self.max_skipped_steps, allow_zero=True)
        check_range("train.warmup_ratio", self.warmup_ratio, 0, 1)
        if self.max_grad_norm is not None:
            check_positive("train.max_grad_norm", self.max_grad_norm)
        check_positive("train.eval_every", self.eval_every, allow_zero=True)
        check_positive("train.log_every", self.log_every)
        check_positive("train.init_batches", self.init_batches)


@dataclass
class HardwareConfig:
    """Where and how the run executes; changing it must not change the science."""

    name: str = "cpu"
    device: str = "cpu"  # cpu | cuda
    num_processes: int = 1
    strategy: str = "ddp"  # ddp | fsdp | zero2 | zero3 (lorabench.distributed): how the processes share the model
    mixed_precision: str = "no"  # no | bf16 | fp16
    micro_batch_size: Optional[int] = None  # None: derived from the global batch (``derive_micro_batch``)
    gradient_checkpointing: bool = False
    num_threads: Optional[int] = None
    labelled_logits: bool = (
        False  # causal LM: LM-head logits only where the next token is labelled (same loss, less memory)
    )
    loss_chunk: Optional[int] = None  # causal LM: LM head + cross-entropy in checkpointed chunks of N positions
    release_memory: bool = False  # glibc: freed buffers go back to the system at once (lorabench.memory)
    # float32 | bfloat16: how the frozen base's Linear weights are stored (lorabench.frozen_dtype; bf16
    # needs mixed_precision=bf16 and an adapter method)
    frozen_dtype: str = "float32"

    DEVICES = ("cpu", "cuda")
    PRECISIONS = ("no", "bf16", "fp16")

    def __post_init__(self) -> None:
        check_choice("hardware.device", self.device, self.DEVICES)
        check_choice("hardware.mixed_precision", self.mixed_precision, self.PRECISIONS)
        check_choice("hardware.strategy", self.strategy, STRATEGIES)
        check_choice("hardware.frozen_dtype", self.frozen_dtype, FROZEN_DTYPES)
        check_positive("hardware.num_processes", self.num_processes)
        if self.micro_batch_size is not None:
            check_positive("hardware.micro_batch_size", self.micro_batch_size)
        if self.num_threads is not None:
            check_positive("hardware.num_threads", self.num_threads)
        if self.loss_chunk is not None:
            check_positive("hardware.loss_chunk", self.loss_chunk)


@dataclass
class CheckpointConfig:
    """Periodic checkpoints for resuming; not part of the run id (they do not change the science)."""

    every: int = 0  # steps between checkpoints; 0 = off (a canceled run still checkpoints if > 0)
    keep: int = 2  # newest checkpoints kept
    save_model: bool = True  # full-weight methods save the trained model (model/, save_pretrained) at the end

    def __post_init__(self) -> None:
        check_positive("checkpoint.every", self.every, allow_zero=True)
        check_positive("checkpoint.keep", self.keep)


@dataclass
class AnalysisConfig:
    """Post-training analyses recorded with every run; not part of the run id."""

    intruders: bool = True  # intruder dimensions of the targeted weights (Shuttleworth et al., 2024)
    intruder_top_k: int = 10
    intruder_epsilon: float = 0.5
    forgetting: bool = (
        False  # held-out perplexity on the base model's text before/after (decoders; lorabench/analysis/forgetting.py)
    )
    forgetting_texts: int = 32  # how many held-out texts
    forgetting_data: Optional[str] = (
        None  # a local text/jsonl file of held-out text; None: texts sampled from the base model
    )

    def __post_init__(self) -> None:
        check_positive("analysis.forgetting_texts", self.forgetting_texts)
        check_positive("analysis.intruder_top_k", self.intruder_top_k)
        check_range("analysis.intruder_epsilon", self.intruder_epsilon, 0, 1, closed_low=False)


@dataclass
class BudgetConfig:
    """Compare at equal cost: the method's size knob (rank, density, layers, ...) is solved from the
    model's shapes so the run is as large as possible without exceeding the budget."""

    trainable_params: Optional[int] = None
    optimizer_state_mb: Optional[float] = None

    def __post_init__(self) -> None:
        if self.trainable_params is not None and self.optimizer_state_mb is not None:
            raise ConfigError("set only one of budget.trainable_params and budget.optimizer_state_mb")
        if self.trainable_params is not None:
            check_positive("budget.trainable_params", self.trainable_params)
        if self.optimizer_state_mb is not None:
            check_positive("budget.optimizer_state_mb", self.optimizer_state_mb)

    def active(self) -> bool:
        return self.trainable_params is not None or self.optimizer_state_mb is not None


@dataclass
class FederatedConfig:
    """``protocol=federated``: clients, rounds and aggregation of a Flower simulation
    (lorabench/protocols/federated). The run's dataset is partitioned over the clients."""

    clients: int = 4
    clients_per_round: Optional[int] = None  # None: every client trains every round
    rounds: int = 5
    local_steps: int = 10  # optimizer steps per client per round (train.global_batch_size each)
    partition: str = "iid"  # iid | dirichlet (label-skewed, Hsu et al. 2019)
    dirichlet_alpha: float = 0.5  # smaller = more skewed
    aggregation: str = "fedavg"  # fedavg | fedsvd (lorabench.protocols.federated.aggregation)
    dp_target_epsilon: Optional[float] = None  # user-level DP (clipping + Gaussian noise); None = off
    dp_delta: float = 1.0e-5
    dp_clip: float = 1.0  # l2 bound of one client's update (all of its trained arrays together)
    target: Optional[float] = None  # rounds-to-target threshold on the primary metric (as recorded, 0-1)
    backend: str = "ray"  # Flower's simulation backend
    client_cpus: int = 1  # CPUs Flower reserves per simulated client

    PARTITIONS = ("iid", "dirichlet")
    BACKENDS = ("ray",)
    AGGREGATIONS = ("fedavg", "fedsvd")  # = the registry's names (a test checks)
    FROZEN_A_AGGREGATIONS = ("fedsvd",)  # the clients train B only: the method must freeze A

    def __post_init__(self) -> None:
        check_positive("protocol.federated.clients", self.clients)
        check_positive("protocol.federated.rounds", self.rounds)
        check_positive("protocol.federated.local_steps", self.local_steps)
        check_choice("protocol.federated.partition", self.partition, self.PARTITIONS)
        check_choice("protocol.federated.aggregation", self.aggregation, self.AGGREGATIONS)
        check_positive("protocol.federated.dirichlet_alpha", self.dirichlet_alpha)
        check_choice("protocol.federated.backend", self.backend, self.BACKENDS)
        check_positive("protocol.federated.client_cpus", self.client_cpus)
        check_positive("protocol.federated.dp_clip", self.dp_clip)
        check_range("protocol.federated.dp_delta", self.dp_delta, 0, 1, closed_low=False)
        if self.dp_target_epsilon is not None:
            check_positive("protocol.federated.dp_target_epsilon", self.dp_target_epsilon)
        if self.clients_per_round is not None:
            check_positive("protocol.federated.clients_per_round", self.clients_per_round)
            if self.clients_per_round > self.clients:
                raise ConfigError(
                    f"protocol.federated.clients_per_round={self.clients_per_round} is larger than "
                    f"protocol.federated.clients={self.clients}"
                )


@dataclass
class ContinualConfig:
    """``protocol=continual``: a sequence of tasks trained one after another
    (lorabench/protocols/continual); every earlier task is evaluated after each stage."""

    tasks: list[str] = field(default_factory=lambda: ["sst2", "rte", "mrpc"])  # dataset presets, in order
    data_dirs: dict[str, str] = field(default_factory=dict)  # task -> local folder (else the preset's source)
    steps_per_task: int = 100  # optimizer steps of each stage
    strategy: str = "sequential"  # a name in lorabench.protocols.continual.STRATEGIES
    replay_size: int = 64  # examples kept per finished task (strategies that replay)
    replay_ratio: float = 0.25  # share of each batch drawn from the replay buffer
    ema_decay: float = 0.99  # I-LoRA: slow <- decay * slow + (1 - decay) * fast
    consistency_weight: float = 1.0  # I-LoRA: weight of the fast/slow consistency loss

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("protocol.continual.tasks is empty; name at least one dataset preset")
        check_positive("protocol.continual.steps_per_task", self.steps_per_task)
        check_positive("protocol.continual.replay_size", self.replay_size, allow_zero=True)
        check_range("protocol.continual.replay_ratio", self.replay_ratio, 0, 1)
        check_range("protocol.continual.ema_decay", self.ema_decay, 0, 1)
        check_positive("protocol.continual.consistency_weight", self.consistency_weight, allow_zero=True)


@dataclass
class ComposeConfig:
    """``protocol=compose``: one LoRA expert trained per task, then the experts combined by each
    merge of ``merges`` (lorabench/protocols/compose) and every combination scored on every task."""

    tasks: list[str] = field(default_factory=lambda: ["sst2", "rte", "mrpc"])  # dataset presets, one expert each
    data_dirs: dict[str, str] = field(default_factory=dict)  # task -> local folder (else the preset's source)
    steps_per_task: int = 100  # optimizer steps of each expert
    merges: list[str] = field(default_factory=lambda: ["average", "task_arithmetic", "ties", "dare_ties", "lego"])
    weight: float = 1.0  # lambda of every expert in the weighted merges (task_arithmetic, ties, dare_*)
    density: float = 0.2  # share of each task vector kept by TIES (top magnitude) and DARE (random, rescaled)
    lego_rank: Optional[int] = None  # LoRA-LEGO's merged rank (clusters per layer); None: the experts' rank

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("protocol.compose.tasks is empty; name at least two dataset presets")
        check_positive("protocol.compose.steps_per_task", self.steps_per_task)
        if not self.merges:
            raise ConfigError("protocol.compose.merges is empty; name at least one merge")
        check_positive("protocol.compose.weight", self.weight)
        if not 0 < self.density <= 1:  # nan fails too
            raise ConfigError(f"protocol.compose.density={self.density!r} is invalid; it must be in (0, 1]")
        if self.lego_rank is not None:
            check_positive("protocol.compose.lego_rank", self.lego_rank)


@dataclass
class CompressedConfig:
    """``protocol=compressed``: the base model's linear layers compressed in place (quantized or
    pruned), the run's LoRA started from the compression error, then trained as a single run
    (lorabench/protocols/compressed; ``train.max_steps=0``: training-free compensation)."""

    compressor: str = "hqq"  # hqq (quantization) | magnitude, semi_structured (N:M) pruning | welore (low rank)
    bits: int = 4  # hqq: bits per weight
    group_size: int = 64  # hqq: weights sharing one scale and zero point (along the input dimension)
    sparsity: float = 0.5  # magnitude: share of each matrix's weights set to zero
    n_of_m: list[int] = field(default_factory=lambda: [2, 4])  # semi_structured: keep N of every M inputs
    compensation: str = "none"  # none (QLoRA-style: B = 0) | svd | eora (calibration inputs) | lq_lora | loftq
    iterations: int = 100  # lq_lora: most alternations of SVD and compression (stops when the error rises)
    loftq_iterations: int = 1  # loftq: alternations of compression and SVD (peft's loftq_iter default)
    bit_budget: Optional[float] = None  # hqq: LQ-LoRA's ILP picks each layer's bits for this mean bits/weight
    bit_choices: list[int] = field(default_factory=lambda: [2, 3, 4, 8])  # hqq with bit_budget: the candidates
    recover: bool = False  # LoRAM: the LoRA trained on the compressed base is scored on the original weights
    welore_reduction: float = 0.5  # welore: share of all ranks the threshold prunes (attempted)
    welore_min_ratio: float = 0.4999  # welore: a matrix becomes low-rank when more than this share is pruned
    modules: str = r"(^|\.)(layer|layers|h|blocks)\.\d+\."  # re.search on nn.Linear names: inside the blocks

    COMPRESSORS = ("hqq", "magnitude", "semi_structured", "welore")  # = the registries' names (a test checks)
    COMPENSATIONS = ("eora", "loftq", "lq_lora", "none", "svd")
    HQQ_BITS = (1, 2, 3, 4, 8)  # what hqq's BaseQuantizeConfig packs

    def __post_init__(self) -> None:
        where = "protocol.compressed"
        check_choice(f"{where}.compressor", self.compressor, self.COMPRESSORS)
        check_choice(f"{where}.compensation", self.compensation, self.COMPENSATIONS)
        check_choice(f"{where}.bits", self.bits, self.HQQ_BITS)
        check_positive(f"{where}.group_size", self.group_size)
        if not 0 < self.sparsity < 1:  # nan fails too
            raise ConfigError(f"{where}.sparsity={self.sparsity!r} is invalid; it must be in (0, 1)")
        n_m = list(self.n_of_m)
        if len(n_m) != 2 or not all(isinstance(v, int) for v in n_m) or not 0 < n_m[0] < n_m[1]:
            raise ConfigError(f"{where}.n_of_m={n_m!r} is invalid; it must be [N, M] with 0 < N < M (e.g. [2, 4])")
        check_positive(f"{where}.iterations", self.iterations)
        check_positive(f"{where}.loftq_iterations", self.loftq_iterations)
        check_range(f"{where}.welore_reduction", self.welore_reduction, 0, 1, closed_low=False)
        check_range(f"{where}.welore_min_ratio", self.welore_min_ratio, 0, 1)
        if self.bit_budget is not None:
            check_positive(f"{where}.bit_budget", self.bit_budget)
            if self.compressor != "hqq":
                raise ConfigError(
                    f"{where}.bit_budget={self.bit_budget} allocates quantization bits; it needs compressor=hqq "
                    f"(got compressor={self.compressor!r})"
                )
            if not self.bit_choices:
                raise ConfigError(f"{where}.bit_choices is empty; name the candidate bit widths, e.g. [2, 3, 4, 8]")
            for bits in self.bit_choices:
                check_choice(f"{where}.bit_choices entry", bits, self.HQQ_BITS)
        try:
            re.compile(self.modules)
        except re.error as exc:
            raise ConfigError(f"{where}.modules={self.modules!r} is not a regular expression: {exc}") from None


@dataclass
class ProtocolConfig:
    """How the run's training is organised: one run (``single``), clients and rounds
    (``federated``), a task sequence (``continual``), one expert per task combined (``compose``) or
    one run on a compressed base (``compressed``). Only the chosen protocol's settings enter the run
    id, and ``single`` none at all (lorabench.results.record.config_hash)."""

    name: str = "single"
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    compressed: CompressedConfig = field(default_factory=CompressedConfig)

    NAMES = ("single", "federated", "continual", "compose", "compressed")

    def __post_init__(self) -> None:
        check_choice("protocol", self.name, self.NAMES)


@dataclass
class RunConfig:
    """One run = model x method x dataset x train x hardware, plus a seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict[str, Any] = field(default_factory=dict)  # validated by lorabench.method_params.check (torch-free)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    seed: int = 0
    results_dir: str = "results/runs"
    force: bool = False  # rerun even if a record for this run id exists
    resume: str = "never"  # never | auto: continue this run id from its newest valid checkpoint
    progress: bool = True
    tracker: str = "none"  # none | wandb | mlflow

    TRACKERS = ("none", "wandb", "mlflow")
    RESUME = ("never", "auto")

    def __post_init__(self) -> None:
        check_choice("tracker", self.tracker, self.TRACKERS)
        check_choice("resume", self.resume, self.RESUME)
        check_positive("seed", self.seed, allow_zero=True)
        if self.hardware.micro_batch_size is None:
            self.hardware.micro_batch_size = derive_micro_batch(
                self.train.global_batch_size, self.hardware.num_processes, self.hardware.device
            )

    def gradient_accumulation(self) -> int:
        per_step = self.hardware.micro_batch_size * self.hardware.num_processes
        return self.train.global_batch_size // per_step


# The largest micro-batch a derived one takes per device kind (what the hardware presets set before
# the micro-batch was derived: the same runs keep the same micro-batch and run id).
MAX_DERIVED_MICRO_BATCH = {"cpu": 4, "cuda": 16}


def derive_micro_batch(global_batch: int, num_processes: int, device: str) -> int:
    """The micro-batch when ``hardware.micro_batch_size`` is not set: the largest divisor of the
    per-process batch (global / processes) up to ``MAX_DERIVED_MICRO_BATCH[device]``; gradient
    accumulation makes up the rest. Raises ConfigError when the processes do not divide the batch."""
    if global_batch % num_processes:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by hardware.num_processes={num_processes}; "
            f"choose a global batch that is a multiple of {num_processes}"
        )
    per_process = global_batch // num_processes
    cap = MAX_DERIVED_MICRO_BATCH.get(device, 4)
    return max(d for d in range(1, min(per_process, cap) + 1) if per_process % d == 0)


def validate_run(cfg: RunConfig) -> None:
    """Cross-group checks that no single dataclass can make. Raises ``ConfigError``."""
    hw, tr, model = cfg.hardware, cfg.train, cfg.model
    if not (model.hub_id or model.name_or_path or model.offline or model.random_init):
        raise ConfigError(f"model {model.name!r} has no source: set model.name_or_path to a local folder or hub id")
    per_step = hw.micro_batch_size * hw.num_processes
    if tr.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={tr.global_batch_size} is not divisible by "
            f"hardware.micro_batch_size x hardware.num_processes = {hw.micro_batch_size} x "
            f"{hw.num_processes} = {per_step}; choose a global batch that is a multiple of {per_step}"
        )
    if hw.mixed_precision == "fp16" and hw.device == "cpu":
        raise ConfigError("hardware.mixed_precision='fp16' needs hardware.device='cuda'; use 'bf16' or 'no' on CPU")
    if tr.eval_every and tr.max_steps and tr.eval_every > tr.max_steps:
        raise ConfigError(
            f"train.eval_every={tr.eval_every} is larger than train.max_steps={tr.max_steps}; "
            "use 0 to evaluate only at the end"
        )
