"""The dataset config of each task of a continual or compose run (torch-free: config validation uses it).

A task's :class:`~lorabench.config.DatasetConfig` is its preset ``conf/dataset/<task>.yaml`` merged
onto the schema defaults, then:

* the sizes of the run's own ``dataset`` (``SHARED_SIZES``: train_size, eval_size, max_length,
  subset_seed, eval_batch_size) replace the preset's, so that every task of the sequence is trained
  and scored at one scale (``dataset=rte`` as the first task with ``dataset.max_length=128`` gives
  every task 128 tokens, though the RTE preset says 256);
* its data folder is ``protocol.<continual|compose>.data_dirs[task]`` when given (``source=local``);
  for the run's own dataset (which must be the first task, lorabench.protocols.continual.check) ``dataset.data_dir``,
  ``dataset.source``, ``dataset.hub_id`` and ``dataset.primary_metric`` apply too; otherwise the
  preset's source (the hub for GLUE).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lorabench.config import DatasetConfig, RunConfig

SHARED_SIZES = ("train_size", "eval_size", "max_length", "subset_seed", "eval_batch_size")
# what the run's own dataset (the first task) brings besides the sizes
OWN_SOURCE = ("data_dir", "eval_data_dir", "source", "hub_id", "primary_metric")


def preset_dir() -> Path:
    from lorabench.launch import CONF_DIR

    return CONF_DIR / "dataset"


def preset(name: str) -> DatasetConfig:
    """``conf/dataset/<name>.yaml`` as a DatasetConfig (the schema defaults when there is none)."""
    from omegaconf import OmegaConf

    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        return DatasetConfig(name=name)
    node = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(path), {"name": name})
    return OmegaConf.to_object(node)


def task_settings(cfg: RunConfig):
    """The settings of the run's protocol over a task list (``protocol.continual`` or
    ``protocol.compose``: both have ``tasks``, ``data_dirs`` and ``steps_per_task``)."""
    return getattr(cfg.protocol, cfg.protocol.name)


def task_config(cfg: RunConfig, name: str) -> DatasetConfig:
    """The DatasetConfig task ``name`` is loaded, trained and scored with (see the module docstring)."""
    base = preset(name)
    changes = {key: getattr(cfg.dataset, key) for key in SHARED_SIZES}
    if name == cfg.dataset.name:
        changes.update({key: getattr(cfg.dataset, key) for key in OWN_SOURCE})
    data_dir = task_settings(cfg).data_dirs.get(name)
    if data_dir:
        changes.update(data_dir=data_dir, source="local")
    return dataclasses.replace(base, **changes)
