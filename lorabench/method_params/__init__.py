"""The method components' hyper-parameters, declared without torch, and the check of a method config.

``lorabench train`` answers a bad ``method.*`` value (an unknown component or key, a wrong type, an
invalid value, an incompatible combination) before torch, transformers or peft load: every
component's ``Params`` dataclass lives here, one module per axis (``adapters``, ``initializers``,
``optimizers``, ``procedures``), registered by name in ``registry.PARAMS``; ``check.check_method``
does every check ``lorabench.methods.spec.resolve_method`` does before it builds the components.
The component modules import their ``Params`` from here (``Params = LoraParams``).

This package sits beside ``lorabench.methods``, not in it: importing any module of that package
runs its ``__init__``, which imports every component (and with them torch and peft).

Importing this package (or any module in it) registers every ``Params``.
"""

# ruff: noqa: F401  (imported for their registration side effects)
from lorabench.method_params import (
    adapters,
    adapters_block_lora,
    adapters_codyra,
    adapters_s2_lora,
    adapters_sara,
    adapters_sltrain,
    adapters_tlora,
    adapters_wara,
    initializers,
    optimizers,
    procedures,
    procedures_selection,
    regularizers,
    regularizers_alignguard,
    regularizers_s2_lora,
)
