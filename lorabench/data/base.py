"""The dataset interface every task family implements, and the shared collate/subset helpers.

A family (``glue.py``, ``gsm8k.py``, ...) registers one :class:`Task` per dataset option. A task
loads raw examples from its source, turns training examples into token features, predicts on raw
evaluation examples (the loop shards them over processes) and scores the gathered predictions with
its official metric. Its ``version`` must be bumped whenever
the prompt, preprocessing or metric changes; it travels with every score in the record.

Importing this module (and every family module) does not import torch: the dataset registry and
the file readers serve config validation and the pre-flight checks, which run before any model
code loads. Readers raise ``DataError`` naming the file and line of the first bad row.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from lorabench.config import DatasetConfig
from lorabench.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch


@dataclass
class Splits:
    """Raw examples of one dataset plus where they came from."""

    train: list[dict]
    eval: list[dict]
    source: dict  # e.g. {"kind": "local", "path": ...} or {"kind": "hub", "hub_id": ..., "revision": ...}
    train_split: str = "train"
    eval_split: str = "validation"
    notes: list[str] = field(default_factory=list)


class Task(Protocol):
    name: str
    version: str
    head: str  # "classification" (sequence-classification head) or "causal_lm"
    num_labels: int | None
    metrics: tuple[str, ...]
    primary_metric: str
    higher_is_better: dict[str, bool]

    def load(self, cfg: DatasetConfig) -> Splits: ...

    def features(self, example: dict, tokenizer: Any, cfg: DatasetConfig) -> dict: ...

    def predict(self, model, tokenizer, examples: list[dict], cfg: DatasetConfig, device) -> list: ...

    def score(self, predictions: list, examples: list[dict]) -> dict[str, float]: ...

    def protocol(self, cfg: DatasetConfig) -> dict: ...


def subset(examples: list[dict], size: int | None, seed: int) -> list[dict]:
    """A fixed random subset (same for every run seed), or everything when size is None."""
    if size is None or size >= len(examples):
        return examples
    rng = random.Random(seed)
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), size))]


def require_file(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise DataError(f"dataset {dataset!r}: expected file {path} is missing")
    return path


def check_columns(path: Path | str, found: list[str], required: list[str]) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {found}")


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a leading BOM dropped). Bytes that are not UTF-8 raise
    ``DataError`` naming the file, line and column of the first one."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def open_text(path: Path) -> io.StringIO:
    """:func:`read_text` as a file object for ``csv.reader`` (newlines kept as in the file)."""
    return io.StringIO(read_text(path), newline="")


def check_string_fields(where: str, row: Any, required: list[str]) -> dict:
    """``row`` is a JSON object whose ``required`` fields are all strings; ``where`` is ``file:line``."""
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected a JSON object with {required}, found {type(row).__name__} {json.dumps(row)[:60]}"
        )
    check_columns(where, list(row), required)
    for key in required:
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} is {json.dumps(row[key])[:60]}; expected a string")
    return row


def read_jsonl(path: Path, required: list[str], check: Callable[[dict], Any] | None = None) -> list[dict]:
    """Rows of a jsonl file: each non-blank line a JSON object whose ``required`` fields are strings.
    ``check(row)`` may raise ``ValueError`` for a row the task cannot use. Every problem is a
    ``DataError`` naming ``file:line``; a file without rows is one too."""
    rows = []
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        check_string_fields(f"{path}:{line_no}", row, required)
        if check is not None:
            try:
                check(row)
            except ValueError as exc:
                raise DataError(f"{path}:{line_no}: {exc}") from None
        rows.append(row)
    return require_rows(path, rows)


def require_rows(path: Path | str, rows: list) -> list:
    """``rows``, or a ``DataError`` naming the file when it holds no example (an empty evaluation
    split would otherwise fail only at the first evaluation, after training)."""
    if not rows:
        raise DataError(f"{path}: the file is empty (no examples after the header, if any); every split needs data")
    return rows


# -- one load per run: the pre-flight checks load the splits, the training loop reuses them -------
_PRELOADED: dict[str, Splits] = {}


def _load_key(task: Any, cfg: DatasetConfig) -> str:
    name = getattr(task, "registry_name", getattr(task, "name", type(task).__name__))
    return json.dumps([name, dataclasses.asdict(cfg)], sort_keys=True, default=str)


def preload(task: Any, cfg: DatasetConfig) -> Splits:
    """``task.load(cfg)``, kept so that the next ``task.load`` with the same config returns it
    instead of reading the files again (lorabench.preflight loads before the run, train.py during)."""
    _PRELOADED.clear()
    splits = task.load(cfg)
    _PRELOADED[_load_key(task, cfg)] = splits
    return splits


def forget_preloaded() -> None:
    """Drop splits kept by :func:`preload` (called when the run they were loaded for is over)."""
    _PRELOADED.clear()


def reuses_preload(load: Callable) -> Callable:
    """Decorator for ``Task.load``: hand out (once) what :func:`preload` loaded for the same config."""

    @functools.wraps(load)
    def wrapper(self, cfg: DatasetConfig) -> Splits:
        kept = _PRELOADED.pop(_load_key(self, cfg), None)
        return kept if kept is not None else load(self, cfg)

    return wrapper


def resolve_primary(task: Task, cfg: DatasetConfig) -> str:
    primary = cfg.primary_metric or task.primary_metric
    if primary not in task.metrics:
        raise ConfigError(
            f"dataset.primary_metric={primary!r} is not a metric of {task.name!r}; "
            f"valid choices: {', '.join(task.metrics)}"
        )
    return primary


def collate(features: list[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of token features into a batch. ``labels`` are padded with -100 when they are
    sequences (language modelling) and stacked when they are class ids or regression targets."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": []}
    seq_labels = "labels" in features[0] and isinstance(features[0]["labels"], list)
    if seq_labels:
        batch["labels"] = []

    def padded(seq, value):
        fill = [value] * (width - len(seq))
        return fill + list(seq) if padding_side == "left" else list(seq) + fill

    for f in features:
        batch["input_ids"].append(padded(f["input_ids"], pad_token_id))
        batch["attention_mask"].append(padded([1] * len(f["input_ids"]), 0))
        if seq_labels:
            batch["labels"].append(padded(f["labels"], -100))
    out = {k: torch.tensor(v) for k, v in batch.items()}
    if "labels" in features[0] and not seq_labels:
        out["labels"] = torch.tensor([f["labels"] for f in features])
    return out


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


def truncate_at_stops(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """``text`` up to the first occurrence of any stop string (all of it when none occurs)."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def generate_texts(
    model, tokenizer, prompts: list[str], cfg: DatasetConfig, device, stop: tuple[str, ...] = (), **generate_kwargs
) -> list[str]:
    """Batched generation (left padding, KV cache; greedy, or beam with ``cfg.num_beams``): the
    decoded new tokens of each prompt. Prompts are tokenized as in ``lm_features`` (BOS only when
    the tokenizer adds one). With ``stop`` strings, a sequence stops once its text ends in one
    (transformers' ``stop_strings``) and each text is cut before the first stop string it holds."""
    import torch

    with torch.no_grad():
        return _generate_texts(model, tokenizer, prompts, cfg, device, stop, **generate_kwargs)


def _generate_texts(model, tokenizer, prompts, cfg, device, stop, **generate_kwargs) -> list[str]:
    bos = (
        [tokenizer.bos_token_id]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False)
        else []
    )
    if stop:
        generate_kwargs = {**generate_kwargs, "stop_strings": list(stop), "tokenizer": tokenizer}
    from lorabench.console import progress

    feats = [{"input_ids": bos + tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    # batches of similar lengths, longest first (the peak memory shows at once): less left padding to
    # attend over; the texts come back in the prompts' order
    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))
    outputs: list[str | None] = [None] * len(prompts)
    starts = range(0, len(order), cfg.eval_batch_size)
    for start in progress(starts, "generate", total=len(starts)):
        chunk = order[start : start + cfg.eval_batch_size]
        batch = collate([feats[i] for i in chunk], tokenizer.pad_token_id, padding_side="left")
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            num_beams=cfg.num_beams,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **generate_kwargs,
        )
        texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            outputs[i] = truncate_at_stops(text, stop)
    return outputs
