"""Checks of ``protocol=compressed`` that span config groups, torch-free: lorabench.protocols.checks
calls :func:`check_compressed` from validation, before anything heavy loads."""

from __future__ import annotations

import importlib.util

from lorabench.errors import ConfigError


def check_compressed(cfg, method) -> None:
    """The method is peft's LoRA (its layers are what peft wraps around an HQQ or pruned layer and
    what the compensation writes) without DoRA, with peft's own initialisation (an init that reads
    or rewrites the base weights, such as PiSSA's SVD or LoftQ's quantization, would act on the
    compressed ones); the HQQ package is installed when the compressor needs it."""
    settings = cfg.protocol.compressed
    from lorabench.protocols.checks import not_plain_lora

    if settings.compressor == "welore":
        check_welore(cfg, method)
        return
    kind = not_plain_lora(method)
    if kind:
        raise ConfigError(
            f"protocol=compressed trains a peft LoRA on the compressed layers; method {method.label!r} has "
            f"{kind}; use a LoRA method (e.g. method=lora, rslora), or compressor=welore with method=full"
        )
    init = method.names.get("init", "none")
    if init != "none":
        raise ConfigError(
            f"protocol=compressed starts the LoRA from protocol.compressed.compensation; method "
            f"{method.label!r} has init {init!r}, which reads or rewrites the base weights; use a method "
            f"without an init (e.g. method=lora) and choose the compensation "
            f"({', '.join(settings.COMPENSATIONS)})"
        )
    if settings.recover and settings.compensation != "none":
        raise ConfigError(
            f"protocol.compressed.recover=true scores the LoRA on the original weights, where "
            f"compensation={settings.compensation!r} (a fit of the compression error) would count that error "
            "twice; use compensation=none (LoRAM trains a plainly initialised LoRA)"
        )
    if settings.compressor == "hqq" and importlib.util.find_spec("hqq") is None:
        raise ConfigError(
            "protocol.compressed.compressor=hqq needs the hqq package (pip install hqq); "
            "or use compressor=magnitude or semi_structured"
        )


def check_welore(cfg, method) -> None:
    """WeLore trains its low-rank components themselves: an adapter-free method (its optimizer
    gets the factors and a classification head only), nothing to compensate, no bit budget."""
    settings = cfg.protocol.compressed
    if method.names["adapter"] != "none":
        raise ConfigError(
            f"protocol.compressed.compressor=welore fine-tunes the low-rank factors it makes; method "
            f"{method.label!r} adds adapter {method.names['adapter']!r}; use an adapter-free method (method=full)"
        )
    if method.names.get("procedure", "none") != "none":
        raise ConfigError(
            f"protocol.compressed.compressor=welore chooses what trains; method {method.label!r} has procedure "
            f"{method.names['procedure']!r}; use method=full"
        )
    if settings.recover:
        raise ConfigError(
            "protocol.compressed.recover=true puts a LoRA back on the original weights; compressor=welore "
            "trains the low-rank weights themselves and has no LoRA; use recover=false"
        )
    if settings.compensation != "none":
        raise ConfigError(
            f"protocol.compressed.compensation={settings.compensation!r} needs a LoRA to hold it; "
            "compressor=welore has none (use compensation=none)"
        )
