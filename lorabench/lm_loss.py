"""The training loss of one micro-batch, and two ways to compute a causal-LM loss in less memory.

All three give transformers' ``ForCausalLMLoss``: the mean cross-entropy over labelled next tokens,
with the logits upcast to fp32.

- ``hardware.labelled_logits``: the LM head runs only at the positions whose next token is labelled
  in some row (transformers' ``logits_to_keep``), so prompt and padding positions get no logits.
- ``hardware.loss_chunk=N``: the LM head and the cross-entropy run over the labelled positions in
  chunks of N, each chunk under activation checkpointing. The (positions x vocabulary) logits, their
  log-softmax and its gradient are never held whole, only one chunk of them. For SmolLM2's
  49,152-word vocabulary the whole is 0.2 GB per tensor for a quickstart batch of ~1,160 labelled
  positions, and the backward holds three such tensors. The model's forward runs as usual, up to the
  output embedding, whose input is taken and whose output is replaced by a placeholder.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from lorabench.errors import ConfigError

IGNORE = -100


def forward_loss(model, batch: dict, labelled_only: bool = False, chunk: int | None = None) -> torch.Tensor:
    """The batch's training loss: the model's own (``model(**batch).loss``), or one of the two
    memory-saving forms of the same causal-LM loss (module docstring)."""
    if chunk is not None:
        return chunked_causal_lm_loss(model, batch, chunk)
    if labelled_only:
        return labelled_positions_loss(model, batch)
    return model(**batch).loss


def labelled_positions_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy from the logits of the positions whose next token is labelled in some row."""
    labels = batch["labels"]
    keep = torch.nonzero((labels[:, 1:] != IGNORE).any(dim=0)).flatten()
    logits = model(**_inputs(batch), logits_to_keep=keep).logits
    targets = labels[:, keep + 1]
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def chunked_causal_lm_loss(model, batch: dict, chunk: int) -> torch.Tensor:
    """Cross-entropy over the labelled positions, ``chunk`` positions at a time: for each chunk
    ``sum CE(head(h_chunk).float(), y_chunk)`` under ``torch.utils.checkpoint``, then the sum over
    chunks divided by the number of labelled positions."""
    head = output_embedding(model)
    hidden = _hidden_before_head(model, head, batch)
    labels = batch["labels"][:, 1:]
    labelled = labels != IGNORE
    states, targets = hidden[:, :-1][labelled], labels[labelled]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_cross_entropy, head, states[part], targets[part], use_reentrant=False)
    return total / targets.numel()


def output_embedding(model) -> torch.nn.Module:
    """The module that turns the last hidden states into logits (through DDP and peft wrappers);
    refused for a model that transforms its logits after it (a softcap), which the chunks would skip."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = inner.get_output_embeddings()
    config = getattr(inner, "config", None)
    if head is None or getattr(config, "final_logit_softcapping", None):
        raise ConfigError(
            f"hardware.loss_chunk needs a causal LM whose logits are its output embedding's output; "
            f"{type(inner).__name__} has "
            + ("no output embedding" if head is None else "a final logit softcap")
            + ": use hardware.loss_chunk=null (hardware.labelled_logits=true also saves memory)"
        )
    return head


def _hidden_before_head(model, head: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Run the model's forward with the output embedding replaced by one that records its input and
    returns a (batch, length, 1) placeholder; the recorded input is returned."""
    seen: list[torch.Tensor] = []

    def record(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(hidden)
        return hidden.new_zeros(hidden.shape[:-1] + (1,))

    head.forward = record
    try:
        model(**_inputs(batch))
    finally:
        del head.forward  # back to the class's forward
    (hidden,) = seen
    return hidden


def _chunk_cross_entropy(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(states).float(), targets, reduction="sum")


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}
