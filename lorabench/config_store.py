"""Registers the dataclass schema with Hydra, so composing type-checks every group's YAML."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from lorabench.config import RunConfig


def register_schemas() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
