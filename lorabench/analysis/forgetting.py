"""Forgetting of the base model's own language: held-out perplexity before and after fine-tuning.

``analysis.forgetting=true`` (decoder models with a generation task; not part of the run id) scores
a fixed set of held-out texts with the model's language-model head twice: on the base model, just
before the method is applied (lorabench.train.prepare_run; PiSSA-like initialisers rewrite the base
weights there), and on the trained model after the final evaluation (lorabench.train.finish_record).
PEFT's method-comparison harness reports such a figure as a forgetting measure; a ratio above 1
means the fine-tuned model finds text it used to model well less likely.

The texts (``record["analysis"]["forgetting"]["source"]`` says which):

* ``analysis.forgetting_data``: a local ``.txt`` file (one text per line, blank lines skipped) or
  ``.jsonl`` file (a ``"text"`` string per row); the first ``analysis.forgetting_texts`` texts,
  each truncated to ``dataset.max_length`` tokens (a BOS token first when the tokenizer adds one);
* otherwise ``analysis.forgetting_texts`` continuations sampled from the base model itself
  (``source.kind = "sampled"``): from its BOS (else EOS) token, ``SAMPLE_TOKENS`` new tokens by plain
  ancestral sampling (temperature 1, no top-k/top-p), up to and including the first EOS, in batches
  of ``SAMPLE_BATCH`` with the fixed seed ``SAMPLE_SEED``, inside ``torch.random.fork_rng`` so the
  run's own random stream is untouched: the base model's text distribution, measured offline.

Perplexity = exp(sum of next-token negative log-likelihoods / number of predicted tokens) over all
texts (the first token of each is context only). Record entry: {source, texts, tokens, ppl_before,
ppl_after, ratio = ppl_after / ppl_before}. Computed on the main process only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lorabench.errors import ConfigError, DataError

SAMPLE_SEED = 1234
SAMPLE_TOKENS = 64
SAMPLE_BATCH = 8  # sequences sampled together: fixed, so the texts do not depend on the run's batch sizes
SUFFIXES = (".txt", ".jsonl")


def check_forgetting(cfg, heads: list[str]) -> None:
    """``analysis.forgetting`` needs a decoder trained through its LM head (``heads``: the run's task
    heads) and, when given, an existing ``.txt``/``.jsonl`` file. Torch-free; raises ConfigError."""
    analysis = cfg.analysis
    if not analysis.forgetting:
        return
    if cfg.model.architecture != "decoder" or any(h != "causal_lm" for h in heads):
        what = (
            f"model={cfg.model.name!r} is an {cfg.model.architecture} (no language-model head)"
            if cfg.model.architecture != "decoder"
            else f"dataset={cfg.dataset.name!r} trains a classification head, not the language-model head"
        )
        raise ConfigError(
            f"analysis.forgetting=true scores held-out text with the model's language-model head, but {what}; "
            "use a decoder model with a generation dataset (e.g. model=smollm2_135m dataset=gsm8k) "
            "or analysis.forgetting=false"
        )
    if analysis.forgetting_data:
        path = Path(analysis.forgetting_data)
        if path.suffix not in SUFFIXES:
            raise ConfigError(
                f"analysis.forgetting_data={analysis.forgetting_data!r} is invalid; "
                f"valid choices: a {' or '.join(SUFFIXES)} file"
            )
        if not path.is_file():
            raise ConfigError(f"analysis.forgetting_data={analysis.forgetting_data!r} does not exist or is not a file")


def read_texts(path: Path, limit: int) -> list[str]:
    """The first ``limit`` texts of a ``.txt`` (one per line) or ``.jsonl`` (``"text"``) file."""
    from lorabench.data.base import read_jsonl, read_text

    path = Path(path)
    if path.suffix == ".jsonl":
        texts = [row["text"] for row in read_jsonl(path, ["text"])]
    else:
        texts = [line for line in read_text(path).splitlines() if line.strip()]
    texts = [t for t in texts if t.strip()][:limit]
    if not texts:
        raise DataError(f"{path}: no text to score (analysis.forgetting_data)")
    return texts


@dataclass
class ForgettingProbe:
    """The held-out token sequences and the base model's perplexity on them."""

    source: dict
    sequences: list[list[int]]
    ppl_before: float
    tokens: int
    batch_size: int
    pad_token_id: int


def _file_sequences(path: str, limit: int, tokenizer, max_length: int) -> list[list[int]]:
    bos = (
        [tokenizer.bos_token_id]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False)
        else []
    )
    sequences = [
        (bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:max_length] for t in read_texts(path, limit)
    ]
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise DataError(f"{path}: every text is shorter than two tokens (analysis.forgetting_data)")
    return sequences


def sample_sequences(model, tokenizer, count: int, device) -> list[list[int]]:
    """``count`` continuations sampled from ``model`` in eval mode (see the module docstring), as
    token ids starting with the start token."""
    import torch
    from transformers import GenerationConfig

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_beams=1,
        max_new_tokens=SAMPLE_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    devices = [device] if getattr(device, "type", str(device)) == "cuda" else []
    sequences = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(SAMPLE_SEED)
        for begin in range(0, count, SAMPLE_BATCH):
            n = min(SAMPLE_BATCH, count - begin)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
            for row in out.tolist():
                generated = row[1:]
                if tokenizer.eos_token_id in generated:
                    generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
                sequences.append([start, *generated])
    model.train(was_training)
    return [s for s in sequences if len(s) >= 2]


def perplexity(model, sequences: list[list[int]], device, batch_size: int, pad_token_id: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over every predicted token of ``sequences``, and their count."""
    import torch
    import torch.nn.functional as F

    from lorabench.data.base import collate

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for begin in range(0, len(sequences), batch_size):
                batch = collate([{"input_ids": s} for s in sequences[begin : begin + batch_size]], pad_token_id)
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
                keep = mask[:, 1:].to(nll.dtype)
                total += float((nll * keep).sum(dtype=torch.float64))
                count += int(keep.sum())
    finally:
        model.train(was_training)
    return math.exp(total / count), count


def forgetting_before(parts, accelerator) -> ForgettingProbe | None:
    """The probe on the base model of ``parts`` (lorabench.train.RunParts), before the method is
    applied; None on processes other than the main one."""
    if not accelerator.is_main_process:
        return None
    cfg, model, tokenizer = parts.cfg, parts.model, parts.tokenizer
    analysis, device = cfg.analysis, accelerator.device
    batch = cfg.dataset.eval_batch_size
    home = next(model.parameters()).device
    model.to(device)
    was_training = model.training
    model.eval()
    try:
        if analysis.forgetting_data:
            source = {"kind": "file", "path": str(Path(analysis.forgetting_data).resolve())}
            sequences = _file_sequences(
                analysis.forgetting_data, analysis.forgetting_texts, tokenizer, cfg.dataset.max_length
            )
        else:
            source = {"kind": "sampled", "seed": SAMPLE_SEED, "new_tokens": SAMPLE_TOKENS, "temperature": 1.0}
            sequences = sample_sequences(model, tokenizer, analysis.forgetting_texts, device)
        ppl, tokens = perplexity(model, sequences, device, batch, tokenizer.pad_token_id)
    finally:
        model.train(was_training)
        model.to(home)
    print(
        f"[lorabench] forgetting probe: {len(sequences)} {source['kind']} texts, {tokens} tokens, "
        f"base perplexity {ppl:.3f}"
    )
    return ForgettingProbe(source, sequences, ppl, tokens, batch, tokenizer.pad_token_id)


def forgetting_after(probe: ForgettingProbe, model, device) -> dict:
    """The record's ``analysis.forgetting`` entry: the probe scored again on the trained ``model``."""
    ppl, tokens = perplexity(model, probe.sequences, device, probe.batch_size, probe.pad_token_id)
    print(f"[lorabench] forgetting: perplexity {probe.ppl_before:.3f} -> {ppl:.3f} on the held-out texts")
    return {
        "source": probe.source,
        "texts": len(probe.sequences),
        "tokens": tokens,
        "ppl_before": probe.ppl_before,
        "ppl_after": ppl,
        "ratio": ppl / probe.ppl_before,
    }
