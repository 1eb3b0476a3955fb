"""What a finished run leaves for Hugging Face users, beside its record (main process only):

* adapter methods: ``adapter.safetensors`` (every trainable tensor and the adapter buffers a reload
  needs; lorabench's own format, read by ``lorabench.methods.adapters.layer``), and for peft-backed
  adapters also ``peft_adapter/`` (``save_pretrained``: loads with ``PeftModel.from_pretrained``) with
  the tokenizer, and the base model's hub id as ``base_model_name_or_path`` (the path the run loaded
  it from is machine-specific; a model without a hub id, e.g. a tiny random one, records none);
* full-weight methods (full fine-tuning, the GaLore family, LISA, BAdam): ``model/``, the whole
  trained model through ``save_pretrained`` (safetensors) with the tokenizer, unless
  ``checkpoint.save_model=false`` (sweeps that only want the numbers).

Returns the record's ``outputs`` entry: what was written, relative to the run folder, and sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorabench.methods.adapters.layer import save_trainable
from lorabench.methods.adapters.xlora import PEFT_ADAPTER_DIR

MODEL_DIR = "model"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def whole_state_dict(model) -> dict | None:
    """A sharded model's (FSDP2, inside ``lorabench.distributed.whole_model``) state dict of whole
    tensors, copied to host memory one by one (FSDP2's gathered parameters are views of one buffer per
    unit, which the savers' alias check cannot handle): its ``state_dict()`` would return the shards.
    None (the model's own) when not sharded."""
    from lorabench.distributed import is_sharded

    if not is_sharded(model):
        return None
    tensors = dict(model.named_parameters(remove_duplicate=False))
    for prefix, module in model.named_modules(remove_duplicate=False):  # persistent buffers, as state_dict keeps
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors[f"{prefix}.{name}" if prefix else name] = buffer
    return {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}


def portable_model_card(folder: Path) -> None:
    """peft's model card (``README.md``) names the base model by the path it was loaded from, for a
    local or cached model this machine's absolute path: rewritten in portable form
    (``<lorabench-cache>/...``; lorabench.fingerprint.portable_text), as records are."""
    from lorabench.fingerprint import portable_text

    card = folder / "README.md"
    if card.is_file():
        card.write_text(portable_text(card.read_text(encoding="utf-8"), everywhere=True), encoding="utf-8")


def _save_peft(model, tokenizer, run_dir: Path, hub_id: str | None) -> dict | None:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or str(getattr(config, "peft_type", "")) in ("XLORA", "PeftType.XLORA"):
        return None  # X-LoRA's own folder layout is peft's; lorabench saves its classifier in adapter.safetensors
    config.base_model_name_or_path = hub_id
    folder = run_dir / PEFT_ADAPTER_DIR
    model.save_pretrained(folder, state_dict=whole_state_dict(model))
    tokenizer.save_pretrained(folder)
    portable_model_card(folder)
    return {"path": PEFT_ADAPTER_DIR, "bytes": _folder_bytes(folder), "base_model_name_or_path": hub_id}


def save_outputs(model, tokenizer, run_dir: Path, *, has_adapter: bool, hub_id: str | None, save_model: bool) -> dict:
    """Write the run's loadable outputs (see the module docstring) and describe them."""
    outputs: dict = {}
    if has_adapter:
        path = run_dir / "adapter.safetensors"
        tmp = path.with_suffix(".tmp")
        save_trainable(model, tmp)
        os.replace(tmp, path)
        outputs["adapter"] = {"path": path.name, "bytes": path.stat().st_size}
        peft = _save_peft(model, tokenizer, run_dir, hub_id)
        if peft:
            outputs["peft_adapter"] = peft
    elif save_model:
        folder = run_dir / MODEL_DIR
        model.save_pretrained(folder, safe_serialization=True, state_dict=whole_state_dict(model))
        tokenizer.save_pretrained(folder)
        outputs["model"] = {"path": MODEL_DIR, "bytes": _folder_bytes(folder)}
    return outputs
