"""A finished run leaves what a Hugging Face user expects: full-weight methods a ``model/`` folder
that plain transformers loads (the same logits as the trained weights the run checkpointed), peft
adapters a ``peft_adapter/`` folder with the tokenizer and the hub id, that plain peft loads with
the trained tensors; ``checkpoint.save_model=false`` skips the model folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lorabench.checkpoint import list_checkpoints
from tests.conftest import tiny_overrides
from tests.test_resume import only_run_dir, train


@pytest.mark.parametrize("method", ["full", "galore"])
def test_full_weight_methods_save_a_model_plain_transformers_loads(method, gsm8k_dir, tmp_path):
    args = tiny_overrides("causal_lm", gsm8k_dir, tmp_path, "checkpoint.every=2")
    assert train(f"method={method}", *args) == 0
    run_dir = only_run_dir(tmp_path)
    record = json.loads((run_dir / "record.json").read_text())
    assert record["outputs"]["model"]["path"] == "model" and record["outputs"]["model"]["bytes"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    trained = load_file(str(list_checkpoints(run_dir)[-1] / "trainable.safetensors"))  # the final step's weights
    reference = AutoModelForCausalLM.from_config(loaded.config).eval()
    missing, unexpected = reference.load_state_dict(trained, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    reference.tie_weights()
    batch = tokenizer(["Question: 2 + 3 = ?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, reference(**batch).logits)


def test_sweeps_can_skip_the_model_folder(gsm8k_dir, tmp_path):
    assert train("method=full", *tiny_overrides("causal_lm", gsm8k_dir, tmp_path), "checkpoint.save_model=false") == 0
    run_dir = only_run_dir(tmp_path)
    assert (
        not (run_dir / "model").exists() and "model" not in json.loads((run_dir / "record.json").read_text())["outputs"]
    )


# AdaLoRA's folder is written too, but peft's loader resizes its factors by the saved rank pattern, so
# its tensors do not come back as trained: an open finding (the issue notes), not checked here
@pytest.mark.parametrize("method", ["lora", "vera"])
def test_peft_adapters_load_in_plain_peft_with_the_hub_id_and_tokenizer(method, sst2_dir, tmp_path):
    from peft import PeftModel

    args = [a for a in tiny_overrides("classification", sst2_dir, tmp_path) if a != "model=tiny_bert"]
    assert train(f"method={method}", "model=minilm_l6", "dataset.eval_size=8", *args) == 0
    run_dir = only_run_dir(tmp_path)
    folder = run_dir / "peft_adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # the hub id, not a path
    assert (folder / "tokenizer_config.json").is_file()
    from lorabench.models import minilm_package

    base = AutoModelForSequenceClassification.from_pretrained(minilm_package()[0], num_labels=2)
    peft_model = PeftModel.from_pretrained(base, folder)
    ours = load_file(str(run_dir / "adapter.safetensors"))
    theirs = dict(peft_model.named_parameters())
    shared = [name for name in ours if name in theirs]
    assert len(shared) >= len([n for n in ours if "classifier" not in n]) // 2 and shared
    for name in shared:
        assert torch.equal(ours[name], theirs[name].detach()), name


def test_the_pretrained_snapshot_on_disk_equals_the_in_memory_one_and_is_removed():
    import os

    from lorabench.analysis.intruders import snapshot, snapshot_to_file
    from lorabench.config import ModelConfig
    from lorabench.models import load_model

    tiny = ModelConfig(name="tiny_llama", random_init="tiny_llama", source="random", architecture="decoder")
    model = load_model(tiny, "causal_lm").model
    in_memory = snapshot(model, ["q_proj", "v_proj"])
    saved = snapshot_to_file(model, ["q_proj", "v_proj"])
    assert sorted(saved) == sorted(in_memory) and len(saved) == len(in_memory) > 0
    for key, value in in_memory.items():
        assert torch.equal(saved[key], value)
    path = saved.path
    assert os.path.exists(path)
    saved.discard()
    assert not os.path.exists(path)


def test_the_peft_model_card_names_no_machine_path(tmp_path, monkeypatch):
    """peft's README.md names the base model by the folder it loaded from: written portable."""
    from lorabench.outputs import portable_model_card

    cache = tmp_path / "cache"
    monkeypatch.setenv("LORABENCH_CACHE", str(cache))
    (tmp_path / "README.md").write_text(f"---\nbase_model: {cache}/smollm2_135m_fp32\n---\n")
    portable_model_card(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert str(tmp_path) not in text and "<lorabench-cache>/smollm2_135m_fp32" in text, text
