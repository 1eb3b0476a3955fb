"""bf16 autocast on a CPU without bf16 instructions is emulated (~100x slower): the run says so in
one line before training and records whether the CPU has them (record.hardware.cpu_bf16)."""

from __future__ import annotations

from types import SimpleNamespace

from lorabench import train

INTEL = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n"
EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_bf16_instructions_read_from_cpuinfo():
    assert train.cpu_bf16_instructions(INTEL) is True
    assert train.cpu_bf16_instructions(GRAVITON) is True
    assert train.cpu_bf16_instructions(EPYC) is False
    assert train.cpu_bf16_instructions("no flags here") is None


def _cfg(precision: str):
    return SimpleNamespace(hardware=SimpleNamespace(mixed_precision=precision))


def test_emulated_bf16_is_announced_only_where_it_applies(monkeypatch, capsys):
    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"), is_main_process=True)
    cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"), is_main_process=True)
    monkeypatch.setattr(train, "cpu_bf16_instructions", lambda: False)
    train.warn_emulated_bf16(_cfg("bf16"), cpu)
    assert "bf16 on a CPU without bf16 instructions" in capsys.readouterr().out
    for cfg, acc in ((_cfg("no"), cpu), (_cfg("bf16"), cuda)):
        train.warn_emulated_bf16(cfg, acc)
        assert capsys.readouterr().out == ""
    monkeypatch.setattr(train, "cpu_bf16_instructions", lambda: True)
    train.warn_emulated_bf16(_cfg("bf16"), cpu)
    assert capsys.readouterr().out == ""


def test_runs_at_different_precisions_share_one_process():
    """Accelerate refuses a second Accelerator at another precision in one process; each run's
    accelerator (lorabench.distributed.new_accelerator) clears that state, so a sweep, a protocol or a notebook can run
    fp32 after bf16 and back. The process-wide PartialState (device, process group) is kept."""
    from accelerate import Accelerator
    from accelerate.state import PartialState

    from lorabench.distributed import new_accelerator

    Accelerator(cpu=True, mixed_precision="no")
    partial = PartialState._shared_state.copy()
    for precision in ("bf16", "no", "bf16"):
        assert new_accelerator(True, precision).mixed_precision == precision
    assert PartialState._shared_state.keys() == partial.keys()
    new_accelerator(True, "no")  # leave the default behind for the tests that follow
