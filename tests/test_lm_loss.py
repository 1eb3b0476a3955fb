"""The memory-saving forms of the causal-LM loss (lorabench/lm_loss.py) equal transformers' loss
over the full logits, and so do their gradients; ``hardware=cpu_lowmem`` trains the same run as
``hardware=cpu``; ``hardware.release_memory`` sets glibc's allocator."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lorabench.config import ModelConfig
from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.lm_loss import forward_loss
from lorabench.models import load_model
from lorabench.validate import validate_config


def _tiny_llama():
    torch.manual_seed(0)
    return load_model(
        ModelConfig(name="tiny_llama", random_init="tiny_llama", source="random", architecture="decoder"), "causal_lm"
    ).model


def _batch() -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (3, 12))
    labels = ids.clone()
    labels[0, :7] = -100  # prompts of different lengths, one row padded at the end
    labels[1, :4] = -100
    labels[2, :9] = -100
    labels[2, 11:] = -100
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, **how):
    model.zero_grad()
    loss = forward_loss(model, _batch(), **how)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("how", [{"labelled_only": True}, {"chunk": 1}, {"chunk": 5}, {"chunk": 4096}])
def test_memory_saving_losses_and_gradients_equal_the_full_ones(how):
    """The model in float64; the cross-entropy itself runs in float32 on both sides (transformers'
    loss and ours upcast the logits with ``.float()``), so the loss and gradients agree to float32
    summation order, which differs between CPUs: on an AMD EPYC with AVX-512 the loss differed by
    9e-8 relative, and in an all-float32 model one gradient entry in 1.5 million by 1.5e-6."""
    model = _tiny_llama().double()
    full, full_grads = _loss_and_grads(model)
    part, grads = _loss_and_grads(model, **how)
    assert part == pytest.approx(full, rel=1e-6)
    assert len(grads) == len(full_grads)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert "forward" not in vars(model.get_output_embeddings())  # the head's own forward is back


def test_chunked_loss_reaches_adapter_weights_through_peft():
    from peft import LoraConfig, get_peft_model

    model = _tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    full, full_grads = _loss_and_grads(peft_model)
    part, grads = _loss_and_grads(peft_model, chunk=3)
    assert part == pytest.approx(full, rel=1e-6)
    assert len(grads) == len(full_grads) > 0
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_chunked_loss_refuses_a_model_with_a_logit_softcap():
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final logit softcap: use hardware.loss_chunk=null"):
        forward_loss(model, _batch(), chunk=4)


@pytest.mark.parametrize("key", ["hardware.labelled_logits=true", "hardware.loss_chunk=64"])
def test_memory_saving_losses_are_refused_for_a_classification_head(key):
    with pytest.raises(ConfigError, match=f"{key.split('=')[0]}=.* applies to language-model losses"):
        validate_config(compose(["model=tiny_bert", "dataset=sst2", key]))


def test_loss_chunk_must_be_positive():
    with pytest.raises(ConfigError, match="hardware.loss_chunk=0 is invalid"):
        validate_config(compose(["hardware.loss_chunk=0"]))


def test_release_memory_sets_the_allocator_in_a_fresh_process():
    """Run in a child process: the setting would slow every later allocation of the test session."""
    code = "from lorabench.memory import release_freed_memory; print(release_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    if sys.platform.startswith("linux"):
        assert "freed buffers return to the system" in out
    else:
        assert "no glibc mallopt" in out


def test_cpu_lowmem_trains_the_same_run_as_cpu(tmp_path, gsm8k_dir):
    from tests.conftest import tiny_overrides
    from tests.test_resume import train

    preset = compose(["hardware=cpu_lowmem"])["hardware"]
    assert (preset["gradient_checkpointing"], preset["loss_chunk"], preset["release_memory"]) == (True, 256, True)
    logs = {}
    # release_memory stays off here: it would change this test process's allocator for good
    for hardware in ("hardware=cpu", "hardware=cpu_lowmem", "hardware.loss_chunk=3"):
        out = tmp_path / hardware.replace("=", "-")
        extra = (hardware, "hardware.release_memory=false", "train.max_steps=3")
        overrides = tiny_overrides("causal_lm", gsm8k_dir, out, *extra)
        assert train("method=lora", *overrides) == 0
        (record_file,) = out.glob("*/record.json")
        record = json.loads(record_file.read_text())
        assert record["status"] == "completed"
        logs[hardware] = [entry["loss"] for entry in record["train_log"]]
    assert len(logs["hardware=cpu"]) >= 2
    assert logs["hardware=cpu_lowmem"] == pytest.approx(logs["hardware=cpu"], rel=1e-5)
    assert logs["hardware.loss_chunk=3"] == pytest.approx(logs["hardware=cpu"], rel=1e-5)
