"""Sweep presets (conf/sweep/): each composes with the sweeper parameters it promises; the launcher
presets and Hydra's launcher plugins compose; `+sweep=seeds` runs three seeds end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lorabench.cli import main
from tests.conftest import CONF_DIR, compose, tiny_overrides

SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))


def hydra_cfg(overrides: list[str]) -> dict:
    """The ``hydra`` node that ``lorabench train <overrides>`` would use."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from lorabench.config_store import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra, resolve=False)


def test_every_sweep_preset_is_global_and_documented():
    assert {"seeds", "ranks", "lr_lora", "lr_full", "lr_galore", "joblib", "slurm"} <= set(SWEEPS)
    for name in SWEEPS:
        lines = (CONF_DIR / "sweep" / f"{name}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_", name
        assert lines[1].startswith("# lorabench train -m +sweep="), name


@pytest.mark.parametrize(
    "name,key,values",
    [
        ("seeds", "seed", "0,1,2"),
        ("ranks", "method.rank", "4,8,16,32,64"),
        ("lr_lora", "method.lr", "5e-5,1e-4,2e-4,5e-4,1e-3"),
        ("lr_full", "method.lr", "5e-6,1e-5,2e-5,5e-5,1e-4"),
        ("lr_galore", "method.lr", "1e-5,3e-5,1e-4,3e-4,1e-3"),
    ],
)
def test_sweep_params(name, key, values):
    params = hydra_cfg([f"+sweep={name}"])["sweeper"]["params"]
    assert params[key] == values
    if name.startswith("lr_"):
        assert params["method"] == name[3:]
    compose([f"+sweep={name}"])  # the job config itself still composes


@pytest.mark.parametrize(
    "preset,override,target",
    [
        ("joblib", "hydra/launcher=joblib", "JoblibLauncher"),
        ("slurm", "hydra/launcher=submitit_slurm", "SlurmLauncher"),
    ],
)
def test_launchers_compose(preset, override, target):
    plugin = {"joblib": "hydra_plugins.hydra_joblib_launcher", "slurm": "hydra_plugins.hydra_submitit_launcher"}[preset]
    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"{plugin} is not installed")
    assert hydra_cfg([override])["launcher"]["_target_"].endswith(target)
    launcher = hydra_cfg([f"+sweep={preset}", "method=galore"])["launcher"]
    assert launcher["_target_"].endswith(target)
    if preset == "slurm":
        assert launcher["gpus_per_node"] == 1 and launcher["tasks_per_node"] == 1


def test_seeds_sweep_runs_three_seeds(sst2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # hydra.sweep.dir is ".": multirun.yaml lands in the working directory
    with pytest.raises(SystemExit) as exc:
        main(["train", "-m", "+sweep=seeds", "method=lora", *tiny_overrides("classification", sst2_dir, tmp_path)])
    assert exc.value.code == 0
    seeds = sorted(json.loads(p.read_text())["config"]["seed"] for p in Path(tmp_path).rglob("record.json"))
    assert seeds == [0, 1, 2]
