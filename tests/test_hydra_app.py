"""lorabench behaves as a Hydra app: shell completion that works in bash, ``--version``,
``hydra.run.dir`` / ``hydra.sweep.dir`` honoured, ``.hydra/`` kept with each run, each sweep job
echoed, a micro-batch derived when not set, and every ``lorabench`` example of the README valid as
written (the CPU ones run at tiny scale)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorabench.cli import main
from lorabench.config import derive_micro_batch
from lorabench.config_store import compose
from lorabench.errors import ConfigError
from lorabench.fingerprint import portable_path
from lorabench.validate import build_run
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lorabench"), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code


def test_version(capsys):
    assert cli("--version") == 0
    assert re.fullmatch(r"lorabench \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def bash_complete(line: str) -> list[str]:
    """What bash offers after ``line`` once ``eval "$(lorabench -sc install=bash)"`` ran."""
    script = f"""
        eval "$(lorabench -sc install=bash)"
        COMP_LINE={shlex.quote(line)}; COMP_POINT=${{#COMP_LINE}}
        read -r -a COMP_WORDS <<< "$COMP_LINE"
        COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); [[ "$COMP_LINE" == *" " ]] && COMP_CWORD=${{#COMP_WORDS[@]}}
        hydra_bash_completion
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_bash_completion_installs_for_lorabench_and_completes_commands_and_overrides():
    installed = run_cli("-sc", "install=bash")
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.rstrip().endswith("-F hydra_bash_completion lorabench")
    assert run_cli("train", "-sc", "install=bash").stdout == installed.stdout  # the README's spelling too
    assert bash_complete("lorabench ta") == ["table"]
    assert sorted(bash_complete("lorabench train method=galo")) == ["method=galore", "method=galore_torch"]
    assert "train.lr=" in bash_complete("lorabench train train.l")


def test_hydra_run_dir_holds_the_run_with_its_hydra_files(sst2_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    args = [
        a for a in tiny_overrides("classification", sst2_dir, tmp_path / "default") if not a.startswith("results_dir")
    ]
    assert cli("train", "method=lora", *args, f"hydra.run.dir={out}") == 0
    (record,) = out.glob("*/record.json")
    assert not (tmp_path / "default").exists()
    hydra_dir = record.parent / ".hydra"
    config = yaml.safe_load((hydra_dir / "config.yaml").read_text())
    written = portable_path(str(out))  # as records write it: relative where it lies under the checkout or beside it
    assert config["method"]["label"] == "lora" and config["results_dir"] == written
    assert "method=lora" in yaml.safe_load((hydra_dir / "overrides.yaml").read_text())
    assert json.loads(record.read_text())["config"]["results_dir"] == written


def test_sweep_echoes_each_job_and_honours_hydra_sweep_dir(sst2_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = [
        a for a in tiny_overrides("classification", sst2_dir, tmp_path / "default") if not a.startswith("results_dir")
    ]
    assert cli("train", "-m", "method=lora", "seed=0,1", *args, f"hydra.sweep.dir={out}") == 0
    printed = capsys.readouterr().out
    assert "sweep job #0: method=lora seed=0" in printed and "sweep job #1: method=lora seed=1" in printed
    assert len(list(out.glob("*/record.json"))) == 2 and not (tmp_path / "default").exists()


@pytest.mark.parametrize(
    "global_batch,processes,device,expected",
    [(16, 1, "cpu", 4), (4, 2, "cpu", 2), (6, 1, "cpu", 3), (16, 1, "cuda", 16), (48, 2, "cuda", 12), (7, 1, "cpu", 1)],
)
def test_micro_batch_is_derived(global_batch, processes, device, expected):
    assert derive_micro_batch(global_batch, processes, device) == expected


def test_derived_micro_batch_keeps_explicit_values_and_refuses_what_processes_cannot_split():
    cfg, _ = build_run(compose(["hardware=cpu_ddp2", "model=tiny_llama"]))  # the README example
    assert (cfg.hardware.micro_batch_size, cfg.gradient_accumulation()) == (2, 1)
    cfg, _ = build_run(compose(["hardware.micro_batch_size=1", "train.global_batch_size=8"]))
    assert (cfg.hardware.micro_batch_size, cfg.gradient_accumulation()) == (1, 8)
    with pytest.raises(ConfigError, match="global_batch_size=5 is not divisible by hardware.num_processes=2"):
        build_run(compose(["hardware=cpu_ddp2", "train.global_batch_size=5"]))


# -- the README's examples ---------------------------------------------------------------------------
def readme_commands() -> list[list[str]]:
    """Every ``lorabench ...`` line of the README's indented code blocks (continuations joined,
    comments dropped), as argument lists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.startswith("    lorabench "):
            commands.append(shlex.split(line.split(" #")[0].strip())[1:])
    return commands


README = readme_commands()
TRAIN_EXAMPLES = [c for c in README if c[0] == "train"]
NEEDS_GPU = ("hardware=gpu", "hardware=gpu_ddp", "hardware=gpu_fsdp", "hardware=gpu_zero2", "hardware=gpu_zero3")


def test_the_readme_has_examples():
    assert len(TRAIN_EXAMPLES) >= 6 and {c[0] for c in README} >= {"train", "table"}


@pytest.mark.parametrize("example", TRAIN_EXAMPLES, ids=[" ".join(c) for c in TRAIN_EXAMPLES])
def test_every_readme_train_example_is_valid_as_written(example, sst2_dir):
    overrides = [a.replace("path/to/glue/SST-2", str(sst2_dir)).replace("=...", f"={sst2_dir}") for a in example[1:]]
    overrides = [a for a in overrides if a != "-m"]
    # one job of a sweep (a list value such as model.target_modules=[a,b] is one value, not a sweep)
    single = [a.split(",")[0] if "=" in a and "=[" not in a else a for a in overrides]
    if any(a in NEEDS_GPU for a in single):
        with pytest.raises(ConfigError, match="needs CUDA"):  # valid on a GPU machine; this one has none
            build_run(compose(single))
        return
    build_run(compose(single))


# the Optuna sweeper example runs its trials in tests/test_tuning.py (two trials, not the example's 30);
# the protocol examples run with the same options at tiny scale in tests/test_federated.py (2 clients x 2
# rounds), tests/test_continual.py and tests/test_compose.py (their CLI runs), which have the task fixtures they need
RUN_ELSEWHERE = ("hydra/sweeper=lr_optuna", "protocol=federated", "protocol=continual", "protocol=compose")
CPU_EXAMPLES = [
    c
    for c in TRAIN_EXAMPLES
    if not any(a in NEEDS_GPU for a in c)
    and not {"hardware=cpu_ddp2", "hardware=cpu_fsdp2"} & set(c)  # tests/test_strategies.py runs 2 processes
    and not any(a in RUN_ELSEWHERE for a in c)
]


@pytest.mark.parametrize("example", CPU_EXAMPLES, ids=[" ".join(c) for c in CPU_EXAMPLES])
def test_readme_cpu_train_examples_run_at_tiny_scale(example, sst2_dir, gsm8k_dir, tmp_path):
    """As written, plus the tiny model of the same kind and a 1-step schedule (tests/conftest.py)."""
    args = [a.replace("path/to/glue/SST-2", str(sst2_dir)).replace("=...", f"={sst2_dir}") for a in example[1:]]
    kind = "classification" if "dataset=sst2" in args else "causal_lm"
    data = sst2_dir if kind == "classification" else gsm8k_dir
    # per-layer updates need the whole batch in one micro-batch (the tiny runs use micro-batches of 2);
    # hardware.release_memory would change this test process's allocator for good (tests/test_lm_loss.py
    # checks it in a child process)
    extra = ("hardware.micro_batch_size=4",) if "+method.layerwise=true" in args else ()
    extra += ("hardware.release_memory=false",) if "hardware=cpu_lowmem" in args else ()
    tiny = tiny_overrides(kind, data, tmp_path, "train.max_steps=1", *extra)
    scale = ("model=", "dataset=", "dataset.data_dir=", "train.max_steps=")
    keep = [a for a in args if not a.startswith(scale) or a == "train.max_steps=0"]
    flags = [a for a in keep if a.startswith("-")]  # Hydra reads flags before the overrides
    assert cli("train", *flags, *tiny, *[a for a in keep if not a.startswith("-")]) == 0


@pytest.mark.parametrize(
    "sweep,job,needle",
    [
        (["method=lora,nosuch"], "sweep job #1 (method=nosuch)", "valid choices: adalora"),
        (["seed=0,1", "train.lr=0.1,nan"], "sweep job #1 (seed=0 train.lr=nan)", "must be a finite number > 0"),
        (["seed=0,1", "train.foo=1"], "sweep job #0 (seed=0 train.foo=1)", "valid keys: eval_every"),
    ],
)
def test_a_bad_job_in_a_sweep_is_one_line_naming_the_job_before_any_job_trains(sweep, job, needle, tmp_path):
    """Every job of a basic-sweeper multirun is composed and validated before the first trains."""
    result = run_cli("train", "-m", *sweep, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and job in lines[0] and needle in lines[0], result.stderr
    assert not (tmp_path / "sweep").exists()  # nothing launched


def test_sweep_jobs_is_hydras_cartesian_product_and_defers_to_other_sweepers():
    from lorabench.validate import sweep_jobs

    assert sweep_jobs(["method=lora,dora", "seed=0,1", "model=tiny_bert"]) == [
        ["method=lora", "seed=0", "model=tiny_bert"],
        ["method=lora", "seed=1", "model=tiny_bert"],
        ["method=dora", "seed=0", "model=tiny_bert"],
        ["method=dora", "seed=1", "model=tiny_bert"],
    ]
    assert sweep_jobs(["hydra/sweeper=optuna", "train.lr=interval(1e-5,1e-2)"]) is None
