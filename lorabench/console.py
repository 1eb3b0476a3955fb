"""What a run prints: the libraries' noise silenced, progress bars for the long loops.

``quiet_libraries()`` (called once by the CLI, before torch, transformers or peft load) silences
messages that say nothing about the run: bitsandbytes' note that an optional CPU kernel package is
absent, transformers' per-tensor loading bar and its "LOAD REPORT" (the loop prints its own line
naming the tensors a checkpoint lacked, e.g. a new task head), and deprecation warnings raised
inside the libraries. ``progress(iterable, ...)`` wraps evaluation, generation and calibration
loops in a tqdm bar on the main process when ``progress=true``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_SETTINGS = {"progress": True}

# (logger, level): loggers whose messages below ``level`` say nothing about the run
QUIET_LOGGERS = (
    ("bitsandbytes.backends.cpu.ops", logging.ERROR),  # "Failed to load CPU gemm_4bit_forward from kernels-community"
    ("transformers.modeling_utils", logging.ERROR),  # the LOAD REPORT (missing keys: printed by lorabench.models)
    ("transformers.utils.loading_report", logging.ERROR),
    # with modeling_utils at ERROR, transformers checks the tensor-parallel plan and lists every layer
    ("transformers.distributed.tensor_parallel", logging.ERROR),
)
# (category, message regex, module regex) of warnings raised inside libraries, not by the user's config
QUIET_WARNINGS = (
    (FutureWarning, r".*is_gradient_checkpointing.*", ""),
    (DeprecationWarning, r".*torch\.jit\.script_method.*", ""),
)


def quiet_libraries() -> None:
    for name, level in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-file download and loading bars


def set_progress(enabled: bool) -> None:
    """``progress=false`` (sweeps, CI logs) turns every bar of this module off."""
    _SETTINGS["progress"] = bool(enabled)


def _main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "batch") -> Iterator[T]:
    """``items`` with a progress bar (stderr) on the main process when progress is on."""
    from tqdm.auto import tqdm

    enabled = _SETTINGS["progress"] and _main_process()
    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=not enabled, leave=False)
