"""The fixed problem of Flexora's parity check (scripts/parity/flexora.py writes the fixture,
tests/test_parity_flexora.py reads it).

A 4-layer Llama with random weights (hidden 32, GQA: q_proj 32 x 32, v_proj 16 x 32, vocab 64,
eager attention) and peft LoRA (rank 4, alpha 8, no dropout) on q_proj and v_proj, the authors'
``lora_target``. The data are seeded random token batches (2 x 12 tokens, labels = inputs, so the
loss is the causal LM's own); the calibration batches of a case are its training share followed by
its validation share, the order lorabench's split takes them in (the last ones are held out).
"""

from __future__ import annotations

import torch

LAYERS, HIDDEN, VOCAB, SEQ, BATCH = 4, 32, 64, 12, 2
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
MODEL_SEED, LORA_SEED = 0, 1


def tiny_llama(seed: int = MODEL_SEED):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def token_batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def lora_tensors(model) -> dict[str, torch.Tensor]:
    """The LoRA factors by a name without peft's prefix and adapter name: ``layers.0.self_attn.q_proj.lora_A``."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            short = name[name.index("layers.") :].replace(".default.weight", "")
            out[short] = p
    return out


def checksum(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {n: [t.detach().double().sum().item(), t.detach().double().abs().sum().item()] for n, t in tensors.items()}
