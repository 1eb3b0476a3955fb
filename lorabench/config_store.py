"""Registers the dataclass schema with Hydra, so composing type-checks every group's YAML."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from lorabench.config import RunConfig


def register_schemas() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def compose(overrides: list[str]) -> dict:
    """The resolved config dict that ``lorabench train <overrides>`` would run (no Hydra job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from lorabench.launch import CONF_DIR

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)
