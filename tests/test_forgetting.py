"""analysis.forgetting: held-out perplexity of the base model's text before and after training (tiny
Llama, fixture data): the recorded figures against an independent computation on the rebuilt base
model and the saved adapter, the sampled texts' isolation from the run's random stream, the file
readers, and the refusals at validation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorabench.analysis.forgetting import forgetting_before, perplexity, read_texts, sample_sequences
from lorabench.cli import main
from lorabench.config import AnalysisConfig, DatasetConfig, ModelConfig
from lorabench.config_store import compose
from lorabench.errors import ConfigError, DataError
from lorabench.validate import validate_config
from tests.conftest import tiny_overrides

TEXTS = ["The cat sat on the mat.", "Numbers are fun: 1 2 3 4.", "A quick brown fox jumps over the lazy dog."]
TINY_LLAMA = ModelConfig(name="tiny_llama", random_init="tiny_llama", source="random", architecture="decoder")


def train(*overrides: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["train", *overrides])
    return exc.value.code


def independent_ppl(model, tokenizer, texts: list[str], max_length: int) -> float:
    """exp(total NLL / predicted tokens), one text at a time through transformers' own loss."""
    nll, count = 0.0, 0
    bos = (
        [tokenizer.bos_token_id]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False)
        else []
    )
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([(bos + tokenizer(text, add_special_tokens=False)["input_ids"])[:max_length]])
            n = ids.shape[1] - 1
            nll += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    return math.exp(nll / count)


def test_file_texts_before_and_after_equal_an_independent_perplexity(gsm8k_dir, tmp_path):
    from accelerate.utils import set_seed
    from peft import PeftModel

    from lorabench.models import load_model

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    args = [a for a in tiny_overrides("causal_lm", gsm8k_dir, tmp_path / "runs") if not a.startswith("train.max_steps")]
    overrides = ["method=lora", *args, "train.max_steps=3", "train.lr=0.02", "analysis.forgetting=true"]
    assert train(*overrides, f"analysis.forgetting_data={held}", "analysis.forgetting_texts=2") == 0
    (path,) = (tmp_path / "runs").rglob("record.json")
    record = json.loads(path.read_text())
    entry = record["analysis"]["forgetting"]
    assert entry["source"]["kind"] == "file" and Path(entry["source"]["path"]).name == "held.jsonl"
    assert entry["texts"] == 2  # analysis.forgetting_texts of the file's three
    assert record["analysis"]["intruders_per_layer"]  # the intruder analysis is still there

    set_seed(0)  # what build_run_parts does before it loads the model
    loaded = load_model(TINY_LLAMA, "causal_lm")
    base, tokenizer = loaded.model, loaded.tokenizer
    assert entry["ppl_before"] == pytest.approx(independent_ppl(base, tokenizer, TEXTS[:2], 64), rel=1e-5)
    bos = 1 if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False) else 0
    assert entry["tokens"] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + bos - 1 for t in TEXTS[:2])
    trained = PeftModel.from_pretrained(base, str(path.parent / "peft_adapter"))
    assert entry["ppl_after"] == pytest.approx(independent_ppl(trained, tokenizer, TEXTS[:2], 64), rel=1e-5)
    assert entry["ppl_after"] != pytest.approx(entry["ppl_before"], rel=1e-7)
    assert entry["ratio"] == pytest.approx(entry["ppl_after"] / entry["ppl_before"])


def test_sampled_texts_come_from_the_base_model_and_leave_the_random_stream_alone():
    from accelerate.utils import set_seed

    from lorabench.models import load_model

    set_seed(0)
    loaded = load_model(TINY_LLAMA, "causal_lm")
    model, tokenizer = loaded.model, loaded.tokenizer
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = sample_sequences(model, tokenizer, 3, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)  # the run's stream is untouched
    assert model.training and first == sample_sequences(model, tokenizer, 3, torch.device("cpu"))  # a fixed seed
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert len(first) == 3 and all(s[0] == start and 2 <= len(s) <= 65 for s in first)
    assert len({tuple(s) for s in first}) == 3

    cfg = SimpleNamespace(
        analysis=AnalysisConfig(forgetting=True, forgetting_texts=3),
        dataset=DatasetConfig(name="gsm8k", eval_batch_size=2),
    )
    parts = SimpleNamespace(cfg=cfg, model=model, tokenizer=tokenizer)
    main_process = SimpleNamespace(is_main_process=True, device=torch.device("cpu"))
    probe = forgetting_before(parts, main_process)
    assert probe.source["kind"] == "sampled" and probe.sequences == first
    assert model.training and all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    ppl, tokens = perplexity(model, first, "cpu", 3, tokenizer.pad_token_id)
    assert probe.ppl_before == pytest.approx(ppl) and probe.tokens == tokens == sum(len(s) - 1 for s in first)
    # the same figure, one sequence at a time through transformers' own loss
    model.eval()
    with torch.no_grad():
        nll = sum(
            float(model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss) * (len(s) - 1) for s in first
        )
    assert probe.ppl_before == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert forgetting_before(parts, SimpleNamespace(is_main_process=False, device=torch.device("cpu"))) is None


def test_read_texts_formats_and_errors(tmp_path):
    txt = tmp_path / "held.txt"
    txt.write_text("first text\n\n   \nsecond text\nthird\n", encoding="utf-8")
    assert read_texts(txt, 2) == ["first text", "second text"]
    jsonl = tmp_path / "held.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    assert read_texts(jsonl, 10) == ["one", "two"]
    jsonl.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"held\.jsonl:2: missing column"):
        read_texts(jsonl, 10)
    txt.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no text to score"):
        read_texts(txt, 10)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=tiny_bert", "dataset=sst2"], "model='tiny_bert' is an encoder \\(no language-model head\\)"),
        (["model=tiny_llama", "dataset=sst2"], "dataset='sst2' trains a classification head"),
        (["protocol=continual", "model=tiny_bert"], "model='tiny_bert' is an encoder"),
        (
            ["model=tiny_llama", "dataset=gsm8k", "analysis.forgetting_data=held.csv"],
            "valid choices: a .txt or .jsonl file",
        ),
        (["model=tiny_llama", "dataset=gsm8k", "analysis.forgetting_data=/no/such/held.txt"], "does not exist"),
    ],
)
def test_forgetting_is_refused_at_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose([*overrides, "analysis.forgetting=true"]))
    validate_config(compose([*overrides, "analysis.forgetting=false"]))  # the same run without the analysis is fine
