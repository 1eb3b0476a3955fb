"""The torch-free Params registry (lorabench/method_params/) against the component registries, and
``check_method`` (torch-free) against ``resolve_method`` on every preset in conf/method.

The two registries must never drift: the same names on every axis, ``component.Params`` the
registered class, the same ``requires_adapter``. A preset checked in a fresh interpreter that never
imports torch, transformers or peft gives the params ``resolve_method`` builds with the components.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorabench.methods  # noqa: F401  registers components
from lorabench.errors import ConfigError
from lorabench.method_params.check import COMMON_KEYS, check_method
from lorabench.method_params.registry import PARAMS
from lorabench.methods.catalog import load_presets
from lorabench.methods.spec import AXES, resolve_method
from lorabench.registry import OPTIMIZERS
from tests.conftest import CONF_DIR

HEAVY = ("torch", "transformers", "peft")
PRESETS = load_presets(CONF_DIR / "method")
COMPONENTS = [(axis, name, component) for axis, registry in AXES.items() for name, component in registry.items()]


def test_every_axis_registers_the_same_names_in_both_registries():
    for axis, registry in AXES.items():
        assert PARAMS[axis].names() == registry.names(), axis
    assert len(COMPONENTS) >= 49


@pytest.mark.parametrize("axis,name,component", COMPONENTS, ids=[f"{a}-{n}" for a, n, _ in COMPONENTS])
def test_component_params_and_adapter_requirement_are_the_registered_ones(axis, name, component):
    declared = PARAMS[axis].get(name)
    assert component.Params is declared.params
    assert dataclasses.is_dataclass(declared.params)
    assert declared.params.__module__.startswith("lorabench.method_params."), "Params defined in a torch module"
    assert tuple(getattr(component, "requires_adapter", None) or ()) == declared.requires_adapter


def test_an_unknown_component_lists_the_components_choices():
    raw = {**PRESETS["lora"], "optimizer": "nosuch"}
    with pytest.raises(ConfigError) as exc:
        check_method(raw)
    assert str(exc.value) == f"unknown method.optimizer 'nosuch'; valid choices: {', '.join(OPTIMIZERS.names())}"


def _preset(name: str, experts: list[str]) -> dict:
    raw = dict(PRESETS[name])
    if name == "xlora":  # needs two trained experts: folders that pass the adapter-folder check
        raw["experts"] = experts
    return raw


DRIVER = """
import dataclasses, json, sys
from pathlib import Path
from omegaconf import OmegaConf
from lorabench.method_params.check import check_method

experts = json.loads(sys.argv[2])
out = {}
for path in sorted(Path(sys.argv[1]).glob("*.yaml")):
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if path.stem == "xlora":
        raw["experts"] = experts
    checked = check_method(raw)
    out[path.stem] = {
        "names": checked.names,
        "params": {a: [type(p).__module__ + "." + type(p).__qualname__, dataclasses.asdict(p)]
                   for a, p in checked.params.items()},
    }
print(json.dumps({"presets": out, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> list[str]:
    folders = []
    for i in range(2):
        folder = tmp_path_factory.mktemp(f"expert{i}")
        (folder / "adapter_config.json").write_text("{}")
        folders.append(str(folder))
    return folders


@pytest.fixture(scope="module")
def checked_torch_free(experts) -> dict:
    """Every preset through ``check_method`` in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(CONF_DIR / "method"), json.dumps(experts)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_checking_every_preset_imports_no_heavy_module(checked_torch_free):
    assert checked_torch_free["heavy"] == []
    assert sorted(checked_torch_free["presets"]) == sorted(PRESETS)


def _described(params: dict) -> dict:
    return {a: [type(p).__module__ + "." + type(p).__qualname__, dataclasses.asdict(p)] for a, p in params.items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_torch_free_check_gives_the_params_resolve_method_builds(name, checked_torch_free, experts):
    raw = _preset(name, experts)
    torch_free = checked_torch_free["presets"][name]
    if raw.get("requires_cuda") and not torch.cuda.is_available():
        # the CUDA check needs torch: check_method passes, resolve_method refuses
        with pytest.raises(ConfigError, match="needs CUDA"):
            resolve_method(raw)
        assert torch_free["params"] == json.loads(json.dumps(_described(check_method(raw).params)))
        return
    spec = resolve_method(raw)
    assert torch_free["names"] == spec.names
    assert torch_free["params"] == json.loads(json.dumps(_described(spec.params)))
    for axis, component in spec.components.items():
        assert type(spec.params[axis]) is component.Params


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_hyper_parameter_of_a_preset_reaches_its_params(name, experts):
    """Each non-common key the preset sets is the value of that field in every Params declaring it."""
    raw = _preset(name, experts)
    checked = check_method(raw)
    seen = set()
    for key, value in raw.items():
        if key in COMMON_KEYS:
            continue
        for axis, params in checked.params.items():
            if key in {f.name for f in dataclasses.fields(params)}:
                seen.add(key)
                expected = [str(Path(p)) for p in value] if key == "experts" else value
                assert getattr(params, key) == expected, (axis, key)
    assert seen == set(raw) - set(COMMON_KEYS)
