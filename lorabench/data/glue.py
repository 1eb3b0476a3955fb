"""GLUE (Wang et al., 2018) for encoder models with a classification or regression head.

Sources: the hub dataset ``nyu-mll/glue`` or a local folder with the official GLUE TSV files
(``dataset.data_dir=``, e.g. ``SST-2/`` holding ``train.tsv`` and ``dev.tsv``). Official metrics:
Matthews correlation (CoLA), accuracy and F1 (MRPC, QQP; ``dataset.primary_metric=f1`` picks F1),
Pearson and Spearman (STS-B, regression), accuracy (the others). Labels follow the hub's integer ids
on both sources (``label_names`` lists the hub's class names in id order).

Local file formats (the official GLUE distribution; every file is a tab-separated file read
without quote handling, as GLUE's own loaders do):

=======  ==========================================  ============================================
task     files                                       columns used (label)
=======  ==========================================  ============================================
CoLA     train.tsv, dev.tsv (no header)              source, label, label_orig, sentence (0/1)
SST-2    train.tsv, dev.tsv                          sentence (label 0/1)
MRPC     train.tsv, dev.tsv                          #1 String, #2 String (Quality 0/1)
STS-B    train.tsv, dev.tsv                          sentence1, sentence2 (score, float 0..5)
QQP      train.tsv, dev.tsv                          question1, question2 (is_duplicate 0/1)
MNLI     train.tsv, dev_matched.tsv,                 sentence1, sentence2 (gold_label: entailment,
         dev_mismatched.tsv (``mnli_mm``)            neutral, contradiction)
QNLI     train.tsv, dev.tsv                          question, sentence (entailment/not_entailment)
RTE      train.tsv, dev.tsv                          sentence1, sentence2 (entailment/not_entailment)
WNLI     train.tsv, dev.tsv                          sentence1, sentence2 (label 0/1)
=======  ==========================================  ============================================

A row with too few fields, an unknown label, a byte that is not UTF-8, or a file without rows
raises ``DataError`` naming the file and line.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lorabench.config import DatasetConfig
from lorabench.data.base import (
    Splits,
    check_columns,
    collate,
    open_text,
    require_file,
    require_rows,
    resolve_primary,
    reuses_preload,
    subset,
)
from lorabench.errors import DataError
from lorabench.hub import hub_reachable
from lorabench.registry import DATASETS

csv.field_size_limit(sys.maxsize)

NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}
NLI2 = {"entailment": 0, "not_entailment": 1}
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "matthews_correlation": True, "pearson": True, "spearmanr": True}


@dataclass
class GlueTask:
    """One GLUE task: where its files and columns are, how labels map, and how it is scored."""

    name: str
    hub_config: str
    folder: str  # the official folder name inside the GLUE distribution
    text_columns: tuple[str, ...]  # local TSV columns
    hub_columns: tuple[str, ...]
    label_column: str
    metrics: tuple[str, ...]
    primary_metric: str
    num_labels: int
    label_names: tuple[str, ...] = ()  # the hub's ClassLabel names in id order (empty for STS-B)
    label_map: dict[str, int] | None = None  # local string labels -> hub ids; None = already ints
    header: tuple[str, ...] | None = None  # for files shipped without a header row (CoLA)
    train_file: str = "train.tsv"
    eval_file: str = "dev.tsv"
    hub_eval_split: str = "validation"
    version: str = "1"
    head: str = "classification"
    higher_is_better: dict[str, bool] = field(default_factory=lambda: dict(HIGHER_IS_BETTER))

    def __post_init__(self) -> None:
        # The local label mapping must give the hub's ids: label_map[name] == label_names.index(name).
        named = self.num_labels == 1 or len(self.label_names) == self.num_labels
        if not named or any(self.label_names[i] != n for n, i in (self.label_map or {}).items()):
            raise ValueError(
                f"GLUE task {self.name!r}: label_map {self.label_map} disagrees with the hub's "
                f"label names {self.label_names}"
            )

    # -- loading ---------------------------------------------------------------------------------
    @reuses_preload
    def load(self, cfg: DatasetConfig) -> Splits:
        use_local = cfg.source == "local" or (cfg.source == "auto" and cfg.data_dir)
        if use_local:
            if not cfg.data_dir:
                raise DataError(f"dataset.source=local needs dataset.data_dir for {self.name!r}")
            root = Path(cfg.data_dir)
            if not root.is_dir():
                raise DataError(f"dataset.data_dir={cfg.data_dir!r} does not exist or is not a folder")
            if (root / self.folder).is_dir() and not (root / self.train_file).exists():
                root = root / self.folder
            train = self._read_tsv(require_file(root / self.train_file, self.name))
            evals = self._read_tsv(require_file(root / self.eval_file, self.name))
            source = {"kind": "local", "path": str(root.resolve()), "format": "GLUE tsv"}
            splits = Splits(train, evals, source, "train", Path(self.eval_file).stem)
        else:
            splits = self._load_hub(cfg)
        if not splits.train or not splits.eval:
            raise DataError(
                f"dataset {self.name!r} has an empty split (train={len(splits.train)}, eval={len(splits.eval)})"
            )
        splits.train = subset(splits.train, cfg.train_size, cfg.subset_seed)
        splits.eval = subset(splits.eval, cfg.eval_size, cfg.subset_seed)
        return splits

    def _read_tsv(self, path: Path) -> list[dict]:
        with open_text(path) as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = list(self.header) if self.header else next(reader, [])
            check_columns(path, header, [*self.text_columns, self.label_column])
            idx = [header.index(c) for c in self.text_columns]
            label_idx = header.index(self.label_column)
            rows = []
            for line_no, row in enumerate(reader, start=1 if self.header else 2):
                if not row:  # a blank line (e.g. a trailing one)
                    continue
                if len(row) < len(header):
                    raise DataError(f"{path}:{line_no}: expected {len(header)} tab-separated fields, found {len(row)}")
                rows.append({"texts": [row[i] for i in idx], "label": self._label(row[label_idx], path, line_no)})
        return require_rows(path, rows)

    def _label(self, raw: str, path: Path, line_no: int) -> float | int:
        try:
            if self.num_labels == 1:
                return float(raw)
            if self.label_map is not None:
                return self.label_map[raw]
            label = int(raw)
            if not 0 <= label < self.num_labels:
                raise ValueError(raw)
            return label
        except (KeyError, ValueError):
            valid = (
                list(self.label_map)
                if self.label_map
                else f"integers 0..{self.num_labels - 1}"
                if self.num_labels > 1
                else "floats"
            )
            raise DataError(f"{path}:{line_no}: label {raw!r} is not one of {valid}") from None

    def _load_hub(self, cfg: DatasetConfig) -> Splits:
        reachable, reason = hub_reachable()
        if not reachable:
            raise DataError(
                f"dataset {self.name!r}: the hub is unreachable ({reason}); download GLUE {self.folder} "
                "and pass dataset.data_dir=<folder with train.tsv and dev.tsv>"
            )
        import datasets

        hub_id = cfg.hub_id or "nyu-mll/glue"
        ds = datasets.load_dataset(hub_id, self.hub_config)

        def rows(split):
            return [{"texts": [ex[c] for c in self.hub_columns], "label": ex["label"]} for ex in ds[split]]

        revision = getattr(ds["train"].info, "version", None)
        source = {"kind": "hub", "hub_id": hub_id, "config": self.hub_config, "version": str(revision)}
        return Splits(rows("train"), rows(self.hub_eval_split), source, "train", self.hub_eval_split)

    # -- features and evaluation -----------------------------------------------------------------
    def features(self, example: dict, tokenizer, cfg: DatasetConfig) -> dict:
        enc = tokenizer(*example["texts"], truncation=True, max_length=cfg.max_length)
        return {"input_ids": enc["input_ids"], "labels": example["label"]}

    def predict(self, model, tokenizer, examples: list[dict], cfg: DatasetConfig, device) -> list:
        """Class ids (argmax of the logits), or scores for the regression task (STS-B)."""
        import torch

        with torch.no_grad():
            return self._predict(model, tokenizer, examples, cfg, device)

    def _predict(self, model, tokenizer, examples: list[dict], cfg: DatasetConfig, device) -> list:
        from lorabench.console import progress

        preds = []
        starts = range(0, len(examples), cfg.eval_batch_size)
        for start in progress(starts, "evaluate", total=len(starts)):
            chunk = examples[start : start + cfg.eval_batch_size]
            batch = collate([self.features(e, tokenizer, cfg) for e in chunk], tokenizer.pad_token_id)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()
            out = logits.squeeze(-1) if self.num_labels == 1 else logits.argmax(-1)
            preds.extend(out.cpu().tolist())
        return preds

    def score(self, predictions: list, examples: list[dict]) -> dict:
        from lorabench.evaluation.classification import compute  # scipy and sklearn: only when scoring

        return compute(self.metrics, predictions, [e["label"] for e in examples])

    def protocol(self, cfg: DatasetConfig) -> dict:
        return {
            "max_length": cfg.max_length,
            "prompt_template": None,
            "decoding": None,
            "primary_metric": resolve_primary(self, cfg),
        }


def _register(task: GlueTask) -> None:
    DATASETS.register(task.name)(task)


_ACC = ("accuracy",)
_BIN = ("accuracy", "f1")
_NLI3_NAMES = ("entailment", "neutral", "contradiction")
_NLI2_NAMES = ("entailment", "not_entailment")
_PAIR = ("sentence1", "sentence2")
for _task in [
    GlueTask(
        "cola",
        "cola",
        "CoLA",
        ("sentence",),
        ("sentence",),
        "label",
        ("matthews_correlation",),
        "matthews_correlation",
        2,
        ("unacceptable", "acceptable"),
        header=("source", "label", "label_orig", "sentence"),
    ),
    GlueTask(
        "sst2", "sst2", "SST-2", ("sentence",), ("sentence",), "label", _ACC, "accuracy", 2, ("negative", "positive")
    ),
    GlueTask(
        "mrpc",
        "mrpc",
        "MRPC",
        ("#1 String", "#2 String"),
        _PAIR,
        "Quality",
        _BIN,
        "accuracy",
        2,
        ("not_equivalent", "equivalent"),
    ),
    GlueTask("stsb", "stsb", "STS-B", _PAIR, _PAIR, "score", ("pearson", "spearmanr"), "pearson", 1),
    GlueTask(
        "qqp",
        "qqp",
        "QQP",
        ("question1", "question2"),
        ("question1", "question2"),
        "is_duplicate",
        _BIN,
        "accuracy",
        2,
        ("not_duplicate", "duplicate"),
    ),
    GlueTask(
        "mnli",
        "mnli",
        "MNLI",
        _PAIR,
        ("premise", "hypothesis"),
        "gold_label",
        _ACC,
        "accuracy",
        3,
        _NLI3_NAMES,
        label_map=NLI3,
        eval_file="dev_matched.tsv",
        hub_eval_split="validation_matched",
    ),
    GlueTask(
        "mnli_mm",
        "mnli",
        "MNLI",
        _PAIR,
        ("premise", "hypothesis"),
        "gold_label",
        _ACC,
        "accuracy",
        3,
        _NLI3_NAMES,
        label_map=NLI3,
        eval_file="dev_mismatched.tsv",
        hub_eval_split="validation_mismatched",
    ),
    GlueTask(
        "qnli",
        "qnli",
        "QNLI",
        ("question", "sentence"),
        ("question", "sentence"),
        "label",
        _ACC,
        "accuracy",
        2,
        _NLI2_NAMES,
        label_map=NLI2,
    ),
    GlueTask("rte", "rte", "RTE", _PAIR, _PAIR, "label", _ACC, "accuracy", 2, _NLI2_NAMES, label_map=NLI2),
    GlueTask("wnli", "wnli", "WNLI", _PAIR, _PAIR, "label", _ACC, "accuracy", 2, ("not_entailment", "entailment")),
]:
    _register(_task)
