"""protocol=continual on a tiny BERT and GLUE-format fixtures written here: the record's accuracy
matrix and its figures against a hand computation, the CLI end to end, an interrupted run resumed
with resume=auto equal to an uninterrupted one, the replay buffer and batches, the task heads,
I-LoRA's rules (pinned numbers from the official code's own functions), and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorabench.cli import main
from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.protocols.continual import metrics
from lorabench.protocols.continual.batches import StageBatches, derived_seed, replay_count, replay_indices
from lorabench.protocols.continual.heads import HeadSelector, TaskHeads
from lorabench.protocols.continual.ilora import ILoRA, consistency_loss, ema_step
from lorabench.results.record import validate_record
from lorabench.validate import validate_config

POSITIVE = ["a delight", "wonderful acting", "moving and funny", "a great film"]
NEGATIVE = ["a dull mess", "boring and flat", "painfully slow", "a waste of time"]


def _label(i: int) -> int:
    return 0 if i % 3 == 0 else 1  # unbalanced dev sets: a constant prediction scores 1/3 or 2/3


def _write(folder: Path, header: str, row, n_train: int = 24, n_dev: int = 9) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, offset in (("train.tsv", n_train, 0), ("dev.tsv", n_dev, 100)):
        lines = [header] + [row(offset + i, _label(i)) for i in range(n)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> dict[str, Path]:
    """SST-2, RTE and MRPC folders in the official GLUE TSV formats (lorabench/data/glue.py)."""
    root = tmp_path_factory.mktemp("glue_continual")
    nli = {0: "entailment", 1: "not_entailment"}
    return {
        "sst2": _write(
            root / "SST-2", "sentence\tlabel", lambda i, l: f"the movie is {(POSITIVE if l else NEGATIVE)[i % 4]}\t{l}"
        ),
        "rte": _write(
            root / "RTE",
            "index\tsentence1\tsentence2\tlabel",
            lambda i, l: (
                f"{i}\ta dog runs in the park {i} .\t{'a dog runs' if l == 0 else 'no cat sleeps'} {i} .\t{nli[l]}"
            ),
        ),
        "mrpc": _write(
            root / "MRPC",
            "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            lambda i, l: (
                f"{l}\t{1000 + i}\t{2000 + i}\the agreed {i} .\t{'he said yes' if l else 'the market fell'} {i} ."
            ),
        ),
    }


def continual_args(glue: dict[str, Path], results: Path, tasks=("sst2", "rte"), *extra: str) -> list[str]:
    return [
        "protocol=continual",
        "model=tiny_bert",
        "method=lora",
        f"protocol.continual.tasks=[{','.join(tasks)}]",
        "protocol.continual.steps_per_task=2",
        *(f"+protocol.continual.data_dirs.{t}={glue[t]}" for t in tasks),
        "dataset.max_length=32",
        "train.global_batch_size=4",
        "hardware.micro_batch_size=2",
        "train.lr=0.05",
        f"results_dir={results}",
        "progress=false",
        *extra,
    ]


def train(*overrides: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["train", *overrides])
    return exc.value.code


def only_record(root: Path) -> tuple[Path, dict]:
    (path,) = root.rglob("record.json")
    return path.parent, json.loads(path.read_text())


# -- the figures ------------------------------------------------------------------------------------
def test_summary_figures_by_hand():
    tasks, primaries = ["a", "b", "c"], {"a": "accuracy", "b": "f1", "c": "accuracy"}
    rows = [{"a": 0.5}, {"a": 0.7, "b": 0.6}, {"a": 0.4, "b": 0.65, "c": 0.9}]
    stages = [{"scores": {t: {primaries[t]: v, "other": -1.0} for t, v in row.items()}} for row in rows]
    out = metrics.summary(stages, tasks, primaries)
    assert out["accuracy_matrix"] == [[0.5, None, None], [0.7, 0.6, None], [0.4, 0.65, 0.9]]
    assert out["average_accuracy"] == pytest.approx((0.4 + 0.65 + 0.9) / 3)
    # BWT = mean_j<T-1 R[T-1][j] - R[j][j]; forgetting uses the best earlier score (0.7 for task a, not 0.5)
    assert out["backward_transfer"] == pytest.approx(((0.4 - 0.5) + (0.65 - 0.6)) / 2)
    assert out["forgetting"] == pytest.approx(((0.7 - 0.4) + (0.6 - 0.65)) / 2)
    one = metrics.summary(stages[:1], tasks, primaries)
    assert one["average_accuracy"] == 0.5 and one["backward_transfer"] is None and one["forgetting"] is None


# -- the CLI end to end -----------------------------------------------------------------------------
def test_continual_cli_run_records_the_matrix(glue, tmp_path):
    assert train(*continual_args(glue, tmp_path, ("sst2", "rte", "mrpc"))) == 0
    run_dir, record = only_record(tmp_path)
    assert validate_record(record) is None and record["status"] == "completed"
    assert record["run_id"].startswith("lora-continual-sst2+rte+mrpc-tiny_bert-s0-")
    report = record["protocol_report"]
    assert report["tasks"] == ["sst2", "rte", "mrpc"] and report["strategy"] == "sequential"
    assert [s["task"] for s in report["stages"]] == ["sst2", "rte", "mrpc"]
    assert [s["step"] for s in report["stages"]] == [2, 4, 6]
    R = report["accuracy_matrix"]
    assert [[v is None for v in row] for row in R] == [[False, True, True], [False, False, True], [False] * 3]
    for i, stage in enumerate(report["stages"]):  # the matrix is the stages' accuracies
        assert sorted(stage["scores"]) == sorted(["sst2", "rte", "mrpc"][: i + 1])
        assert R[i][: i + 1] == [stage["scores"][t]["accuracy"] for t in ["sst2", "rte", "mrpc"][: i + 1]]
    assert len({v for row in R for v in row if v is not None}) > 1, R  # the fixtures give different scores
    assert report["average_accuracy"] == pytest.approx(sum(R[2]) / 3)
    assert report["backward_transfer"] == pytest.approx(((R[2][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2)
    assert report["forgetting"] == pytest.approx(((max(R[0][0], R[1][0]) - R[2][0]) + (R[1][1] - R[2][1])) / 2)
    m = record["metrics"]
    assert m["primary"] == "average_accuracy" and m["higher_is_better"] is True
    assert m["final"]["average_accuracy"] == report["average_accuracy"]
    assert m["final"]["backward_transfer"] == report["backward_transfer"]
    assert m["final"]["mrpc/accuracy"] == R[2][2]
    assert [h["stage"] for h in record["history"]] == [0, 1, 2]
    data = record["dataset"]
    assert data["name"] == "sst2+rte+mrpc" and data["source"]["kind"] == "local"
    assert [t["source"]["kind"] for t in data["tasks"]] == ["local"] * 3
    assert [Path(t["source"]["path"]).name for t in data["tasks"]] == ["SST-2", "RTE", "MRPC"]
    assert [t["eval_size"] for t in data["tasks"]] == [9, 9, 9]
    # three heads trained (one per task), every stage checkpointed (keep=2: the last two)
    assert record["cost"]["trainable_params"] == record["cost"]["expected_trainable_params"]
    assert sorted(p.name for p in (run_dir / "continual").iterdir()) == ["stage_1", "stage_2"]
    heads = [k for k in load_file(str(run_dir / "continual" / "stage_2" / "trainable.safetensors")) if "heads." in k]
    assert {k.split("heads.")[1].split(".")[0] for k in heads} == {"0", "1", "2"}

    from lorabench.results.protocol_table import build_protocol_rows
    from lorabench.results.table import collect

    table, _ = build_protocol_rows(collect(tmp_path, protocol="continual")[0], "continual")  # its own table
    (row,) = table.values
    assert row["dataset"] == "sst2+rte+mrpc" and row["average"]["mean"] == pytest.approx(100 * sum(R[2]) / 3)
    assert row["rte final"]["mean"] == pytest.approx(100 * R[2][1])


# -- resume -------------------------------------------------------------------------------------------
def test_interrupted_continual_run_resumes_with_the_same_numbers(glue, tmp_path, monkeypatch):
    """ilora (replay buffer, slow copy, consistency loss): stopped right after stage 1 (SIGTERM via
    LORABENCH_FAULT_AT_STEP), resumed, stopped again inside stage 2 (restarted from its start), resumed:
    the same record numbers and weights as an uninterrupted run."""
    extra = (
        "protocol.continual.strategy=ilora",
        "protocol.continual.replay_size=6",
        "protocol.continual.replay_ratio=0.5",
    )
    tasks = ("sst2", "rte", "mrpc")
    assert train(*continual_args(glue, tmp_path / "a", tasks, *extra)) == 0
    b = continual_args(glue, tmp_path / "b", tasks, *extra)
    monkeypatch.setenv("LORABENCH_FAULT_AT_STEP", "2")  # the last step of stage 0
    assert train(*b) == 130
    b_dir, stopped = only_record(tmp_path / "b")
    assert stopped["status"] == "canceled" and "continues at stage 1" in stopped["error"]["message"]
    assert [s["task"] for s in stopped["protocol_report"]["stages"]] == ["sst2"]
    monkeypatch.setenv("LORABENCH_FAULT_AT_STEP", "3")  # inside stage 1
    assert train(*b, "resume=auto") == 130
    _, stopped = only_record(tmp_path / "b")
    assert "inside stage 1" in stopped["error"]["message"]
    monkeypatch.delenv("LORABENCH_FAULT_AT_STEP")
    assert train(*b, "resume=auto") == 0
    a_dir, a = only_record(tmp_path / "a")
    _, b_rec = only_record(tmp_path / "b")
    assert b_rec["status"] == "completed"
    assert [r["stage"] for r in b_rec["resumed_from"]] == [0, 0]
    assert b_rec["protocol_report"]["replay_buffer"] == {"sst2": 6, "rte": 6, "mrpc": 6}
    kept = [json.loads((d / "continual/stage_2/state.json").read_text())["replay"] for d in (a_dir, b_dir)]
    assert kept[0] == kept[1] == {t: replay_indices(24, 6, derived_seed(0, "replay", i)) for i, t in enumerate(tasks)}
    for key in ("train_log", "history", "metrics"):
        assert a[key] == b_rec[key], key
    assert a["protocol_report"] == b_rec["protocol_report"]
    assert a["protocol_report"]["strategy_report"]["last_consistency_loss"] > 0
    for name in (
        "adapter.safetensors",
        "continual/stage_2/trainable.safetensors",
        "continual/stage_2/strategy.safetensors",
    ):
        wa, wb = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert wa.keys() == wb.keys() and wa, name
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    # the final model is the slow learner: the saved adapter holds the slow tensors
    slow = load_file(str(a_dir / "continual/stage_2/strategy.safetensors"))
    fast = load_file(str(a_dir / "continual/stage_2/trainable.safetensors"))
    adapter = load_file(str(a_dir / "adapter.safetensors"))
    lora_b = [k for k in slow if "lora_B" in k]
    assert lora_b and any(not torch.equal(slow[k], fast[k]) for k in lora_b)
    assert adapter.keys() == slow.keys() and all(torch.equal(adapter[k], slow[k]) for k in slow)


# -- the pieces ---------------------------------------------------------------------------------------
def test_replay_buffer_and_batches_are_deterministic():
    assert replay_indices(50, 6, seed=3) == replay_indices(50, 6, seed=3)
    assert replay_indices(50, 6, seed=3) != replay_indices(50, 6, seed=4)
    assert len(set(replay_indices(50, 6, seed=3))) == 6 and replay_indices(4, 6, seed=3) == [0, 1, 2, 3]
    assert [replay_count(t, 2, 0.25) for t in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert sum(replay_count(t, 3, 0.4) for t in range(10)) == 12  # floor(10 * 3 * 0.4)

    current = [{"input_ids": [1, 10 + i], "labels": 0} for i in range(5)]
    buffer = [(0, {"input_ids": [1, 100 + i, 7], "labels": 1}) for i in range(4)]

    def collate(rows):
        from lorabench.data.base import collate as pad

        return pad(rows, pad_token_id=0)

    def stream(seed, rank=0, world=1):
        seen = []
        batches = StageBatches(
            current,
            1,
            collate,
            micro=2,
            seed=seed,
            device="cpu",
            replay=buffer,
            ratio=0.5,
            rank=rank,
            world=world,
            on_batch=lambda batch, ids, rows: seen.append((ids.tolist(), rows)),
        )
        return [next(batches)["input_ids"].tolist() for _ in range(6)], seen

    first, seen = stream(5)
    assert first == stream(5)[0] and first != stream(6)[0]
    assert all(ids == [1, 0] and rows == [1] for ids, rows in seen)  # ratio 0.5 of 2 rows: one replayed, last
    assert all(batch[1][1] >= 100 for batch in first)  # the replayed row comes from the buffer
    epoch = sorted(batch[0][1] for batch in first[:5])
    assert epoch == [10, 11, 12, 13, 14]  # the current task's rows: one shuffled epoch, each once
    # two processes share one stream: rank 0 and rank 1 get alternate draws of it
    assert stream(5, 0, 2)[0][:3] == [first[0], first[2], first[4]]
    assert stream(5, 1, 2)[0][:3] == [first[1], first[3], first[5]]


def test_task_heads_route_each_row_to_its_head():
    torch.manual_seed(0)
    selector = HeadSelector()
    heads = TaskHeads(torch.nn.Linear(4, 2), 3, selector)
    with torch.no_grad():
        for i, head in enumerate(heads.heads):
            head.weight.add_(i)
    x = torch.randn(5, 4)
    selector.active = 2
    assert torch.equal(heads(x), heads.heads[2](x))
    selector.task_ids = torch.tensor([0, 1, 0, 1, 1])
    out = heads(x)
    assert torch.allclose(out[[0, 2]], heads.heads[0](x[[0, 2]])) and torch.allclose(
        out[[1, 3, 4]], heads.heads[1](x[[1, 3, 4]])
    )
    out.sum().backward()
    assert heads.heads[2].weight.grad is None and heads.heads[0].weight.grad is not None


# numbers printed by which47/LLMCL method/ILORA.py's own ILoRAModel.update_ema_weights and
# ILoRAModel.forward (its consistency-loss lines), run on these tensors (with a stub model returning
# them as hidden states); see the module docstring of lorabench/protocols/continual/ilora.py
OFFICIAL_EMA_025 = {"a": [[0.75, -1.25], [0.875, 2.0]], "b": [0.4375, -0.3125]}
OFFICIAL_L_CONS = 0.722802996635437
OFFICIAL_GRAD_LAYER0_SUM = -0.2160971313714981
OFFICIAL_GRAD_ABS_SUM = 0.8823695033788681


def test_ilora_rules_match_the_official_code():
    fast = {"a": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([0.25, -0.75])}
    slow = {"a": torch.tensor([[0.0, 1.0], [2.0, -1.0]]), "b": torch.tensor([1.0, 1.0])}
    for name in slow:  # the official coefficient min(1 - 1/(step+1), 0.25) is 0.25 at every step >= 1
        ema_step(slow[name], fast[name], 0.25)
        assert slow[name].tolist() == OFFICIAL_EMA_025[name]
    g = torch.Generator().manual_seed(3)
    fast_h = tuple(torch.randn(2, 3, 4, generator=g, requires_grad=True) for _ in range(3))
    slow_h = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(3))
    loss = consistency_loss(fast_h, slow_h, torch.ones(2, 3))
    assert float(loss.detach()) == pytest.approx(OFFICIAL_L_CONS, rel=1e-6)
    assert float(consistency_loss(fast_h, slow_h).detach()) == pytest.approx(OFFICIAL_L_CONS, rel=1e-6)
    loss.backward()
    assert float(fast_h[0].grad.sum()) == pytest.approx(OFFICIAL_GRAD_LAYER0_SUM, rel=1e-5)
    assert sum(float(h.grad.abs().sum()) for h in fast_h) == pytest.approx(OFFICIAL_GRAD_ABS_SUM, rel=1e-5)
    # padding is left out: a masked position contributes nothing
    masked = consistency_loss(fast_h, slow_h, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    diffs = [(f - torch.maximum(f, s)) ** 2 for f, s in zip(fast_h, slow_h)]
    by_hand = sum(d[0, :2].sum() + d[1].sum() for d in diffs) / (3 * 5 * 4)
    assert float(masked.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-6)


def test_ilora_slow_weights_are_the_ema_of_the_fast_ones():
    """On a tiny LoRA model: after each optimizer step slow = lam * slow + (1 - lam) * fast (computed
    here from the fast tensors); evaluation weights are the slow ones, and the fast ones come back."""
    from peft import LoraConfig, get_peft_model

    from lorabench.config import ModelConfig
    from lorabench.models import load_model

    torch.manual_seed(0)
    model = load_model(
        ModelConfig(name="tiny_bert", random_init="tiny_bert", source="random"), "classification", 2
    ).model
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    model.eval()  # no dropout: the forward passes below are comparable
    lam = 0.6
    ilora = ILoRA(lam, 1.0)
    ilora.setup(model, None)
    names = sorted(ilora.slow)
    expected = {n: ilora.slow[n].clone() for n in names}
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD([params[n] for n in names], lr=0.5)
    ids = torch.tensor([[101, 2023, 3185, 102], [101, 2204, 2143, 102]])
    for _ in range(3):
        out = model(input_ids=ids, labels=torch.tensor([0, 1]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ilora.ema_update()
        for n in names:
            expected[n] = lam * expected[n] + (1 - lam) * params[n].detach()
    for n in names:
        assert torch.allclose(ilora.slow[n], expected[n], atol=1e-7), n
    assert any(not torch.equal(ilora.slow[n], params[n]) for n in names if "lora_B" in n)
    fast_logits = model(input_ids=ids).logits
    with ilora.slow_weights():
        slow_logits = model(input_ids=ids).logits
    reference = torch.func.functional_call(model, expected, args=(), kwargs={"input_ids": ids}, strict=False).logits
    assert torch.allclose(slow_logits, reference, atol=1e-6) and not torch.allclose(slow_logits, fast_logits)
    assert torch.equal(model(input_ids=ids).logits, fast_logits)  # the fast weights are back


# -- config errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["protocol.continual.tasks=[sst2,nosuch]"],
            "unknown protocol.continual.tasks entry 'nosuch'; valid choices: cola",
        ),
        (["protocol.continual.tasks=[sst2,sst2]"], "names sst2 more than once"),
        (["protocol.continual.tasks=[rte,mrpc]"], "dataset='sst2' must be the first task .* set dataset=rte"),
        (["protocol.continual.tasks=[sst2,stsb]"], "must share one head and label count"),
        (["protocol.continual.tasks=[sst2,mnli]"], "mnli: classification \\(3 labels\\)"),
        (
            ["protocol.continual.strategy=ewc"],
            "unknown protocol.continual.strategy 'ewc'; valid choices: ilora, replay, sequential",
        ),
        (
            ["method=galore", "protocol.continual.strategy=ilora"],
            "'ilora' interpolates an adapter, but method 'galore'",
        ),
        (
            ["protocol.continual.strategy=replay", "protocol.continual.replay_ratio=0"],
            "replay_ratio=0.0; both must be > 0",
        ),
        (["+protocol.continual.data_dirs.qqp=/x"], "data_dirs has folder\\(s\\) for qqp.*valid keys: sst2, rte, mrpc"),
        (["+protocol.continual.data_dirs.sst2=/x", "dataset.data_dir=/y"], "name two folders for the first task"),
        (["hardware=cpu_ddp2"], "one head per task, and DDP needs every trained tensor to get a gradient"),
    ],
)
def test_continual_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose(["protocol=continual", "model=tiny_bert", *overrides]))


def test_continual_config_composes_with_the_first_task_as_dataset():
    cfg = validate_config(compose(["protocol=continual", "model=minilm_l6", "method=lora"]))
    assert cfg.dataset.name == "sst2" and cfg.protocol.continual.tasks == ["sst2", "rte", "mrpc"]
    cfg = validate_config(
        compose(["protocol=continual", "model=tiny_bert", "dataset=rte", "protocol.continual.tasks=[rte,sst2]"])
    )
    from lorabench.protocols.continual.tasks import task_config

    sst2 = task_config(cfg, "sst2")  # the run's sizes, the preset's source
    assert sst2.max_length == cfg.dataset.max_length == 256 and sst2.eval_batch_size == 64 and sst2.data_dir is None
