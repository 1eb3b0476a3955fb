"""How a run is spread over processes: ``hardware.strategy`` (``ddp``, ``fsdp``), the Accelerator
that runs it, and the context in which a sharded model is whole again.

* ``ddp``: every process holds the whole model; gradients are averaged (Accelerate's DDP, gloo on
  CPU, NCCL on CUDA). The default, and the only strategy of a one-process run unless another is named.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Accelerate's
  ``FullyShardedDataParallelPlugin(fsdp_version=2)``: every transformer block (the model's
  ``_no_split_modules``) and the root are sharded along dim 0 over the processes; parameters,
  gradients and optimizer state are ``DTensor`` shards, gathered for each block's forward and
  backward. Accelerate detects FSDP only for accelerator devices; on CPU (gloo) the same plugin and
  ``prepare`` path run once the state names FSDP (``new_accelerator``), which is how the CPU tests
  check FSDP2 against the one-process run.

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

STRATEGIES = ("ddp", "fsdp")
SHARDED = ("fsdp",)
# What a component's ``sharding`` declaration means (lorabench.method_params.registry.ParamsEntry):
#   "any": elementwise on parameters and gradients, acting only through the forward, or gathering what it
#   needs whole (the GaLore-family optimizers gather each projected gradient: whole_gradient): runs on shards;
#   a string other than "any": the reason it needs whole tensors, which a sharded strategy refuses with.
ANY = "any"
_DETECTED_TYPE: list = []  # the PartialState's own distributed type while an FSDP run overrides it
WHOLE_FLAG = "_lorabench_whole"  # set on a model while ``whole_model`` holds its shards gathered


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


def _init_single_process_group(cpu: bool) -> None:
    """FSDP needs a process group even on one process (``hardware.num_processes=1``): a world of one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from lorabench.launch import _free_port

        os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo" if cpu else "nccl", rank=0, world_size=1)


def new_accelerator(cpu: bool, mixed_precision: str, strategy: str = "ddp"):
    """The run's Accelerator. Accelerate keeps one process-wide ``AcceleratorState`` and refuses a
    second Accelerator at another precision; a later run in the same process (a sweep, a protocol's
    stages, a notebook, the tests) at another ``mixed_precision`` or strategy clears that state
    first. The ``PartialState`` (device, process group of a distributed launch) is kept.

    The LR schedule steps once per optimizer step (``step_scheduler_with_optimizer=False``):
    ``train.max_steps`` counts optimizer steps of the global batch, while Accelerate's default steps
    the schedule ``num_processes`` times per step (it assumes one built for a per-process data loader),
    which ran a 2-process run's schedule twice as fast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, mixed_precision) or (
        state and (state.get("distributed_type") == DistributedType.FSDP) != (strategy == "fsdp")
    ):
        AcceleratorState._reset_state(reset_partial_state=False)
        if _DETECTED_TYPE:  # undo an earlier FSDP run's override of the process-wide type
            PartialState._shared_state["distributed_type"] = _DETECTED_TYPE.pop()
    if strategy != "fsdp":
        return Accelerator(cpu=cpu, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False)
    plugin = fsdp_plugin()
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, fsdp_plugin=plugin, step_scheduler_with_optimizer=False
    )
    _init_single_process_group(cpu)  # a launched run's group exists by now
    if accelerator.state.distributed_type != DistributedType.FSDP:  # CPU (gloo) or one process
        # every later AcceleratorState() copies the type from the PartialState, so both name FSDP, as
        # Accelerate itself leaves them for FSDP on GPUs
        _DETECTED_TYPE.append(PartialState._shared_state["distributed_type"])
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    # no FSDP parameter casting (its bf16 policy runs norms, softmax and the loss in bf16): the run's
    # autocast (autocast_sharded) sets the compute precision as under every other strategy, over fp32 shards
    plugin.mixed_precision_policy = None
    return accelerator


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
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def whole_model(model) -> Iterator[None]:
    """Inside: every FSDP2 unit of ``model`` holds its whole parameters as plain tensors (no
    collective in its forward, so processes may evaluate different numbers of batches or generate
    different lengths, and ``named_parameters`` reads whole tensors for saving). Every process must
    enter it. A model that is not sharded, or already whole (nested use), passes through unchanged."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units or getattr(model, WHOLE_FLAG, False):
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    setattr(model, WHOLE_FLAG, True)
    try:
        yield
    finally:
        setattr(model, WHOLE_FLAG, False)
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


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


def autocast_sharded(accelerator, model) -> None:
    """After ``prepare``: Accelerate's FSDP2 path leaves out the autocast wrapper its other paths put on
    ``model.forward``; the same wrapper here, so that ``mixed_precision=bf16`` is the same compute under
    every strategy (without it an FSDP run at bf16 silently trains in fp32)."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32
    from accelerate.utils.modeling import get_mixed_precision_context_manager

    if accelerator.state.distributed_type.value != "FSDP" or not accelerator.native_amp:
        return
    if hasattr(model, "_original_forward"):  # Accelerate wrapped it after all
        return
    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model._original_forward = model.forward
    model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)


def plan_sharding(accelerator, model) -> None:
    """Before ``accelerator.prepare``: name the FSDP2 units (``block_class_names``)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and accelerator.state.distributed_type.value == "FSDP":
        plugin.transformer_cls_names_to_wrap = block_class_names(model)
