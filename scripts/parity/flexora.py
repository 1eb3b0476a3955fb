"""Pin Flexora's layer search from the authors' code: writes tests/fixtures/parity/flexora.json.

    FLEXORA_SRC=<folder holding src/llamafactory/train/flora.py> .venv/bin/python scripts/parity/flexora.py

Reference: kithib/Flexora at commit 4449be816683c49e3919d3f065394946887c0aa6 (LLaMA-Factory based):
  * src/llamafactory/train/flora.py, class ``BlockOptimizer``: BAdam's block optimizer with the
    authors' additions ("flora add"): ``hyper_param`` (one alpha per transformer layer, zeros, its own
    ``Adam(lr=0.01)``), ``inject_hyper_param`` (forward pre-hooks that multiply the input of every
    module named ``*lora*`` inside ``layers.N`` by L softmax(alpha)_N, detached while training),
    ``hyper_step`` (after every optimizer step: eval mode, the loss of the next 8 batches of a cycled
    evaluation loader, backward into alpha, one Adam step) and ``selected_layer`` (alpha > 0);
  * src/llamafactory/train/utils.py ``_create_badam_optimizer`` (the wrapped torch AdamW) and
    src/llamafactory/train/sft/trainer.py (``register_model_and_trainer``, ``inject_hyper_param``
    before training); flexora.yaml (``badam_mode: layer``, ``badam_switch_interval: 1``,
    ``lora_target: q_proj, v_proj``, cosine schedule, ``val_size``).
Obtain it with the ``fetch`` tool (or git) and extract it:

    git --git-dir=<mirror> archive 4449be816683 src/llamafactory/train/flora.py | tar -x -C /tmp/flexora_work

flora.py is loaded on its own by path (it needs torch and transformers only). The HF Trainer around it
is replayed here as transformers' Trainer runs a step: forward, backward, ``clip_grad_norm_`` at 1.0
(the Trainer's default ``max_grad_norm``; the authors' replacement clip function is torch 1.13's,
the same formula), the cosine learning rate of the step (no warm-up) written into the optimizer's
first group, ``optimizer.step()`` (AdamW on fresh state, then the hyper step inside), ``model.zero_grad()``.
The trainer object the hyper step calls is a stub: ``compute_loss`` is the model's loss, the
evaluation loader is the case's validation batches (tests/parity_flexora_case.py).

Recorded per case: the initial LoRA factors (ours load them), alpha after every step, a checksum of
the LoRA factors after every step, the factors after the search and the layers with alpha > 0.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_adapter_case import rounded  # noqa: E402
from tests.parity_case import write_fixture  # noqa: E402
from tests.parity_flexora_case import LORA, LORA_SEED, checksum, lora_tensors, tiny_llama, token_batches  # noqa: E402

COMMIT = "4449be816683c49e3919d3f065394946887c0aa6"
SRC = Path(os.environ.get("FLEXORA_SRC", "/tmp/flexora_work"))
FILE = "src/llamafactory/train/flora.py"
CASES = {
    # lr, training batches, validation batches, epochs over the training share
    "authors": {"lr": 1e-2, "train": 6, "val": 2, "epochs": 2, "data_seed": 3},
    "odd_cycle": {"lr": 3e-3, "train": 5, "val": 3, "epochs": 3, "data_seed": 4},
}


def load():
    path = SRC / FILE
    if not path.is_file():
        sys.exit(f"the reference is absent: extract kithib/Flexora@{COMMIT[:12]} {FILE} into {SRC}")
    spec = importlib.util.spec_from_file_location("flexora_reference_flora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TrainerStub:
    """What ``hyper_step`` calls on the HF trainer."""

    def __init__(self, val_batches):
        self.val_batches = val_batches

    def get_eval_dataloader(self):
        return self.val_batches

    def _prepare_inputs(self, inputs):
        return inputs

    def compute_loss(self, model, inputs):
        return model(**inputs).loss


def cosine(lr: float, t: int, total: int) -> float:
    return lr * 0.5 * (1.0 + math.cos(math.pi * t / total))


def run_case(flora, case: dict) -> dict:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    torch.manual_seed(LORA_SEED)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    factors = lora_tensors(model)
    init = {n: rounded(t) for n, t in factors.items()}
    batches = token_batches(case["train"] + case["val"], case["data_seed"])
    train, val = batches[: case["train"]], batches[case["train"] :]

    # utils.py _create_badam_optimizer: torch AdamW over the decay / no-decay groups (weight_decay 0,
    # the TrainingArguments default), wrapped by the authors' BlockOptimizer in "layer" mode
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "bias" not in n]
    nodecay = [p for n, p in model.named_parameters() if p.requires_grad and "bias" in n]
    assert len(decay) + len(nodecay) == len(params)
    base = torch.optim.AdamW(
        [{"params": nodecay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.0}],
        lr=case["lr"],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    optimizer = flora.BlockOptimizer(
        base_optimizer=base,
        named_parameters_list=list(model.named_parameters()),
        block_prefix_list=None,
        switch_block_every=1,  # flexora.yaml badam_switch_interval: 1
        start_block=None,
        switch_mode="random",  # flexora.yaml badam_switch_mode (every block is active in their version)
        verbose=0,
    )
    optimizer.register_model_and_trainer(model, TrainerStub(val))
    optimizer.inject_hyper_param(model_train=True)
    assert optimizer.block_num == 4

    steps = case["epochs"] * case["train"]
    alphas, sums = [], []
    for t in range(steps):
        model.train()
        loss = model(**train[t % len(train)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.param_groups[0]["lr"] = cosine(case["lr"], t, steps)
        optimizer.step()
        model.zero_grad()
        alphas.append(rounded(optimizer.hyper_param.detach()))
        sums.append(checksum(lora_tensors(model)))
    optimizer.remove_hooks()
    return {
        **case,
        "steps": steps,
        "init": init,
        "alpha": alphas,
        "lora_checksums": sums,
        "final": {n: rounded(t) for n, t in lora_tensors(model).items()},
        "selected": optimizer.selected_layer(),
        "effective_weight_decay": optimizer.base_optimizer.param_groups[0]["weight_decay"],
    }


def hooked_modules(flora) -> list[str]:
    """The modules whose forward pre-hook fires in one forward (peft's LoRA Linear calls its dropout, A, B)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", **LORA))
    optimizer = flora.BlockOptimizer(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
        list(model.named_parameters()),
        None,
        switch_block_every=1,
        switch_mode="random",
        verbose=0,
    )
    optimizer.register_model_and_trainer(model, TrainerStub(token_batches(1, 0)))
    optimizer.inject_hyper_param(model_train=True)
    fired = []
    for name, module in model.named_modules():
        if "layers.0.self_attn.q_proj" in name and "lora" in name:
            module.register_forward_pre_hook(lambda m, a, name=name: fired.append(name[name.index("lora") :]))
    model(**token_batches(1, 0)[0])
    optimizer.remove_hooks()
    return fired


def main() -> None:
    flora = load()
    import peft

    cases = {name: run_case(flora, case) for name, case in CASES.items()}
    payload = {
        "reference": f"kithib/Flexora@{COMMIT[:12]} {FILE} (BlockOptimizer: hyper_param, hyper_step)",
        "version": COMMIT,
        "produced_by": "scripts/parity/flexora.py",
        "peft": peft.__version__,
        "hooked_per_lora_layer": hooked_modules(flora),
        "cases": cases,
    }
    print(write_fixture("flexora", payload))
    for name, case in cases.items():
        print(name, "selected", case["selected"], "alpha", case["alpha"][-1], "wd", case["effective_weight_decay"])


if __name__ == "__main__":
    main()
