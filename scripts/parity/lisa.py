"""Pin LISA's layer schedule and trajectory from the authors' code: writes tests/fixtures/parity/lisa.json.

    .venv/bin/python scripts/parity/lisa.py

Reference: OptimalScale/LMFlow at commit f3597dba134e8bb3d2cfedeaaae6fc7296ace924,
``src/lmflow/pipeline/utils/lisa_trainer.py`` (``DynamicLayerActivationCallback``, unchanged since
a6b97aa3; the ``lisa_*`` defaults are in ``src/lmflow/args.py``). Obtain it with the repository
fetched as a bare git directory GIT_DIR:

    mkdir -p /tmp/parity/lisa/src
    git --git-dir=GIT_DIR archive f3597dba134e8bb3d2cfedeaaae6fc7296ace924 src/lmflow/pipeline/utils/lisa_trainer.py \\
        | tar -x -C /tmp/parity/lisa/src

(or point LISA_SRC at another extracted tree). Only that file is loaded (the lmflow package, which
needs its own dependencies, is bypassed); it needs transformers for ``TrainerCallback``.

The HF Trainer around the callback is replaced by its minimal part: numpy's global generator seeded
with the run's seed (the Trainer's ``set_seed``), a ``torch.optim.AdamW`` over every parameter built
before the first switch (weight decay on the 2-D tensors, as the Trainer's groups for these models),
and per step ``on_step_begin`` with ``state.global_step`` = steps done, the gradients, ``step()`` and
``zero_grad(set_to_none=True)``. Each case is a tiny transformers model (tests/test_parity_layerwise.py
builds it from the config stored in the case, with seeded Gaussian weights) trained with seeded
Gaussian gradients on the tensors that require grad. Cases:
  * reference_defaults: LMFlow's defaults (2 layers every 20 steps) on a 4-layer Llama causal LM (a
    class LMFlow maps to ``model.model.layers``), seed 42 as its example script, 100 steps;
  * preset: conf/method/lisa.yaml (the same 2 and 20) on a 4-layer Llama classifier with weight decay
    0.1, 60 steps (``lisa_layers_attribute`` names the layers);
  * preset_bert: a 4-layer BERT classifier, 1 layer every 3 steps, weight decay 0.1, 20 steps.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.test_parity_layerwise import drive, layerwise_model  # noqa: E402

COMMIT = "f3597dba134e8bb3d2cfedeaaae6fc7296ace924"
SRC = Path(os.environ.get("LISA_SRC", "/tmp/parity/lisa/src"))
FILE = SRC / "src" / "lmflow" / "pipeline" / "utils" / "lisa_trainer.py"
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "lisa.yaml"))

LLAMA = dict(
    vocab_size=16,
    hidden_size=4,
    intermediate_size=4,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=16,
    num_labels=2,
    pad_token_id=0,
)
BERT = dict(
    vocab_size=16,
    hidden_size=4,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=8,
    max_position_embeddings=8,
    type_vocab_size=2,
    num_labels=2,
)


def callback_class():
    if not FILE.is_file():
        sys.exit(f"the reference is absent: extract OptimalScale/LMFlow@{COMMIT} into {SRC} (see the docstring)")
    spec = importlib.util.spec_from_file_location("lmflow_lisa_trainer", FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DynamicLayerActivationCallback


def case(arch, config, head, steps, layers, interval, attribute, *, seed=0, weight_decay=0.0, lr=1e-3):
    return {
        "model": {"arch": arch, "config": config, "init_seed": 0},
        "head": head,
        "steps": steps,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "grad_seed": 1,
        "ours": {"lisa_activated_layers": layers, "lisa_interval_steps": interval},
        "reference": {"n_layers": layers, "interval_steps": interval, "lisa_layers_attribute": attribute},
        "compare": "all",
    }


def cases() -> dict:
    gamma, k = PRESET["lisa_activated_layers"], PRESET["lisa_interval_steps"]
    return {
        "reference_defaults": case("llama_lm", LLAMA, "causal_lm", 100, 2, 20, None, seed=42),
        "preset": case("llama_cls", LLAMA, "classification", 60, gamma, k, "model.model.layers", weight_decay=0.1),
        "preset_bert": case("bert_cls", BERT, "classification", 20, 1, 3, "model.bert.encoder.layer", weight_decay=0.1),
    }


def run_reference(callback_cls, settings: dict) -> dict:
    model = layerwise_model(settings["model"])
    wd = settings["weight_decay"]
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": wd},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=settings["lr"],
        betas=(PRESET["beta1"], PRESET["beta2"]),
        eps=PRESET["eps"],
    )
    np.random.seed(settings["seed"])  # the Trainer's set_seed
    callback = callback_cls(model=model, **settings["reference"])

    def on_step_begin(t):
        callback.on_step_begin(None, SimpleNamespace(global_step=t), None)

    with contextlib.redirect_stdout(io.StringIO()):  # its print at every switch
        return drive(model, opt, settings["steps"], settings["grad_seed"], lambda: opt.state, on_step_begin)


def main() -> None:
    callback_cls = callback_class()
    out = {}
    for name, settings in cases().items():
        out[name] = {**settings, **run_reference(callback_cls, settings)}
        print(f"{name}: {settings['steps']} steps, periods start at {[p[0] for p in out[name]['periods']]}")
    path = write_fixture(
        "lisa",
        {
            "reference": f"OptimalScale/LMFlow@{COMMIT[:12]} src/lmflow/pipeline/utils/lisa_trainer.py",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/lisa.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
