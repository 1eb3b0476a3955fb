"""Pin what can be pinned of AlignGuard-LoRA: writes tests/fixtures/parity/alignguard.json.

    ALIGNGUARD_GIT=<mirror of abhilekhborah/AlignGuard-LoRA> \
    ALIGNGUARD_THIRD_GIT=<mirror of Sirhan1/modelFineTuneRiskAssessment> \
    .venv/bin/python scripts/parity/alignguard.py

Two parts (the ``fetch`` tool makes both git mirrors; files are read with ``git show`` at the commits
below and executed from memory, nothing is re-implemented for the reference numbers):

1. The authors' code, abhilekhborah/AlignGuard-LoRA at f2143d1a4b00: an audit, not numbers. Each
   Python file is compiled (model.py ends mid-training-loop in a stray line and raises SyntaxError, so
   the package cannot be imported) and searched for the paper's ingredients (Fisher, eigen-directions,
   geodesic, Riemannian, collision) and for what it implements instead (silhouette coefficient,
   null-space projection): there is no loss of the paper to run.
2. A third party's reading of the paper, Sirhan1/modelFineTuneRiskAssessment at 1d8a8e61859a
   (``src/alignment_risk/fisher.py`` and ``mitigation.py``, which cite the paper's section 4 and
   Appendix C): on a tiny seeded model, its Fisher subspace (``FisherSubspaceAnalyzer``, per-sample
   gradients by loop, full SVD, top-k, no explained-variance cut) of one linear weight; then, for a
   fixed update dW of that weight, its split (``decompose_update``), alignment energy
   (``fisher_weighted_alignment_penalty``), task energy with the identity metric, overlap
   (``riemannian_overlap_penalty``) and geodesic (``geodesic_overlap_penalty``) terms and their
   gradients with respect to dW; and both collision terms on a free pair (a, t) that is not a split
   (so the geodesic term is not 0), with gradients. All in float64.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

AUTHORS_GIT = os.environ.get("ALIGNGUARD_GIT", "/tmp/parity/alignguard/authors.git")
AUTHORS_COMMIT = "f2143d1a4b0009c5824b1633a139f117611b23c0"
THIRD_GIT = os.environ.get("ALIGNGUARD_THIRD_GIT", "/tmp/parity/alignguard/third.git")
THIRD_COMMIT = "1d8a8e61859aa82941cdc43b5cce0fd396282830"
OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity" / "alignguard.json"

RULE_WORDS = ("fisher", "eigen", "geodesic", "riemannian", "collision", "lambda_a", "lambda_nc")
OTHER_WORDS = ("silhouette", "null_space", "lambda_sc", "lambda_null", "mahalanobis")
SETTINGS = {"samples": 6, "tokens": 3, "d_in": 5, "d_out": 4, "classes": 3, "top_k": 3, "beta": 4.0, "tau": 0.01}


def show(git_dir: str, commit: str, path: str) -> str:
    return subprocess.check_output(["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"], text=True)


def audit_authors() -> dict:
    files = subprocess.check_output(
        ["git", f"--git-dir={AUTHORS_GIT}", "ls-tree", "--name-only", AUTHORS_COMMIT], text=True
    ).split()
    report = {}
    for name in sorted(f for f in files if f.endswith(".py")):
        text = show(AUTHORS_GIT, AUTHORS_COMMIT, name)
        try:
            compile(text, name, "exec")
            compiles = True
        except SyntaxError as exc:
            compiles = f"SyntaxError at line {exc.lineno}: {exc.msg}"
        low = text.lower()
        report[name] = {
            "compiles": compiles,
            "rule_words": {w: low.count(w) for w in RULE_WORDS},
            "other_words": {w: low.count(w) for w in OTHER_WORDS},
        }
    return report


def load_third_party():
    """The package's types, utils, fisher and mitigation modules, without its __init__ (plots, CLI)."""
    pkg = types.ModuleType("alignment_risk")
    pkg.__path__ = []
    sys.modules["alignment_risk"] = pkg
    for name in ("types", "utils", "fisher", "mitigation"):
        full = f"alignment_risk.{name}"
        module = types.ModuleType(full)
        module.__package__ = "alignment_risk"
        sys.modules[full] = module
        code = show(THIRD_GIT, THIRD_COMMIT, f"src/alignment_risk/{name}.py")
        exec(compile(code, f"alignment_risk/{name}.py", "exec"), module.__dict__)
        setattr(pkg, name, module)
    return pkg.fisher, pkg.mitigation


class Tiny(torch.nn.Module):
    """x (B x T x d_in) -> tanh(lin(x)) -> fixed readout -> per-token logits."""

    def __init__(self, weight, readout):
        super().__init__()
        self.lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        self.lin.weight.data.copy_(weight)
        self.readout = torch.nn.Parameter(readout, requires_grad=False)

    def forward(self, x):
        return torch.tanh(self.lin(x)) @ self.readout.T


def summed_ce(model, batch):
    """Per sample: the cross-entropy summed over its tokens (the sequence NLL)."""
    logits = model(batch["x"])
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["y"], reduction="none")
    return nll.sum(dim=1)


def as_list(t: torch.Tensor):
    return t.detach().double().tolist()


def main() -> None:
    torch.manual_seed(0)
    s = SETTINGS
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(s["d_out"], s["d_in"], generator=gen, dtype=torch.float64)
    readout = torch.randn(s["classes"], s["d_out"], generator=gen, dtype=torch.float64)
    x = torch.randn(s["samples"], s["tokens"], s["d_in"], generator=gen, dtype=torch.float64)
    y = torch.randint(0, s["classes"], (s["samples"], s["tokens"]), generator=gen)
    delta = 0.05 * torch.randn(s["d_out"], s["d_in"], generator=gen, dtype=torch.float64)
    free_a = torch.randn(s["d_out"], s["d_in"], generator=gen, dtype=torch.float64) * 0.02
    free_t = torch.randn(s["d_out"], s["d_in"], generator=gen, dtype=torch.float64) * 0.02 + 0.5 * free_a

    fisher, mitigation = load_third_party()
    model = Tiny(weight, readout)
    config = fisher.FisherConfig(
        top_rank=s["top_k"],
        target_explained_variance=None,
        max_samples=s["samples"],
        gradient_collection="loop",
        device="cpu",
        max_parameters=10_000,
    )
    subspace = fisher.FisherSubspaceAnalyzer(config).analyze(
        model, [{"x": x, "y": y}], summed_ce, parameter_names=["lin.weight"]
    )
    basis, eigenvalues = subspace.fisher_eigenvectors.double(), subspace.fisher_eigenvalues.double()

    vec = delta.reshape(-1).clone().requires_grad_(True)
    aligned, task = mitigation.decompose_update(vec, basis)
    terms = {
        "align": mitigation.fisher_weighted_alignment_penalty(aligned, basis, eigenvalues),
        "task": (task**2).sum(),  # h_type "identity"
        "overlap": mitigation.riemannian_overlap_penalty(aligned, task, beta=s["beta"], tau=s["tau"]),
        "geodesic": mitigation.geodesic_overlap_penalty(aligned, task, eps=1e-12),
    }
    split_out = {"aligned": as_list(aligned.reshape(delta.shape)), "task": as_list(task.reshape(delta.shape))}
    term_out = {}
    for name, value in terms.items():
        (grad,) = torch.autograd.grad(value, vec, retain_graph=True)
        term_out[name] = {"value": value.item(), "grad_delta": as_list(grad.reshape(delta.shape))}

    a = free_a.reshape(-1).clone().requires_grad_(True)
    t = free_t.reshape(-1).clone().requires_grad_(True)
    free_out = {}
    for name, value in (
        ("overlap", mitigation.riemannian_overlap_penalty(a, t, beta=s["beta"], tau=s["tau"])),
        ("geodesic", mitigation.geodesic_overlap_penalty(a, t, eps=1e-12)),
    ):
        ga, gt = torch.autograd.grad(value, (a, t))
        free_out[name] = {
            "value": value.item(),
            "grad_a": as_list(ga.reshape(delta.shape)),
            "grad_t": as_list(gt.reshape(delta.shape)),
        }

    fixture = {
        "reference": {
            "authors": {"repo": "github.com/abhilekhborah/AlignGuard-LoRA", "commit": AUTHORS_COMMIT},
            "third_party": {
                "repo": "github.com/Sirhan1/modelFineTuneRiskAssessment",
                "commit": THIRD_COMMIT,
                "files": "src/alignment_risk/fisher.py (FisherSubspaceAnalyzer), src/alignment_risk/mitigation.py",
                "note": "a third party's reading of arXiv:2508.02079 (section 4, Appendix C), not the authors' code",
            },
        },
        "version": "authors f2143d1a4b00 (no release); third party 1d8a8e61859a",
        "produced_by": "scripts/parity/alignguard.py",
        "authors_audit": audit_authors(),
        "settings": {**s, "dtype": "float64", "seed": 0, "loss": "per-token cross-entropy summed per sample"},
        "cases": {
            "inputs": {
                "weight": as_list(weight),
                "readout": as_list(readout),
                "x": as_list(x),
                "y": y.tolist(),
                "delta": as_list(delta),
                "free_a": as_list(free_a),
                "free_t": as_list(free_t),
            },
            "fisher": {
                "eigenvalues": as_list(eigenvalues),
                "eigenvectors": as_list(basis.T.reshape(-1, *delta.shape)),  # k x d_out x d_in, signs as SVD gives
            },
            "split": split_out,
            "terms": term_out,
            "free_pair": free_out,
        },
    }
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
