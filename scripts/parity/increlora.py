"""Pin IncreLoRA's layer, allocation and schedule from the authors' code: writes tests/fixtures/parity/increlora.json.

    .venv/bin/python scripts/parity/increlora.py

Reference: FeiyuZhang98/IncreLoRA at commit 51a2d734af7883ef90425206057c1ef25997b359:
``loralib/loralib`` (``SVDLinear``, ``RankAllocator``, ``mark_only_lora_as_trainable``),
``NLU/src/transformers/trainer.py`` (``Trainer.compute_svd_orth_regu``, added to the loss with
``reg_orth_coef``; the allocation after clipping, before ``optimizer.step()``) and
``NLU/src/transformers/optimization.py`` (``get_linear_schedule_with_warmup(..., multi_lr=True)``:
``Multi_LambdaLR``). Obtain it with the repository fetched as a bare git directory GIT_DIR:

    mkdir -p /tmp/parity/increlora/src
    git --git-dir=GIT_DIR archive 51a2d734af7883ef90425206057c1ef25997b359 loralib \\
        NLU/src/transformers/trainer.py NLU/src/transformers/optimization.py | tar -x -C /tmp/parity/increlora/src

(or point INCRELORA_SRC at another extracted tree). ``loralib`` is imported as is (its ``ipdb`` import,
used only in its error paths, gets a stand-in that raises). Their transformers fork cannot be
imported beside the installed transformers, so ``compute_svd_orth_regu`` (a Trainer method whose
``self`` is unused), ``get_lr_lambda``, ``Multi_LambdaLR`` and ``get_linear_schedule_with_warmup``
are read from those two files and run. Two shims for the installed torch (2.13), neither changing a
value: ``Multi_LambdaLR`` passes the ``verbose`` argument that torch's ``LambdaLR`` no longer takes,
so its base class is given a ``LambdaLR`` that drops it; ``compute_svd_orth_regu`` adds in place to
the output of ``torch.norm`` that autograd saved, which the backward refuses, so it is given a
``torch.norm`` that returns a copy (the same value and gradient).
Their Trainer loop is replaced by its minimal part (tests/test_parity_lamda_increlora.py
``increlora_drive``: loss = MSE + reg_orth_coef x regulariser, backward, clipping at 1.0,
``update_and_increase(model, global_step, optimizer)``, ``optimizer.step()``, the scheduler,
``zero_grad``), with ``torch.optim.AdamW`` over the Trainer's groups (theirs is transformers' own
AdamW; lorabench's optimizer is torch's). One intervention, on values only: each component's P
column and Q row, drawn by ``SVDLinear`` from N(0, 0.02^2) when it is created, are overwritten by the
case's seeded bank (the same distribution, in creation order). Cases, on an MLP of 8 adapted 8 x 8
linears (so top_h = 6 selects among 8):
  * reference_defaults: the SST-2 rank-8 script (NLU/scripts/rank=8/run_sst2.sh: lora_r 1, target_rank
    8, top_h 6, 4 components per round from rank_dic, lora_alpha 16, lora_dropout 0.3, reg_orth_coef
    0.1, weight decay 0.01, lr 8e-4, advance_learn and multi_lr on) with init_warmup = incre_interval
    = warm-up = 2 of 12 steps: rounds at steps 4, 6, 8; the last one passes the budget (8 -> 80 > 64);
  * preset: conf/method/increlora.yaml (tinit = delta_t = max(1, round(0.02 x 12)) = 1) with lr 2e-2;
  * release: target_rank 2 (1 component per round), top_h 3, no dropout, 14 steps: the budget is met
    exactly at step 8 and the reserves are released;
  * no_advance: advance_learn off, target_rank 4 (2 per round), top_h 3, rounds every 3 steps over 16.
"""

from __future__ import annotations

import ast
import math
import os
import sys
import textwrap
import types
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402
from tests.test_parity_lamda_increlora import increlora_bank, increlora_drive, mlp, targets_of  # noqa: E402

COMMIT = "51a2d734af7883ef90425206057c1ef25997b359"
SRC = Path(os.environ.get("INCRELORA_SRC", "/tmp/parity/increlora/src"))
PRESET = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "increlora.yaml"))


def _ipdb_stub() -> types.ModuleType:
    stub = types.ModuleType("ipdb")

    def set_trace(*args, **kwargs):
        raise RuntimeError("the reference reached one of its ipdb.set_trace() error paths")

    stub.set_trace = set_trace
    return stub


class _LambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """torch's LambdaLR, accepting the ``verbose`` argument that Multi_LambdaLR still passes."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1, verbose=False):
        super().__init__(optimizer, lr_lambda, last_epoch)


class _TorchCopyNorm:
    """torch for ``compute_svd_orth_regu``, whose ``regu_loss += ...`` adds in place to the output of
    ``torch.norm``, which autograd saved for the backward (torch 2.13 refuses it): ``norm`` returns a
    copy, the same value and gradient."""

    @staticmethod
    def norm(*args, **kwargs):
        return torch.norm(*args, **kwargs).clone()

    def __getattr__(self, name):
        return getattr(torch, name)


def _read(path: Path, names: list[str], scope: dict) -> dict:
    """Run the top-level (or method) definitions ``names`` of ``path`` in ``scope``."""
    text = path.read_text()
    tree = ast.parse(text)
    for name in names:
        (node,) = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
        source = textwrap.dedent(ast.get_source_segment(text, node))
        exec(compile(source, f"{path.name}:{name}", "exec"), scope)
    return scope


def load_reference():
    lib = SRC / "loralib" / "loralib" / "increlora.py"
    transformers_src = SRC / "NLU" / "src" / "transformers"
    if not lib.is_file() or not (transformers_src / "trainer.py").is_file():
        sys.exit(f"the IncreLoRA reference is not at {SRC}: extract {COMMIT[:12]} there (see this script's docstring)")
    stub = _ipdb_stub()
    sys.modules["ipdb"] = stub
    sys.path.insert(0, str(SRC / "loralib"))
    import loralib  # the authors' package

    sched = _read(
        transformers_src / "optimization.py",
        ["Multi_LambdaLR", "get_lr_lambda", "get_linear_schedule_with_warmup"],
        {"LambdaLR": _LambdaLR, "warnings": warnings, "ipdb": stub, "math": math},
    )
    scope = {"torch": _TorchCopyNorm(), "lora": loralib}
    regu = _read(transformers_src / "trainer.py", ["compute_svd_orth_regu"], scope)
    return loralib, sched["get_linear_schedule_with_warmup"], regu["compute_svd_orth_regu"]


class Reference:
    """The authors' SVDLinear layers and RankAllocator on a case, with the driver's interface."""

    def __init__(self, case: dict, loralib, linear_schedule, compute_svd_orth_regu):
        self.case, self.regu = case, compute_svd_orth_regu
        widths, targets = case["widths"], targets_of(case["widths"])
        model = mlp(widths, case["model_seed"])
        bank = increlora_bank(case)
        for name in targets:
            base = model[int(name)]
            layer = loralib.SVDLinear(
                base.in_features,
                base.out_features,
                r=case["init_r"],
                lora_alpha=case["alpha"],
                lora_dropout=case["dropout"],
            )
            with torch.no_grad():
                layer.weight.copy_(base.weight)
                layer.bias.copy_(base.bias)
                p, q = bank[name]
                layer.lora_B[0].copy_(p[:, : case["init_r"]])
                layer.lora_A[0].copy_(q[: case["init_r"]])
            layer.bank = bank[name]
            model[int(name)] = layer
        loralib.mark_only_lora_as_trainable(model)
        self.model = model
        self.layers = {n: model[int(n)] for n in targets}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for n, p in named if "bias" not in n], "weight_decay": case["weight_decay"]},
                {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0},
            ],
            lr=case["lr"],
        )
        assert case["schedule"] == "linear"
        self.scheduler = linear_schedule(self.optimizer, case["warmup"], case["steps"], multi_lr=True)
        init_warmup, interval = case["resolved"]
        self.allocator = loralib.RankAllocator(
            model,
            lora_r=case["init_r"],
            target_rank=case["target_r"],
            init_warmup=init_warmup,
            incre_interval=interval,
            top_h=case["add_per_round"],
            advance_learn=case["advance_learn"],
            beta1=0.85,
            beta2=0.85,
            total_step=case["steps"],
            weight_decay=case["weight_decay"],
            incre_rank_num=case["incre_rank_num"] or None,
        )
        self.allocator.set_total_step(case["steps"])
        self.round = None

    def loss_extra(self):
        coef = self.case["orth_reg_weight"]
        return coef * self.regu(None, self.model) if coef > 0 else 0.0

    def after_backward(self, step):
        pass

    def allocate(self, step):
        before = self.ranks()
        self.allocator.update_and_increase(self.model, step, self.optimizer)
        grown = [n for n, r in self.ranks().items() if r > before[n]]
        if grown:
            self.round = [step, grown]

    def on_step_end(self, step):
        pass

    def factors(self):
        out = {}
        for n, m in self.layers.items():
            tensors = [torch.cat(list(m.lora_B), 1), torch.cat(list(m.lora_A), 0), torch.cat(list(m.lora_E), 0)]
            grads = [
                torch.cat([p.grad if p.grad is not None else torch.zeros_like(p) for p in chunks], dim)
                for chunks, dim in ((m.lora_B, 1), (m.lora_A, 0), (m.lora_E, 0))
            ]
            out[n] = (*tensors, *grads)
        return out

    def ranks(self):
        return {n: int(m.ranknum.item()) for n, m in self.layers.items()}

    def scores(self):
        ipt, unc = self.allocator.exp_avg_ipt, self.allocator.exp_avg_unc
        return {n: float(ipt[n] * unc[n]) if n in ipt else 0.0 for n in self.layers}

    def last_round(self):
        return self.round


def _seeded_reserves(loralib):
    """Wrap ``SVDLinear.add_reserve_param`` so each new component takes the bank's values."""
    original = loralib.SVDLinear.add_reserve_param

    def add_reserve_param(self, add_r, advance_learn=True):
        first = sum(a.shape[0] for a in self.lora_A)
        original(self, add_r, advance_learn)
        p, q = self.bank
        with torch.no_grad():
            for j in range(add_r):
                self.lora_B[len(self.lora_B) - add_r + j].copy_(p[:, first + j : first + j + 1])
                self.lora_A[len(self.lora_A) - add_r + j].copy_(q[first + j : first + j + 1])

    loralib.SVDLinear.add_reserve_param = add_reserve_param


def resolved(case: dict) -> list[int]:
    """(init_warmup, incre_interval) by the preset's rule: delta_t 0 -> max(1, round(ratio T)), tinit -1 -> delta_t."""
    interval = case["delta_t"] or max(1, round(case["interval_ratio"] * case["steps"]))
    return [case["tinit"] if case["tinit"] >= 0 else interval, interval]


def cases() -> dict[str, dict]:
    common = {
        "widths": [8] * 9 + [4],
        "model_seed": 0,
        "bank_seed": 1,
        "bank_size": 48,
        "data_seed": 2,
        "dropout_seed": 1000,
        "schedule": "linear",
        "interval_ratio": 0.02,
        "orth_reg_weight": 0.1,
        "init_r": 1,
        "alpha": 16,
        "advance_learn": True,
    }
    keys = ("init_r", "alpha", "dropout", "target_r", "add_per_round", "incre_rank_num", "tinit", "delta_t")
    out = {
        "reference_defaults": {
            **common,
            "steps": 12,
            "dropout": 0.3,
            "target_r": 8,
            "add_per_round": 6,
            "incre_rank_num": 0,
            "tinit": 2,
            "delta_t": 2,
            "new_warmup_ratio": 2 / 12,
            "lr": 8e-4,
            "weight_decay": 0.01,
        },
        "preset": {
            **common,
            **{k: PRESET[k] for k in keys},
            "interval_ratio": PRESET["interval_ratio"],
            "orth_reg_weight": PRESET["orth_reg_weight"],
            "advance_learn": PRESET["advance_learn"],
            "new_warmup_ratio": PRESET["new_warmup_ratio"],
            "steps": 12,
            "lr": 2e-2,
            "weight_decay": 0.0,
        },
        "release": {
            **common,
            "steps": 14,
            "dropout": 0.0,
            "target_r": 2,
            "add_per_round": 3,
            "incre_rank_num": 0,
            "tinit": 2,
            "delta_t": 2,
            "new_warmup_ratio": 0.1,
            "lr": 2e-2,
            "weight_decay": 0.01,
        },
        "no_advance": {
            **common,
            "steps": 16,
            "dropout": 0.1,
            "target_r": 4,
            "add_per_round": 3,
            "incre_rank_num": 0,
            "tinit": 3,
            "delta_t": 3,
            "advance_learn": False,
            "new_warmup_ratio": 0.125,
            "lr": 2e-2,
            "weight_decay": 0.01,
        },
    }
    for case in out.values():
        case["warmup"] = math.ceil(case["new_warmup_ratio"] * case["steps"])
        case["resolved"] = resolved(case)
    return out


def main() -> None:
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    loralib, linear_schedule, regu = load_reference()
    _seeded_reserves(loralib)
    out = {}
    for name, case in cases().items():
        ref = Reference(case, loralib, linear_schedule, regu)
        record = increlora_drive(ref.model, ref.optimizer, ref.scheduler, case, ref)
        rounds = sorted({r[0] for r in record["rounds"] if r})
        per_round = case["incre_rank_num"] or {2: 1, 4: 2, 6: 3, 8: 4}[case["target_r"]]
        out[name] = {
            "settings": case,
            "record": record,
            "rounds": rounds,
            # room for a module chosen at every round plus its reserves: what lorabench's rank 0 preallocates
            "r_max": case["init_r"] + per_round * (len(rounds) + 1),
        }
        print(f"{name}: rounds at {rounds}, final total rank {sum(record['ranks'][-1].values())}")
    path = write_fixture(
        "increlora",
        {
            "reference": f"FeiyuZhang98/IncreLoRA@{COMMIT[:12]} loralib + NLU trainer/optimization",
            "version": COMMIT,
            "produced_by": "scripts/parity/increlora.py",
            "cases": out,
        },
    )
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
