"""Pin WaRA's rule from the paper's pipeline run literally: writes tests/fixtures/parity/wara.json.

    .venv/bin/python -m pip install --target /tmp/parity/wara/site --no-deps pytorch-wavelets==1.3.0 "setuptools<80"
    WARA_PTW_SITE=/tmp/parity/wara/site .venv/bin/python scripts/parity/wara.py

Reference. The authors' code (moeinheidari7829/WaRA) could not be fetched here, so this pins the rule of
arXiv:2506.24092v1, Fig. 1, as written: the input X (d_in x k, features x tokens) goes through a one-level
2-D DWT into C_LL, C_LH, C_HL, C_HH; one pair A (r x n_in), B (n_out x r) maps each subband on its feature
axis (B A C); the 2-D IDWT of the four results, cut to d_out x k and scaled by s, is added to W0 X + b0.
It is computed twice, with two wavelet libraries and nothing of lorabench's (ours uses ptwt's 1-D
transforms along the features only):
  * PyWavelets (numpy, float64): pywt.dwt2 / pywt.idwt2; Delta W is the pipeline applied to the identity
    (d_in tokens e_j), and the gradients of L = <y, G> (G a seeded upstream gradient) come from the
    pipeline's linearity in M = B A and in X: dL/dM_ij = <F_{E_ij}(X), G>, dL/dA = B^T dL/dM,
    dL/dB = dL/dM A^T, dL/dX_tp = <F_M(E_tp), G> + (G W0)_tp (exact, no finite differences);
  * pytorch_wavelets 1.3.0 (the 2-D DWT library of many vision codebases; torch, float64): DWTForward(J=1)
    and DWTInverse on a (1, 1, d_in, k) image, gradients by autograd.
The two must agree to 1e-12 (checked here; the gaps are recorded), except for the input gradient in
the symmetric mode at odd widths, where pytorch_wavelets' hand-written backward is not the derivative of
its own forward (see BACKWARD_NOT_ADJOINT). Pinned: the PyWavelets numbers.

Cases (k tokens, seeded W0 ~ N(0, 1/d_in), b0 ~ N(0, 0.01), A, B, X ~ N(0, 1), G ~ N(0, 1)):
  * haar_even: 8 -> 6, r 2, s 1.5, Haar, zero mode, k 4 (the default rule on even widths);
  * haar_odd: 7 -> 5, r 2, s 0.5, Haar, zero mode, k 3 (odd widths and an odd token count);
  * haar_odd_symmetric: as haar_odd with the symmetric mode (the padded edge sample differs);
  * db2: 8 -> 6, r 3, s 1.0, db2, zero mode, k 5 (a longer filter: redundant, non-orthogonal edges).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pywt
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.parity_case import write_fixture  # noqa: E402

SITE = os.environ.get("WARA_PTW_SITE", "/tmp/parity/wara/site")
CASES = {
    "haar_even": dict(d_in=8, d_out=6, rank=2, scale=1.5, wavelet="haar", mode="zero", tokens=4, seed=0),
    "haar_odd": dict(d_in=7, d_out=5, rank=2, scale=0.5, wavelet="haar", mode="zero", tokens=3, seed=1),
    "haar_odd_symmetric": dict(d_in=7, d_out=5, rank=2, scale=0.5, wavelet="haar", mode="symmetric", tokens=3, seed=1),
    "db2": dict(d_in=8, d_out=6, rank=3, scale=1.0, wavelet="db2", mode="zero", tokens=5, seed=2),
}


# pytorch_wavelets' hand-written DWT backward (AFB2D) is not the derivative of its forward when the
# symmetric mode pads an odd width (measured 0.3 here; its zero mode and PyWavelets' linearity agree), so
# that gap is recorded, not asserted
BACKWARD_NOT_ADJOINT = {("haar_odd_symmetric", "grad_X")}


def band(width: int, wavelet: str, mode: str) -> int:
    return pywt.dwt_coeff_len(width, pywt.Wavelet(wavelet).dec_len, mode)


def pipeline_pywt(m: np.ndarray, x: np.ndarray, c: dict) -> np.ndarray:
    """s IDWT2(M C_ab) for x (d_in x k), cut to d_out x k (Fig. 1 of the paper, PyWavelets)."""
    ll, (lh, hl, hh) = pywt.dwt2(x, c["wavelet"], mode=c["mode"])
    out = pywt.idwt2((m @ ll, (m @ lh, m @ hl, m @ hh)), c["wavelet"], mode=c["mode"])
    return c["scale"] * out[: c["d_out"], : x.shape[1]]


def pipeline_ptw(m: torch.Tensor, x: torch.Tensor, c: dict, dwt, idwt) -> torch.Tensor:
    """The same with pytorch_wavelets on a (1, 1, d_in, k) image; M acts on the feature (H) axis."""
    yl, yh = dwt(x[None, None])
    yl = torch.einsum("ij,bcjk->bcik", m, yl)
    yh = [torch.einsum("ij,bcsjk->bcsik", m, yh[0])]
    out = idwt((yl, yh))[0, 0]
    return c["scale"] * out[: c["d_out"], : x.shape[1]]


def reference_pywt(c: dict, t: dict) -> dict:
    a, b, x, g = (t[k].numpy() for k in ("A", "B", "X", "G"))  # x, g: tokens x features (as a layer sees them)
    m = b @ a
    upd = pipeline_pywt(m, x.T, c).T  # k x d_out
    delta = pipeline_pywt(m, np.eye(c["d_in"]), c)  # d_out x d_in: token j = e_j
    d_m = np.zeros_like(m)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            e = np.zeros_like(m)
            e[i, j] = 1.0
            d_m[i, j] = np.sum(pipeline_pywt(e, x.T, c).T * g)
    d_x = np.zeros_like(x)
    for tok in range(x.shape[0]):
        for p in range(x.shape[1]):
            e = np.zeros_like(x)
            e[tok, p] = 1.0
            d_x[tok, p] = np.sum(pipeline_pywt(m, e.T, c).T * g)
    w0 = t["W0"].numpy()
    out = x @ w0.T + t["b0"].numpy() + upd
    grads = {"grad_A": b.T @ d_m, "grad_B": d_m @ a.T, "grad_X": d_x + g @ w0}  # dL/dX includes W0's path
    return {"out": out, "delta_weight": delta, **grads}


def reference_ptw(c: dict, t: dict) -> dict:
    from pytorch_wavelets import DWTForward, DWTInverse

    dwt, idwt = DWTForward(J=1, wave=c["wavelet"], mode=c["mode"]), DWTInverse(wave=c["wavelet"], mode=c["mode"])
    dwt, idwt = dwt.double(), idwt.double()
    a, b, x = (t[k].clone().requires_grad_(True) for k in ("A", "B", "X"))
    upd = pipeline_ptw(b @ a, x.T, c, dwt, idwt).T
    out = x @ t["W0"].T + t["b0"] + upd
    (out * t["G"]).sum().backward()
    with torch.no_grad():
        delta = pipeline_ptw(b @ a, torch.eye(c["d_in"], dtype=torch.float64), c, dwt, idwt)
    return {"out": out.detach(), "delta_weight": delta, "grad_A": a.grad, "grad_B": b.grad, "grad_X": x.grad}


def tensors(c: dict) -> dict:
    gen = torch.Generator().manual_seed(c["seed"])
    n_in, n_out = band(c["d_in"], c["wavelet"], c["mode"]), band(c["d_out"], c["wavelet"], c["mode"])

    def draw(*shape, std=1.0):
        return std * torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "W0": draw(c["d_out"], c["d_in"], std=c["d_in"] ** -0.5),
        "b0": draw(c["d_out"], std=0.1),
        "A": draw(c["rank"], n_in),
        "B": draw(n_out, c["rank"]),  # non-zero: the pinned numbers exercise the whole path
        "X": draw(c["tokens"], c["d_in"]),
        "G": draw(c["tokens"], c["d_out"]),
    }


def main() -> None:
    if SITE not in sys.path:
        sys.path.insert(0, SITE)
    try:
        import pytorch_wavelets
    except ImportError:
        sys.exit(f"pytorch_wavelets is absent: pip install --target {SITE} --no-deps pytorch-wavelets==1.3.0")
    out_cases, worst = {}, 0.0
    for name, c in CASES.items():
        t = tensors(c)
        ref = reference_pywt(c, t)
        other = reference_ptw(c, t)
        gaps = {k: float(np.abs(ref[k] - other[k].numpy()).max()) for k in ref}
        checked = {k: v for k, v in gaps.items() if (name, k) not in BACKWARD_NOT_ADJOINT}
        assert max(checked.values()) <= 1e-12, f"{name}: PyWavelets and pytorch_wavelets disagree: {gaps}"
        worst = max(worst, *checked.values())
        gap = max(checked.values())
        out_cases[name] = {
            **c,
            "n_in": band(c["d_in"], c["wavelet"], c["mode"]),
            "n_out": band(c["d_out"], c["wavelet"], c["mode"]),
            "inputs": {k: v.tolist() for k, v in t.items()},
            "expected": {k: np.asarray(v).tolist() for k, v in ref.items()},
            "pytorch_wavelets_gaps": gaps,
        }
        print(f"{name}: pywt vs pytorch_wavelets max |Δ| = {gap:.3g}")
    path = write_fixture(
        "wara",
        {
            "reference": "arXiv:2506.24092v1 Fig. 1 pipeline (2-D DWT of X, one B A on C_LL/C_LH/C_HL/C_HH,"
            " 2-D IDWT) run literally on PyWavelets (pinned) and pytorch_wavelets; not the authors' code (unreachable)",
            "version": f"PyWavelets {pywt.__version__}, pytorch_wavelets {pytorch_wavelets.__version__}",
            "produced_by": "scripts/parity/wara.py",
            "libraries_max_gap": worst,
            "cases": out_cases,
        },
    )
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    main()
