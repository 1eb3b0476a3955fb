"""A disk cache of tokenized training features (safetensors, never pickle).

``cached_features(task, examples, tokenizer, cfg)`` returns exactly what
``[task.features(e, tokenizer, cfg) for e in examples]`` returns, reading it from
``<LORABENCH_CACHE or ~/.cache/lorabench>/features/<key>.safetensors`` when present. The key is a
SHA-256 over everything that changes the features:

* the task (registry name, class, ``version`` -- bump it when the prompt or preprocessing changes),
* the examples themselves (their canonical JSON: this covers the source, split and subset exactly,
  whatever produced them),
* the tokenizer (class, name_or_path, a hash of its vocabulary and added tokens, special tokens,
  BOS/EOS handling, chat template),
* the dataset options that features read: ``max_length``, ``prompt_template``, ``name``.

Files are written to a temporary name in the same folder and renamed into place, so readers never
see a partial file and concurrent writers (several ranks) are harmless. ``LORABENCH_FEATURE_CACHE=0``
turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorabench.config import DatasetConfig

FORMAT = "1"


def cache_root() -> Path:
    return Path(os.environ.get("LORABENCH_CACHE", Path.home() / ".cache" / "lorabench")) / "features"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    added = {str(k): str(v) for k, v in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_sha256": _sha(sorted(vocab.items())),
        "added_tokens_sha256": _sha(added),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
        "chat_template_sha256": _sha(getattr(tokenizer, "chat_template", None)),
    }


def cache_key(task, examples: list[dict], tokenizer, cfg: DatasetConfig) -> str:
    parts = {
        "format": FORMAT,
        "task": getattr(task, "registry_name", getattr(task, "name", None)),
        "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
        "task_version": getattr(task, "version", None),
        "examples_sha256": _sha(examples),
        "num_examples": len(examples),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": {"name": cfg.name, "max_length": cfg.max_length, "prompt_template": cfg.prompt_template},
    }
    return _sha(parts)[:32]


def cached_features(task, examples: list[dict], tokenizer, cfg: DatasetConfig) -> list[dict]:
    """``task.features`` of every example, from the disk cache when the key matches."""
    if os.environ.get("LORABENCH_FEATURE_CACHE", "1") == "0":
        return [task.features(e, tokenizer, cfg) for e in examples]
    path = cache_root() / f"{cache_key(task, examples, tokenizer, cfg)}.safetensors"
    if path.is_file():
        try:
            return _decode(load_file(str(path)), len(examples))
        except (SafetensorError, OSError, ValueError, KeyError) as exc:  # corrupt or foreign: rebuild
            print(f"[lorabench] feature cache {path} unreadable ({exc}); rebuilding it")
    features = [task.features(e, tokenizer, cfg) for e in examples]
    _write_atomic(path, _encode(features))
    return features


# -- encoding: each key becomes one flat tensor (+ offsets for variable-length lists) -------------
def _encode(features: list[dict]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    if not features:
        return {"__empty__": torch.zeros(0)}
    for key in features[0]:
        values = [f[key] for f in features]
        if all(isinstance(v, (list, tuple)) for v in values):
            flat = [x for v in values for x in v]
            offsets = torch.tensor([0, *torch.tensor([len(v) for v in values]).cumsum(0).tolist()], dtype=torch.int64)
            is_float = any(isinstance(x, float) for x in flat)
            tensors[f"list:{key}"] = torch.tensor(flat, dtype=torch.float64 if is_float else torch.int64)
            tensors[f"offsets:{key}"] = offsets
        elif all(isinstance(v, int) for v in values):  # bool is an int
            tensors[f"int:{key}"] = torch.tensor(values, dtype=torch.int64)
        elif all(isinstance(v, (int, float)) for v in values):
            tensors[f"float:{key}"] = torch.tensor([float(v) for v in values], dtype=torch.float64)
        else:
            raise TypeError(f"feature {key!r} holds values the cache cannot store: {type(values[0]).__name__}")
    return tensors


def _decode(tensors: dict[str, torch.Tensor], n: int) -> list[dict]:
    if "__empty__" in tensors:
        return []
    out: list[dict] = [{} for _ in range(n)]
    for name, tensor in tensors.items():
        kind, key = name.split(":", 1)
        if kind == "list":
            values = tensor.tolist()
            offsets = tensors[f"offsets:{key}"].tolist()
            if len(offsets) != n + 1:
                raise ValueError("cache file does not match the number of examples")
            for i in range(n):
                out[i][key] = values[offsets[i] : offsets[i + 1]]
        elif kind in ("int", "float"):
            values = tensor.tolist()
            if len(values) != n:
                raise ValueError("cache file does not match the number of examples")
            for i, v in enumerate(values):
                out[i][key] = v
    return out


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
