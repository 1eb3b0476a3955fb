"""hardware.labelled_logits: the causal-LM loss from the labelled positions' logits only equals
transformers' loss over the full logits, and so do its gradients."""

from __future__ import annotations

import pytest
import torch

from lorabench.config import ModelConfig
from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.models import load_model
from lorabench.train import forward_loss
from lorabench.validate import validate_config


def test_labelled_only_loss_and_gradients_equal_the_full_ones():
    torch.manual_seed(0)
    model = load_model(
        ModelConfig(name="tiny_llama", random_init="tiny_llama", source="random", architecture="decoder"), "causal_lm"
    ).model
    ids = torch.randint(3, 100, (3, 12))
    labels = ids.clone()
    labels[0, :7] = -100  # prompts of different lengths, one row padded at the end
    labels[1, :4] = -100
    labels[2, :9] = -100
    labels[2, 11:] = -100
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    full = forward_loss(model, batch)
    full.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    part = forward_loss(model, batch, labelled_only=True)
    part.backward()
    assert part.item() == pytest.approx(full.item(), rel=1e-6)
    for a, p in zip(full_grads, model.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


def test_labelled_logits_is_refused_for_a_classification_head():
    with pytest.raises(ConfigError, match="hardware.labelled_logits=true applies to language-model losses"):
        validate_config(compose(["model=tiny_bert", "dataset=sst2", "hardware.labelled_logits=true"]))
