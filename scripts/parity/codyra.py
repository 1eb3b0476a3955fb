"""Pin CoDyRA's layer and gate threshold from the authors' code: writes tests/fixtures/parity/codyra.json.

    CODYRA_SRC=<checkout> .venv/bin/python scripts/parity/codyra.py

Reference: Artificer-AI-Lab/CoDyRA at commit c1691e4c4c8a331acaaeb7dfa5e37bcb974cf0c8:
  * ``loralib/codyra.py``, class ``codyra_Linear`` (an nn.Linear holding the frozen W0, b0 and lora_A
    Kaiming uniform, lora_B = 0, gate = randn(1, r); forward W0 x + b0 + ((x A^T) * g) B^T, returning
    (output, 0)) and its ``increment_task`` (drops zero-gate ranks, merges (B * g) A into W0);
  * ``models/codyra.py``, function ``train_model``: the AdamW over every trainable tensor (betas 0.9,
    0.9999), ``utils.cosine_lr``, the threshold values lambdas = linspace(0, max_kappa, lambda_num), the
    dense phase dense_iters = dense_iters * T, lambda_step_iters, the raise of the threshold at the start
    of an iteration and the in-place threshold on every gate after ``optimizer.step()``;
  * ``utils.py``, ``cosine_lr`` (with ``_warmup_lr`` and ``assign_learning_rate``).
Get the repository with the ``fetch`` tool (or git) and extract those three files into CODYRA_SRC
(default /tmp/parity/codyra/src), keeping their paths:

    git --git-dir=<mirror> archive c1691e4c4c8a331acaaeb7dfa5e37bcb974cf0c8 loralib models utils.py \\
        | tar -x -C /tmp/parity/codyra/src

``codyra_Linear`` is loaded from its file on its own (``loralib/__init__.py`` also imports layers.py, not
needed). ``train_model`` needs CLIP, CUDA and the datasets, so it is not called: its statements that set
the optimizer, the scheduler and the threshold schedule, and the two blocks of its iteration loop that
raise the threshold and threshold the gates, are read out of the file with ``ast`` and executed as
written, in the loop's order (raise the threshold, scheduler(iteration), forward, zero_grad, backward,
loss.backward(), optimizer.step(), threshold the gates); ``utils.cosine_lr`` likewise. ``model.module`` (their
DataParallel) is the container of the reference layers. Only those statements and ``codyra_Linear`` need
to be present in the files (an excerpt holding them runs as the full files do).

The case (tests/parity_adapter_case.py): two seeded linear layers, 24 x 20 and 20 x 24 with bias, each
put into a ``codyra_Linear`` as the authors' ``apply_lora`` does for the MLP linears (weight and bias
copied in, only lora_*/gate trainable, as ``finetune`` sets them), built right after
torch.manual_seed(100 + layer index): its A and g draws are recorded as the init that ours loads. The
loss is the shared seeded regression, summed over both layers. ``args``: wd 0 and warmup_length 0 (the
authors' defaults), the case's lr, rank, max_kappa, lambda_num, dense_iters and iterations. Cases:
  * preset: conf/method/codyra.yaml as it stands (r 16, max_kappa 0.005, lambda_num 50, dense 0.5),
    lr 5e-4 (runner_codyra.sh), 100 iterations (D = 50, L = 1: the threshold reaches max_kappa at 98);
  * short_run: the preset over 12 iterations: L = int(6 // 50) = 0, so the threshold stays 0;
  * fast: r 4, max_kappa 0.1, lambda_num 3, dense 0.25, lr 1e-2, 12 iterations;
  * no_dense: r 8, max_kappa 0.06, lambda_num 4, dense 0, lr 5e-3, 12 iterations;
  * odd_dense: r 4, max_kappa 0.05, lambda_num 5, dense 0.3, lr 1e-2, 25 iterations (D = 7.5, L = 3).
Recorded: the init, the first step's outputs and gradients, per iteration the threshold, the lr, the
zero-gate count and a float64 checksum of A, B and g of both layers, the final A, B, g, the indices of
the zero gates, the outputs at a probe input after training, and each layer's weight after their
``increment_task`` merge (preset and no_dense; short_run keeps only what its schedule shows).
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_adapter_case import base_linears, batches, factor_checksum, rounded  # noqa: E402
from tests.parity_case import write_fixture  # noqa: E402

COMMIT = "c1691e4c4c8a331acaaeb7dfa5e37bcb974cf0c8"
SRC = Path(os.environ.get("CODYRA_SRC", "/tmp/parity/codyra/src"))
FILES = {"layer": "loralib/codyra.py", "trainer": "models/codyra.py", "utils": "utils.py"}
SHAPES = [(24, 20), (20, 24)]  # (d_out, d_in): rank 16 fits both
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "codyra.yaml"), resolve=True)
INIT_SEED = 100  # torch.manual_seed(INIT_SEED + layer index) before each reference layer
PROBE_SEED = 99
MERGED = ("preset", "no_dense")  # the cases whose increment_task merge is pinned


def cases() -> dict:
    p = {k: PRESET[k] for k in ("rank", "max_kappa", "lambda_num", "dense_fraction")}
    return {
        "preset": {**p, "lr": 5e-4, "steps": 100},
        "short_run": {**p, "lr": 5e-4, "steps": 12},
        "fast": {"rank": 4, "max_kappa": 0.1, "lambda_num": 3, "dense_fraction": 0.25, "lr": 1e-2, "steps": 12},
        "no_dense": {"rank": 8, "max_kappa": 0.06, "lambda_num": 4, "dense_fraction": 0.0, "lr": 5e-3, "steps": 12},
        "odd_dense": {"rank": 4, "max_kappa": 0.05, "lambda_num": 5, "dense_fraction": 0.3, "lr": 1e-2, "steps": 25},
    }


def load_layer_module():
    for rel in FILES.values():
        if not (SRC / rel).is_file():
            sys.exit(f"the reference is absent: extract Artificer-AI-Lab/CoDyRA@{COMMIT[:12]} {rel} into {SRC}")
    spec = importlib.util.spec_from_file_location("codyra_reference_layer", SRC / FILES["layer"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _function(path: Path, name: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _compiled(nodes: list[ast.stmt], path: Path):
    return compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec")


def trainer_pieces() -> SimpleNamespace:
    """The statements of ``train_model`` this case runs, compiled from the authors' file, and ``cosine_lr``."""
    path = SRC / FILES["trainer"]
    fn = _function(path, "train_model")
    wanted = {"optimizer", "scheduler", "lambdas", "threshold_id", "threshold", "dense_iters", "lambda_step_iters"}
    setup = [
        n
        for n in fn.body
        if isinstance(n, ast.Assign) and {t.id for t in n.targets if isinstance(t, ast.Name)} & wanted
    ]
    assert sorted(t.id for n in setup for t in n.targets) == sorted(wanted), ast.dump(setup[0])
    loop = next(n for n in fn.body if isinstance(n, ast.For))
    raise_block = next(n for n in loop.body if isinstance(n, ast.If) and ast.unparse(n.test) == "lambda_step_iters > 0")
    prune_block = next(n for n in loop.body if isinstance(n, ast.If) and ast.unparse(n.test) == "prune")
    calls = {ast.unparse(n): n for n in loop.body if isinstance(n, ast.Expr)}
    utils_path = SRC / FILES["utils"]
    utils_ns = {"np": np}
    for name in ("assign_learning_rate", "_warmup_lr", "cosine_lr"):
        exec(_compiled([_function(utils_path, name)], utils_path), utils_ns)
    return SimpleNamespace(
        setup=_compiled(setup, path),
        raise_threshold=_compiled([raise_block], path),
        scheduler=_compiled([calls["scheduler(iteration)"]], path),
        zero_grad=_compiled([calls["optimizer.zero_grad()"]], path),
        backward=_compiled([calls["loss.backward()"]], path),
        step=_compiled([calls["optimizer.step()"]], path),
        prune=_compiled([prune_block], path),
        cosine_lr=utils_ns["cosine_lr"],
        source={
            "setup": [ast.unparse(n) for n in setup],
            "raise_threshold": ast.unparse(raise_block),
            "prune": ast.unparse(prune_block),
        },
    )


def reference_layers(lora, rank: int) -> nn.ModuleList:
    layers = nn.ModuleList()
    for i, base in enumerate(base_linears(SHAPES)):
        torch.manual_seed(INIT_SEED + i)
        layer = lora.codyra_Linear(base.in_features, base.out_features, r=rank, merge_weights=False)
        layer.weight.data = base.weight.data.clone()  # as their apply_lora for the MLP linears
        layer.bias = nn.Parameter(base.bias.data.clone())
        layers.append(layer)
    for name, param in layers.named_parameters():  # their finetune(): lora_* and gate train, nothing else
        param.requires_grad = "lora" in name or "gate" in name
    return layers


def factors(layer) -> dict:
    return {"A": layer.lora_A, "B": layer.lora_B, "gate": layer.gate.view(-1)}


def run_case(lora, pieces, name: str, case: dict) -> dict:
    layers = reference_layers(lora, case["rank"])
    init = [{k: rounded(v) for k, v in factors(m).items() if k != "B"} for m in layers]
    assert all(not m.lora_B.any() for m in layers)  # B starts at 0
    args = SimpleNamespace(
        lr=case["lr"],
        wd=0.0,  # main.py's default (runner_codyra.sh sets none)
        warmup_length=0,  # main.py's default
        max_kappa=case["max_kappa"],
        lambda_num=case["lambda_num"],
        dense_iters=case["dense_fraction"],
    )
    quiet = logging.getLogger("codyra_reference")
    quiet.disabled = True
    ns = {
        "torch": torch,
        "np": np,
        "abs": abs,
        "args": args,
        "model": layers,
        "total_iterations": case["steps"],
        "utils": SimpleNamespace(cosine_lr=pieces.cosine_lr),
        "lora": lora,
        "logging": quiet,
        "prune": True,
    }
    exec(pieces.setup, ns)
    ns["model"] = SimpleNamespace(module=layers)  # their DataParallel wrapper: the loop reads model.module
    out = {"init": init, "thresholds": [], "lrs": [], "zero_gates": [], "trajectory": []}
    for iteration, data in enumerate(batches(SHAPES, case["steps"])):
        ns["iteration"] = iteration
        exec(pieces.raise_threshold, ns)
        exec(pieces.scheduler, ns)
        outs = [layer(x)[0] for layer, (x, _) in zip(layers, data)]
        ns["loss"] = sum(0.5 * ((y - target) ** 2).mean() for y, (_, target) in zip(outs, data))
        exec(pieces.zero_grad, ns)
        exec(pieces.backward, ns)
        if iteration == 0:
            out["out0"] = [rounded(y) for y in outs]
            out["grad0"] = [{k: rounded(g) for k, g in _grads(m).items()} for m in layers]
        exec(pieces.step, ns)
        exec(pieces.prune, ns)
        out["thresholds"].append(float(ns["threshold"]))
        out["lrs"].append(float(ns["optimizer"].param_groups[0]["lr"]))
        out["zero_gates"].append(sum(int((m.gate == 0).sum()) for m in layers))
        out["trajectory"].append(factor_checksum([factors(m) for m in layers]))
    out["final"] = [{k: rounded(v) for k, v in factors(m).items()} for m in layers]
    out["zero_ranks"] = [torch.nonzero(m.gate.view(-1) == 0).view(-1).tolist() for m in layers]
    out["dense_iters"], out["lambda_step_iters"] = float(ns["dense_iters"]), int(ns["lambda_step_iters"])
    gen = torch.Generator().manual_seed(PROBE_SEED)
    probe = [torch.randn(3, d_in, generator=gen) for _, d_in in SHAPES]
    with torch.no_grad():
        out["probe_output"] = [rounded(m(x)[0]) for m, x in zip(layers, probe)]
        merged = []
        for m in layers:
            twin = copy.deepcopy(m)
            torch.manual_seed(0)  # increment_task draws a fresh gate for the next task
            twin.increment_task()
            merged.append(rounded(twin.weight))
        out["merged_weight"] = merged
    if name not in MERGED:  # the fixture stays small
        del out["merged_weight"]
    if name == "short_run":
        for key in ("out0", "grad0", "probe_output"):
            del out[key]
    return out


def _grads(layer) -> dict:
    return {"A": layer.lora_A.grad, "B": layer.lora_B.grad, "gate": layer.gate.grad.view(-1)}


def main() -> None:
    lora = load_layer_module()
    pieces = trainer_pieces()
    out = {}
    for name, case in cases().items():
        out[name] = {"settings": case, **run_case(lora, pieces, name, case)}
        got = out[name]
        print(
            f"{name}: D {got['dense_iters']}, L {got['lambda_step_iters']}, last threshold {got['thresholds'][-1]:.4g},"
            f" zero ranks {got['zero_ranks']}"
        )
    path = write_fixture(
        "codyra",
        {
            "reference": f"Artificer-AI-Lab/CoDyRA@{COMMIT[:12]} ({FILES['layer']} codyra_Linear; {FILES['trainer']}"
            f" train_model's optimizer, schedule and gate threshold; {FILES['utils']} cosine_lr)",
            "version": COMMIT[:12],
            "commit": COMMIT,
            "produced_by": "scripts/parity/codyra.py",
            "shapes": SHAPES,
            "init_seed": INIT_SEED,
            "probe_seed": PROBE_SEED,
            "reference_statements": pieces.source,
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
