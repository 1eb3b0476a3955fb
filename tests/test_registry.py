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
