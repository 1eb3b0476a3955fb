"""hardware.strategy: FSDP2 (lorabench.distributed) against DDP and the one-process run, the
declarations that refuse what cannot run on shards, and the committed measured matrix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorabench.cli import main
from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.validate import build_run
from tests.conftest import CONF_DIR, tiny_overrides

ROOT = CONF_DIR.parent
MATRIX = ROOT / "results" / "strategies" / "matrix.json"


@pytest.fixture(scope="module")
def strategy_matrix():
    spec = importlib.util.spec_from_file_location("strategy_matrix", ROOT / "scripts" / "strategy_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(args: list[str]) -> tuple[dict, Path]:
    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 0
    root = Path(next(a.split("=", 1)[1] for a in args if a.startswith("results_dir=")))
    path = next(root.rglob("record.json"))
    return json.loads(path.read_text()), path.parent


ONE_PROCESS_CASES = {
    "lora": ("method=lora",),
    # bf16 autocast, which Accelerate's FSDP2 path leaves out (lorabench.distributed.autocast_sharded)
    "lora_bf16": ("method=lora", "hardware.mixed_precision=bf16"),
    # BAdam switches its trained block at every step: the switch must reach FSDP2's sharded parameters
    "badam": ("method=badam", "method.switch_every=1"),
}


@pytest.mark.parametrize("case", sorted(ONE_PROCESS_CASES))
def test_one_process_fsdp_equals_the_plain_run(sst2_dir, tmp_path, case):
    """A world of one under FSDP2 (DTensor parameters, whole_model around evaluation and saving)
    trains, scores and saves exactly what the plain run does."""
    extra = (*ONE_PROCESS_CASES[case], "model.dropout=0.0", "train.log_every=1", "train.max_steps=4")
    plain, plain_dir = _train(tiny_overrides("classification", sst2_dir, tmp_path / "plain", *extra))
    fsdp, fsdp_dir = _train(
        tiny_overrides("classification", sst2_dir, tmp_path / "fsdp", *extra, "hardware.strategy=fsdp")
    )
    assert fsdp["status"] == "completed" and fsdp["hardware"]["strategy"] == "fsdp"
    assert [e["loss"] for e in fsdp["train_log"]] == [e["loss"] for e in plain["train_log"]]
    assert fsdp["metrics"]["final"] == plain["metrics"]["final"]
    assert fsdp["analysis"]["intruders_total"] == plain["analysis"]["intruders_total"]  # merged without a copy
    names = (
        ("adapter.safetensors", "peft_adapter/adapter_model.safetensors")
        if case != "badam"
        else ("model/model.safetensors",)
    )
    for name in names:
        a, b = load_file(str(fsdp_dir / name)), load_file(str(plain_dir / name))
        assert sorted(a) == sorted(b) and all(bool((a[k] == b[k]).all()) for k in a), name
    assert fsdp["run_id"] != plain["run_id"]  # the strategy is part of the configuration


@pytest.mark.parametrize("preset", ["lora", "full", "galore"])
def test_two_process_fsdp_equals_ddp(strategy_matrix, sst2_dir, tmp_path, preset):
    """2 processes (gloo): FSDP2's losses and saved tensors equal DDP's, and each process keeps half
    the optimizer state (scripts/strategy_matrix.py's measurement). GaLore gathers each projected
    gradient, projects the whole matrix and keeps its subspace state whole on every process: its
    update equals DDP's and only the state of its other parameters is halved."""
    cells = strategy_matrix.measure(preset, sst2_dir, tmp_path, timeout_s=240)
    assert cells["ddp"]["verdict"] == "runs", cells
    assert cells["fsdp"]["verdict"] == "equals ddp", cells
    assert cells["fsdp"]["max_tensor_difference"] <= strategy_matrix.TENSOR_ATOL
    ddp_bytes, fsdp_bytes = cells["ddp"]["optimizer_state_bytes"], cells["fsdp"]["optimizer_state_bytes"]
    assert fsdp_bytes < (0.9 if preset == "galore" else 0.55) * ddp_bytes


def test_the_matrix_verdict_rules(strategy_matrix):
    """A differing loss or saved tensor is 'differs from ddp', a declared refusal 'refused'."""
    ddp = {"status": "completed", "train_log": [{"loss": 1.0}, {"loss": 0.9}], "cost": {}}
    verdict = strategy_matrix.verdict
    assert verdict(ddp, ddp, {}, 0.0)["fsdp"]["verdict"] == "equals ddp"
    off = {**ddp, "train_log": [{"loss": 1.0}, {"loss": 0.9001}]}
    assert verdict(ddp, off, {}, 0.0)["fsdp"]["verdict"] == "differs from ddp"
    assert verdict(ddp, ddp, {}, 1e-3)["fsdp"]["verdict"] == "differs from ddp"
    refused = verdict(ddp, None, {"fsdp": "optimizer 'galore' needs whole gradients"}, None)["fsdp"]
    assert refused["verdict"] == "refused" and "galore" in refused["reason"]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["method=galore_torch"], "optimizer 'galore_torch' (galore-torch's own optimizer) projects each weight's"),
        (["method=lora_pro"], "optimizer 'lora_pro' solves for each LoRA pair's gradients"),
        (["method=increlora"], "procedure 'increlora' adds rank components"),
        (["method=lora", "protocol=federated", "hardware.num_processes=1"], "needs protocol.name=single"),
        (["method=dora"], "with use_dora=true needs analysis.intruders=false"),
    ],
)
def test_sharded_strategy_refuses_what_needs_whole_tensors(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        build_run(compose(["hardware=cpu_fsdp2", *overrides]))
    assert needle in str(exc.value) and "hardware.strategy=fsdp" in str(exc.value)
    build_run(compose(["hardware=cpu_ddp2", *overrides]))  # DDP runs them


def test_ddp_refuses_a_trainable_set_that_moves_and_fsdp_runs_it():
    """BAdam switches the trained block: DDP's reducer (built once) cannot follow, FSDP2 can."""
    with pytest.raises(ConfigError, match=r"hardware.strategy=ddp on 2 processes: method 'badam': procedure 'badam'"):
        build_run(compose(["hardware=cpu_ddp2", "method=badam"]))
    build_run(compose(["hardware=cpu_fsdp2", "method=badam"]))
    build_run(compose(["hardware=cpu", "method=badam"]))


def test_a_ddp_run_after_an_fsdp_run_in_one_process_is_ddp_again():
    from accelerate.utils import DistributedType

    from lorabench.distributed import new_accelerator

    assert new_accelerator(True, "no", "fsdp").distributed_type == DistributedType.FSDP
    assert new_accelerator(True, "no", "ddp").distributed_type != DistributedType.FSDP
    assert new_accelerator(True, "bf16", "ddp").distributed_type != DistributedType.FSDP
    new_accelerator(True, "no")


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ConfigError, match=r"hardware.strategy='zero' is invalid; valid choices: ddp, fsdp"):
        build_run(compose(["hardware.strategy=zero"]))


def test_committed_matrix_agrees_with_the_declarations():
    """Every preset the committed two-process measurement ran: FSDP either equals DDP or is refused
    by a declaration; none fails or differs while declared able to shard."""
    from lorabench.method_params.check import check_method, strategy_conflicts
    from lorabench.methods.catalog import load_presets

    matrix = json.loads(MATRIX.read_text())["presets"]
    presets = load_presets(ROOT / "conf" / "method")
    assert set(matrix) <= set(presets) and len(matrix) >= 60
    for preset, cells in matrix.items():
        method = check_method(dict(presets[preset]))
        ddp_refused, fsdp_refused = bool(strategy_conflicts(method, "ddp")), bool(strategy_conflicts(method, "fsdp"))
        assert cells["ddp"]["verdict"] == ("refused" if ddp_refused else "runs"), (preset, cells["ddp"])
        fsdp_ok = "refused" if fsdp_refused else ("runs (ddp refused: not compared)" if ddp_refused else "equals ddp")
        assert cells["fsdp"]["verdict"] == fsdp_ok, (preset, cells["fsdp"])


@pytest.mark.slow
def test_two_process_fsdp_resume_equals_the_uninterrupted_run(sst2_dir, tmp_path, monkeypatch):
    """2 processes under FSDP2, stopped after step 3 and resumed (resume=auto): the same losses,
    history and final trainable tensors as the run that was not stopped; the checkpoint holds whole
    tensors (gathered), not one process's shard."""
    from lorabench.checkpoint import list_checkpoints

    def args(root: Path) -> list[str]:
        base = [a for a in tiny_overrides("classification", sst2_dir, root) if not a.startswith("train.max_steps")]
        return ["method=lora", *base, "hardware=cpu_fsdp2", "train.max_steps=6", "checkpoint.every=2"]

    a, a_dir = _train(args(tmp_path / "a"))
    monkeypatch.setenv("LORABENCH_FAULT_AT_STEP", "3")
    with pytest.raises(SystemExit) as exc:
        main(["train", *args(tmp_path / "b")])
    assert exc.value.code != 0
    monkeypatch.delenv("LORABENCH_FAULT_AT_STEP")
    b, b_dir = _train([*args(tmp_path / "b"), "resume=auto"])
    assert b["resumed_from"][0]["step"] == 3 and b["hardware"]["num_processes"] == 2
    assert [e["loss"] for e in a["train_log"]] == [e["loss"] for e in b["train_log"]]
    assert a["metrics"]["final"] == b["metrics"]["final"]
    wa = load_file(str(list_checkpoints(a_dir)[-1] / "trainable.safetensors"))
    wb = load_file(str(list_checkpoints(b_dir)[-1] / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    rank = a["config"]["method"]["rank"]
    lora_a = [v for k, v in wa.items() if "lora_A" in k]
    assert lora_a and all(v.shape[0] == rank for v in lora_a)  # whole (rank rows), not one process's half


def test_two_process_runs_follow_the_one_process_lr_schedule(sst2_dir, tmp_path):
    """The schedule steps once per optimizer step on 2 processes too: Accelerate's default stepped it
    num_processes times, so a 2-process run reached lr 0 at half of train.max_steps."""
    steps = ["method=lora", "train.max_steps=6", "train.log_every=1"]
    one, _ = _train(tiny_overrides("classification", sst2_dir, tmp_path / "one", *steps))
    two, _ = _train(tiny_overrides("classification", sst2_dir, tmp_path / "two", *steps, "hardware=cpu_ddp2"))
    lrs = [e["lr"] for e in one["train_log"]]
    assert len(lrs) == 6 and lrs[-2] > 0
    assert [e["lr"] for e in two["train_log"]] == lrs
