"""User-level differential privacy for federated rounds, accounted by Opacus.

Each round every sampled client's update (its trained arrays minus the global ones) is clipped to
l2 norm ``C`` on the client (Flower's ``fixedclipping_mod``) and the server adds Gaussian noise of
standard deviation ``sigma * C / m`` to the average of the ``m`` updates (Flower's
``DifferentialPrivacyClientSideFixedClipping``): the Gaussian mechanism of DP-FedAvg (McMahan et
al. 2018, arXiv:1710.06963) that DP-LoRA ("Differentially Private Low-Rank Adaptation of Large
Language Model Using Federated Learning") applies to LoRA's weights.

The accountant is Opacus' RDP accountant (Mironov 2017) with sample rate 1 for every round: no
amplification by client sampling is claimed, so the epsilon reported is an upper bound also when
``clients_per_round`` < ``clients`` (Flower samples a fixed number of clients, not the Poisson
sampling the amplified bound assumes). The noise multiplier for a target epsilon over the run's
rounds is solved with Opacus' ``get_noise_multiplier``.
"""

from __future__ import annotations

SAMPLE_RATE = 1.0  # no amplification by sampling (see the module docstring)
FIDELITY = {  # lorabench.methods.fidelity.Fidelity.describe() form, torch-free
    "reference": "Flower DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod; Opacus RDPAccountant",
    "status": "library",
    "deviations": ["no amplification by client sampling is claimed: epsilon is an upper bound"],
    "unchecked": ["DP-LoRA's own code (none released): its mechanism is read as DP-FedAvg on LoRA's weights"],
}
ACCOUNTANT = "opacus rdp, sample rate 1 (no sampling amplification)"


def noise_multiplier_for(target_epsilon: float, delta: float, rounds: int) -> float:
    """The smallest noise multiplier (Opacus' search, to within its tolerance) whose ``rounds``
    Gaussian releases stay within (``target_epsilon``, ``delta``)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=SAMPLE_RATE,
            steps=rounds,
            accountant="rdp",
            epsilon_tolerance=0.01,
        )
    )


def epsilon_after(noise_multiplier: float, delta: float, rounds: int) -> float:
    """Epsilon spent at ``delta`` after ``rounds`` releases with ``noise_multiplier``."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=SAMPLE_RATE)
    return float(accountant.get_epsilon(delta=delta))
