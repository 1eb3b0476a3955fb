"""The server's aggregation rules, as Flower strategies (``protocol.federated.aggregation``).

* ``fedavg``: FedAvg (McMahan et al. 2017, arXiv:1602.05629) of every array the clients train,
  weighted by their example counts. Over LoRA's A and B this averages the factors, not the
  products: mean(B_i) mean(A_i) != mean(B_i A_i) unless A is shared; with an A-frozen method
  (``method=ffa_lora``, FFA-LoRA: "Improving LoRA in Privacy-preserving Federated Learning") the
  clients train only B, so the average is exact: mean(B_i) A = mean(B_i A).
* ``fedsvd``: FedSVD ("FedSVD: Adaptive Orthogonalization for Private Federated Learning with
  LoRA"): clients train B with A fixed; the server averages the B's, forms ΔW = B̄ A and
  re-factorises it by SVD, ΔW = U Σ Vᵀ, into A ← V_rᵀ (orthonormal rows) and B ← U_r Σ_r, which
  the next round starts from. The product, hence the global model, is unchanged by the
  re-factorisation; only the basis A that the clients train B against moves.

Both are Flower's ``FedAvg`` (flwr.serverapp.strategy) with the round number of a resumed run sent
to the clients, a client failure failing the run instead of being averaged away, and the numpy and
Python RNGs seeded per round (Flower's sampling and DP noise draw from them), so that a resumed run
is the uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from lorabench.methods.fidelity import Fidelity
from lorabench.registry import Registry

AGGREGATIONS = Registry("aggregation")
ROUND_KEY = "lorabench-round"  # the global round (past rounds of a resumed run included)


class ClientFailed(RuntimeError):
    """A client's training raised; its reason is the message."""


class LorabenchFedAvg(FedAvg):
    """Flower's FedAvg, seeded per round, failing on client errors, rounds counted from ``offset``."""

    def __init__(self, *, seed: int, offset: int = 0, frozen_checksum: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed, self.offset, self.frozen_checksum = seed, offset, frozen_checksum
        self.client_metrics: list[dict] = []  # the last round's per-client metrics, for the record

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        global_round = self.offset + server_round
        random.seed(self.seed * 1_000_003 + global_round)
        np.random.seed((self.seed * 1_000_003 + global_round) % 2**32)
        config[ROUND_KEY] = global_round
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed:
            raise ClientFailed(f"round {self.offset + server_round}: a client failed: {failed[0].error.reason}")
        self.client_metrics = [dict(m.content["metrics"]) for m in replies]
        for metrics in self.client_metrics:
            got = metrics.get("frozen-checksum")
            if self.frozen_checksum is not None and not _close(got, self.frozen_checksum):
                raise ClientFailed(
                    f"round {self.offset + server_round}: a client's frozen weights differ from the server's "
                    f"(checksum {got!r} vs {self.frozen_checksum!r}): the processes did not build the same model"
                )
        return self.aggregate(server_round, replies)

    def aggregate(self, server_round: int, replies: list[Message]):
        return super().aggregate_train(server_round, replies)


def _close(a, b) -> bool:
    return a is not None and abs(a - b) <= 1e-9 * max(1.0, abs(b))


@AGGREGATIONS.register("fedavg")
class FedAvgAggregation(LorabenchFedAvg):
    """FedAvg of every trained array (the module docstring)."""

    needs_frozen_a = False
    fidelity = Fidelity(reference="Flower's FedAvg (flwr.serverapp.strategy.FedAvg), itself", status="library")

    @staticmethod
    def global_keys(trained: list[str], frozen_adapter: list[str]) -> list[str]:
        """The arrays the server holds and sends: what the clients train."""
        return trained


@AGGREGATIONS.register("fedsvd")
class FedSVDAggregation(LorabenchFedAvg):
    """FedAvg of B (and of any other trained array, e.g. a classification head), then every
    (A, B) pair re-factorised by the SVD of B̄A (the module docstring)."""

    needs_frozen_a = True
    fidelity = Fidelity(
        reference="no released code found for FedSVD; the rule is our reading of the paper",
        status="rule",
        unchecked=(
            "the paper's private setting (DP-SGD on the clients' B): DP here is user-level, with aggregation=fedavg",
            "the first round's A is the method's random init, not orthonormal; every later A is",
        ),
    )

    @staticmethod
    def global_keys(trained: list[str], frozen_adapter: list[str]) -> list[str]:
        """What the clients train plus the frozen A's, which the server re-factorises each round."""
        return trained + frozen_adapter

    def aggregate(self, server_round: int, replies: list[Message]):
        arrays, metrics = super().aggregate(server_round, replies)
        if arrays is None:
            return arrays, metrics
        state = arrays.to_torch_state_dict()
        return ArrayRecord({k: Array(v.numpy()) for k, v in refactorise(state).items()}), metrics


def refactorise(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every ``...lora_A...``/``...lora_B...`` pair of ``state`` replaced by the SVD factors of
    their product (in float64): A ← V_rᵀ, B ← U_r Σ_r with r the adapter's rank, so B A is kept."""
    out = dict(state)
    for key_a in [k for k in state if ".lora_A." in k]:
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        a, b = state[key_a].double(), state[key_b].double()
        rank = a.shape[0]
        u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
        out[key_a] = vh[:rank].to(state[key_a].dtype).contiguous()
        out[key_b] = (u[:, :rank] * s[:rank]).to(state[key_b].dtype).contiguous()
    return out
