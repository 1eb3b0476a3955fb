"""Rewrite committed run records into the portable form (lorabench/fingerprint.py), once.

Records made before run ids hashed local folders by content carry the absolute paths of the machine
that made them (data folder, results folder, the virtualenv's site-packages), and their run ids hash
the data folder's path. For every ``record.json`` under the given roots this script

1. recovers the config (and component revisions) the run id was computed from, each candidate
   checked against the stored ``config_hash`` with paths hashed as strings: the stored config; the
   config composed from the overrides in the record's ``command``; for a size-budget run (which
   stores the solved size in its config) the stored config with the size knob put back to today's
   preset value or a power of two. A record matching none is reported and left as it is;
2. computes the new run id from that config with the current code (local folders by content),
3. rewrites every string of the record, and of its ``.hydra/`` files, with the machine prefixes
   made portable (``<site-packages>/...``, paths relative to the project root or its parent),
   sets ``run_id``, ``config_hash`` and ``inputs``, and renames the folder to the new run id.

The old -> new ids go to ``--map`` (JSON). Run from the project root, on the machine whose paths the
records hold (so the data folders named in them exist and can be fingerprinted)::

    python scripts/portable_records.py results --machine-root /abs/path/of/this/checkout --map results/portable_ids.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorabench.fingerprint import SITE_PACKAGES, local_inputs, portable_text  # noqa: E402
from lorabench.results.record import RECORD_NAME, config_hash, json_text, read_record  # noqa: E402

PRESET_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # sizes a preset may have had
SITE_PACKAGES_RE = re.compile(r"(?:/[^\s\"'=]*)?/site-packages/")


def revision_candidates(method: dict) -> list[dict[str, int]]:
    """Every revision set the method's components may have had when the record was made (1 up to
    today's revision per component; only revisions above 1 enter the hash), today's first."""
    import lorabench.methods  # noqa: F401  registers components
    from lorabench.methods.fidelity import component_revisions, fidelity_of
    from lorabench.methods.spec import AXES

    ranges = []
    for axis, registry in AXES.items():
        name = str(method.get(axis) or "none")
        if name != "none" and name in registry:
            ranges.append((axis, range(fidelity_of(registry.get(name)).revision, 0, -1)))
    sets = [{}]
    for axis, revs in ranges:
        sets = [{**s, **({axis: r} if r > 1 else {})} for s in sets for r in revs]
    current = component_revisions(method)
    return [current, *[s for s in sets if s != current]]


def command_overrides(command: str) -> list[str]:
    """The ``key=value`` overrides of a record's command line (program and flags dropped)."""
    return [tok for tok in shlex.split(command) if "=" in tok and not tok.startswith("-")]


def id_time_config(record: dict) -> tuple[dict, dict] | None:
    """(config, component revisions) the stored ``config_hash`` was computed from, or None."""
    stored = record.get("config_hash")

    def candidates():
        yield record.get("config") or {}
        from lorabench.config_store import compose

        try:
            composed = compose(command_overrides(record.get("command", "")))
        except Exception:  # overrides today's configs refuse
            composed = None
        if composed is not None:
            yield composed
        knob = ((record.get("method_report") or {}).get("budget") or {}).get("knob")
        if knob:  # a budget run stored its solved size: try the preset's size of then
            names = knob.split("=")
            today = ((composed or {}).get("method") or {}).get(names[0])
            for value in [today, *PRESET_SIZES]:
                config = json.loads(json.dumps(record["config"]))
                config["method"].update({name: value for name in names})
                yield config

    for config in candidates():
        for revisions in revision_candidates(config.get("method") or {}):
            if config_hash(config, revisions=revisions, by_content=False) == stored:
                return config, revisions
    return None


def new_run_id(config: dict, revisions: dict) -> tuple[str, str]:
    digest = config_hash(config, revisions=revisions)
    label = str(config["method"].get("label", "method"))
    return f"{label}-{config['dataset']['name']}-{config['model']['name']}-s{config['seed']}-{digest[:10]}", digest


ALIASES: dict[str, str] = {}  # --alias OLD=NEW: other clones of the project (e.g. a frozen copy that ran)


def make_portable_text(text: str, machine_root: Path) -> str:
    """The ``--alias`` copies of the project -> relative; then every folder of
    :func:`lorabench.fingerprint.machine_prefixes` (site-packages, lorabench's cache, the project root
    and its parent, the home and temporary folders), as seen from the project root."""
    text = SITE_PACKAGES_RE.sub(SITE_PACKAGES + "/", text)  # any virtualenv's, not only this one's
    for old, new in ALIASES.items():
        text = text.replace(old, new)
    return portable_text(text, cwd=machine_root, everywhere=True)


def _walk(value, fix):
    if isinstance(value, str):
        return fix(value)
    if isinstance(value, list):
        return [_walk(v, fix) for v in value]
    if isinstance(value, dict):
        return {k: _walk(v, fix) for k, v in value.items()}
    return value


def rewrite_text_only(record_path: Path, machine_root: Path) -> None:
    """Make the strings of an already migrated record (and its .hydra files) portable; ids unchanged."""
    folder = record_path.parent
    for path in [record_path, *(folder / ".hydra").glob("*.yaml")]:
        if path.suffix == ".json":
            path.write_text(json_text(_walk(read_record(path), lambda t: make_portable_text(t, machine_root))))
        else:
            path.write_text(make_portable_text(path.read_text(encoding="utf-8"), machine_root), encoding="utf-8")


def migrate(record_path: Path, machine_root: Path) -> tuple[str, str] | str:
    """(old id, new id) after rewriting, or a problem (the record is left as it was)."""
    record = read_record(record_path)
    old_id = record.get("run_id")
    if record_path.parent.name != old_id:
        return f"{record_path}: folder name is not the run id {old_id!r}"
    found = id_time_config(record)
    if found is None:
        return f"{record_path}: no config reproduces the stored config_hash"
    config, revisions = found
    new_id, digest = new_run_id(config, revisions)

    def fix(text: str) -> str:
        return make_portable_text(text, machine_root).replace(old_id, new_id)

    portable = _walk(record, fix)
    portable["run_id"], portable["config_hash"] = new_id, digest
    portable["inputs"] = _walk(local_inputs(config, cwd=machine_root), fix)
    folder = record_path.parent
    extras = [*(folder / ".hydra").glob("*.yaml"), *(folder / "peft_adapter").glob("*.[jm][sd]*")]
    for extra in extras:
        extra.write_text(fix(extra.read_text(encoding="utf-8")), encoding="utf-8")
    record_path.write_text(json_text(portable), encoding="utf-8")
    if new_id != old_id:
        target = folder.with_name(new_id)
        if target.exists():
            return f"{record_path}: the new run id {new_id} is taken by another folder (rewritten, not renamed)"
        os.replace(folder, target)
    return old_id, new_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--machine-root", type=Path, required=True, help="absolute project root in the records")
    parser.add_argument("--map", type=Path, help="write {old id: new id} here (JSON)")
    parser.add_argument("--alias", action="append", default=[], help="OLD=NEW prefix, e.g. a frozen clone's path=''")
    parser.add_argument("--text-only", action="store_true", help="records already migrated: paths only, ids kept")
    args = parser.parse_args()
    ALIASES.update(dict(a.split("=", 1) for a in args.alias))
    mapping, problems, rewritten = {}, [], 0
    for root in args.roots:
        for path in sorted(root.rglob(RECORD_NAME)):
            if any(part.startswith(".") for part in path.relative_to(root).parts[:-1]):
                continue  # staging folders
            if args.text_only:
                rewrite_text_only(path, args.machine_root.resolve())
                rewritten += 1
                continue
            result = migrate(path, args.machine_root.resolve())
            if isinstance(result, str):
                problems.append(result)
            else:
                mapping[result[0]] = result[1]
                rewritten += 1
    if args.map:
        previous = json.loads(args.map.read_text()) if args.map.exists() else {}
        args.map.write_text(json.dumps({**previous, **mapping}, indent=1, sort_keys=True) + "\n")
    print(f"rewrote {rewritten} records ({len(mapping)} distinct run ids); {len(problems)} problems")
    for problem in problems:
        print("  " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
