"""E2E NLG Challenge (Novikova et al., 2017): meaning representation -> restaurant description.

Training: one (MR, reference) pair per human reference; the prompt ("plain":
``Meaning representation: {mr}\\nDescription:``, or the tokenizer's chat template) gets no loss,
the reference does (``gsm8k.lm_features``). Evaluation: one generation per distinct MR (greedy, or
beam search with ``dataset.num_beams``; beams use the LoRA paper's length penalty 0.9 and
no-repeat 4-grams, Hu et al. 2021 Table 11), cut at the first newline, scored against all of that
MR's references with the official E2E metrics (``evaluation.data_to_text``; BLEU in 0..1).

Sources:

* ``dataset.data_dir``: a folder in the official format (tuetschek/e2e-dataset), CSV files with
  header ``mr,ref`` and one row per reference. Which files are used (first that applies):
  ``trainset.csv`` + ``testset_w_refs.csv`` (train / test, the LoRA paper's table);
  ``trainset.csv`` + ``devset.csv`` (train / dev); ``devset.csv`` + ``testset_w_refs.csv`` (train on
  the dev set, evaluate on the test set; a note says so); ``devset.csv`` alone, split by MR (see
  :func:`split_by_mr`) so no MR is in both halves (the split names and notes say so). Any other
  folder is an error naming the CSV files found and the expected names. As the official scorer
  does, the mis-encodings ``Ł``/``Â£`` (for ``£``) and ``Ã©``/``ã©`` (for ``é``) are repaired.
* the hub (``dataset.hub_id``, default ``tuetschek/e2e_nlg``, columns ``meaning_representation``,
  ``human_reference``; ``GEM/e2e_nlg`` also works: ``target`` plus a ``references`` list).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from lorabench.config import DatasetConfig
from lorabench.data.base import (
    Splits,
    check_columns,
    generate_texts,
    open_text,
    resolve_primary,
    reuses_preload,
    subset,
)
from lorabench.data.gsm8k import lm_features, prompt_text
from lorabench.errors import ConfigError, DataError
from lorabench.hub import hub_reachable
from lorabench.registry import DATASETS

TEMPLATES = ("plain", "chat")
DEV_EVAL_MODULUS = 5  # dev-only split: an MR is evaluated when sha256(mr) % 5 == 0 (about 20%)
BEAM_KWARGS = {"length_penalty": 0.9, "no_repeat_ngram_size": 4}  # LoRA paper, Table 11 (E2E)
# Mis-encodings the official scorer (measure_scores.py) repairs in every line it reads, in its order.
TEXT_REPAIRS = (
    ("\u0141", "\u00a3"),  # Ł -> £
    ("\u00c2\u00a3", "\u00a3"),  # Â£ -> £
    ("\u00c3\u00a9", "\u00e9"),  # Ã© -> é
    ("\u00e3\u00a9", "\u00e9"),  # ã© -> é
)
METRIC_REFERENCE = (
    "tuetschek/e2e-metrics@1b9c4d87fd0b measure_scores.py (parity: tests/fixtures/parity/e2e_metrics.json)"
)


def e2e_prompt(mr: str, tokenizer, template: str) -> str:
    if template == "plain":
        return f"Meaning representation: {mr}\nDescription:"
    if template == "chat":
        return prompt_text(
            f"Write a one-paragraph restaurant description that expresses exactly this meaning representation:\n{mr}",
            tokenizer,
            "chat",
        )
    raise ConfigError(f"dataset.prompt_template={template!r} is invalid for e2e; valid choices: {', '.join(TEMPLATES)}")


def repair_text(text: str) -> str:
    """``text`` with the official scorer's repairs of mis-encoded pound signs and e-acute."""
    for wrong, right in TEXT_REPAIRS:
        text = text.replace(wrong, right)
    return text


def read_e2e_csv(path: Path) -> list[dict]:
    """(mr, ref) rows of one official E2E CSV file, text repaired (:func:`repair_text`); extra
    columns (the cleaned release's) are ignored."""
    with open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        check_columns(path, header, ["mr", "ref"])
        mr_i, ref_i = header.index("mr"), header.index("ref")
        rows = []
        start = reader.line_num
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: expected {len(header)} comma-separated fields "
                    f"({','.join(header)}), found {len(row)}"
                )
            mr, ref = repair_text(row[mr_i]).strip(), repair_text(row[ref_i]).strip()
            if not mr:
                raise DataError(f"{path}:{reader.line_num}: empty 'mr' field")
            rows.append({"mr": mr, "ref": ref})
        if not rows:
            raise DataError(f"{path}: no data rows after the header (line {start})")
    return rows


def group_by_mr(pairs: list[dict]) -> list[dict]:
    """One evaluation example per distinct MR, in first-seen order, with all its references."""
    groups: dict[str, list[str]] = {}
    for pair in pairs:
        groups.setdefault(pair["mr"], [])
        refs = pair.get("references")
        if refs:  # GEM rows carry the full reference list; take it once
            if not groups[pair["mr"]]:
                groups[pair["mr"]].extend(refs)
        elif pair["ref"]:
            groups[pair["mr"]].append(pair["ref"])
    missing = [mr for mr, refs in groups.items() if not refs]
    if missing:
        raise DataError(f"e2e: {len(missing)} MR(s) have no reference, e.g. {missing[0]!r}")
    return [{"mr": mr, "references": refs} for mr, refs in groups.items()]


def split_by_mr(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Deterministic MR-level split of one file: an MR goes to eval when the SHA-256 of its UTF-8
    text is 0 modulo ``DEV_EVAL_MODULUS``, else to train. It depends only on the MR text (not file
    order or seeds), and all references of one MR land on the same side."""

    def to_eval(mr: str) -> bool:
        return int(hashlib.sha256(mr.encode("utf-8")).hexdigest(), 16) % DEV_EVAL_MODULUS == 0

    return [p for p in pairs if not to_eval(p["mr"])], [p for p in pairs if to_eval(p["mr"])]


class E2E:
    name = "e2e"
    version = "2"  # 2: metrics equal to the official scorer (PTB jar tokens, mteval lower-casing)
    head = "causal_lm"
    num_labels = None
    metrics = ("bleu", "nist", "meteor", "rouge_l", "cider")
    primary_metric = "bleu"
    higher_is_better = dict.fromkeys(metrics, True)

    # -- loading ---------------------------------------------------------------------------------
    @reuses_preload
    def load(self, cfg: DatasetConfig) -> Splits:
        if cfg.source == "generated":
            raise ConfigError("dataset.source='generated' is not an e2e source; use local or hub")
        if cfg.source == "local" or (cfg.source == "auto" and cfg.data_dir):
            splits = self._load_local(cfg)
        else:
            splits = self._load_hub(cfg)
        if not splits.train or not splits.eval:
            raise DataError(
                f"dataset 'e2e' ({splits.source.get('path') or splits.source.get('hub_id')}) has an empty split "
                f"({splits.train_split}={len(splits.train)}, {splits.eval_split}={len(splits.eval)}); "
                "every split needs data"
            )
        # train: (mr, ref) pairs; eval: one example per MR. Subsets count pairs and MRs respectively.
        splits.train = subset(splits.train, cfg.train_size, cfg.subset_seed)
        splits.eval = subset(group_by_mr(splits.eval), cfg.eval_size, cfg.subset_seed)
        return splits

    def _load_local(self, cfg: DatasetConfig) -> Splits:
        root = Path(cfg.data_dir or "")
        if not cfg.data_dir or not root.is_dir():
            raise DataError(
                f"dataset.data_dir={cfg.data_dir!r} does not exist or is not a folder "
                "(expected the official E2E trainset.csv / devset.csv / testset_w_refs.csv)"
            )
        files = {n: root / f"{n}.csv" for n in ("trainset", "devset", "testset_w_refs")}
        have = {n for n, path in files.items() if path.is_file()}
        source = {"kind": "local", "path": str(root.resolve()), "format": "E2E csv (mr,ref)"}
        if "trainset" in have and have & {"testset_w_refs", "devset"}:
            eval_name = "testset_w_refs" if "testset_w_refs" in have else "devset"
            train = read_e2e_csv(files["trainset"])
            evals = read_e2e_csv(files[eval_name])
            return Splits(train, evals, source, "train", "test" if eval_name == "testset_w_refs" else "dev")
        if have == {"devset", "testset_w_refs"}:
            note = (
                f"no trainset.csv in {root}: training on devset.csv, evaluating on testset_w_refs.csv "
                "(test scores, but from a model trained on the smaller dev set)"
            )
            dev, test = read_e2e_csv(files["devset"]), read_e2e_csv(files["testset_w_refs"])
            return Splits(dev, test, source, "dev", "test", notes=[note])
        if have == {"devset"}:
            dev = read_e2e_csv(files["devset"])
            train, evals = split_by_mr(dev)
            rule = f"sha256(mr) % {DEV_EVAL_MODULUS}"
            note = (
                f"no trainset.csv in {root}: devset.csv was split by MR ({rule} == 0 -> eval, else train); "
                "scores are not comparable with official E2E test scores"
            )
            return Splits(train, evals, source, f"dev[{rule} != 0]", f"dev[{rule} == 0]", notes=[note])
        found = sorted(p.name for p in root.glob("*.csv"))
        hint = " (testset.csv has no references: use testset_w_refs.csv)" if "testset.csv" in found else ""
        raise DataError(
            f"dataset 'e2e': {root} holds {', '.join(found) or 'no CSV file'}{hint}; expected the official E2E "
            "files trainset.csv with testset_w_refs.csv or devset.csv, devset.csv with testset_w_refs.csv, "
            "or devset.csv alone"
        )

    def _load_hub(self, cfg: DatasetConfig) -> Splits:
        hub_id = cfg.hub_id or "tuetschek/e2e_nlg"
        reachable, reason = hub_reachable()
        if not reachable:
            raise DataError(
                f"dataset 'e2e': the hub is unreachable ({reason}); download the official E2E "
                "data (tuetschek/e2e-dataset) and pass dataset.data_dir=<folder with trainset.csv, "
                "devset.csv, testset_w_refs.csv> (devset.csv alone also works)"
            )
        import datasets

        ds = datasets.load_dataset(hub_id)

        def pairs(split: str) -> list[dict]:
            cols = ds[split].column_names
            ref_col = next((c for c in ("human_reference", "target", "ref") if c in cols), None)
            mr_col = next((c for c in ("meaning_representation", "mr") if c in cols), None)
            if mr_col is None or ref_col is None:
                raise DataError(
                    f"hub dataset {hub_id!r} split {split!r}: expected columns meaning_representation "
                    f"and human_reference (or target); found {cols}"
                )
            return [
                {"mr": r[mr_col].strip(), "ref": r[ref_col].strip(), "references": r.get("references") or []}
                for r in ds[split]
            ]

        source = {"kind": "hub", "hub_id": hub_id, "version": str(getattr(ds["train"].info, "version", None))}
        return Splits(pairs("train"), pairs("test"), source, "train", "test")

    # -- features and evaluation -----------------------------------------------------------------
    def features(self, example: dict, tokenizer, cfg: DatasetConfig) -> dict:
        prompt = e2e_prompt(example["mr"], tokenizer, cfg.prompt_template)
        target = " " + example["ref"] if cfg.prompt_template == "plain" else example["ref"]
        return lm_features(prompt, target, tokenizer, cfg.max_length)

    def predict(self, model, tokenizer, examples: list[dict], cfg: DatasetConfig, device) -> list[str]:
        prompts = [e2e_prompt(e["mr"], tokenizer, cfg.prompt_template) for e in examples]
        extra = BEAM_KWARGS if cfg.num_beams > 1 else {}
        texts = generate_texts(model, tokenizer, prompts, cfg, device, **extra)
        return [t.strip().split("\n")[0].strip() for t in texts]

    def score(self, predictions: list[str], examples: list[dict]) -> dict:
        """The five E2E scores (float, or None when a metric cannot run here); when any is None,
        ``missing`` maps it to the reason (a plain dict, so the record's JSON keeps it)."""
        from lorabench.evaluation.data_to_text import e2e_metrics  # only when scoring

        scores, missing = e2e_metrics(list(predictions), [e["references"] for e in examples])
        out: dict = {name: (None if scores.get(name) is None else float(scores[name])) for name in self.metrics}
        if missing:
            out["missing"] = dict(missing)
        return out

    def protocol(self, cfg: DatasetConfig) -> dict:
        beam = cfg.num_beams > 1
        return {
            "max_length": cfg.max_length,
            "prompt_template": cfg.prompt_template,
            "decoding": {
                "strategy": "beam" if beam else "greedy",
                "num_beams": cfg.num_beams,
                "max_new_tokens": cfg.max_new_tokens,
                **(BEAM_KWARGS if beam else {}),
                "postprocess": "first line, stripped",
            },
            "references": "all references of an MR (multi-reference); one generation per MR",
            "metrics": METRIC_REFERENCE,
            "primary_metric": resolve_primary(self, cfg),
        }


DATASETS.register("e2e")(E2E())
