"""Shared fixtures: tiny data files in the official formats (written here, never downloaded),
config composition through Hydra's compose API, and a one-step method harness."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from lorabench.config_store import compose  # noqa: F401  (re-exported for the tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if (_worker := os.environ.get("PYTEST_XDIST_WORKER", "")).startswith("gw"):
    # parallel test workers launch 2-process runs at the same time: disjoint rendezvous port ranges
    # (below the ephemeral range) so that no two are handed the same port (lorabench.launch._free_port)
    _low = 20000 + 500 * int(_worker[2:])
    os.environ.setdefault("LORABENCH_PORT_RANGE", f"{_low}-{_low + 499}")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_script(name: str):
    """``scripts/<name>.py`` imported as module ``name`` (registered in ``sys.modules``: dataclasses
    look their module up there); the caller pops it when done."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, CONF_DIR.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


POSITIVE = ["a delight", "wonderful acting", "moving and funny", "a great film", "sharp , warm and smart"]
NEGATIVE = ["a dull mess", "boring and flat", "painfully slow", "a waste of time", "clumsy , tired jokes"]


def write_sst2(folder: Path, n_train: int = 48, n_dev: int = 16, seed: int = 0) -> Path:
    """SST-2 in the GLUE TSV format: header ``sentence<TAB>label``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            phrase = rng.choice(POSITIVE if label else NEGATIVE)
            rows.append(f"the movie is {phrase}\t{label}")
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def write_gsm8k(folder: Path, n_train: int = 24, n_test: int = 6, seed: int = 0) -> Path:
    """GSM8K in the official jsonl format: ``question`` and ``answer`` ending in ``#### N``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("test.jsonl", n_test)):
        with (folder / name).open("w", encoding="utf-8") as fh:
            for _ in range(n):
                a, b = rng.randint(1, 20), rng.randint(1, 20)
                row = {
                    "question": f"Tom has {a} apples and gets {b} more. How many?",
                    "answer": f"{a}+{b}={a + b}\n#### {a + b}",
                }
                fh.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (tiny shapes: more threads only contend on a shared
    machine, with the same numbers); restored afterwards. A test module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sst2_dir(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("glue") / "SST-2")


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory) -> Path:
    return write_gsm8k(tmp_path_factory.mktemp("gsm8k"))


def tiny_overrides(kind: str, data_dir: Path, results_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run on a random-weight model and a fixture dataset."""
    if kind == "classification":
        base = ["model=tiny_bert", "dataset=sst2", "dataset.max_length=32"]
    else:
        base = [
            "model=tiny_llama",
            "dataset=gsm8k",
            "dataset.max_length=64",
            "dataset.max_new_tokens=8",
            "dataset.prompt_template=plain",
        ]
    return [
        *base,
        f"dataset.data_dir={data_dir}",
        "train=quickstart",
        "train.max_steps=2",
        "train.global_batch_size=4",
        "hardware.micro_batch_size=2",
        f"results_dir={results_dir}",
        "progress=false",
        *extra,
    ]
