"""Protocol checks made at validation, before torch loads (lorabench.validate.validate_config)."""

from __future__ import annotations

from lorabench.errors import ConfigError


def check_federated(cfg, method) -> None:
    """``method`` is the checked method (lorabench.method_params.check.CheckedMethod). FedSVD needs
    an A-frozen LoRA; DP only with FedAvg (Flower's DP wrapper noises every array the server sends,
    FedSVD's A included); no method procedure (a client trains a few steps from the global arrays,
    where a procedure's schedule over the run has no meaning)."""
    fed = cfg.protocol.federated
    if method.names.get("procedure", "none") != "none":
        raise ConfigError(
            f"protocol=federated does not run method procedures (method {method.label!r} has procedure "
            f"{method.names['procedure']!r}); use an adapter or optimizer method without one"
        )
    if fed.aggregation in fed.FROZEN_A_AGGREGATIONS and not getattr(method.params.get("adapter"), "freeze_a", False):
        raise ConfigError(
            f"protocol.federated.aggregation={fed.aggregation!r} trains B with A fixed: it needs a LoRA "
            f"method with freeze_a=true (method=ffa_lora), not method {method.label!r}"
        )
    if fed.dp_target_epsilon is not None and fed.aggregation != "fedavg":
        raise ConfigError(
            f"protocol.federated.dp_target_epsilon with aggregation={fed.aggregation!r} is not supported: "
            "Flower's DP wrapper adds noise to every array the server sends, FedSVD's A included; "
            "use aggregation=fedavg"
        )
    if cfg.hardware.num_processes > 1:
        raise ConfigError(
            "protocol=federated runs its clients in Flower's simulation, not under accelerate launch; "
            f"use hardware.num_processes=1 (got {cfg.hardware.num_processes}) and protocol.federated.client_cpus"
        )


CHECKS = {"federated": check_federated}


def check_protocol(cfg, method) -> None:
    """The chosen protocol's checks (none for ``single``)."""
    check = CHECKS.get(cfg.protocol.name)
    if check:
        check(cfg, method)
