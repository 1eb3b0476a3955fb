"""hardware.strategy: FSDP2 and DeepSpeed ZeRO-2/3 (lorabench.distributed) against DDP and the
one-process run, the declarations that refuse what cannot run on shards or partitions, and the
committed measured matrix."""

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
    # clipping that acts at every step (DeepSpeed's engine clips by its own global norm)
    "lora_clipped": ("method=lora", "train.max_grad_norm=0.001"),
}


ONE_PROCESS_RUNS = [
    *(("fsdp", case) for case in ("badam", "lora", "lora_bf16")),
    # ZeRO: DeepSpeed's engine steps inside the backward, over its own fp32 partition (ZeRO-3: the
    # weights partitioned, gathered with its hooks off for evaluation and saving); bf16 is the run's autocast
    *(("zero2", case) for case in ("lora", "lora_bf16", "lora_clipped")),
    ("zero3", "lora"),
]


@pytest.mark.parametrize("strategy,case", ONE_PROCESS_RUNS)
def test_one_process_partitioned_run_equals_the_plain_run(sst2_dir, tmp_path, strategy, case):
    """A world of one under FSDP2 (DTensor parameters, whole_model around evaluation and saving) or
    DeepSpeed ZeRO trains, scores and saves exactly what the plain run does (2 micro-batches per
    step: DeepSpeed's accumulation boundary is the run's)."""
    extra = (*ONE_PROCESS_CASES[case], "model.dropout=0.0", "train.log_every=1", "train.max_steps=4")
    plain, plain_dir = _train(tiny_overrides("classification", sst2_dir, tmp_path / "plain", *extra))
    fsdp, fsdp_dir = _train(
        tiny_overrides("classification", sst2_dir, tmp_path / strategy, *extra, f"hardware.strategy={strategy}")
    )
    assert fsdp["status"] == "completed" and fsdp["hardware"]["strategy"] == strategy
    assert fsdp["cost"]["trainable_params"] == plain["cost"]["trainable_params"]  # ZeRO-3: counted whole
    assert [e["loss"] for e in fsdp["train_log"]] == [e["loss"] for e in plain["train_log"]]
    assert fsdp["metrics"]["final"] == plain["metrics"]["final"]
    assert fsdp["analysis"]["intruders_total"] == plain["analysis"]["intruders_total"]  # merged without a copy
    names = (
        ("adapter.safetensors", "peft_adapter/adapter_model.safetensors")
        if case != "badam"
        else ("model/model.safetensors",)
    )
    # ZeRO-3's saved tensors, and ZeRO's clipping (DeepSpeed sums the global norm over its own flat
    # buffers), differ from the plain run's in the last bits (measured: at most 5e-10 and 3e-11, with
    # equal losses and scores); the rest is bitwise
    atol = 1e-8 if strategy == "zero3" or case == "lora_clipped" else 0.0
    for name in names:
        a, b = load_file(str(fsdp_dir / name)), load_file(str(plain_dir / name))
        assert sorted(a) == sorted(b), name
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= atol, name
    assert fsdp["run_id"] != plain["run_id"]  # the strategy is part of the configuration


@pytest.mark.parametrize("preset", ["lora", "full", "galore"])
def test_two_process_partitioned_runs_equal_ddp(strategy_matrix, sst2_dir, tmp_path, preset):
    """2 processes (gloo): FSDP2's and ZeRO-2/3's losses and saved tensors equal DDP's, and each
    process keeps half the optimizer state (scripts/strategy_matrix.py's measurement); ZeRO also
    keeps an fp32 master copy of its half of the trained weights (counted: 3/4 of DDP's bytes for
    AdamW). GaLore gathers each projected gradient under FSDP2 and keeps its subspace state whole on
    every process (only its other parameters' state is halved); ZeRO, which hands the optimizer flat
    partitions, refuses it before training."""
    cells = strategy_matrix.measure(preset, sst2_dir, tmp_path, timeout_s=300)
    assert cells["ddp"]["verdict"] == "runs", cells
    ddp_bytes = cells["ddp"]["optimizer_state_bytes"]
    share = {"fsdp": 0.9 if preset == "galore" else 0.55, "zero2": 0.8, "zero3": 0.8}
    for strategy in strategy_matrix.COMPARED:
        cell = cells[strategy]
        if preset == "galore" and strategy != "fsdp":
            assert cell["verdict"] == "refused" and "flat 1-D partitions" in cell["reason"], cell
            continue
        assert cell["verdict"] == "equals ddp", (strategy, cell)
        assert cell["max_tensor_difference"] <= strategy_matrix.TENSOR_ATOL
        assert cell["optimizer_state_bytes"] < share[strategy] * ddp_bytes, (strategy, cell)


def test_the_matrix_verdict_rules(strategy_matrix):
    """A differing loss or saved tensor is 'differs from ddp', a declared refusal 'refused', a missing
    record without a refusal 'no record'; each strategy is judged on its own against DDP."""
    ddp = {"status": "completed", "train_log": [{"loss": 1.0}, {"loss": 0.9}], "cost": {}}
    off = {**ddp, "train_log": [{"loss": 1.0}, {"loss": 0.9001}]}

    def cells(records, refusal=None, differences=None):
        return strategy_matrix.verdict(records, refusal or {}, differences or {})

    same = cells({"ddp": ddp, "fsdp": ddp, "zero2": off, "zero3": ddp}, differences={"zero3": 1e-3, "fsdp": 0.0})
    assert [same[s]["verdict"] for s in ("ddp", "fsdp", "zero2", "zero3")] == [
        "runs",
        "equals ddp",
        "differs from ddp",
        "differs from ddp",
    ]
    refused = cells({"ddp": ddp}, refusal={"fsdp": "optimizer 'galore' needs whole gradients"})
    assert refused["fsdp"]["verdict"] == "refused" and "galore" in refused["fsdp"]["reason"]
    assert refused["zero2"]["verdict"] == "no record"


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


@pytest.mark.parametrize(
    "strategy,overrides,needle",
    [
        ("zero2", ["method=galore"], "optimizer 'galore' works on each weight's gradient as a matrix"),
        ("zero2", ["method=lisa"], "procedure 'lisa' changes which parameters train"),
        ("zero2", ["method=sora"], "procedure 'sora' acts on gradients between the backward and the update"),
        ("zero2", ["method=codyra"], "procedure 'codyra' changes weights in place between steps"),
        ("zero2", ["method=mgpo"], "regularizer 'mgpo' acts on gradients between the backward"),
        ("zero3", ["method=s2_lora"], "adapter 's2_lora' shares one A and one B across every layer"),
        ("zero3", ["method=lora", "train.nonfinite=skip"], "needs train.nonfinite=stop"),
        ("zero3", ["method=lora", "checkpoint.every=2"], "needs checkpoint.every=0 under zero3"),
        ("zero2", ["method=lora", "protocol=federated", "hardware.num_processes=1"], "needs protocol.name=single"),
    ],
)
def test_zero_refuses_what_deepspeed_cannot_run(strategy, overrides, needle):
    """Before any weight loads: one line naming the component or setting, why, and what works."""
    with pytest.raises(ConfigError) as exc:
        build_run(compose([f"hardware=cpu_{strategy}", *overrides]))
    assert needle in str(exc.value) and f"hardware.strategy={strategy}" in str(exc.value), str(exc.value)
    build_run(compose(["hardware=cpu_ddp2", *overrides]))  # DDP runs them


def test_zero2_runs_what_only_zero3_refuses():
    """S2-LoRA's shared factors are whole on every process under ZeRO-2 (only optimizer state and
    gradients are partitioned), so only the weight-partitioning strategies refuse it."""
    build_run(compose(["hardware=cpu_zero2", "method=s2_lora"]))
    with pytest.raises(ConfigError, match="hardware.strategy=fsdp"):
        build_run(compose(["hardware=cpu_fsdp2", "method=s2_lora"]))


def test_the_deepspeed_config_is_the_runs_batch_arithmetic():
    from lorabench.distributed import accelerator_for, deepspeed_config

    cfg, _ = build_run(compose(["hardware=cpu_zero3", "train.global_batch_size=16", "hardware.micro_batch_size=2"]))
    config = deepspeed_config(3, 2, cfg.gradient_accumulation(), 2, cfg.train.max_grad_norm)
    assert config["train_batch_size"] == 16 and config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"] == {"stage": 3} and config["gradient_clipping"] == cfg.train.max_grad_norm
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}  # the run's autocast
    assert deepspeed_config(2, 4, 1, 1, None)["gradient_clipping"] == 0.0
    one, _ = build_run(compose(["hardware=cpu_zero2", "hardware.num_processes=1", "hardware.mixed_precision=bf16"]))
    accelerator = accelerator_for(one)
    assert accelerator.distributed_type.value == "DEEPSPEED" and accelerator.native_amp  # autocast, not DS's bf16
    assert accelerator.state.deepspeed_plugin.deepspeed_config["bf16"] == {"enabled": False}


def test_ddp_refuses_a_trainable_set_that_moves_and_fsdp_runs_it():
    """BAdam switches the trained block: DDP's reducer (built once) cannot follow, FSDP2 can."""
    with pytest.raises(ConfigError, match=r"hardware.strategy=ddp on 2 processes: method 'badam': procedure 'badam'"):
        build_run(compose(["hardware=cpu_ddp2", "method=badam"]))
    build_run(compose(["hardware=cpu_fsdp2", "method=badam"]))
    build_run(compose(["hardware=cpu", "method=badam"]))


def test_a_ddp_run_after_an_fsdp_or_zero_run_in_one_process_is_ddp_again():
    from accelerate.utils import DistributedType

    from lorabench.distributed import deepspeed_config, new_accelerator

    assert new_accelerator(True, "no", "fsdp").distributed_type == DistributedType.FSDP
    assert new_accelerator(True, "no", "ddp").distributed_type != DistributedType.FSDP
    zero = deepspeed_config(2, 1, 1, 1, None)
    assert new_accelerator(True, "no", "zero2", zero).distributed_type == DistributedType.DEEPSPEED
    assert new_accelerator(True, "no", "ddp").distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    assert new_accelerator(True, "bf16", "ddp").distributed_type != DistributedType.FSDP
    new_accelerator(True, "no")


def test_unknown_strategy_names_the_choices():
    with pytest.raises(
        ConfigError, match=r"hardware.strategy='zero' is invalid; valid choices: ddp, fsdp, zero2, zero3"
    ):
        build_run(compose(["hardware.strategy=zero"]))


def test_committed_matrix_agrees_with_the_declarations():
    """Every preset the committed two-process measurement ran: each partitioned strategy either
    equals DDP or is refused by a declaration; none fails or differs while declared able to run."""
    from lorabench.method_params.check import check_method, strategy_conflicts
    from lorabench.methods.catalog import load_presets

    matrix = json.loads(MATRIX.read_text())["presets"]
    presets = load_presets(ROOT / "conf" / "method")
    assert set(matrix) <= set(presets) and len(matrix) >= 60
    for preset, cells in matrix.items():
        method = check_method(dict(presets[preset]))
        ddp_refused = bool(strategy_conflicts(method, "ddp"))
        assert cells["ddp"]["verdict"] == ("refused" if ddp_refused else "runs"), (preset, cells["ddp"])
        for strategy in ("fsdp", "zero2", "zero3"):
            refused = bool(strategy_conflicts(method, strategy))
            ok = "refused" if refused else ("runs (ddp refused: not compared)" if ddp_refused else "equals ddp")
            assert cells[strategy]["verdict"] == ok, (preset, strategy, cells[strategy])


RESUME_CASES = [
    pytest.param("fsdp", 2, marks=pytest.mark.slow),
    pytest.param("zero2", 1),  # the default suite's: DeepSpeed's partition state saved and loaded in-process
    pytest.param("zero2", 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("strategy,processes", RESUME_CASES)
def test_partitioned_resume_equals_the_uninterrupted_run(sst2_dir, tmp_path, monkeypatch, strategy, processes):
    """Stopped after step 3 and resumed (resume=auto): the same losses, history and final trainable
    tensors as the run that was not stopped; the checkpoint holds whole tensors (gathered), not one
    process's shard. FSDP2's optimizer state is gathered whole; ZeRO's stays one partition per
    process (optimizer_<rank>.pt), and DeepSpeed's fp32 master partition is refreshed on load."""
    from lorabench.checkpoint import list_checkpoints

    def args(root: Path) -> list[str]:
        base = [a for a in tiny_overrides("classification", sst2_dir, root) if not a.startswith("train.max_steps")]
        return [
            "method=lora",
            *base,
            f"hardware=cpu_{'fsdp2' if strategy == 'fsdp' else strategy}",
            f"hardware.num_processes={processes}",
            "train.max_steps=6",
            "checkpoint.every=2",
        ]

    a, a_dir = _train(args(tmp_path / "a"))
    monkeypatch.setenv("LORABENCH_FAULT_AT_STEP", "3")
    with pytest.raises(SystemExit) as exc:
        main(["train", *args(tmp_path / "b")])
    assert exc.value.code != 0
    monkeypatch.delenv("LORABENCH_FAULT_AT_STEP")
    b, b_dir = _train([*args(tmp_path / "b"), "resume=auto"])
    assert b["resumed_from"][0]["step"] == 3 and b["hardware"]["num_processes"] == processes
    assert [e["loss"] for e in a["train_log"]] == [e["loss"] for e in b["train_log"]]
    assert a["metrics"]["final"] == b["metrics"]["final"]
    last_a, last_b = list_checkpoints(a_dir)[-1], list_checkpoints(b_dir)[-1]
    wa = load_file(str(last_a / "trainable.safetensors"))
    wb = load_file(str(last_b / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    rank = a["config"]["method"]["rank"]
    lora_a = [v for k, v in wa.items() if "lora_A" in k]
    assert lora_a and all(v.shape[0] == rank for v in lora_a)  # whole (rank rows), not one process's half
    if strategy != "fsdp":
        assert sorted(p.name for p in last_a.glob("optimizer_*.pt")) == [f"optimizer_{r}.pt" for r in range(processes)]


def test_two_process_runs_follow_the_one_process_lr_schedule(sst2_dir, tmp_path):
    """The schedule steps once per optimizer step on 2 processes too: Accelerate's default stepped it
    num_processes times, so a 2-process run reached lr 0 at half of train.max_steps."""
    steps = ["method=lora", "train.max_steps=6", "train.log_every=1"]
    one, _ = _train(tiny_overrides("classification", sst2_dir, tmp_path / "one", *steps))
    two, _ = _train(tiny_overrides("classification", sst2_dir, tmp_path / "two", *steps, "hardware=cpu_ddp2"))
    lrs = [e["lr"] for e in one["train_log"]]
    assert len(lrs) == 6 and lrs[-2] > 0
    assert [e["lr"] for e in two["train_log"]] == lrs


def test_zero_without_deepspeed_installed_says_how_to_get_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"hardware.strategy=zero2 runs DeepSpeed, which is not installed: pip"):
        build_run(compose(["hardware=cpu_zero2", "method=lora"]))
