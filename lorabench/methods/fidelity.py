"""How far each component is known to agree with its authors' released code.

Every registered component declares ``fidelity = Fidelity(...)``. ``status`` says what backs the
claim:

* ``parity``: pinned numbers produced by running the authors' code (a script under
  ``scripts/parity/`` writes them to ``tests/fixtures/parity/``; ``tests/test_parity_*.py`` check
  ours against them at ``tolerance``);
* ``library``: the component calls the reference implementation itself (peft, torch, galore-torch);
* ``rule``: no released code was found; the update rule is our reading of the paper, checked by
  hand-computed tests only;
* ``unchecked``: code exists but no parity fixture has been produced yet.

``deviations`` lists every deliberate difference from the reference at the defaults, each with
its reason. ``revision`` is raised whenever a change alters what the component computes at the same
config (a fixed rule): it enters the run id (``component_revisions``), so runs recorded by the old
code are not taken for finished runs of the new one. ``lorabench methods --fidelity`` prints the
entries and every run record carries them (``method.fidelity``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

STATUSES = ("parity", "library", "rule", "unchecked")


@dataclass(frozen=True)
class Fidelity:
    reference: str  # e.g. "pip fira==1.0.2 (= xichen-fy/Fira optimizer_torch/)"
    status: str  # one of STATUSES
    tolerance: str = ""  # e.g. "max |Δθ| <= 1e-6 over 12 steps"
    fixture: str = ""  # e.g. "tests/fixtures/parity/fira.json"
    deviations: tuple[str, ...] = ()  # deliberate differences at the defaults, each with its reason
    unchecked: tuple[str, ...] = ()  # parts of the reference the parity test does not cover, and why
    revision: int = 1  # raised when the numerics change at an unchanged config

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"fidelity status {self.status!r} is invalid; valid choices: {', '.join(STATUSES)}")
        if not (isinstance(self.revision, int) and self.revision >= 1):
            raise ValueError(f"fidelity revision {self.revision!r} is invalid; it must be an integer >= 1")
        if self.status == "parity" and not (self.fixture and self.tolerance):
            raise ValueError(f"fidelity of {self.reference!r}: status 'parity' needs a fixture and a tolerance")

    def describe(self) -> dict:
        out = asdict(self)
        out["deviations"], out["unchecked"] = list(self.deviations), list(self.unchecked)
        return out


UNCHECKED = Fidelity(reference="authors' code not yet compared", status="unchecked")
LIBRARIES = ("peft", "torch", "transformers", "galore-torch")  # backends that are the reference themselves


def fidelity_of(component) -> Fidelity:
    """The component's declared entry; a component backed by a reference library and declaring
    none is that library (``library``, with the installed version); anything else is ``UNCHECKED``."""
    declared = getattr(component, "fidelity", None)
    if declared is not None:
        return declared
    backend = getattr(component, "backed_by", "")
    if backend in LIBRARIES:
        return Fidelity(reference=f"{backend}=={_version(backend)}", status="library")
    return UNCHECKED


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution).split("+")[0]
    except PackageNotFoundError:
        return "not installed"


def component_revisions(method: dict) -> dict[str, int]:
    """axis -> revision of the components a method config names, only those above 1 (so the run
    ids of components never revised stay what they were)."""
    import lorabench.methods  # noqa: F401  registers components
    from lorabench.methods.spec import AXES

    out = {}
    for axis, registry in AXES.items():
        name = str(method.get(axis) or "none")
        if name != "none" and name in registry:
            revision = fidelity_of(registry.get(name)).revision
            if revision > 1:
                out[axis] = revision
    return out
