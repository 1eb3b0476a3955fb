"""Pin BAdam's block schedule and trajectory from the authors' code: writes tests/fixtures/parity/badam.json.

    .venv/bin/python scripts/parity/badam.py

Reference: pip badam==1.4, whose ``badam/block_optim.py`` is identical to Ledzy/BAdam at commit
bf989dcb8c1a7bbcf7360034b323e1b5616bf3e4 (``src/badam/block_optim.py``). Obtain it outside the
project's site-packages with

    .venv/bin/pip install --no-deps --target /tmp/parity/badam/site badam==1.4

(or point BADAM_SITE at another folder holding ``badam/``). Its ``BlockOptimizer`` wraps a
``torch.optim.AdamW`` and runs on CPU in fp32 (its fp32 master copy of the active block is then a
plain copy; ``torch.cuda.empty_cache`` is a no-op).

Each case is a tiny transformers model (tests/test_parity_layerwise.py builds it from the config
stored in the case, with seeded Gaussian weights) trained with seeded Gaussian gradients on the
tensors that require grad. Cases:
  * reference_defaults: the BlockOptimizer's own defaults (automatic partition of a Llama causal LM,
    embeddings and LM head outside the blocks, K = 50, descending), 160 steps;
  * preset: conf/method/badam.yaml (K = 50, ascending) on a Llama classifier, the automatic partition
    with the final norm and the head in ``active_modules`` (the README's advice), 160 steps;
  * preset_bert: the same on a BERT classifier with the block list written out as the authors'
    SuperGLUE script does (``bert.encoder.layer.N.``) and pooler + classifier active, K = 1, 12 steps;
  * random_blocks: switch_mode random with include_embedding and include_lm_head (embeddings and the
    rest as blocks), K = 2, 16 steps; torch's global generator seeded with the case's seed right
    before the BlockOptimizer is built (ours: a generator of its own with that seed);
  * weight_decay: the preset at K = 4 with weight decay 0.1 for 16 steps (the test compares the 2-D
    tensors: the reference decays the 1-D ones too).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.test_parity_layerwise import drive, layerwise_model  # noqa: E402

VERSION = "1.4"
COMMIT = "bf989dcb8c1a7bbcf7360034b323e1b5616bf3e4"
SITE = Path(os.environ.get("BADAM_SITE", "/tmp/parity/badam/site"))
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "badam.yaml"))

LLAMA = dict(
    vocab_size=16,
    hidden_size=4,
    intermediate_size=4,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=16,
    num_labels=2,
    pad_token_id=0,
)
BERT = dict(
    vocab_size=16,
    hidden_size=4,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=8,
    max_position_embeddings=8,
    type_vocab_size=2,
    num_labels=2,
)


def block_optimizer_class():
    if not (SITE / "badam" / "block_optim.py").is_file():
        sys.exit(f"the reference is absent: pip install --no-deps --target {SITE} badam=={VERSION} (see the docstring)")
    sys.path.insert(0, str(SITE))
    from badam import BlockOptimizer

    return BlockOptimizer


def case(arch, config, head, steps, ours, reference, *, lr=1e-3, weight_decay=0.0, seed=0, compare="all"):
    return {
        "model": {"arch": arch, "config": config, "init_seed": 0},
        "head": head,
        "steps": steps,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "grad_seed": 1,
        "ours": ours,
        "reference": reference,
        "compare": compare,
    }


def cases() -> dict:
    k, mode = PRESET["switch_every"], PRESET["switch_mode"]
    bert_layers = [[f"bert.encoder.layer.{i}."] for i in range(BERT["num_hidden_layers"])]
    return {
        "reference_defaults": case(
            "llama_lm", LLAMA, "causal_lm", 160, {"switch_every": 50, "switch_mode": "descending"}, {}
        ),
        "preset": case(
            "llama_cls",
            LLAMA,
            "classification",
            160,
            {},
            {"switch_block_every": k, "switch_mode": mode, "active_modules": ["model.norm.", "score."]},
        ),
        "preset_bert": case(
            "bert_cls",
            BERT,
            "classification",
            12,
            {"switch_every": 1},
            {
                "block_prefix_list": bert_layers,
                "switch_block_every": 1,
                "switch_mode": mode,
                "active_modules": ["bert.pooler.", "classifier."],
            },
        ),
        "random_blocks": case(
            "llama_cls",
            LLAMA,
            "classification",
            16,
            {"switch_every": 2, "switch_mode": "random", "badam_non_layer": "blocks"},
            {"switch_block_every": 2, "switch_mode": "random", "include_embedding": True, "include_lm_head": True},
            seed=3,
        ),
        "weight_decay": case(
            "llama_cls",
            LLAMA,
            "classification",
            16,
            {"switch_every": 4},
            {"switch_block_every": 4, "switch_mode": mode, "active_modules": ["model.norm.", "score."]},
            weight_decay=0.1,
            compare="matrices",
        ),
    }


def run_reference(block_optimizer, settings: dict) -> dict:
    model = layerwise_model(settings["model"])
    base = torch.optim.AdamW(
        model.parameters(),
        lr=settings["lr"],
        betas=(PRESET["beta1"], PRESET["beta2"]),
        eps=PRESET["eps"],
        weight_decay=settings["weight_decay"],
    )
    torch.manual_seed(settings["seed"])  # random mode draws its orders from torch's global generator
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its fp32-weights warning
        opt = block_optimizer(base, list(model.named_parameters()), verbose=0, **settings["reference"])
        return drive(model, opt, settings["steps"], settings["grad_seed"], lambda: opt.base_optimizer.state)


def main() -> None:
    block_optimizer = block_optimizer_class()
    out = {}
    for name, settings in cases().items():
        out[name] = {**settings, **run_reference(block_optimizer, settings)}
        periods = out[name]["periods"]
        print(f"{name}: {settings['steps']} steps, {len(periods)} periods starting at {[p[0] for p in periods]}")
    path = write_fixture(
        "badam",
        {
            "reference": f"pip badam=={VERSION} (= Ledzy/BAdam@{COMMIT[:12]} src/badam/block_optim.py)",
            "version": VERSION,
            "commit": COMMIT,
            "produced_by": "scripts/parity/badam.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
