"""Dataset loaders on tiny fixtures written here in the official formats (never downloaded):
GLUE file formats and label ids, error messages, E2E grouping and its dev-only split, loss masking
of the causal-LM tasks, the tokenized-feature cache, and E2E scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorabench.config import DatasetConfig
from lorabench.data import e2e, glue, gsm8k, metamathqa  # noqa: F401  (registers every dataset)
from lorabench.data.base import resolve_primary
from lorabench.errors import ConfigError, DataError
from lorabench.registry import DATASETS
from tests.conftest import write_gsm8k

# -- GLUE fixtures in the official formats ---------------------------------------------------------
NLI3 = ["entailment", "neutral", "contradiction"]
NLI2 = ["entailment", "not_entailment"]


def _tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mnli_row(i: int, label: str) -> list[str]:
    return [
        str(i),
        f"{i}1",
        f"{i}1e",
        "fiction",
        "( p )",
        "( h )",
        "(ROOT p)",
        "(ROOT h)",
        f"premise {i} .",
        f"hypothesis {i} ?",
        label,
        label,
    ]


MNLI_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]

# task -> (file -> rows writer), expected labels of the train file, the raw label strings written
GLUE_FIXTURES = {
    "cola": (None, lambda i, l: ["gj04", l, "" if l == "1" else "*", f"the cat sat {i} ."], ["0", "1", "1"]),
    "sst2": (["sentence", "label"], lambda i, l: [f"a fine film {i} .", l], ["1", "0", "1"]),
    "mrpc": (
        ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        lambda i, l: [l, str(1000 + i), str(2000 + i), f'He said "yes" {i} .', f"He agreed {i} ."],
        ["1", "0", "0"],
    ),
    "stsb": (
        ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
        lambda i, l: [
            str(i),
            "main-captions",
            "MSRvid",
            "2012test",
            str(i),
            "none",
            "none",
            f"A man plays {i} .",
            f"A man is playing {i} .",
            l,
        ],
        ["5.000", "0.750", "3.2"],
    ),
    "qqp": (
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        lambda i, l: [str(i), str(2 * i), str(2 * i + 1), f"How do I {i}?", f"What is {i}?", l],
        ["0", "1", "0"],
    ),
    "mnli": (MNLI_HEADER, _mnli_row, ["neutral", "contradiction", "entailment"]),
    "qnli": (
        ["index", "question", "sentence", "label"],
        lambda i, l: [str(i), f"What is {i}?", f"It is {i} .", l],
        ["not_entailment", "entailment", "entailment"],
    ),
    "rte": (
        ["index", "sentence1", "sentence2", "label"],
        lambda i, l: [str(i), f"A {i} happened .", f"B {i} .", l],
        ["entailment", "not_entailment", "entailment"],
    ),
    "wnli": (
        ["index", "sentence1", "sentence2", "label"],
        lambda i, l: [str(i), f"The trophy {i} .", f"It {i} .", l],
        ["1", "0", "0"],
    ),
}
FOLDERS = {
    "cola": "CoLA",
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "stsb": "STS-B",
    "qqp": "QQP",
    "mnli": "MNLI",
    "qnli": "QNLI",
    "rte": "RTE",
    "wnli": "WNLI",
}
# The hub's (nyu-mll/glue) ClassLabel names in id order.
HUB_NAMES = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": NLI3,
    "mnli_mm": NLI3,
    "qnli": NLI2,
    "rte": NLI2,
    "wnli": ["not_entailment", "entailment"],
}


def write_glue(root: Path, task: str) -> Path:
    header, row, labels = GLUE_FIXTURES[task]
    folder = root / FOLDERS[task]
    folder.mkdir(parents=True, exist_ok=True)
    evals = ["dev_matched.tsv", "dev_mismatched.tsv"] if task == "mnli" else ["dev.tsv"]
    _tsv(folder / "train.tsv", header, [row(i, lab) for i, lab in enumerate(labels)])
    for k, name in enumerate(evals):
        dev_labels = labels[: 2 + k]  # the two MNLI dev sets differ in size
        _tsv(folder / name, header, [row(100 * (k + 1) + i, lab) for i, lab in enumerate(dev_labels)])
    return folder


def _expected(task: str, raw: str):
    if task == "stsb":
        return float(raw)
    names = HUB_NAMES[task]
    return names.index(raw) if raw in names else int(raw)


@pytest.mark.parametrize("task", [*GLUE_FIXTURES, "mnli_mm"])
def test_glue_loader_formats_and_label_ids(tmp_path, task):
    family = "mnli" if task == "mnli_mm" else task
    write_glue(tmp_path, family)
    spec = DATASETS.get(task)
    # data_dir may be the GLUE root (holding MNLI/, SST-2/, ...) or the task's own folder
    splits = spec.load(DatasetConfig(name=task, data_dir=str(tmp_path)))
    raw_labels = GLUE_FIXTURES[family][2]
    assert [e["label"] for e in splits.train] == [_expected(family, r) for r in raw_labels]
    assert all(len(e["texts"]) == len(spec.text_columns) for e in splits.train)
    if task == "stsb":
        assert spec.num_labels == 1 and all(isinstance(e["label"], float) for e in splits.train)
    else:
        assert list(spec.label_names) == HUB_NAMES[task]
    if task == "cola":
        assert splits.train[0]["texts"] == ["the cat sat 0 ."]  # headerless: no row lost to a header
    expected_eval = {"mnli": ("dev_matched", 2), "mnli_mm": ("dev_mismatched", 3)}.get(task, ("dev", 2))
    assert (splits.eval_split, len(splits.eval)) == expected_eval
    assert splits.source["kind"] == "local"


def test_mrpc_primary_metric_is_choosable():
    task = DATASETS.get("mrpc")
    assert resolve_primary(task, DatasetConfig(name="mrpc")) == "accuracy"
    assert resolve_primary(task, DatasetConfig(name="mrpc", primary_metric="f1")) == "f1"
    with pytest.raises(ConfigError, match="matthews_correlation"):
        resolve_primary(task, DatasetConfig(name="mrpc", primary_metric="matthews_correlation"))
    scores = task.score([1, 0, 1, 1], [{"label": 1}, {"label": 0}, {"label": 0}, {"label": 1}])
    assert scores == {"accuracy": 0.75, "f1": pytest.approx(0.8)}


@pytest.mark.parametrize(
    "task, edit, pattern",
    [
        ("rte", lambda t: t.replace("\tentailment\n", "\tmaybe\n", 1), r"train\.tsv:2: label 'maybe'"),
        ("rte", lambda t: t.replace("\tB 0 .\tentailment", "", 1), r"train\.tsv:2: expected 4 .*found 2"),
        ("cola", lambda t: t.replace("gj04\t0\t*\t", "gj04\t", 1), r"train\.tsv:1: expected 4"),
        ("stsb", lambda t: t.replace("\t5.000\n", "\tfive\n", 1), r"train\.tsv:2: label 'five'.*floats"),
        ("sst2", lambda t: t.replace("sentence\tlabel", "text\tlabel", 1), r"train\.tsv: missing column.*'sentence'"),
        ("sst2", lambda t: t.replace("\t1\n", "\t7\n", 1), r"train\.tsv:2: label '7'"),
    ],
)
def test_glue_malformed_rows_name_file_and_line(tmp_path, task, edit, pattern):
    folder = write_glue(tmp_path, task)
    train = folder / "train.tsv"
    text = train.read_text(encoding="utf-8")
    assert edit(text) != text, "the fixture edit did not apply"
    train.write_text(edit(text), encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        DATASETS.get(task).load(DatasetConfig(name=task, data_dir=str(folder)))
    assert str(train) in str(info.value)


def test_glue_missing_file_names_it(tmp_path):
    folder = write_glue(tmp_path, "mnli")
    (folder / "dev_mismatched.tsv").unlink()
    DATASETS.get("mnli").load(DatasetConfig(name="mnli", data_dir=str(folder)))
    with pytest.raises(DataError, match="dev_mismatched.tsv is missing"):
        DATASETS.get("mnli_mm").load(DatasetConfig(name="mnli_mm", data_dir=str(folder)))


# -- E2E -------------------------------------------------------------------------------------------
E2E_MRS = [f"name[Place {i}], eatType[pub], area[riverside], customer rating[{i} out of 5]" for i in range(12)]


def write_e2e(folder: Path, files=("trainset", "devset", "testset_w_refs")) -> Path:
    """Official E2E CSV: header ``mr,ref``, one row per reference, MR i has 1 + i % 3 references."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        lines = ["mr,ref"]
        for i, mr in enumerate(E2E_MRS):
            for k in range(1 + i % 3):
                lines.append(f'"{mr} ({name})","Place {i} is a pub by the river, rated {i} out of 5 ({k})."')
        (folder / f"{name}.csv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return folder


def test_e2e_groups_references_per_mr(tmp_path):
    folder = write_e2e(tmp_path / "e2e")
    splits = DATASETS.get("e2e").load(DatasetConfig(name="e2e", data_dir=str(folder)))
    assert (splits.train_split, splits.eval_split) == ("train", "test")
    assert len(splits.train) == sum(1 + i % 3 for i in range(12))  # one pair per reference
    assert len(splits.eval) == 12  # one example per MR
    assert [len(e["references"]) for e in splits.eval] == [1 + i % 3 for i in range(12)]
    assert splits.eval[0]["mr"].endswith("(testset_w_refs)") and "," in splits.eval[0]["mr"]
    assert splits.eval[2]["references"][2].endswith("rated 2 out of 5 (2).")
    # without the test file the dev set is the evaluation split
    (folder / "testset_w_refs.csv").unlink()
    assert DATASETS.get("e2e").load(DatasetConfig(name="e2e", data_dir=str(folder))).eval_split == "dev"


def test_e2e_dev_only_split_is_by_mr(tmp_path):
    folder = write_e2e(tmp_path / "e2e", files=("devset",))
    cfg = DatasetConfig(name="e2e", data_dir=str(folder))
    splits = DATASETS.get("e2e").load(cfg)
    train_mrs, eval_mrs = {p["mr"] for p in splits.train}, {e["mr"] for e in splits.eval}
    assert train_mrs and eval_mrs and not train_mrs & eval_mrs
    assert len(train_mrs | eval_mrs) == 12
    assert len(splits.train) + sum(len(e["references"]) for e in splits.eval) == sum(1 + i % 3 for i in range(12))
    assert "dev[" in splits.train_split and "dev[" in splits.eval_split and splits.notes
    again = DATASETS.get("e2e").load(cfg)
    assert [e["mr"] for e in again.eval] == [e["mr"] for e in splits.eval]  # deterministic


def test_e2e_errors_name_file_and_line(tmp_path):
    folder = write_e2e(tmp_path / "e2e")
    test_csv = folder / "testset_w_refs.csv"
    lines = test_csv.read_text(encoding="utf-8").splitlines()
    lines[3] = '"name[X]","a","b"'
    test_csv.write_text("\r\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"testset_w_refs\.csv:4: expected 2"):
        DATASETS.get("e2e").load(DatasetConfig(name="e2e", data_dir=str(folder)))
    test_csv.write_text("meaning,ref\r\nx,y\r\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"testset_w_refs\.csv: missing column.*'mr'"):
        DATASETS.get("e2e").load(DatasetConfig(name="e2e", data_dir=str(folder)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no CSV file; expected the official E2E files trainset.csv"):
        DATASETS.get("e2e").load(DatasetConfig(name="e2e", data_dir=str(empty)))


def test_e2e_dev_and_test_files_train_on_dev_and_evaluate_on_test(tmp_path):
    folder = write_e2e(tmp_path / "e2e", files=("devset", "testset_w_refs"))
    splits = DATASETS.get("e2e").load(DatasetConfig(name="e2e", data_dir=str(folder)))
    assert (splits.train_split, splits.eval_split) == ("dev", "test")
    assert all(p["mr"].endswith("(devset)") for p in splits.train)
    assert len(splits.eval) == 12 and all(e["mr"].endswith("(testset_w_refs)") for e in splits.eval)
    assert any("testset_w_refs.csv" in note for note in splits.notes)


def test_e2e_unusable_folder_names_the_files_found(tmp_path):
    folder = write_e2e(tmp_path / "e2e", files=("testset", "trainset"))
    with pytest.raises(DataError, match=r"holds testset\.csv, trainset\.csv \(testset\.csv has no references"):
        DATASETS.get("e2e").load(DatasetConfig(name="e2e", data_dir=str(folder)))


def test_e2e_reader_repairs_encodings_as_the_official_scorer(tmp_path):
    path = tmp_path / "devset.csv"
    path.write_text(
        'mr,ref\n"name[Caf\u00c3\u00a9 X]","Costs \u00c2\u00a320 or \u014130, caf\u00e3\u00a9."\n', encoding="utf-8"
    )
    assert e2e.read_e2e_csv(path) == [{"mr": "name[Caf\u00e9 X]", "ref": "Costs \u00a320 or \u00a330, caf\u00e9."}]


def test_e2e_score_perfect_predictions(monkeypatch):
    from lorabench.evaluation import data_to_text

    monkeypatch.setattr(data_to_text, "find_java", lambda: None)  # no PTB tokens or METEOR (and no 10 s JVM)
    examples = [
        {"mr": mr, "references": [f"Place {i} is a riverside pub rated {i} out of 5 .", f"A pub {i} ."]}
        for i, mr in enumerate(E2E_MRS[:4])
    ]
    scores = DATASETS.get("e2e").score([e["references"][0] for e in examples], examples)
    assert scores["bleu"] == pytest.approx(1.0)
    assert scores["meteor"] is None and "java" in scores["missing"]["meteor"]
    assert scores["rouge_l"] is None and scores["cider"] is None and scores["nist"] > 0
    for name in DATASETS.get("e2e").metrics:
        assert scores[name] is None or type(scores[name]) is float
    assert json.loads(json.dumps(scores)) == scores


# -- causal-LM features: loss only on the target ----------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from lorabench.models import RANDOM_MODELS

    return RANDOM_MODELS.get("tiny_llama")()[1]


def write_metamathqa(folder: Path, n: int = 6, jsonl: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "query": f"What is {i} plus {i}?",
            "response": f"{i} + {i} = {2 * i}.\nThe answer is: {2 * i}",
            "type": "GSM_Rephrased" if i % 2 else "MATH_AnsAug",
            "original_question": f"{i}+{i}?",
        }
        for i in range(n)
    ]
    if jsonl:
        (folder / "metamath.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        (folder / "MetaMathQA-395K.json").write_text(json.dumps(rows), encoding="utf-8")
    write_gsm8k(folder / "gsm8k", n_train=2, n_test=5)
    return folder


def _assert_loss_on_target_only(feats, prompt, target, tokenizer):
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids, labels = feats["input_ids"], feats["labels"]
    assert len(ids) == len(labels) and ids[: len(prompt_ids)] == prompt_ids
    loss_at = [i for i, lab in enumerate(labels) if lab != -100]
    assert loss_at == list(range(len(prompt_ids), len(ids)))  # exactly the target tokens
    assert [labels[i] for i in loss_at] == ids[len(prompt_ids) :]
    assert tokenizer.decode(ids[len(prompt_ids) :]) == target + tokenizer.eos_token


@pytest.mark.parametrize("template", ["plain", "alpaca", "qa"])
def test_metamathqa_loss_only_on_response(tmp_path, tokenizer, template):
    task = DATASETS.get("metamathqa")
    cfg = DatasetConfig(
        name="metamathqa", data_dir=str(write_metamathqa(tmp_path)), prompt_template=template, max_length=512
    )
    example = task.load(cfg).train[3]
    prompt = metamathqa.math_prompt(example["query"], tokenizer, template)
    assert example["query"] in prompt
    sep = "" if prompt.endswith(" ") else " "
    _assert_loss_on_target_only(task.features(example, tokenizer, cfg), prompt, sep + example["response"], tokenizer)


def test_gsm8k_loss_only_on_answer(tmp_path, tokenizer):
    task = DATASETS.get("gsm8k")
    cfg = DatasetConfig(name="gsm8k", data_dir=str(write_gsm8k(tmp_path)), prompt_template="plain")
    example = task.load(cfg).train[0]
    prompt = gsm8k.prompt_text(example["question"], tokenizer, "plain")
    _assert_loss_on_target_only(task.features(example, tokenizer, cfg), prompt, " " + example["answer"], tokenizer)


def test_e2e_loss_only_on_reference(tmp_path, tokenizer):
    task = DATASETS.get("e2e")
    cfg = DatasetConfig(name="e2e", data_dir=str(write_e2e(tmp_path / "e2e")))
    example = task.load(cfg).train[0]
    prompt = f"Meaning representation: {example['mr']}\nDescription:"
    _assert_loss_on_target_only(task.features(example, tokenizer, cfg), prompt, " " + example["ref"], tokenizer)


def test_metamathqa_sources_subset_and_filter(tmp_path):
    folder = write_metamathqa(tmp_path / "mm", n=10)
    cfg = DatasetConfig(name="metamathqa", data_dir=str(folder), train_size=4)
    splits = DATASETS.get("metamathqa").load(cfg)
    assert len(splits.train) == 4 and len(splits.eval) == 5  # the GSM8K test fixture
    assert splits.source["eval"]["dataset"] == "gsm8k" and splits.eval_split == "gsm8k/test"
    assert [e["query"] for e in DATASETS.get("metamathqa").load(cfg).train] == [e["query"] for e in splits.train]
    gsm_only = DATASETS.get("metamathqa_gsm").load(DatasetConfig(name="metamathqa_gsm", data_dir=str(folder)))
    assert len(gsm_only.train) == 5 and all("GSM" in e["type"] for e in gsm_only.train)
    jl = write_metamathqa(tmp_path / "jl", n=3, jsonl=True)
    assert len(DATASETS.get("metamathqa").load(DatasetConfig(name="metamathqa", data_dir=str(jl))).train) == 3


def test_metamathqa_errors_name_file(tmp_path):
    folder = write_metamathqa(tmp_path / "mm", n=3)
    path = folder / "MetaMathQA-395K.json"
    rows = json.loads(path.read_text())
    del rows[1]["response"]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"MetaMathQA-395K\.json\[item 1\].*missing column.*'response'"):
        DATASETS.get("metamathqa").load(DatasetConfig(name="metamathqa", data_dir=str(folder)))
    path.write_text("[{oops")
    with pytest.raises(DataError, match=r"MetaMathQA-395K\.json:1: not valid JSON"):
        DATASETS.get("metamathqa").load(DatasetConfig(name="metamathqa", data_dir=str(folder)))
    (folder / "gsm8k" / "test.jsonl").unlink()
    path.write_text("[]")
    with pytest.raises(DataError, match=r"gsm8k.test\.jsonl is missing"):
        DATASETS.get("metamathqa").load(DatasetConfig(name="metamathqa", data_dir=str(folder)))


def test_generation_tasks_predict_one_text_per_example(tmp_path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from lorabench.models import RANDOM_MODELS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(RANDOM_MODELS.get("tiny_llama")()[0]).eval()
    cfg = DatasetConfig(name="e2e", data_dir=str(write_e2e(tmp_path / "e2e")), max_new_tokens=3, eval_batch_size=2)
    examples = DATASETS.get("e2e").load(cfg).eval[:3]
    preds = DATASETS.get("e2e").predict(model, tokenizer, examples, cfg, "cpu")
    assert len(preds) == 3 and all(isinstance(p, str) and "\n" not in p for p in preds)
    mcfg = DatasetConfig(name="metamathqa", data_dir=str(write_metamathqa(tmp_path / "mm")), max_new_tokens=3)
    evals = DATASETS.get("metamathqa").load(mcfg).eval[:2]
    assert len(DATASETS.get("metamathqa").predict(model, tokenizer, evals, mcfg, "cpu")) == 2


# -- tokenized-feature cache ------------------------------------------------------------------------
def test_feature_cache_hits_and_keys(tmp_path, monkeypatch, tokenizer):
    from lorabench.data import cache

    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    folder = write_metamathqa(tmp_path / "mm", n=5)
    task = DATASETS.get("metamathqa")
    cfg = DatasetConfig(name="metamathqa", data_dir=str(folder), max_length=64)
    examples = task.load(cfg).train
    first = cache.cached_features(task, examples, tokenizer, cfg)
    assert first == [task.features(e, tokenizer, cfg) for e in examples]
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 1

    class NoRecompute:  # a second call must read the file, not tokenize again
        name, version = task.name, task.version
        registry_name = task.registry_name

        def features(self, *args):
            raise AssertionError("features recomputed despite a cache hit")

    NoRecompute.__module__, NoRecompute.__qualname__ = type(task).__module__, type(task).__qualname__
    assert cache.cached_features(NoRecompute(), examples, tokenizer, cfg) == first
    key = cache.cache_key(task, examples, tokenizer, cfg)
    (tmp_path / "cache" / "features" / f"{key}.safetensors").write_bytes(b"not a safetensors file")
    assert cache.cached_features(task, examples, tokenizer, cfg) == first  # a corrupt file is rebuilt
    assert cache.cache_key(task, examples, tokenizer, DatasetConfig(name="metamathqa", max_length=65)) != key
    assert cache.cache_key(task, examples[:-1], tokenizer, cfg) != key
    assert (
        cache.cache_key(
            task, examples, tokenizer, DatasetConfig(name="metamathqa", max_length=64, prompt_template="qa")
        )
        != key
    )
    # classification features (int and float labels) round-trip too
    rows = [{"texts": ["a b"], "label": 1.5}, {"texts": ["c"], "label": 0.25}]

    class Reg:
        name, version = "stsb_like", "1"

        def features(self, example, tok, c):
            return {"input_ids": tok(*example["texts"])["input_ids"], "labels": example["label"]}

    rcfg = DatasetConfig(name="stsb")
    assert cache.cached_features(Reg(), rows, tokenizer, rcfg) == cache.cached_features(Reg(), rows, tokenizer, rcfg)
    assert [f["labels"] for f in cache.cached_features(Reg(), rows, tokenizer, rcfg)] == [1.5, 0.25]
