"""The bad-input corpus: every case is CLI arguments (and, for data cases, one broken file written in
the dataset's official format) -> exit code 2, exactly one ``lorabench: error:`` line naming the
offending value (or file:line) and the valid choices, no traceback, no weights loaded.

* ``config`` cases fail in ``validate.validate_config`` or before it (Hydra composition); one subprocess
  runs them all and checks that torch, transformers and peft were never imported.
* ``method`` cases are bad method hyper-parameters or components: ``validate.validate_config`` refuses
  them too (``lorabench.method_params.check``), and the same subprocess check holds; only the
  checks that need torch (QLoRA's need for CUDA) wait for the method to resolve.
* ``preflight`` cases fail in ``lorabench.preflight`` on a meta-device model: no record is written.
* ``data`` cases fail when ``train()`` reads the data, before the model loads: the record says
  ``failed`` with ``model.source`` null.

Plus property-based fuzzing (hypothesis) of the numeric fields: any value is accepted or refused
with a ``ConfigError`` naming the field, never another exception.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import compose, tiny_overrides, write_gsm8k, write_sst2

ERROR = "lorabench: error:"
HEAVY = ("torch", "transformers", "peft")


@dataclass
class Case:
    id: str
    args: list[str]  # after "train" (or the whole argv for other commands: see ``command``)
    needles: list[str]
    stage: str = "config"  # config | method | preflight | data
    kind: str = "classification"  # which tiny_overrides base: classification | causal_lm | e2e | none
    files: dict[str, bytes] = field(default_factory=dict)  # data file -> content (in the fixture folder)
    command: str = "train"
    torch_free: bool = True  # answered without importing torch (all but the CUDA checks)


def _tsv(*rows: str) -> bytes:
    return ("\n".join(rows) + "\n").encode("utf-8")


def _jsonl(*rows) -> bytes:
    return ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n").encode("utf-8")


GOOD_Q = {"question": "Tom has 2 apples and gets 3 more. How many?", "answer": "2+3=5\n#### 5"}
CAUSAL = "causal_lm"

CASES = [
    # -- config: numbers (train) ---------------------------------------------------------------------
    Case("lr-nan", ["train.lr=nan"], ["train.lr=nan", "finite", "> 0"]),
    Case("lr-inf", ["train.lr=inf"], ["train.lr=inf", "finite", "> 0"]),
    Case("lr-minus-inf", ["train.lr=-inf"], ["train.lr=-inf", "finite"]),
    Case("lr-zero", ["train.lr=0"], ["train.lr=0", "> 0"]),
    Case("lr-string", ["train.lr=abc"], ["abc", "train.lr"]),
    Case("lr-unparsable", ["train.lr=[1"], ["[1"]),
    Case("weight-decay-negative", ["train.weight_decay=-0.1"], ["train.weight_decay=-0.1", ">= 0"]),
    Case("weight-decay-nan", ["train.weight_decay=nan"], ["train.weight_decay=nan", "finite"]),
    Case("warmup-above-one", ["train.warmup_ratio=1.5"], ["train.warmup_ratio=1.5", "[0, 1)"]),
    Case("warmup-nan", ["train.warmup_ratio=nan"], ["train.warmup_ratio=nan", "[0, 1)"]),
    Case("max-steps-negative", ["train.max_steps=-1"], ["train.max_steps=-1", ">= 0"]),
    Case("max-steps-float", ["train.max_steps=1.5"], ["1.5", "train.max_steps"]),
    Case("global-batch-zero", ["train.global_batch_size=0"], ["train.global_batch_size=0", "> 0"]),
    Case(
        "global-batch-indivisible",
        ["train.global_batch_size=10", "hardware.micro_batch_size=4"],
        ["global_batch_size=10", "multiple of 4"],
    ),
    Case("grad-norm-inf", ["train.max_grad_norm=inf"], ["train.max_grad_norm=inf", "finite"]),
    Case("eval-every-negative", ["train.eval_every=-1"], ["train.eval_every=-1", ">= 0"]),
    Case("eval-every-beyond-steps", ["train.eval_every=50", "train.max_steps=10"], ["eval_every=50", "max_steps=10"]),
    Case("schedule", ["train.schedule=step"], ["step", "cosine", "linear", "constant"]),
    Case("nonfinite", ["train.nonfinite=ignore"], ["ignore", "stop", "skip"]),
    Case("report", ["train.report=worst"], ["worst", "last", "best"]),
    Case("train-key-typo", ["train.lrr=1"], ["lrr", "valid keys", "lr,"]),
    # -- config: groups, keys, hardware, model, dataset, run ------------------------------------------
    Case("method-option", ["method=nosuch"], ["nosuch", "galore", "lora"]),
    Case("dataset-option", ["dataset=nosuch"], ["nosuch", "sst2"]),
    Case("model-option", ["model=nosuch"], ["nosuch", "minilm_l6"]),
    Case("hardware-option", ["hardware=nosuch"], ["nosuch", "cpu"]),
    Case("method-key-typo", ["method.rnak=4"], ["rnak", "valid keys", "rank"]),
    Case("dataset-name", ["dataset.name=nosuch"], ["nosuch", "sst2", "gsm8k"]),
    Case("micro-batch-zero", ["hardware.micro_batch_size=0"], ["hardware.micro_batch_size=0", "> 0"]),
    Case("precision", ["hardware.mixed_precision=fp8"], ["fp8", "bf16", "fp16"]),
    Case("cuda-missing", ["hardware=gpu"], ["CUDA", "hardware=cpu"], torch_free=False),
    Case("fp16-on-cpu", ["hardware.mixed_precision=fp16"], ["fp16", "cuda", "bf16"]),
    Case("threads-zero", ["hardware.num_threads=0"], ["hardware.num_threads=0", "> 0"]),
    Case("model-dropout-one", ["model.dropout=1.0"], ["model.dropout=1.0", "[0, 1)"]),
    Case("model-dropout-nan", ["model.dropout=nan"], ["model.dropout=nan", "[0, 1)"]),
    Case("model-source", ["model.source=somewhere"], ["somewhere", "local", "hub", "offline"]),
    Case(
        "local-model-missing",
        ["model.source=local", "model.name_or_path=/nonexistent/model"],
        ["'/nonexistent/model' does not exist", "config.json"],
    ),
    Case("local-model-unset", ["model=minilm_l6", "model.source=local"], ["model.source=local", "name_or_path"]),
    Case("max-length-zero", ["dataset.max_length=0"], ["dataset.max_length=0", "> 0"]),
    Case("dataset-source", ["dataset.source=ftp"], ["ftp", "local", "hub"]),
    Case("train-size-zero", ["dataset.train_size=0"], ["dataset.train_size=0", "> 0"]),
    Case("eval-batch-negative", ["dataset.eval_batch_size=-2"], ["dataset.eval_batch_size=-2", "> 0"]),
    Case("generation-on-encoder", ["model=minilm_l6", "dataset=gsm_symbolic"], ["decoder", "minilm_l6"], kind="none"),
    Case("seed-negative", ["seed=-1"], ["seed=-1", ">= 0"]),
    Case("resume", ["resume=sometimes"], ["sometimes", "never", "auto"]),
    Case("checkpoint-every-negative", ["checkpoint.every=-1"], ["checkpoint.every=-1", ">= 0"]),
    Case("checkpoint-keep-zero", ["checkpoint.keep=0"], ["checkpoint.keep=0", "> 0"]),
    Case("tracker", ["tracker=nosuch"], ["nosuch", "wandb", "mlflow"]),
    Case("intruder-epsilon", ["analysis.intruder_epsilon=0"], ["analysis.intruder_epsilon=0", "(0, 1)"]),
    Case(
        "two-budgets",
        ["budget.trainable_params=1000", "budget.optimizer_state_mb=1"],
        ["budget.trainable_params", "budget.optimizer_state_mb"],
    ),
    Case("budget-negative", ["budget.trainable_params=-5"], ["budget.trainable_params=-5", "> 0"]),
    Case("method-alpha-nan", ["method.alpha=nan"], ["method.alpha=nan", "finite"]),
    Case("method-lr-inf", ["method.lr=inf"], ["method.lr=inf", "finite"]),
    Case("method-dropout-nan", ["method.dropout=nan"], ["method.dropout=nan", "finite"]),
    Case("unknown-command", ["frobnicate"], ["frobnicate", "train", "table"], kind="none", command=""),
    # -- method: checked against the components' Params (lorabench/method_params/, torch-free) ----------
    Case("rank-zero", ["method.rank=0"], ["method.rank=0", "> 0"], stage="method"),
    Case("rank-negative", ["method.rank=-3"], ["method.rank=-3", "> 0"], stage="method"),
    Case("rank-float", ["method.rank=1.5"], ["1.5", "(at method.rank)"], stage="method"),
    Case("galore-rank-negative", ["method=galore", "method.rank=-1"], ["method.rank=-1", "> 0"], stage="method"),
    Case("galore-proj-type", ["method=galore", "method.proj_type=diag"], ["diag", "std"], stage="method"),
    Case("lora-dropout-one", ["method.dropout=1.0"], ["method.dropout=1.0", "[0, 1)"], stage="method"),
    Case("adapter-option", ["method.adapter=nosuch"], ["nosuch", "lora"], stage="method"),
    Case("optimizer-option", ["method.optimizer=nosuch"], ["nosuch", "adamw", "galore", "lorafa"], stage="method"),
    Case("procedure-option", ["method.procedure=nosuch"], ["nosuch", "adalora", "lisa"], stage="method"),
    Case("method-key-added", ["+method.foo=1"], ["method.foo", "valid keys", "rank"], stage="method"),
    Case("targets-word", ["method.target_modules=everything"], ["everything", "all-linear"], stage="method"),
    Case("optimizer-needs-lora", ["method=lora_pro", "method.adapter=none"], ["lora_pro", "['lora']"], stage="method"),
    Case(
        "optimizer-not-for-vera",
        ["method.adapter=vera", "method.optimizer=lora_pro"],
        ["lora_pro", "['lora']", "'vera'"],
        stage="method",
    ),
    Case("procedure-needs-no-adapter", ["method.procedure=lisa"], ["lisa", "['none']", "'lora'"], stage="method"),
    # the one method check that needs torch (to ask for CUDA): it waits for resolve_method
    Case("qlora-needs-cuda", ["method=qlora"], ["needs CUDA"], stage="method", torch_free=False),
    # -- preflight: shapes on a meta-device model, data sizes, prompts -------------------------------
    Case("rank-beyond-shape", ["method.rank=100000"], ["method.rank=100000", "1..32", "query"], stage="preflight"),
    Case(
        "rank-beyond-shape-decoder",
        ["method.rank=17"],
        ["method.rank=17", "1..16", "v_proj"],
        stage="preflight",
        kind=CAUSAL,
    ),
    Case(
        "singular-vector-rank",
        ["method=lora_ga", "method.rank=20"],
        ["method.rank=20", "1..16"],
        stage="preflight",
    ),
    Case(
        "adapter-larger-than-model",
        ["method=miss", "method.rank=100000"],
        ["method.rank=100000", "more than the whole model"],
        stage="preflight",
    ),
    Case(
        "target-missing",
        ["method.target_modules=[nosuch]"],
        ["nosuch", "query", "value", "dense"],
        stage="preflight",
    ),
    Case("targets-empty", ["method.target_modules=[]"], ["empty", "all-linear", "query"], stage="preflight"),
    Case("model-targets-empty", ["model.target_modules=[]"], ["model.target_modules=[]", "query"], stage="preflight"),
    Case(
        "micro-batch-beyond-data",
        ["hardware.micro_batch_size=64", "train.global_batch_size=64"],
        ["hardware.micro_batch_size=64", "has 48", "1..48"],
        stage="preflight",
    ),
    Case(
        "max-length-below-prompt",
        ["dataset.max_length=4"],
        ["dataset.max_length=4 is shorter than a prompt"],
        stage="preflight",
        kind=CAUSAL,
    ),
    Case(
        "xlora-on-encoder",
        ["method=xlora", "method.experts=[{tmp}/expert0,{tmp}/expert1]"],
        ["xlora", "causal language model", "sst2", "gsm8k"],
        stage="preflight",
    ),
    # -- data: official formats, one broken file each ----------------------------------------------
    Case(
        "tsv-wrong-columns",
        [],
        ["train.tsv", "missing column", "label"],
        stage="data",
        files={"train.tsv": _tsv("sentence\tpolarity", "a fine film\t1")},
    ),
    Case(
        "tsv-short-row",
        [],
        ["train.tsv:3", "expected 2"],
        stage="data",
        files={"train.tsv": _tsv("sentence\tlabel", "a fine film\t1", "no label here")},
    ),
    Case(
        "tsv-bad-label",
        [],
        ["train.tsv:2", "maybe", "integers 0..1"],
        stage="data",
        files={"train.tsv": _tsv("sentence\tlabel", "a fine film\tmaybe")},
    ),
    Case("tsv-empty", [], ["train.tsv", "empty"], stage="data", files={"train.tsv": _tsv("sentence\tlabel")}),
    Case("tsv-dev-empty", [], ["dev.tsv", "empty"], stage="data", files={"dev.tsv": _tsv("sentence\tlabel")}),
    Case(
        "tsv-not-utf8",
        [],
        ["train.tsv:3", "not valid UTF-8", "0xe9"],
        stage="data",
        files={"train.tsv": b"sentence\tlabel\na fine film\t1\nun film ras\xe9 de pr\xe8s\t0\n"},
    ),
    Case(
        "jsonl-not-an-object",
        [],
        ["train.jsonl:2", "JSON object", "int 123"],
        stage="data",
        kind=CAUSAL,
        files={"train.jsonl": _jsonl(GOOD_Q, "123")},
    ),
    Case(
        "jsonl-answer-null",
        [],
        ["train.jsonl:1", "'answer' is null", "string"],
        stage="data",
        kind=CAUSAL,
        files={"train.jsonl": _jsonl({"question": "How many?", "answer": None})},
    ),
    Case(
        "jsonl-missing-column",
        [],
        ["train.jsonl:1", "missing column", "question"],
        stage="data",
        kind=CAUSAL,
        files={"train.jsonl": _jsonl({"answer": "#### 5"})},
    ),
    Case(
        "jsonl-invalid-json",
        [],
        ["train.jsonl:3", "not valid JSON"],
        stage="data",
        kind=CAUSAL,
        files={"train.jsonl": _jsonl(GOOD_Q, GOOD_Q, '{"question": "oops"')},
    ),
    Case("jsonl-test-empty", [], ["test.jsonl", "empty"], stage="data", kind=CAUSAL, files={"test.jsonl": b""}),
    Case(
        "jsonl-test-without-answer-marker",
        [],
        ["test.jsonl:1", "####"],
        stage="data",
        kind=CAUSAL,
        files={"test.jsonl": _jsonl({"question": "How many?", "answer": "five"})},
    ),
    Case(
        "jsonl-not-utf8",
        [],
        ["test.jsonl:2", "not valid UTF-8"],
        stage="data",
        kind=CAUSAL,
        files={"test.jsonl": _jsonl(GOOD_Q) + b'{"question": "caf\xe9", "answer": "#### 1"}\n'},
    ),
    Case(
        "csv-not-utf8",
        [],
        ["trainset.csv:3", "not valid UTF-8"],
        stage="data",
        kind="e2e",
        files={"trainset.csv": b'mr,ref\n"name[A]","A is fine."\n"name[B], food[Fran\xe7ais]","B."\n'},
    ),
    Case(
        "csv-missing-column",
        [],
        ["trainset.csv", "missing column", "ref"],
        stage="data",
        kind="e2e",
        files={"trainset.csv": b'mr,text\n"name[A]","A is fine."\n'},
    ),
    Case(
        "data-dir-missing",
        ["dataset.data_dir=/nonexistent/glue"],
        ["/nonexistent/glue", "does not exist"],
        stage="data",
    ),
]
CONFIG_CASES = [c for c in CASES if c.stage == "config" and c.torch_free]
METHOD_CASES = [c for c in CASES if c.stage == "method" and c.torch_free]
METHOD_BACKEND_CASES = [c for c in CASES if c.stage == "method" and not c.torch_free]
NEEDS_NO_GPU = {"qlora-needs-cuda", "cuda-missing"}  # they refuse only where CUDA is missing


def write_e2e(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["mr,ref"] + [f'"name[R{i}], food[Thai]","R{i} serves Thai food."' for i in range(12)]
    for name in ("trainset.csv", "devset.csv"):
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def materialize(case: Case, tmp: Path) -> list[str]:
    """The full argv of ``case``: the tiny base overrides with a fresh fixture data folder (its
    broken file written), the case's own arguments, and a results folder in ``tmp``."""
    if case.command != "train":
        return list(case.args)
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    for i in range(2):  # X-LoRA experts: folders that pass the adapter-folder check
        (tmp / f"expert{i}").mkdir(parents=True, exist_ok=True)
        (tmp / f"expert{i}" / "adapter_config.json").write_text("{}")
    results = tmp / "runs"
    if case.kind == "none":
        return ["train", *args, f"results_dir={results}", "progress=false"]
    if case.kind == "e2e":
        data = write_e2e(tmp / "e2e")
        base = tiny_overrides(CAUSAL, data, results)
        base = [a.replace("dataset=gsm8k", "dataset=e2e") for a in base]
    elif case.kind == CAUSAL:
        data = write_gsm8k(tmp / "gsm8k", n_train=8, n_test=2)
        base = tiny_overrides(CAUSAL, data, results)
    else:
        data = write_sst2(tmp / "SST-2")
        base = tiny_overrides("classification", data, results)
    for name, content in case.files.items():
        (data / name).write_bytes(content)
    return ["train", "method=lora", *base, *args]


def check_answer(case: Case, code: int, out: str, err: str, results: Path) -> str:
    """Assert the contract for one case; returns the error line."""
    assert code == 2, f"exit code {code}\n{out}\n{err}"
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1, err
    line = lines[0]
    for needle in case.needles:
        assert needle in line, f"{needle!r} not in: {line}"
    records = [json.loads(p.read_text()) for p in results.rglob("record.json")]
    if case.stage == "data":  # train() read the data first: a failed record, no model loaded
        (record,) = records
        assert record["status"] == "failed" and record["model"]["source"] is None
    else:
        assert not records, "validation must fail before any run starts"
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(case: Case, tmp_path: Path, capsys):
    if case.id in NEEDS_NO_GPU:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("the CUDA check only refuses where there is no GPU")
    from lorabench.cli import main

    argv = materialize(case, tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    check_answer(case, exc.value.code, captured.out, captured.err, tmp_path / "runs")


def test_corpus_is_large_and_covers_every_stage():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)
    assert {c.stage for c in CASES} == {"config", "method", "preflight", "data"}


DRIVER = """
import io, json, sys
from contextlib import redirect_stderr
from lorabench.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
    out.append({"code": code, "err": err.getvalue(), "heavy": [m for m in %r if m in sys.modules]})
print(json.dumps(out))
""" % (HEAVY,)


@pytest.mark.parametrize(
    "cases,allowed",
    [
        # config validation imports neither torch, transformers nor peft
        (CONFIG_CASES, set()),
        # nor does the check of the method's components and hyper-parameters (validate.validate_config ->
        # lorabench.method_params.check.check_method)
        (METHOD_CASES, set()),
        # QLoRA's CUDA check asks torch once the method resolves; transformers and peft load only
        # when a method is built
        (METHOD_BACKEND_CASES, {"torch"}),
    ],
    ids=["config", "method", "method-backend"],
)
def test_errors_are_answered_before_the_heavy_imports(cases, allowed, tmp_path: Path):
    """Every case of a stage, run in one fresh interpreter: each answers exit 2 with its line, and
    after each one nothing heavier than ``allowed`` has been imported (so none of them pays for it)."""
    if any(c.id in NEEDS_NO_GPU for c in cases):
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("the CUDA check only refuses where there is no GPU")
    argvs = [materialize(c, tmp_path / c.id) for c in cases]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argvs)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, result in zip(cases, results):
        check_answer(case, result["code"], "", result["err"], tmp_path / case.id / "runs")
        assert set(result["heavy"]) <= allowed, f"{case.id}: imported {result['heavy']} before answering"


# -- property-based fuzzing of the numeric fields ------------------------------------------------------
NUMBERS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.0, 1.0, 0.5, 1e-12, 1e308, -0.0]),
)
VALUES = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=5))
FIELDS = [
    "train.lr",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.max_steps",
    "train.global_batch_size",
    "train.max_grad_norm",
    "train.eval_every",
    "train.log_every",
    "train.init_batches",
    "train.max_skipped_steps",
    "hardware.micro_batch_size",
    "hardware.num_processes",
    "hardware.num_threads",
    "dataset.max_length",
    "dataset.max_new_tokens",
    "dataset.num_beams",
    "dataset.eval_batch_size",
    "dataset.train_size",
    "model.dropout",
    "checkpoint.every",
    "checkpoint.keep",
    "analysis.intruder_top_k",
    "analysis.intruder_epsilon",
    "budget.trainable_params",
    "budget.optimizer_state_mb",
    "seed",
    "method.rank",
    "method.alpha",
    "method.dropout",
    "method.lr",
]


@pytest.fixture(scope="module")
def base_config() -> dict:
    return compose(["model=tiny_bert", "dataset=sst2", "method=lora"])


def _set(cfg: dict, dotted: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value
    return cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dotted=st.sampled_from(FIELDS), value=VALUES)
def test_numeric_fields_accept_or_name_the_field(base_config, dotted, value):
    from lorabench.errors import ConfigError
    from lorabench.validate import build_run

    try:
        build_run(_set(base_config, dotted, value))
    except ConfigError as exc:
        assert dotted in str(exc), f"{dotted}={value!r}: {exc}"
