"""Compressing a model's base weights, and compensating the compression error with a low-rank adapter.

``protocol=compressed`` (lorabench.protocols.compressed) runs them: a compressor of
:data:`COMPRESSORS` (lorabench.compression.compressors: HQQ quantization, magnitude or 2:4 pruning)
replaces the base weights in place, then a compensation of :data:`COMPENSATIONS`
(lorabench.compression.compensation: none, SVD, EoRA) starts the run's LoRA factors from the
compression error, and training (if any) fine-tunes them.
"""

from __future__ import annotations

from lorabench.registry import Registry

COMPRESSORS: Registry = Registry("compressor")
COMPENSATIONS: Registry = Registry("compensation")

from lorabench.compression import compensation, compressors  # noqa: E402,F401  (registers the entries)
