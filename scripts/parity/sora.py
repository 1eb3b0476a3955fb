"""Pin SoRA's layer, L1 term and gate threshold from the authors' code: writes tests/fixtures/parity/sora.json.

    .venv/bin/python scripts/parity/sora.py

Reference: TsinghuaC3I/SoRA at commit c275ac237b68b888a918cf9dad36d3827e46f616: ``src/lora.py``
(``LowRankLinear``), ``src/trainer.py`` (``SparseTrainerMixin.compute_loss``: the L1 term on the
gates), ``src/sparse_optimizer.py`` and ``src/sparse_optimizer_multiply_lr.py`` (``SparseAdamW``),
``src/util.py`` (``create_optimizer``, ``create_scheduler``: the AdamW of the other parameters), wired as
``run_glue.py`` wires them. Obtain it with the repository fetched as a bare git directory GIT_DIR:

    mkdir -p /tmp/parity/sora/src
    git --git-dir=GIT_DIR archive c275ac237b68b888a918cf9dad36d3827e46f616 src | tar -x -C /tmp/parity/sora/src

and the authors' pinned transformers (requirements.txt) plus the huggingface_hub it needs, outside
the project's environment:

    .venv/bin/pip install --no-deps --target /tmp/parity/sora/site transformers==4.14.1 huggingface_hub==0.10.1

(or point SORA_SRC / SORA_SITE elsewhere). transformers 4.14.1 is loaded without running its package
``__init__`` (whose dependency check wants the authors' whole environment): only ``optimization.py``
(AdamW, get_linear_schedule_with_warmup) and ``trainer_pt_utils.py`` are imported. ``LowRankLinear``
and ``compute_loss`` are read out of their files and executed as written (the files import OpenDelta
and the HF Trainer, not needed to run those two); ``compute_loss`` runs on a stand-in trainer with
``label_smoother=None``, ``args.past_index=-1``, ``args.train_sparse=True`` and ``sparse_lambda``.
The HF Trainer's step is replayed in its order: loss (their ``compute_loss``), backward, clip over all
parameters, AdamW step, SparseAdamW step, both schedulers, zero_grad; ``args.get_warmup_steps`` is
transformers 4.14's rule (ceil(ratio * T)), the gate scheduler's warm-up ``int(ratio * T)`` as in
``run_glue.py``. With ``lambda_schedule`` the reference's ``step_lambda()`` is called at the stage
boundaries lorabench uses (the authors call it between separate training runs).

The case is tests/test_parity_sora_salt_nola.py's (two targets, 12 seeded steps, a probe batch).
Cases: reference_defaults (run_glue.py's and the HF Trainer's defaults: r 16, lambda 1e-3, lambda_2
1e-3, lr 5e-5, no weight decay, clip 1.0, no warm-up), preset (conf/method/sora.yaml with the GLUE
script's training settings, warm-up 0.25 so that ceil and int agree on 12 steps), sparsity (threshold
0.02 and gates set across the zeroing band), lambda_times_lr (sparse_optimizer_multiply_lr.py,
lambda 25) and schedule (linear lambda_2 0 -> 0.03 in 3 stages), the last three at r = 4.
"""

from __future__ import annotations

import ast
import importlib
import math
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.test_parity_sora_salt_nola import (  # noqa: E402
    PROBE,
    SHAPES,
    STEPS,
    Toy,
    base_linears,
    batches,
    checksums,
    f32,
    preset,
    probe,
    sora_init,
    task_loss,
)

COMMIT = "c275ac237b68b888a918cf9dad36d3827e46f616"
SRC = Path(os.environ.get("SORA_SRC", "/tmp/parity/sora/src"))
SITE = Path(os.environ.get("SORA_SITE", "/tmp/parity/sora/site"))
PRESET = preset("sora")


def load_reference():
    """The reference's pieces: LowRankLinear, compute_loss, both SparseAdamW, create_optimizer/_scheduler."""
    if not (SRC / "src" / "sparse_optimizer.py").is_file() or not (SITE / "transformers" / "optimization.py").is_file():
        sys.exit(f"the reference is missing: {SRC}/src and {SITE}/transformers (see this script's docstring)")
    sys.path[:0] = [str(SITE), str(SRC)]
    for name in [m for m in sys.modules if m.split(".")[0] in ("transformers", "huggingface_hub")]:
        del sys.modules[name]  # the project's newer copies, imported with the shared case
    shim = types.ModuleType("transformers")  # the package without its __init__ (dependency check)
    shim.__path__, shim.__version__ = [str(SITE / "transformers")], "4.14.1"
    sys.modules["transformers"] = shim
    optimization = importlib.import_module("transformers.optimization")
    shim.AdamW, shim.get_linear_schedule_with_warmup = optimization.AdamW, optimization.get_linear_schedule_with_warmup
    sparse = importlib.import_module("src.sparse_optimizer")
    sparse_lr = importlib.import_module("src.sparse_optimizer_multiply_lr")
    util = importlib.import_module("src.util")
    ns = {"torch": torch, "nn": nn, "math": math}
    low_rank_linear = _definition(SRC / "src" / "lora.py", "LowRankLinear", ns)
    compute_loss = _definition(SRC / "src" / "trainer.py", "SparseTrainerMixin.compute_loss", ns)
    return SimpleNamespace(
        LowRankLinear=low_rank_linear,
        compute_loss=compute_loss,
        SparseAdamW=sparse.SparseAdamW,
        SparseAdamWTimesLr=sparse_lr.SparseAdamW,
        create_optimizer=util.create_optimizer,
        create_scheduler=util.create_scheduler,
        linear_schedule=optimization.get_linear_schedule_with_warmup,
    )


def _definition(path: Path, dotted: str, namespace: dict):
    """Execute one top-level class, or one method of a class, exactly as written in ``path``."""
    body = ast.parse(path.read_text()).body
    *outer, name = dotted.split(".")
    for part in outer:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == part).body
    node = next(n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name)
    scope = dict(namespace)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)
    return scope[name]


class Parallel(nn.Module):
    """The frozen linear plus the authors' parallel LowRankLinear (OpenDelta inserts it as ``lora``)."""

    def __init__(self, base: nn.Linear, lora: nn.Module):
        super().__init__()
        self.base, self.lora = base, lora

    def forward(self, x):
        return self.base(x) + self.lora(x)


class WithLoss(nn.Module):
    """What ``compute_loss`` expects: ``model(**inputs)`` returning a dict with ``loss``."""

    def __init__(self, toy: Toy):
        super().__init__()
        self.toy = toy

    def forward(self, x, g):
        y = self.toy(x)
        return {"loss": task_loss(y, g), "y": y}


def run_case(ref, s: dict, probes: str = "full") -> dict:
    """One case; ``probes``: "full" (outputs and gradients before and after), "init" (outputs and gradients
    before, outputs after), "none"."""
    torch.manual_seed(s["init_seed"])
    bases = base_linears()
    layers = {
        n: Parallel(bases[n], ref.LowRankLinear(d_in, d_out, bases[n].weight, r=s["rank"], lora_alpha=s["alpha"]))
        for n, (d_in, d_out) in SHAPES.items()
    }
    model = WithLoss(Toy(layers["t1"], layers["t2"]))
    params = {f"{n}.{k}": getattr(m.lora, k) for n, m in layers.items() for k in ("lora_A", "lora_B", "gate")}
    assert all(not layers[n].lora.lora_B.any() for n in layers)  # the authors' B starts at 0
    with torch.no_grad():  # the case's initial values (the authors' distributions, seeded; shared with the test)
        for key, value in sora_init(s).items():
            params[key].copy_(value.view(params[key].shape))

    args = SimpleNamespace(
        weight_decay=s["weight_decay"],
        adam_beta1=s["beta1"],
        adam_beta2=s["beta2"],
        adam_epsilon=s["eps"],
        learning_rate=s["lr"],
        get_warmup_steps=lambda total: math.ceil(total * s["warmup_ratio"]),  # transformers 4.14 TrainingArguments
    )
    optimizer = ref.create_optimizer(args, model)
    scheduler = ref.create_scheduler(args, num_training_steps=STEPS, optimizer=optimizer)
    sparse_cls = ref.SparseAdamWTimesLr if s["lambda_times_lr"] else ref.SparseAdamW
    schedule = "linear" if s["lambda_schedule"] == "linear" else None
    gates = [p for n, p in model.named_parameters() if "lora.gate" in n and p.requires_grad]
    sparse = sparse_cls(
        sparse_lambda=s["sparse_lambda"],
        lambda_schedule=schedule,
        max_lambda=s["max_lambda"],
        lambda_num=s["lambda_num"],
        params=gates,
        lr=s["lr"],
    )
    sparse_scheduler = ref.linear_schedule(
        sparse, num_warmup_steps=int(STEPS * s["warmup_ratio"]), num_training_steps=STEPS
    )
    trainer = SimpleNamespace(
        label_smoother=None, args=SimpleNamespace(past_index=-1, train_sparse=True), sparse_lambda=s["l1_lambda"]
    )

    def forward_loss(x, g):
        loss, outputs = ref.compute_loss(trainer, model, {"x": x, "g": g}, return_outputs=True)
        return outputs["y"], loss

    out = {"settings": s, "losses": [], "trajectory": []}
    if probes in ("full", "init"):
        out["probe_init"] = probe(lambda: forward_loss(*PROBE), params)
    stage = 0
    for step, (x, g) in enumerate(batches(STEPS)):
        if schedule:  # lorabench's stage boundaries: stage = step * lambda_num // T
            while stage < min(s["lambda_num"] - 1, step * s["lambda_num"] // STEPS):
                sparse.step_lambda()
                stage += 1
        _, loss = forward_loss(x, g)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), s["max_grad_norm"])
        optimizer.step()
        sparse.step()
        scheduler.step()
        sparse_scheduler.step()
        model.zero_grad()
        out["losses"].append(loss.item())
        out["trajectory"].append(checksums(params))
    out["final"] = {k: f32(p.flatten() if k.endswith("gate") else p) for k, p in params.items()}
    if probes != "none":
        out["probe_final"] = probe(lambda: forward_loss(*PROBE), params)
        if probes == "init":
            del out["probe_final"]["grads"]
    out["zero_gates"] = sum(int((p == 0).sum()) for k, p in params.items() if k.endswith("gate"))
    out["final_lambda"] = float(sparse.sparse_lambda)
    return out


def settings(**over) -> dict:
    base = dict(
        init_seed=0,
        rank=PRESET["rank"],
        alpha=PRESET["alpha"],
        l1_lambda=PRESET["l1_lambda"],
        gate_eps=PRESET["gate_eps"],  # not passed to the reference: its SparseAdamW keeps AdamW's default eps
        sparse_lambda=PRESET["sparse_lambda"],
        lambda_times_lr=PRESET["lambda_times_lr"],
        lambda_schedule=PRESET["lambda_schedule"],
        max_lambda=PRESET["max_lambda"],
        lambda_num=PRESET["lambda_num"],
        lr=8e-4,  # the authors' GLUE script
        weight_decay=0.1,
        max_grad_norm=0.1,
        warmup_ratio=0.25,
        b_init_std=0.1,
        beta1=PRESET["beta1"],
        beta2=PRESET["beta2"],
        eps=PRESET["eps"],
    )
    return {**base, **over}


GATES = {"t1": [0.9, 0.03, -0.025, 0.3], "t2": [-0.8, 0.021, -0.039, 0.055]}  # across the zeroing band


def main() -> None:
    ref = load_reference()
    cases = {
        "reference_defaults": settings(
            rank=16, l1_lambda=1e-3, sparse_lambda=1e-3, lr=5e-5, weight_decay=0.0, max_grad_norm=1.0, warmup_ratio=0.0
        ),
        "preset": settings(),
        "preset_zero_b": settings(b_init_std=0.0),  # the authors' B = 0 start: the eps-placement deviation
        "sparsity": settings(rank=4, sparse_lambda=0.02, gate_init=GATES, init_seed=1),
        "lambda_times_lr": settings(rank=4, sparse_lambda=25.0, lambda_times_lr=True, gate_init=GATES, init_seed=2),
        "schedule": settings(
            rank=4,
            sparse_lambda=0.0,
            lambda_schedule="linear",
            max_lambda=0.03,
            lambda_num=3,
            gate_init=GATES,
            init_seed=3,
        ),
    }
    probes = {"reference_defaults": "init", "preset_zero_b": "none"}  # the fixture stays small
    out = {name: run_case(ref, s, probes.get(name, "full")) for name, s in cases.items()}
    for name, case in out.items():
        print(f"{name}: zero gates {case['zero_gates']}, lambda {case['final_lambda']}, loss {case['losses'][-1]:.5f}")
    path = write_fixture(
        "sora",
        {
            "reference": f"TsinghuaC3I/SoRA@{COMMIT[:12]} src/lora.py, trainer.py, sparse_optimizer*.py, util.py",
            "version": f"{COMMIT}, transformers==4.14.1",
            "produced_by": "scripts/parity/sora.py",
            "steps": STEPS,
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
