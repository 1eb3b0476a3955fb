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


def _save_peft(model, tokenizer, run_dir: Path, hub_id: str | None) -> dict | None:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or str(getattr(config, "peft_type", "")) in ("XLORA", "PeftType.XLORA"):
        return None  # X-LoRA's own folder layout is peft's; lorabench saves its classifier in adapter.safetensors
    config.base_model_name_or_path = hub_id
    folder = run_dir / PEFT_ADAPTER_DIR
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
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
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        outputs["model"] = {"path": MODEL_DIR, "bytes": _folder_bytes(folder)}
    return outputs
