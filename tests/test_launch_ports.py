"""lorabench.launch._free_port: the OS's choice, or with LORABENCH_PORT_RANGE a free port of that
range, the next after the last one given (parallel test workers get disjoint ranges in conftest)."""

from __future__ import annotations

import socket

import pytest

from lorabench import launch
from lorabench.errors import ConfigError


def test_a_port_range_gives_free_ports_of_the_range_in_turn(monkeypatch):
    monkeypatch.setattr(launch, "_last_port", [])
    monkeypatch.setenv(launch.PORT_RANGE_ENV, "29100-29103")
    first = launch._free_port()
    assert first == 29100
    with socket.socket() as held:  # a port some process holds is passed over
        held.bind(("127.0.0.1", 29101))
        assert launch._free_port() == 29102
    assert [launch._free_port(), launch._free_port()] == [29103, 29100]  # wraps around


def test_a_bad_or_full_port_range_is_named(monkeypatch):
    monkeypatch.setattr(launch, "_last_port", [])
    monkeypatch.setenv(launch.PORT_RANGE_ENV, "29100")
    with pytest.raises(ConfigError, match=r"LORABENCH_PORT_RANGE='29100' is invalid; use low-high"):
        launch._free_port()
    monkeypatch.setenv(launch.PORT_RANGE_ENV, "29110-29110")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 29110))
        with pytest.raises(ConfigError, match="no free port in the range"):
            launch._free_port()


def test_without_a_range_the_system_chooses(monkeypatch):
    monkeypatch.delenv(launch.PORT_RANGE_ENV, raising=False)
    port = launch._free_port()
    assert 0 < port < 65536
