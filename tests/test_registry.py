from __future__ import annotations

import pytest

import lorabench.data  # noqa: F401
import lorabench.methods  # noqa: F401
from lorabench.errors import ConfigError
from lorabench.registry import ADAPTERS, DATASETS, OPTIMIZERS, Registry


def test_register_and_get():
    reg = Registry("widget")

    @reg.register("blue_one")
    class Blue:
        pass

    assert reg.get("blue_one") is Blue
    assert "blue_one" in reg and reg.names() == ["blue_one"]


def test_duplicate_and_malformed_names_are_refused():
    reg = Registry("widget")
    reg.register("a")(object())
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(object())
    for bad in ("Bad", "has-dash", "1x", ""):
        with pytest.raises(ValueError, match="snake_case"):
            reg.register(bad)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown optimizer 'nadam'; valid choices: .*adamw"):
        OPTIMIZERS.get("nadam")


def test_core_components_registered():
    assert {"lora"} <= set(ADAPTERS.names())
    assert {"adamw", "galore_torch"} <= set(OPTIMIZERS.names())
    assert {"sst2", "gsm8k", "gsm_symbolic"} <= set(DATASETS.names())


def test_methods_command_lists_every_preset(capsys):
    from lorabench.cli import main
    from lorabench.launch import CONF_DIR

    with pytest.raises(SystemExit) as exc:
        main(["methods"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["preset", "family", "backed"]
    listed = {line.split()[0] for line in lines[1:]}
    assert listed == {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    galore = next(line for line in lines if line.startswith("galore "))
    assert "lorabench" in galore and "rank (optimizer state)" in galore and "arXiv:2403.03507" in galore
    assert "peft" in next(line for line in lines if line.startswith("lora "))
