"""MetaMathQA (Yu et al., 2023) for training causal LMs, evaluated on the GSM8K test set.

Training: ``query`` -> ``response`` (a worked solution ending "The answer is: N"); loss on the
response tokens only (``gsm8k.lm_features``). ``dataset.train_size`` takes a fixed random subset
(e.g. 100000). Evaluation: the official GSM8K test split (1,319 problems) with the *same* prompt
template, greedy or beam generation, final-number exact match (``MathWordProblems.score``).

Prompt templates (``dataset.prompt_template``), named after the protocol they come from:

* ``plain`` = PEFT ``method_comparison/MetaMathQA``: ``Question: {query} Think step by step.\\nAnswer:``
* ``alpaca``: MetaMath's and LoRA-Pro's Alpaca prompt ("Below is an instruction ... ### Response:")
* ``qa``: LoRA-GA's ``Q: {query}\\nA: ``
* ``chat``: the tokenizer's chat template with the query as the user turn

Sources. Training data: ``dataset.data_dir`` is a MetaMathQA file (JSON list, or jsonl, of objects
with ``query``, ``response``, ``type``, ``original_question``) or a folder holding
``MetaMathQA-395K.json`` (the hub file name) or exactly one ``*.json`` / ``*.jsonl`` file;
without it, the hub dataset ``meta-math/MetaMathQA`` (``dataset.hub_id``). GSM8K test data:
``dataset.eval_data_dir`` when the config has that field, else ``<data_dir folder>/gsm8k/test.jsonl``
(official GSM8K jsonl), else the hub's ``openai/gsm8k``.

``metamathqa_gsm`` keeps only rows whose ``type`` contains "GSM" (the LoRA-GA and LoRA-Pro recipes;
their < 512-token filter is left to ``dataset.max_length`` truncation).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorabench.config import DatasetConfig
from lorabench.data.base import (
    Splits,
    check_string_fields,
    generate_texts,
    read_text,
    require_file,
    resolve_primary,
    reuses_preload,
    subset,
)
from lorabench.data.gsm8k import MathWordProblems, check_gsm8k_answer, lm_features, prompt_text, read_jsonl
from lorabench.errors import ConfigError, DataError
from lorabench.hub import hub_reachable
from lorabench.registry import DATASETS

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{query}\n\n### Response:"
)
TEMPLATES = {
    "plain": "Question: {query} Think step by step.\nAnswer:",  # PEFT method_comparison
    "alpaca": ALPACA,  # MetaMath, LoRA-Pro
    "qa": "Q: {query}\nA: ",  # LoRA-GA
}
# Generation is cut where the model starts a new prompt of the same template.
STOPS = {"plain": "\nQuestion:", "alpaca": "\n### Instruction", "qa": "\nQ:"}
REQUIRED = ["query", "response"]
HUB_FILE = "MetaMathQA-395K.json"


def math_prompt(query: str, tokenizer, template: str) -> str:
    if template == "chat":
        return prompt_text(query, tokenizer, "chat")
    if template not in TEMPLATES:
        raise ConfigError(
            f"dataset.prompt_template={template!r} is invalid for MetaMathQA; valid choices: "
            f"{', '.join([*TEMPLATES, 'chat'])}"
        )
    return TEMPLATES[template].format(query=query)


def read_metamathqa(path: Path) -> list[dict]:
    """Rows of a MetaMathQA file: a JSON list (the hub file) or jsonl, each with query and response."""
    if path.suffix == ".jsonl":
        return read_jsonl(path, REQUIRED)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects with {REQUIRED}, found {type(data).__name__}")
    for i, row in enumerate(data):
        check_string_fields(f"{path}[item {i}]", row, REQUIRED)
    return data  # emptiness is checked after the type filter, in load()


def find_train_file(root: Path) -> Path:
    if root.is_file():
        return root
    if (root / HUB_FILE).is_file():
        return root / HUB_FILE
    found = sorted([*root.glob("*.json"), *root.glob("*.jsonl")])
    if len(found) != 1:
        raise DataError(
            f"dataset 'metamathqa': {root} should hold {HUB_FILE} or exactly one .json/.jsonl file; "
            f"found {[p.name for p in found] or 'none'}"
        )
    return found[0]


class MetaMathQA(MathWordProblems):
    name = "metamathqa"
    version = "1"
    type_filter: str | None = None

    @reuses_preload
    def load(self, cfg: DatasetConfig) -> Splits:
        if cfg.source == "generated":
            raise ConfigError("dataset.source='generated' is not a MetaMathQA source; use local or hub")
        if cfg.source == "local" or (cfg.source == "auto" and cfg.data_dir):
            root = Path(cfg.data_dir or "")
            if not cfg.data_dir or not root.exists():
                raise DataError(
                    f"dataset.data_dir={cfg.data_dir!r} does not exist (expected a MetaMathQA "
                    ".json/.jsonl file or a folder holding one)"
                )
            path = find_train_file(root)
            train = read_metamathqa(path)
            source = {"kind": "local", "path": str(path.resolve()), "format": "MetaMathQA json"}
        else:
            train, source = self._hub_train(cfg)
        if self.type_filter:
            train = [r for r in train if self.type_filter in str(r.get("type", ""))]
            source["type_filter"] = f"type contains {self.type_filter!r}"
        evals, eval_source = self._gsm8k_test(cfg)
        source["eval"] = eval_source
        if not train or not evals:
            raise DataError(f"dataset {self.name!r} has an empty split (train={len(train)}, eval={len(evals)})")
        train = [{"query": r["query"], "response": r["response"], "type": r.get("type")} for r in train]
        return Splits(
            subset(train, cfg.train_size, cfg.subset_seed),
            subset(evals, cfg.eval_size, cfg.subset_seed),
            source,
            "train",
            "gsm8k/test",
        )

    def _hub_train(self, cfg: DatasetConfig) -> tuple[list[dict], dict]:
        hub_id = cfg.hub_id or "meta-math/MetaMathQA"
        reachable, reason = hub_reachable()
        if not reachable:
            raise DataError(
                f"dataset 'metamathqa': the hub is unreachable ({reason}); download {HUB_FILE} and "
                "pass dataset.data_dir=<that file or its folder>"
            )
        import datasets

        ds = datasets.load_dataset(hub_id, split="train")
        return [dict(r) for r in ds], {"kind": "hub", "hub_id": hub_id}

    def _gsm8k_test(self, cfg: DatasetConfig) -> tuple[list[dict], dict]:
        eval_dir = getattr(cfg, "eval_data_dir", None)
        if eval_dir is None and cfg.data_dir:
            root = Path(cfg.data_dir)
            candidate = (root if root.is_dir() else root.parent) / "gsm8k"
            eval_dir = str(candidate) if candidate.is_dir() else None
        if eval_dir is not None:
            path = require_file(Path(eval_dir) / "test.jsonl", "gsm8k (metamathqa eval)")
            return read_jsonl(path, ["question", "answer"], check_gsm8k_answer), {
                "kind": "local",
                "path": str(path.resolve()),
                "dataset": "gsm8k",
                "split": "test",
            }
        reachable, reason = hub_reachable()
        if not reachable:
            raise DataError(
                f"dataset 'metamathqa' evaluates on GSM8K test: the hub is unreachable ({reason}); "
                "put the official GSM8K test.jsonl in <data_dir>/gsm8k/"
            )
        import datasets

        ds = datasets.load_dataset("openai/gsm8k", "main", split="test")
        return [dict(r) for r in ds], {"kind": "hub", "hub_id": "openai/gsm8k", "config": "main", "split": "test"}

    def features(self, example: dict, tokenizer, cfg: DatasetConfig) -> dict:
        prompt = math_prompt(example["query"], tokenizer, cfg.prompt_template)
        sep = "" if cfg.prompt_template == "chat" or prompt[-1:].isspace() else " "
        return lm_features(prompt, sep + example["response"], tokenizer, cfg.max_length)

    def predict(self, model, tokenizer, examples: list[dict], cfg: DatasetConfig, device) -> list[str]:
        prompts = [math_prompt(e["question"], tokenizer, cfg.prompt_template) for e in examples]
        texts = generate_texts(model, tokenizer, prompts, cfg, device)
        stop = STOPS.get(cfg.prompt_template)
        return [t.split(stop)[0] if stop else t for t in texts]

    def protocol(self, cfg: DatasetConfig) -> dict:
        return {
            **super().protocol(cfg),
            "prompt_text": TEMPLATES.get(cfg.prompt_template, "tokenizer chat template"),
            "train_filter": self.type_filter,
            "eval_dataset": "gsm8k test",
            "primary_metric": resolve_primary(self, cfg),
        }


class MetaMathQAGSM(MetaMathQA):
    name = "metamathqa_gsm"
    type_filter = "GSM"


DATASETS.register("metamathqa")(MetaMathQA())
DATASETS.register("metamathqa_gsm")(MetaMathQAGSM())
