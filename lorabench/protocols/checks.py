"""Protocol checks made at validation, before torch loads (lorabench.validate.validate_config)."""

from __future__ import annotations

from lorabench.errors import ConfigError


def not_plain_lora(method) -> str | None:
    """Why ``method`` is not peft's plain LoRA (its adapter, or DoRA's magnitudes), else None: the
    protocols that read or write the LoRA's A and B themselves (compose, compressed) need it."""
    adapter, params = method.names["adapter"], method.params.get("adapter")
    if adapter != "lora":
        return f"adapter {adapter!r}"
    return "DoRA (use_dora=true)" if getattr(params, "use_dora", False) else None


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


def check_continual(cfg, method) -> None:
    """lorabench.protocols.continual.check.check_continual (tasks, heads, strategy)."""
    from lorabench.protocols.continual.check import check_continual as check

    check(cfg, method)


def check_compose(cfg, method) -> None:
    """lorabench.protocols.compose.check.check_compose (tasks, merges, a peft LoRA method)."""
    from lorabench.protocols.compose.check import check_compose as check

    check(cfg, method)


def check_compressed(cfg, method) -> None:
    """lorabench.protocols.compressed.check.check_compressed (a peft LoRA method, the hqq package)."""
    from lorabench.protocols.compressed.check import check_compressed as check

    check(cfg, method)


CHECKS = {
    "federated": check_federated,
    "continual": check_continual,
    "compose": check_compose,
    "compressed": check_compressed,
}


def check_no_regularizer(cfg, method) -> None:
    """Regularizers run in single runs only: a federated client builds its step without one, and a
    continual stage's checkpoint does not hold a regularizer's state."""
    name = method.names.get("regularizer", "none")
    if name != "none":
        raise ConfigError(
            f"protocol={cfg.protocol.name} does not run regularizers yet (method {method.label!r} has "
            f"regularizer {name!r}); use protocol=single or a method without one"
        )


def trained_heads(cfg) -> list[str]:
    """The heads the run trains through: every task's for a continual or compose run, else its dataset's."""
    import lorabench.data  # noqa: F401  registers the datasets (torch-free)
    from lorabench.registry import DATASETS

    name = cfg.protocol.name
    names = getattr(cfg.protocol, name).tasks if name in ("continual", "compose") else [cfg.dataset.name]
    return [DATASETS.get(name, where="dataset").head for name in names]


def check_protocol(cfg, method) -> None:
    """The chosen protocol's checks (none for ``single``), then ``analysis.forgetting``'s, which
    depend on the heads the protocol trains through."""
    from lorabench.analysis.forgetting import check_forgetting

    check = CHECKS.get(cfg.protocol.name)
    if check:
        check_no_regularizer(cfg, method)
        check(cfg, method)
    check_forgetting(cfg, trained_heads(cfg))
