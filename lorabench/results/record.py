"""The run record: one JSON file per run, written atomically for success, failure and cancel alike.

Schema (version 1), snake_case keys:
  schema_version, run_id, status (running | completed | failed | canceled), error {type, message},
  started_at, finished_at, config (fully resolved), config_hash, command,
  method {label, family, paper, adapter, init, optimizer, procedure, backed_by, params},
  model {name, source}, dataset {name, version, source, train_split, eval_split, train_size,
  eval_size, protocol}, metrics {primary, higher_is_better, report, final, best {step, ...}},
  history [{step, metrics}], train_log [{step, loss, lr}], samples [...],
  cost {wall_time_s, init_time_s, train_time_s, eval_time_s, tokens_per_s, train_tokens,
  peak_memory {cpu_peak_rss_bytes, cuda_allocated_bytes, cuda_reserved_bytes}, trainable_params,
  total_params, optimizer_state_bytes, adapter_file_bytes}, method_report {...},
  hardware {device, num_processes, mixed_precision, micro_batch_size, gradient_accumulation,
  global_batch_size, torch_threads, cpu_bf16}, provenance {versions, git_commit, git_dirty, python, platform}.
Added within version 1 (readers treat them as optional; records without them stay valid):
  owner {pid, host, boot_id, pid_started, started_at, heartbeat_at} (the process that writes the
  record; heartbeat_at is refreshed at every write and every ~30 s), progress {step, max_steps},
  segments [{owner {pid, host}, started_at, finished_at, status, step, wall_time_s, init_time_s,
  train_time_s, eval_time_s, error}] (one per start of the run id; a segment that died without
  writing its end is closed as ``stale`` with ``wall_time_estimated``), resumed_from [{step,
  checkpoint, verified, at, skipped [{checkpoint, problem}]}] (one per resume, carried over),
  inputs {"dataset.data_dir" | "dataset.eval_data_dir" | "model.name_or_path": {path, sha256,
  files}} (local folders by content; lorabench/fingerprint.py), hardware.strategy (``ddp`` or
  ``fsdp``; optimizer_state_bytes is then this process's shard). Paths in ``config``, ``inputs``
  and the sources are portable: relative to the working directory where they lie under it (or its
  parent), ``<site-packages>/...`` for offline weight packages, else as given.
  With several segments cost.wall_time_s, init_time_s and eval_time_s are sums over the segments;
  cost.train_time_s is the training time of the steps the final model holds (restored from the
  checkpoint plus this segment). ``running`` with no live owner is reported as ``stale`` by
  :func:`lorabench.results.runs.run_state`; no record is ever written with that status.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
STATUSES = ("running", "completed", "failed", "canceled")
RECORD_NAME = "record.json"
# Config keys that do not change what a run computes, so they are left out of the run id.
NON_SCIENCE_KEYS = ("results_dir", "force", "progress", "tracker", "checkpoint", "resume", "analysis")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(config: dict, *, revisions: dict[str, int] | None = None, by_content: bool = True) -> str:
    """sha256 of the science-relevant config; for a run config (one with ``method``) also of the
    revisions of its components that were revised (lorabench/methods/fidelity.py). Local data and
    model folders count by their content, not their path (lorabench/fingerprint.py), so the same
    run on another machine, or with the data elsewhere, has the same id.

    ``revisions`` (axis -> revision, only those above 1) replaces the current code's, and
    ``by_content=False`` hashes location paths as strings: both only to recompute the ids of records
    made by earlier code (scripts/portable_records.py)."""
    from lorabench.fingerprint import science_locations

    science = {k: v for k, v in config.items() if k not in NON_SCIENCE_KEYS}
    science = _science_protocol(science, by_content)
    science = _without_defaults_added_later(science)
    if by_content:
        science = science_locations(science)
    if revisions is None and isinstance(config.get("method"), dict):
        from lorabench.methods.fidelity import component_revisions

        revisions = component_revisions(config["method"])
    if revisions:
        science["component_revisions"] = revisions
    blob = json.dumps(science, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# (section, key, default) of settings added after records existed: at their default they are left
# out of the hash, so records made before them keep their run ids (lorabench/results/record.py)
ADDED_LATER = (
    ("hardware", "labelled_logits", False),
    ("hardware", "loss_chunk", None),
    ("hardware", "release_memory", False),
    ("hardware", "strategy", "ddp"),
    ("hardware", "frozen_dtype", "float32"),
)


def _without_defaults_added_later(science: dict) -> dict:
    out = dict(science)
    for section, key, default in ADDED_LATER:
        part = out.get(section)
        if isinstance(part, dict) and key in part and part[key] == default:
            out[section] = {k: v for k, v in part.items() if k != key}
    return out


def protocol_view(config: dict) -> dict:
    """``config`` as records and run ids keep it: no ``protocol`` for ``single`` (so a single run's
    record and id are what they were before protocols existed), else the protocol's name and its
    own settings only (a federated run does not carry, or move with, the continual defaults)."""
    out = dict(config)
    protocol = out.pop("protocol", None) or {"name": "single"}
    name = protocol.get("name", "single")
    if name != "single":
        out["protocol"] = {"name": name, name: dict(protocol.get(name) or {})}
    return out


def _science_protocol(science: dict, by_content: bool) -> dict:
    """:func:`protocol_view`, with local task folders (continual ``data_dirs``) by content."""
    science = protocol_view(science)
    protocol = science.get("protocol")
    if not protocol:
        return science
    name = protocol["name"]
    settings = dict(protocol[name])
    if by_content and settings.get("data_dirs"):
        from lorabench.fingerprint import location_identity

        settings["data_dirs"] = {t: location_identity("dataset", d) for t, d in settings["data_dirs"].items()}
    return {**science, "protocol": {"name": name, name: settings}}


def run_id(config: dict) -> str:
    """Deterministic and readable: method-dataset-model-seed-hash."""
    label = str(config["method"].get("label", "method"))
    protocol = (config.get("protocol") or {}).get("name", "single")
    data = config["dataset"]["name"]
    if protocol in ("continual", "compose"):  # the protocols over a list of tasks
        data = "+".join(config["protocol"][protocol]["tasks"])
    if protocol != "single":
        label = f"{label}-{protocol}"
    return f"{label}-{data}-{config['model']['name']}-s{config['seed']}-{config_hash(config)[:10]}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Temp file in the same folder, fsync, rename: readers never see a partial file."""
    write_text_atomic(path, json_text(data))


def json_text(data: Any) -> str:
    """The text a record file holds (what :func:`write_json_atomic` writes)."""
    return json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_record(path: Path) -> dict:
    with Path(path).open(encoding="utf-8") as fh:
        return json.load(fh)


def iter_records(root: Path) -> Iterator[tuple[Path, dict | None, str | None]]:
    """Every ``record.json`` under ``root`` as (path, record or None, problem or None). Never raises
    for one bad file: unreadable (I/O error, not UTF-8, not JSON) or ill-typed records come back as
    (path, None, problem), so that readers (``lorabench table``) skip and report them."""
    for path in sorted(Path(root).rglob(RECORD_NAME)):
        try:
            record = read_record(path)
        except UnicodeDecodeError as exc:
            yield path, None, f"unreadable record (not UTF-8: byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
            continue
        except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            yield path, None, f"unreadable record ({type(exc).__name__}: {exc})"
            continue
        problem = validate_record(record)
        yield path, (record if problem is None else None), problem


REQUIRED_KEYS = (
    "schema_version",
    "run_id",
    "status",
    "config",
    "config_hash",
    "method",
    "model",
    "dataset",
    "metrics",
    "cost",
    "hardware",
    "provenance",
)


def validate_record(record: Any) -> str | None:
    """None if the record is usable, else what is wrong with it: a missing key, an unknown schema or
    status, or a value of the wrong type where readers expect one (a string where a metric number
    should be, a list where an object should be), named by its dotted path."""
    if not isinstance(record, dict):
        return "record is not a JSON object"
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return f"record lacks {missing}"
    if record["schema_version"] != SCHEMA_VERSION:
        return f"schema_version {record['schema_version']!r} is not {SCHEMA_VERSION}"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not one of {STATUSES}"

    def is_number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def wrong(where: str, value: Any, expected: str) -> str:
        return f"{where} is {json.dumps(value, default=str)[:40]} ({type(value).__name__}); expected {expected}"

    # (dotted path, type check, what it should be, required) for what tables, plots and reports read
    shapes = (
        ("run_id", lambda v: isinstance(v, str), "a string", True),
        ("config", lambda v: isinstance(v, dict), "an object", True),
        ("method", lambda v: isinstance(v, dict), "an object", True),
        ("method.label", lambda v: isinstance(v, str), "a string", True),
        ("model", lambda v: isinstance(v, dict), "an object", True),
        ("model.name", lambda v: isinstance(v, str), "a string", True),
        ("dataset", lambda v: isinstance(v, dict), "an object", True),
        ("dataset.name", lambda v: isinstance(v, str), "a string", True),
        ("dataset.version", lambda v: isinstance(v, (str, int)), "a string", False),
        ("dataset.source", lambda v: v is None or isinstance(v, dict), "an object or null", False),
        ("metrics", lambda v: isinstance(v, dict), "an object", True),
        ("metrics.primary", lambda v: isinstance(v, str), "a string", record["status"] == "completed"),
        ("metrics.final", lambda v: v is None or isinstance(v, dict), "an object or null", False),
        ("metrics.best", lambda v: v is None or isinstance(v, dict), "an object or null", False),
        ("cost", lambda v: isinstance(v, dict), "an object", True),
        ("cost.peak_memory", lambda v: v is None or isinstance(v, dict), "an object or null", False),
        ("history", lambda v: isinstance(v, list), "a list", False),
        ("analysis", lambda v: v is None or isinstance(v, dict), "an object or null", False),
    )
    for dotted, ok, expected, required in shapes:
        node: Any = record
        for part in dotted.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:
            if required:
                return f"record lacks {dotted}"
            continue
        if not ok(node):
            return wrong(dotted, node, expected)
    # metric values (and ``step``), costs and peak-memory fields: numbers or null
    for dotted in ("metrics.final", "metrics.best", "cost", "cost.peak_memory"):
        node = record
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for key, value in (node or {}).items():
            if not (value is None or is_number(value) or (dotted, key) == ("cost", "peak_memory")):
                return wrong(f"{dotted}.{key}", value, "a number or null")
    if isinstance(record.get("analysis"), dict) and not (
        record["analysis"].get("intruders_total") is None or is_number(record["analysis"]["intruders_total"])
    ):
        return wrong("analysis.intruders_total", record["analysis"]["intruders_total"], "a number or null")
    return None
