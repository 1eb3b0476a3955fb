"""WaRA's hyper-parameters (adapter ``wara``, lorabench/methods/adapters/wara.py); torch-free.

Defaults: rank 8 and alpha 16 (LoRA's preset here: s = alpha / r = 2; the authors' scaling could not be
checked, see the adapter's docstring); the Haar wavelet (db1) at one level, the only level at which one
A and one B can be shared by the four subbands (Fig. 1 of arXiv:2506.24092v1 shows the single-level
LL/LH/HL/HH split); boundary mode ``zero`` (pytorch_wavelets' default), which only matters for a layer
whose width is odd or for wavelets longer than Haar.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorabench.config import check_choice, check_positive
from lorabench.errors import ConfigError
from lorabench.method_params.registry import params_for

# ptwt's boundary modes (ptwt.constants.BoundaryMode): how the analysis pads a band at the layer's edges
WAVELET_MODES = ("zero", "constant", "reflect", "periodic", "symmetric")


@params_for("adapter", "wara")
@dataclass
class WaraParams:
    rank: int = 8
    alpha: float = 16.0  # s = alpha / r
    wara_wavelet: str = "haar"  # a discrete PyWavelets name (haar = db1, db2, sym4, coif1, ...)
    wara_mode: str = "zero"

    def __post_init__(self) -> None:
        check_positive("method.rank", self.rank)
        check_positive("method.alpha", self.alpha)
        check_choice("method.wara_mode", self.wara_mode, WAVELET_MODES)
        import pywt  # numpy only (ptwt's base); imported here so that the module stays light

        if self.wara_wavelet not in pywt.wavelist(kind="discrete"):
            raise ConfigError(
                f"method.wara_wavelet={self.wara_wavelet!r} is invalid; it must be a discrete PyWavelets wavelet"
                " (haar, db2, sym4, coif1, ...: pywt.wavelist(kind='discrete'))"
            )
