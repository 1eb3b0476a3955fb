"""How a run is spread over processes: ``hardware.strategy`` (``ddp``, ``fsdp``, ``zero2``, ``zero3``),
the Accelerator that runs it, and the context in which a sharded model is whole again.

* ``ddp``: every process holds the whole model; gradients are averaged (Accelerate's DDP, gloo on
  CPU, NCCL on CUDA). The default, and the only strategy of a one-process run unless another is named.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Accelerate's
  ``FullyShardedDataParallelPlugin(fsdp_version=2)``: every transformer block (the model's
  ``_no_split_modules``) and the root are sharded along dim 0 over the processes; parameters,
  gradients and optimizer state are ``DTensor`` shards, gathered for each block's forward and
  backward. Accelerate detects FSDP only for accelerator devices; on CPU (gloo) the same plugin and
  ``prepare`` path run once the state names FSDP (``new_accelerator``), which is how the CPU tests
  check FSDP2 against the one-process run.
* ``zero2`` / ``zero3``: DeepSpeed ZeRO stage 2 (optimizer state and gradients partitioned over the
  processes; every process holds the whole weights) or stage 3 (weights partitioned too, gathered
  module by module in the forward and backward) through Accelerate's ``DeepSpeedPlugin``
  (``deepspeed_config``). DeepSpeed's engine keeps its own flat fp32 partition of every trainable
  weight, and its ``step`` (clipping, the optimizer, the LR schedule) runs inside the backward of the
  step's last micro-batch (``zero_backward``): what a component does to gradients or weights between
  the backward and the update, or to weights after it, never reaches that partition, and an
  optimizer sees flat 1-D partitions, not matrices; components declare it (``zero``). DeepSpeed's own
  bf16 mode (bf16 weights over fp32 masters) is not used: ``mixed_precision=bf16`` is the same
  autocast over fp32 weights as under every other strategy (``autocast_sharded``), so a ZeRO run
  trains what the DDP run does. On CPU, as for FSDP, the state is set to DeepSpeed by hand.

Evaluation, the saved outputs and the post-training analyses see the whole model: ``whole_model``
gathers every shard for their duration (collective: every process enters it) and reshards after.

Which methods can run under which strategy is declared by their components
(``lorabench.method_params``: ``sharding``) and checked before any weight loads
(``check_strategy``); ``lorabench methods --strategies`` prints the matrix.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
SHARDED = ("fsdp", "zero3")  # the weights themselves are partitioned: components must run on shards
ZERO_STAGES = {"zero2": 2, "zero3": 3}
# What a component's ``sharding`` declaration means (lorabench.method_params.registry.ParamsEntry):
#   "any": elementwise on parameters and gradients, acting only through the forward, or gathering what it
#   needs whole (the GaLore-family optimizers gather each projected gradient: whole_gradient): runs on shards;
#   a string other than "any": the reason it needs whole tensors, which a sharded strategy refuses with.
ANY = "any"
_DETECTED_TYPE: list = []  # the PartialState's own distributed type while an FSDP or ZeRO run overrides it
WHOLE_FLAG = "_lorabench_whole"  # set on a model while ``whole_model`` holds its shards gathered
ZERO3_OFFLOAD = "_lorabench_zero3_offload"  # on a ZeRO-3 model: DeepSpeed's parameter coordinator (whole_model)


def deepspeed_config(stage: int, micro_batch: int, accumulation: int, processes: int, max_grad_norm) -> dict:
    """The DeepSpeed config of a ``zero2``/``zero3`` run: the run's own batch arithmetic (micro-batch,
    accumulation, global batch) and clipping (``gradient_clipping``: 0 is none), the ZeRO stage, and
    DeepSpeed's fp16/bf16 modes off (bf16 is the run's autocast; module docstring). The optimizer and
    LR schedule are the run's own objects (``zero_allow_untested_optimizer``)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * processes,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,  # DeepSpeed's own progress lines off: lorabench logs the steps
        "wall_clock_breakdown": False,
    }


def fsdp_plugin():
    """Accelerate's FSDP2 plugin: transformer blocks wrapped, reshard after forward, full state dicts
    gathered for saving; mixed precision comes from the Accelerator (bf16 compute, fp32 shards)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
        activation_checkpointing=False,
    )


OWN_LOCAL_RANK = "LORABENCH_OWN_LOCAL_RANK"  # set beside a LOCAL_RANK that a world of one set for itself


def _init_single_process_group(cpu: bool) -> None:
    """FSDP and DeepSpeed need a process group even on one process (``hardware.num_processes=1``): a
    world of one, on a rendezvous port of its own (passed directly: no MASTER_PORT left in the
    environment for child processes to collide with). DeepSpeed's engine and ZeRO-3's gathering read
    LOCAL_RANK, which a launcher sets: set here for the run, with the ``OWN_LOCAL_RANK`` mark
    (``set_for_a_world_of_one``), and removed when the run ends (``end_world_of_one``), since a
    LOCAL_RANK otherwise means "inside a launch" to lorabench.launch and to Accelerate, in this
    process and in the processes it starts."""
    import torch.distributed as dist

    if "LOCAL_RANK" not in os.environ and (not dist.is_initialized() or dist.get_world_size() == 1):
        os.environ["LOCAL_RANK"] = "0"
        os.environ[OWN_LOCAL_RANK] = "1"
    if dist.is_initialized():
        return
    from lorabench.launch import _free_port

    method = f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group("gloo" if cpu else "nccl", init_method=method, rank=0, world_size=1)


def accelerator_for(cfg):
    """``new_accelerator`` for a run config: its device, precision, strategy and, under ZeRO, the
    DeepSpeed config of its batch arithmetic and clipping."""
    hw = cfg.hardware
    deepspeed = None
    if hw.strategy in ZERO_STAGES:
        deepspeed = deepspeed_config(
            ZERO_STAGES[hw.strategy],
            hw.micro_batch_size,
            cfg.gradient_accumulation(),
            hw.num_processes,
            cfg.train.max_grad_norm,
        )
    return new_accelerator(hw.device == "cpu", hw.mixed_precision, hw.strategy, deepspeed)


def _reset_state_for(strategy: str, mixed_precision: str) -> None:
    """Clear Accelerate's process-wide state when the run needs another precision or strategy than
    the one it holds (an FSDP or DeepSpeed state is never reused: its plugin holds the last run's
    settings), and undo an earlier run's override of the process-wide type."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    special = (DistributedType.FSDP, DistributedType.DEEPSPEED)
    held = state.get("distributed_type") if state else None
    if state.get("_mixed_precision") not in (None, mixed_precision) or (
        state and (held in special or strategy == "fsdp" or strategy in ZERO_STAGES)
    ):
        AcceleratorState._reset_state(reset_partial_state=False)
        if _DETECTED_TYPE:
            PartialState._shared_state["distributed_type"] = _DETECTED_TYPE.pop()


def _name_the_type(accelerator, distributed_type) -> None:
    """Accelerate detects FSDP and DeepSpeed only for accelerator devices; on CPU (gloo) or one
    process the same plugins and ``prepare`` paths run once the state names the type: every later
    AcceleratorState() copies it from the PartialState, so both name it, as Accelerate itself leaves
    them on GPUs."""
    from accelerate.state import PartialState

    _init_single_process_group(accelerator.device.type == "cpu")  # a launched run's group exists by now
    if accelerator.state.distributed_type != distributed_type:
        _DETECTED_TYPE.append(PartialState._shared_state["distributed_type"])
        PartialState._shared_state["distributed_type"] = distributed_type
        accelerator.state.distributed_type = distributed_type


def new_accelerator(cpu: bool, mixed_precision: str, strategy: str = "ddp", deepspeed: dict | None = None):
    """The run's Accelerator. Accelerate keeps one process-wide ``AcceleratorState`` and refuses a
    second Accelerator at another precision; a later run in the same process (a sweep, a protocol's
    stages, a notebook, the tests) at another ``mixed_precision`` or strategy clears that state
    first. The ``PartialState`` (device, process group of a distributed launch) is kept.
    ``deepspeed``: the DeepSpeed config of a ``zero2``/``zero3`` run (``deepspeed_config``).

    The LR schedule steps once per optimizer step (``step_scheduler_with_optimizer=False``):
    ``train.max_steps`` counts optimizer steps of the global batch, while Accelerate's default steps
    the schedule ``num_processes`` times per step (it assumes one built for a per-process data loader),
    which ran a 2-process run's schedule twice as fast."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    _reset_state_for(strategy, mixed_precision)
    common = {"cpu": cpu, "mixed_precision": mixed_precision, "step_scheduler_with_optimizer": False}
    if strategy in ZERO_STAGES:
        if deepspeed is None:
            raise ValueError(f"hardware.strategy={strategy} needs its DeepSpeed config (deepspeed_config)")
        # zero3_init_flag off: the model loads whole (methods initialise from whole weights, as under
        # FSDP here) and DeepSpeed partitions it in ``prepare``, not transformers' zero.Init at load
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed, zero3_init_flag=False)
        accelerator = Accelerator(**common, deepspeed_plugin=plugin)
        _name_the_type(accelerator, DistributedType.DEEPSPEED)
        plugin.deepspeed_config["bf16"] = {"enabled": False}  # the run's autocast instead (module docstring)
        plugin.deepspeed_config["fp16"] = {"enabled": False}
        plugin.select(_from_accelerator_state=True)
        accelerator.state.deepspeed_plugins = plugin
        _load_whole(plugin)
        accelerator.native_amp = mixed_precision == "bf16"  # Accelerate turns its autocast off under DeepSpeed
        return accelerator
    if strategy != "fsdp":
        return Accelerator(**common)
    plugin = fsdp_plugin()
    accelerator = Accelerator(**common, fsdp_plugin=plugin)
    _name_the_type(accelerator, DistributedType.FSDP)
    accelerator.state.fsdp_plugin = plugin
    # no FSDP parameter casting (its bf16 policy runs norms, softmax and the loss in bf16): the run's
    # autocast (autocast_sharded) sets the compute precision as under every other strategy, over fp32 shards
    plugin.mixed_precision_policy = None
    return accelerator


def _load_whole(plugin) -> None:
    """Accelerate registers the DeepSpeed config with transformers whatever ``zero3_init_flag`` says,
    and transformers then builds a ZeRO-3 model already partitioned (``zero.Init``), before any
    method could read its weights: unregistered, so the model loads whole and ``prepare`` partitions
    it (the memory of loading is that of DDP and FSDP here: one whole copy per process)."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    plugin.dschf = None


def uses_deepspeed(accelerator) -> bool:
    return accelerator.state.distributed_type.value == "DEEPSPEED"


def zero_backward(accelerator, objective, last_micro_batch: bool) -> None:
    """A ZeRO run's backward of one micro-batch's (already 1/accumulation-weighted) objective: the
    gradient is reduced into DeepSpeed's partitions, and on the step's last micro-batch DeepSpeed's
    engine clips, steps the optimizer and the LR schedule and clears the gradients (the loop's own
    ``optimizer.step()``/``zero_grad()``/``scheduler.step()`` are Accelerate's no-ops under DeepSpeed)."""
    accelerator.gradient_state._set_sync_gradients(last_micro_batch)
    accelerator.backward(objective, scale_wrt_gas=False)
    accelerator.gradient_state._set_sync_gradients(True)


def zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer behind Accelerate's wrapper, or None when the run is not under ZeRO."""
    inner = getattr(optimizer, "optimizer", None)
    found = hasattr(inner, "single_partition_of_fp32_groups") or hasattr(inner, "fp32_partitioned_groups_flat")
    return inner if found else None


def drop_empty_groups(accelerator, optimizer) -> None:
    """Before the LR schedule is built: under DeepSpeed, the optimizer's parameter groups without
    parameters removed (ZeRO drops them from the optimizer it steps, and a schedule built over them
    then holds one rate more than there are groups; LoRA+'s embedding group is empty without
    embedding adapters). They hold nothing, so the update is the same."""
    if uses_deepspeed(accelerator):
        optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]


def full_numel(p) -> int:
    """A parameter's element count, also for a ZeRO-3 partition (whose local tensor is empty)."""
    return getattr(p, "ds_numel", None) or p.numel()


def whole_gradient(p) -> tuple:
    """``(gradient, sharded)``: an FSDP2 parameter's whole gradient, its shards all-gathered (a
    collective: every process calls it for the same parameters in the same order, and every process
    gets the same tensor), and True; a plain parameter's own ``grad`` and False."""
    from torch.distributed.tensor import DTensor

    if isinstance(p.grad, DTensor):
        return p.grad.full_tensor(), True
    return p.grad, False


def local_part(whole, p):
    """``whole`` (a tensor of ``p``'s full shape, the same on every process) as a DTensor laid out as
    ``p``: each process keeps its own shard of it, without communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)


def is_sharded(model) -> bool:
    """FSDP2-sharded (DTensor parameters)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_partitioned(model) -> bool:
    """Its weights are split over the processes (FSDP2 or ZeRO-3): it cannot be deep-copied, and
    only inside ``whole_model`` do its parameters hold whole tensors."""
    return getattr(model, ZERO3_OFFLOAD, None) is not None or is_sharded(model)


@contextlib.contextmanager
def whole_model(model) -> Iterator[None]:
    """Inside: every FSDP2 unit of ``model`` holds its whole parameters as plain tensors (no
    collective in its forward, so processes may evaluate different numbers of batches or generate
    different lengths, and ``named_parameters`` reads whole tensors for saving). Every process must
    enter it. A model that is not sharded, or already whole (nested use), passes through unchanged."""
    from torch.distributed.fsdp import FSDPModule

    if getattr(model, WHOLE_FLAG, False):
        yield
        return
    if getattr(model, ZERO3_OFFLOAD, None) is not None:
        with _zero3_whole(model):
            yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        with _marked_whole(model):
            yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def _marked_whole(model) -> Iterator[None]:
    """``WHOLE_FLAG`` set on ``model`` for the duration (a nested ``whole_model`` passes through)."""
    setattr(model, WHOLE_FLAG, True)
    try:
        yield
    finally:
        setattr(model, WHOLE_FLAG, False)


@contextlib.contextmanager
def _zero3_whole(model) -> Iterator[None]:
    """ZeRO-3's ``whole_model``: every partitioned weight gathered (read-only) and DeepSpeed's module
    hooks off for the duration, so a forward neither re-gathers (a collective) nor releases them."""
    import deepspeed

    offload = getattr(model, ZERO3_OFFLOAD)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        offload._remove_module_hooks()
        try:
            with _marked_whole(model):
                yield
        finally:
            offload.setup_zero_stage3_hooks()


BLOCK_NAME = re.compile(r"(^|\.)(layer|layers|h|block|blocks)\.\d+$")  # the numbered transformer blocks


def block_class_names(model) -> list[str]:
    """Class names of the model's numbered transformer blocks (``...layer.3``, ``...layers.11``): the
    FSDP2 units. Named here rather than taken from the model's ``_no_split_modules``, which for some
    models (BERT: ``BertEmbeddings``) also names the module that holds the input embeddings, which
    Accelerate then shards twice."""
    names = {type(m).__name__ for n, m in model.named_modules() if BLOCK_NAME.search(n)}
    if not names:
        raise ValueError(f"hardware.strategy=fsdp found no numbered transformer blocks in {type(model).__name__}")
    return sorted(names)


def end_world_of_one() -> None:
    """At the end of a run: the LOCAL_RANK ``_init_single_process_group`` set removed (the process
    group of one stays, for the next run in this process)."""
    if set_for_a_world_of_one("LOCAL_RANK"):
        os.environ.pop("LOCAL_RANK")
        os.environ.pop(OWN_LOCAL_RANK)


def set_for_a_world_of_one(name: str) -> bool:
    """Whether environment variable ``name`` was set by ``_init_single_process_group`` (for
    DeepSpeed's engine, which reads LOCAL_RANK whenever it runs) here or in a parent process, not
    by a launcher."""
    return name == "LOCAL_RANK" and os.environ.get(OWN_LOCAL_RANK) == "1" and os.environ.get(name) == "0"


def autocast_sharded(accelerator, model) -> None:
    """After ``prepare``: Accelerate's FSDP2 and DeepSpeed paths leave out the autocast wrapper its other
    paths put on ``model.forward``; the same wrapper here, so that ``mixed_precision=bf16`` is the same
    compute under every strategy (without it an FSDP run at bf16 silently trains in fp32). A ZeRO-3
    model also keeps DeepSpeed's parameter coordinator, which ``whole_model`` needs."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32
    from accelerate.utils.modeling import get_mixed_precision_context_manager

    if uses_deepspeed(accelerator):
        inner = accelerator.unwrap_model(model)
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            setattr(inner, ZERO3_OFFLOAD, model.optimizer.parameter_offload)
        model = inner  # DeepSpeed's engine calls the module's forward
    elif accelerator.state.distributed_type.value != "FSDP":
        return
    if not accelerator.native_amp or hasattr(model, "_original_forward"):  # off, or Accelerate wrapped it
        return
    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model._original_forward = model.forward
    model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)


def plan_sharding(accelerator, model) -> None:
    """Before ``accelerator.prepare``: name the FSDP2 units (``block_class_names``)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and accelerator.state.distributed_type.value == "FSDP":
        plugin.transformer_cls_names_to_wrap = block_class_names(model)
