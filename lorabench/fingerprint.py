"""Portable records: content fingerprints of local inputs, and paths written without the machine.

A config names a local dataset folder (``dataset.data_dir``, ``dataset.eval_data_dir``) or a local
model folder (``model.name_or_path``) by a path, which differs between machines for the same bytes.
So that a run id and a record mean the same everywhere:

* the run id hashes what such a folder *holds*, not where it is: :func:`folder_fingerprint` is the
  sha256 over the sorted ``(relative name, sha256 of the file)`` pairs of every regular file under
  the folder (hidden names, starting with ``.``, are left out); a path that does not exist keeps
  its string (``missing:<path>``), so a typo still changes the id rather than colliding;
* the record (every string in it: config, command, sources, tracebacks) and the run's ``.hydra/``
  files keep a relative path as given, and write absolute ones relative to the working directory
  when they lie under it (or under its parent: ``../shared/data``), ``<site-packages>/...`` under a
  Python install (offline weight packages), ``<lorabench-cache>/...`` in lorabench's cache; any other
  absolute path is kept as given (:func:`portable_strings`);
* the record's ``inputs`` lists each local input with its portable path, sha256 and file count.

File hashes are cached per process by (path, size, mtime), and files of 64 MiB or more (model
weights) also across processes in ``~/.cache/lorabench/sha256.json``, so a 7B checkpoint is read
once rather than at every run id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import site
import sysconfig
import tempfile
from pathlib import Path

# (config section, key) of every config value that is a location of local files
LOCATION_KEYS = (("dataset", "data_dir"), ("dataset", "eval_data_dir"), ("model", "name_or_path"))
PERSISTENT_MIN_BYTES = 64 * 2**20
SITE_PACKAGES = "<site-packages>"
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def cache_file() -> Path:
    """``<LORABENCH_CACHE or ~/.cache/lorabench>/sha256.json`` (the cache root of lorabench.models)."""
    return Path(os.environ.get("LORABENCH_CACHE", Path.home() / ".cache" / "lorabench")) / "sha256.json"


def _persistent_cache() -> dict:
    try:
        return json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _remember(key: str, digest: str) -> None:
    cache = _persistent_cache()
    cache[key] = digest
    try:
        path = cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _FILE_HASHES:
        return _FILE_HASHES[key]
    persistent_key = "|".join(map(str, key))
    big = stat.st_size >= PERSISTENT_MIN_BYTES
    digest = _persistent_cache().get(persistent_key) if big else None
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
        digest = h.hexdigest()
        if big:
            _remember(persistent_key, digest)
    _FILE_HASHES[key] = digest
    return digest


def folder_files(folder: Path) -> list[Path]:
    """Regular, non-hidden files under ``folder`` (a file path: itself), sorted by relative name."""
    if folder.is_file():
        return [folder]
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def folder_fingerprint(path: str | Path) -> dict:
    """``{"sha256": ..., "files": n}`` of a local folder (or file); see the module docstring."""
    root = Path(path).expanduser()
    files = folder_files(root)
    h = hashlib.sha256()
    for file in files:
        rel = file.name if root.is_file() else file.relative_to(root).as_posix()
        h.update(f"{rel}\0{file_sha256(file)}\n".encode())
    return {"sha256": h.hexdigest(), "files": len(files)}


def _is_local(section: str, value) -> bool:
    if not isinstance(value, str) or not value:
        return False
    return section == "dataset" or Path(value).expanduser().exists()  # a model hub id is not a path


def location_identity(section: str, value) -> str | None:
    """What the run id hashes for one location value: its content fingerprint (``sha256:...``) for
    an existing local path, ``missing:<path>`` for a dataset path that does not exist, the value
    itself for anything else (a hub id, None)."""
    if not _is_local(section, value):
        return value
    if not Path(value).expanduser().exists():
        return f"missing:{value}"
    return "sha256:" + folder_fingerprint(value)["sha256"]


def science_locations(config: dict) -> dict:
    """``config`` with every location value replaced by :func:`location_identity` (a copy)."""
    out = dict(config)
    for section, key in LOCATION_KEYS:
        part = out.get(section)
        if isinstance(part, dict) and part.get(key) is not None:
            out[section] = {**part, key: location_identity(section, part[key])}
    return out


def _site_dirs() -> list[Path]:
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    return [Path(d).resolve() for d in dirs if d]


def machine_prefixes(cwd: Path | None = None, everywhere: bool = False) -> list[tuple[str, str]]:
    """(absolute folder, what a record writes instead), most specific first: Python's site-packages
    -> ``<site-packages>/``, lorabench's cache -> ``<lorabench-cache>/``, the working directory ->
    relative, its parent -> ``../``; with ``everywhere`` (records about to be committed) also the
    home folder -> ``~/`` and the temporary folder -> ``<tmp>/``. Any other path stays as given."""
    here = (cwd or Path.cwd()).resolve()
    cache = Path(os.environ.get("LORABENCH_CACHE", Path.home() / ".cache" / "lorabench")).expanduser().resolve()
    pairs = [(d, f"{SITE_PACKAGES}/") for d in _site_dirs()]
    pairs += [(cache, "<lorabench-cache>/"), (here, ""), (here.parent, "../")]
    if everywhere:
        pairs += [(Path.home().resolve(), "~/"), (Path(tempfile.gettempdir()).resolve(), "<tmp>/")]
    unique = {str(folder): repl for folder, repl in reversed(pairs) if str(folder) != "/"}
    return sorted(unique.items(), key=lambda item: -len(item[0]))


def portable_path(value: str | None, cwd: Path | None = None) -> str | None:
    """A path as a record keeps it (see :func:`machine_prefixes`); a relative path, None and hub ids
    pass unchanged, and so does an absolute path under none of those folders."""
    if not value or not os.path.isabs(os.path.expanduser(value)):
        return value
    path = Path(value).expanduser().resolve()
    for folder, repl in machine_prefixes(cwd):
        if path.is_relative_to(folder):
            rest = path.relative_to(folder).as_posix()
            return (repl + rest if rest != "." else repl.rstrip("/")) or "."
    return value


@functools.lru_cache(maxsize=8)
def _compiled_prefixes(cwd: str, everywhere: bool, cache_env: str | None) -> tuple:
    del cache_env  # part of the key only: the cache folder comes from LORABENCH_CACHE
    return tuple(
        # the folder itself, or a path under it, not preceded by a path character
        (re.compile(rf"(?<![\w./-]){re.escape(folder)}(?:(/)|(?![\w.-]))"), repl)
        for folder, repl in machine_prefixes(Path(cwd), everywhere)
    )


def portable_text(text: str, cwd: Path | None = None, everywhere: bool = False) -> str:
    """Every absolute path in ``text`` (a command, a traceback, a note) under one of the machine's
    folders rewritten as :func:`portable_path` would."""
    patterns = _compiled_prefixes(str(cwd or Path.cwd()), everywhere, os.environ.get("LORABENCH_CACHE"))
    for pattern, repl in patterns:
        if "/" in text:
            text = pattern.sub(lambda m, repl=repl: repl if m.group(1) else (repl.rstrip("/") or "."), text)
    return text


def portable_strings(value, cwd: Path | None = None, everywhere: bool = False):
    """A record (any JSON value) with :func:`portable_text` applied to every string in it."""
    if isinstance(value, str):
        return portable_text(value, cwd, everywhere) if "/" in value else value
    if isinstance(value, list):
        return [portable_strings(v, cwd, everywhere) for v in value]
    if isinstance(value, dict):
        return {k: portable_strings(v, cwd, everywhere) for k, v in value.items()}
    return value


def local_inputs(config: dict, cwd: Path | None = None) -> dict:
    """The record's ``inputs``: ``{"dataset.data_dir": {"path", "sha256", "files"}, ...}`` for every
    location value that is an existing local path."""
    inputs = {}
    for section, key in LOCATION_KEYS:
        value = (config.get(section) or {}).get(key)
        if _is_local(section, value) and Path(value).expanduser().exists():
            inputs[f"{section}.{key}"] = {"path": portable_path(value, cwd), **folder_fingerprint(value)}
    return inputs
