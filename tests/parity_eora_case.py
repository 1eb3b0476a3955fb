"""The EoRA parity case, shared by scripts/parity/eora.py (which runs the authors' code on it) and
tests/test_compressed.py (which runs ours): a one-block decoder-shaped model with Llama's projection
names, seeded weights, a fixed "compression" of every projection and seeded calibration sequences.

One block, because the authors' ``llama_sequential_eigen`` gathers a block's inputs from the blocks
before it already compensated, while lorabench gathers every layer's inputs from the uncompressed
model in one pass: with one block the two are the same inputs, so the comparison isolates the rule
(the second moments' running update, the eigenspace projection, the truncation and the factors).
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, INTERMEDIATE, SEQUENCES, LENGTH, VOCAB, RANK = 24, 40, 6, 20, 50, 4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False), nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj, self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False), nn.Linear(HIDDEN, HIDDEN, bias=False)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)


class Block(nn.Module):
    """A gated residual block over Llama's projection names (no attention softmax: the rule under
    test only sees each projection's inputs)."""

    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = Attention(), Mlp()

    def forward(self, x, attention_mask=None, **_):
        a = self.self_attn
        x = x + a.o_proj(torch.tanh(a.q_proj(x)) * a.v_proj(x) + a.k_proj(x))
        m = self.mlp
        return (x + m.down_proj(nn.functional.silu(m.gate_proj(x)) * m.up_proj(x)),)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([Block()])
        self.norm = nn.LayerNorm(HIDDEN)


class Config:
    use_cache, hidden_size = False, HIDDEN


class TinyDecoder(nn.Module):
    """What the reference's function reads: ``.model.{embed_tokens, layers, norm}``, ``.config`` and
    ``.seqlen``; the forward calls each block with ``attention_mask=`` as Llama's does."""

    def __init__(self):
        super().__init__()
        self.model, self.config, self.seqlen = Inner(), Config(), LENGTH

    def forward(self, input_ids):
        h = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            h = block(h, attention_mask=None)[0]
        return self.model.norm(h)


def build() -> tuple[TinyDecoder, torch.Tensor, dict[str, torch.Tensor]]:
    """The seeded model, the calibration token ids (SEQUENCES x LENGTH) and each projection's
    "compressed" weight (rounded to a per-row grid of 7 levels: a fixed, deterministic error),
    keyed as the reference keys them (``model.layers.0.<module>.<projection>``)."""
    torch.manual_seed(0)
    model = TinyDecoder()
    ids = torch.randint(0, VOCAB, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(1))
    compressed = {}
    for name, m in model.model.layers[0].named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
            step = w.abs().amax(dim=1, keepdim=True) / 3
            compressed[f"model.layers.0.{name}"] = (torch.round(w / step).clamp(-3, 3) * step).clone()
    return model, ids, compressed
