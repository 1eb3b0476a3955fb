"""``lorabench export RUN [--merge] [--out DIR]``: a completed run as a folder that plain Hugging Face
code loads, verified on the spot.

The run's model is rebuilt from its record as the training loop built it (:func:`rebuild`: the same
seed, data, model source, targets, calibration batches, budget and ``apply_method``), and the trained
tensors of ``adapter.safetensors`` are loaded into it (``layer.load_trainable``, as a resume does).
What is written then depends on the method and on ``--merge``:

* ``--merge`` (adapter methods): every adapter is folded into its base weight (``AdapterLayer.merge``
  for lorabench's own adapters, peft's ``merge_and_unload`` for peft-backed ones), each adapter layer
  is replaced by the module it wrapped (the ``nn.Linear``, or the GPT-2 ``Conv1D`` whose weight the
  merge wrote through), and the result, a plain transformers model, is written with
  ``save_pretrained`` (safetensors) together with the tokenizer. Load it with
  ``AutoModelForSequenceClassification.from_pretrained(DIR)`` or ``AutoModelForCausalLM...``: no
  lorabench, no peft.
* no ``--merge``, peft-backed adapters: the run's ``peft_adapter/`` folder is copied (tokenizer
  included); load it with ``PeftModel.from_pretrained(AutoModelFor...from_pretrained(BASE), DIR)``.
* no ``--merge``, lorabench's own adapters (peft cannot hold them): ``adapter.safetensors`` plus
  ``lorabench_adapter.json`` (the method, its parameters, the base model and the run's full resolved
  config) and the tokenizer. A user loads it with lorabench installed:
  ``model, tokenizer = lorabench.export.load_adapter_export(DIR)``, which rebuilds the model from the
  config (so the base model, and for data-driven inits or random-weight models the run's data, must be
  reachable as the run reached them) and loads the tensors; or exports with ``--merge`` instead.
* full-weight methods (full fine-tuning, GaLore family, LISA, BAdam): the run's ``model/`` folder is
  already a ``save_pretrained`` folder that plain transformers loads; it is copied (``--merge`` has
  nothing to merge).

Every export verifies itself: ``export.json`` in the folder names the source run, the method and
whether it was merged, and holds the largest |logit difference| on a fixed probe batch
(:data:`PROBE_TEXTS`) between lorabench's model and the exported folder reloaded the way a user would
(plain transformers; plain peft on the base weights; ``load_adapter_export``), and how far the adapter
moved the probe logits from the base model's. Rule: the export is refused, and nothing is left at the
destination, when that difference exceeds ``TOLERANCE * max(1, max |logits|)`` (float32), or when the
reload reports missing or unexpected weights.

Refused with a message naming the method and the reason: runs that did not complete (their final
weights were never written), runs without weights (``checkpoint.save_model=false``, a deleted file),
adapters that cannot be merged (``AdapterLayer.mergeable = False``, X-LoRA), merges that would need a
tensor the architecture has no place for (Hydra-LoRA's branch bias on a bias-free layer), and, without
``--merge``, peft folders that plain peft does not load as trained (inits such as PiSSA that rewrite the
base weights).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorabench.errors import ConfigError, DataError, ModelSourceError
from lorabench.results.record import RECORD_NAME, now, read_record

EXPORT_JSON = "export.json"
ADAPTER_JSON = "lorabench_adapter.json"
ADAPTER_FILE = "adapter.safetensors"
PEFT_DIR = "peft_adapter"  # lorabench.outputs / methods.adapters.xlora.PEFT_ADAPTER_DIR
MODEL_DIR = "model"  # lorabench.outputs.MODEL_DIR
FORMAT_VERSION = 1
# texts of different lengths (one padded batch), the same for every export so exports compare
PROBE_TEXTS = (
    "the movie is a delight",
    "Question: Tom has 3 apples and gets 4 more. How many apples does he have?",
    "a",
)
TOLERANCE = 1e-4  # float32: relative to max(1, max |logits|); merging moves logits by ~1e-7 relative
# peft types whose adapters have no single merged weight
UNMERGEABLE_PEFT = {"XLORA": "X-LoRA mixes its experts per token with a learned classifier"}


class ExportError(ValueError):
    """A run that cannot be exported as asked; the message names the run, the method and why."""


# -- which run --------------------------------------------------------------------------------------
def resolve_run(run: str, results_dir: str | Path = "results/runs") -> Path:
    """``run`` as a run folder: a folder holding ``record.json``, or a run id found under
    ``results_dir`` (directly, or in a nested folder such as a recipe's)."""
    path = Path(run)
    if (path / RECORD_NAME).is_file():
        return path
    root = Path(results_dir)
    if (root / run / RECORD_NAME).is_file():
        return root / run
    found = sorted(p.parent for p in root.rglob(RECORD_NAME) if p.parent.name == run) if root.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ExportError(f"run id {run!r} is in several folders under {root}: {', '.join(map(str, found))}")
    raise ExportError(
        f"RUN {run!r} is neither a run folder (holding {RECORD_NAME}) nor a run id under --results-dir {root}"
    )


def _read(run_dir: Path) -> dict:
    try:
        return read_record(run_dir / RECORD_NAME)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{run_dir / RECORD_NAME}: unreadable ({type(exc).__name__}: {exc})") from None


def _kind(record: dict, run_dir: Path) -> str:
    """``full`` (a full-weight method: ``model/``), ``peft`` (a peft folder) or ``lorabench`` (our
    adapter file); raises ExportError for runs without final weights."""
    label, rid = record["method"].get("label", "?"), record["run_id"]
    status = record.get("status")
    if status != "completed":
        step = (record.get("error") or {}).get("step", record.get("progress", {}).get("step"))
        raise ExportError(
            f"run {rid} (method {label!r}) is {status} at step {step}, not completed: its final weights were "
            "never written; finish it (the same `lorabench train` command with resume=auto) and export then"
        )
    protocol = (record["config"].get("protocol") or {}).get("name", "single")
    if protocol == "compressed":
        raise ExportError(
            f"run {rid} (method {label!r}) trained its adapter on a compressed base (protocol=compressed): "
            "merged into the float base it would not compute what was evaluated; its peft adapter folder "
            "(if saved) loads onto the same compressed base"
        )
    if record["method"].get("adapter", "none") == "none":
        if not (run_dir / MODEL_DIR / "config.json").is_file():
            raise ExportError(
                f"run {rid} (method {label!r}, full-weight) has no {MODEL_DIR}/ folder: it was trained with "
                "checkpoint.save_model=false (or the folder was removed), so no trained weights were kept"
            )
        return "full"
    if not (run_dir / ADAPTER_FILE).is_file():
        raise ExportError(f"run {rid} (method {label!r}) has no {ADAPTER_FILE}: its trained tensors are gone")
    return "peft" if (run_dir / PEFT_DIR / "adapter_config.json").is_file() else "lorabench"


# -- rebuilding the run's model -------------------------------------------------------------------
@dataclass
class Rebuilt:
    """A run's model as the training loop built it, with what exporting needs beside it."""

    cfg: Any  # RunConfig
    spec: Any  # MethodSpec (budget applied)
    task: Any
    model: Any  # after apply_method; trained tensors loaded by load_run_model / load_adapter_export
    tokenizer: Any
    base_logits: Any  # probe logits of the model before the method was applied
    targets: list  # the module-name suffixes the method adapted
    originals: dict  # name -> linear module (nn.Linear / Conv1D) before the method wrapped it
    base_keys: set  # state-dict keys of the plain model
    base_state: dict | None  # the plain model's tensors before the method (only when asked for)


def rebuild(config: dict, *, keep_base: bool = False) -> Rebuilt:
    """The run's model (trained tensors not yet loaded), built as the training loop builds it, by the
    same function (``lorabench.train.build_run_parts``: ``set_seed``, the data, the model, the
    features and calibration batches, the targets, the budget), so that everything drawn from the
    seed comes out the same; then ``apply_method``. On the CPU, in float32. ``keep_base`` keeps a copy
    of the plain model's tensors (for checking peft folders). tests/test_export.py checks the rebuilt
    model against what the run recorded."""
    import torch

    from lorabench.frozen_dtype import store_frozen_linears
    from lorabench.methods.adapters.layer import as_linear
    from lorabench.methods.build import apply_method
    from lorabench.registry import DATASETS
    from lorabench.train import build_run_parts
    from lorabench.validate import build_run

    cfg, spec = build_run(on_this_machine(config))
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    task = DATASETS.get(cfg.dataset.name, where="dataset")
    try:
        parts = build_run_parts(cfg, spec, task)
    except DataError as exc:
        raise DataError(
            f"{exc} (export rebuilds the run as training built it: its data feeds data-driven inits, and "
            "random-weight models are drawn after it loads; make the run's dataset reachable again)"
        ) from None
    model, tokenizer = parts.model, parts.tokenizer
    base_logits = probe_logits(model, probe_batch(tokenizer))
    originals = {n: m for n, m in model.named_modules() if as_linear(m) is not None}
    base_keys = set(model.state_dict())
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if keep_base else None
    base_params = {id(p) for p in model.parameters()}
    model = apply_method(model, parts.spec, parts.ctx).model
    # a run that stored its frozen base in bf16 trained against those rounded weights: the rebuild
    # rounds them the same way and keeps them in float32
    frozen = config["hardware"].get("frozen_dtype", "float32")
    store_frozen_linears(model, frozen, base_params, keep_float32=True)
    return Rebuilt(
        cfg, parts.spec, task, model, tokenizer, base_logits, parts.targets, originals, base_keys, base_state
    )


def on_this_machine(config: dict) -> dict:
    """The run's config with what only concerned the machine it trained on set for a one-process CPU
    rebuild (device, precision, processes, tracker): the model and its init are built on the CPU in
    float32 by the training loop too, before ``accelerator.prepare`` moves them."""
    hardware = {**config["hardware"], "device": "cpu", "mixed_precision": "no", "num_processes": 1}
    hardware["frozen_dtype"] = "float32"  # rebuild() rounds the frozen base as the run stored it
    return {**config, "hardware": hardware, "tracker": "none"}


def _load_tensors(rebuilt: Rebuilt, path: Path) -> None:
    from safetensors import safe_open

    from lorabench.methods.adapters.layer import load_trainable

    with safe_open(str(path), framework="pt") as f:
        saved = set(f.keys())
    for name, p in rebuilt.model.named_parameters():  # weights a protocol moved though the method froze
        if name in saved and not p.requires_grad:  # them (a FedSVD run's A): they are in the file too
            p.requires_grad_(True)
    try:
        load_trainable(rebuilt.model, path)
    except ValueError as exc:
        raise ExportError(
            f"{path} does not fit the model rebuilt from the run's config (method {rebuilt.spec.label!r}): {exc}"
        ) from None
    rebuilt.model.eval()


def load_run_model(run_dir: str | Path, *, keep_base: bool = False) -> Rebuilt:
    """lorabench's model of a completed adapter run: rebuilt, trained tensors loaded, in eval mode."""
    run_dir = Path(run_dir)
    record = _read(run_dir)
    _kind(record, run_dir)
    rebuilt = rebuild(record["config"], keep_base=keep_base)
    _load_tensors(rebuilt, run_dir / ADAPTER_FILE)
    return rebuilt


def load_adapter_export(folder: str | Path):
    """(model, tokenizer) from an export of lorabench's own adapter (``adapter.safetensors`` +
    ``lorabench_adapter.json``): the model rebuilt from the run's config with the tensors loaded."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / ADAPTER_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder / ADAPTER_JSON}: unreadable ({type(exc).__name__}: {exc})") from None
    rebuilt = rebuild(meta["config"])
    _load_tensors(rebuilt, folder / meta.get("adapter_file", ADAPTER_FILE))
    return rebuilt.model, rebuilt.tokenizer


# -- the probe -----------------------------------------------------------------------------------
def probe_batch(tokenizer) -> dict:
    return dict(tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=64, return_tensors="pt"))


def probe_logits(model, batch: dict):
    """float32 logits on the probe batch (eval mode, no grad; the model's mode is restored); for
    token-level logits only the positions the attention mask keeps."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(**batch).logits.float()
    finally:
        model.train(was_training)
    if logits.ndim == 3:
        logits = logits[batch["attention_mask"].bool()]
    return logits


def _compare(reference, got) -> dict:
    diff = float((reference - got).abs().max())
    scale = max(1.0, float(reference.abs().max()))
    return {"max_abs_logit_diff": diff, "tolerance": TOLERANCE * scale, "max_abs_logit": float(reference.abs().max())}


# -- merging ----------------------------------------------------------------------------------------
def merge_into_plain(rebuilt: Rebuilt):
    """The rebuilt model with every adapter folded into its base weight and no adapter module left:
    a plain transformers model. Raises ExportError for adapters that cannot be merged."""
    from lorabench.methods.adapters.layer import adapter_layers

    model, label = rebuilt.model, rebuilt.spec.label
    model.eval()  # merge what evaluation uses (DyLoRA's eval rank, NOLA's quantised coefficients)
    if hasattr(model, "peft_config"):
        peft_type = str(model.peft_config["default"].peft_type).removeprefix("PeftType.")
        if peft_type in UNMERGEABLE_PEFT or not hasattr(model, "merge_and_unload"):
            reason = UNMERGEABLE_PEFT.get(peft_type, "peft has no merge for it")
            raise ExportError(f"method {label!r} ({peft_type}) cannot be merged: {reason}; export without --merge")
        model = model.merge_and_unload()
    layers = adapter_layers(model)
    blocked = sorted({type(layer).__name__ for layer in layers.values() if not layer.mergeable})
    if blocked:
        raise ExportError(
            f"method {label!r} cannot be merged: its layers ({', '.join(blocked)}) declare mergeable=False "
            "(no single weight reproduces them); export without --merge"
        )
    for name, layer in layers.items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _plain_module(layer, rebuilt.originals[name]))
    extra = sorted(set(model.state_dict()) - rebuilt.base_keys)
    if extra:
        raise ExportError(
            f"method {label!r}: the merged model has tensors the {type(model).__name__} architecture has no place "
            f"for ({', '.join(extra[:4])}; e.g. a branch bias merged into a bias-free layer), so a plain "
            "transformers load would drop them; export without --merge"
        )
    return model


def _plain_module(layer, original):
    """The module the adapter wrapped, holding the merged weight: the ``nn.Linear`` itself, or for a
    GPT-2 ``Conv1D`` the original module (``as_linear`` gave the adapter a transposed view of its
    weight; copied back in case the view was replaced)."""
    import torch

    base = layer.base
    if base is original:
        return original
    with torch.no_grad():
        if base.weight.data_ptr() != original.weight.data_ptr():
            original.weight.copy_(base.weight.T)
        if base.bias is not None and original.bias is not None and base.bias is not original.bias:
            original.bias.copy_(base.bias)
    return original


# -- writing ----------------------------------------------------------------------------------------
def _reload_plain(folder: Path, head: str):
    """The folder loaded with plain transformers (float32); ExportError on missing/unexpected weights."""
    import torch

    from lorabench.models import head_class

    model, info = head_class(head).from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    missing = sorted(set(info.get("missing_keys") or []) - tied)
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing or unexpected:
        raise ExportError(f"{folder} does not load cleanly: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def _plain_peft(folder: Path, rebuilt: Rebuilt):
    """The peft folder applied by plain peft to a plain model holding the run's base weights."""
    from peft import PeftModel

    from lorabench.models import head_class

    model = rebuilt.model
    config = (model.base_model.model if hasattr(model, "base_model") else model).config
    base = head_class(rebuilt.task.head).from_config(config)
    base.load_state_dict(rebuilt.base_state)
    return PeftModel.from_pretrained(base, folder).eval()


def _check_base_untouched(rebuilt: Rebuilt) -> None:
    """Without --merge, a peft folder holds only the adapter: refuse when the init rewrote base weights."""
    import torch

    prefix = "base_model.model."
    changed = []
    for name, value in rebuilt.model.state_dict().items():
        key = name.removeprefix(prefix).replace(".base_layer.", ".")
        if key in rebuilt.base_state and ".lora_" not in name and "modules_to_save" not in name:
            if value.shape == rebuilt.base_state[key].shape and not torch.equal(value, rebuilt.base_state[key]):
                changed.append(key)
    if changed:
        init = rebuilt.spec.names.get("init", "none")
        raise ExportError(
            f"method {rebuilt.spec.label!r}: its init {init!r} rewrote base weights ({', '.join(changed[:3])}"
            f"{', ...' if len(changed) > 3 else ''}), so the peft folder is not an adapter of the original base "
            "model; export with --merge (a plain model with everything folded in)"
        )


def _staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-staging-"))


def default_out(run_dir: Path, kind: str, merge: bool) -> Path:
    name = "model" if kind == "full" else ("merged" if merge else "adapter")
    return run_dir / "exported" / name


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, merge: bool = False) -> dict:
    """Export a completed run (see the module docstring); returns what ``export.json`` holds, plus
    ``path`` (the folder written). Raises ExportError (or ConfigError / DataError / ModelSourceError
    from the rebuild)."""
    run_dir = Path(run_dir)
    record = _read(run_dir)
    kind = _kind(record, run_dir)
    out = Path(out_dir) if out_dir else default_out(run_dir, kind, merge)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; choose another folder or remove it")
    method = record["method"]
    info: dict = {
        "format_version": FORMAT_VERSION,
        "source_run": record["run_id"],
        "method": method.get("label"),
        "adapter": method.get("adapter"),
        "backed_by": method.get("backed_by"),
        "base_model": record["config"]["model"].get("hub_id") or record["config"]["model"]["name"],
        "exported_at": now(),
    }
    staging = _staging(out)
    try:
        if kind == "full":
            info.update(_export_full(run_dir, staging, record))
        else:
            info.update(_export_adapter(run_dir, staging, kind, merge, record))
        (staging / EXPORT_JSON).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return {**info, "path": str(out)}


def _export_full(run_dir: Path, staging: Path, record: dict) -> dict:
    import lorabench.data  # noqa: F401  registers datasets
    from lorabench.registry import DATASETS

    shutil.copytree(run_dir / MODEL_DIR, staging, dirs_exist_ok=True)
    head = DATASETS.get(record["config"]["dataset"]["name"], where="dataset").head
    reloaded = _reload_plain(staging, head)  # it must load cleanly; the weights are the run's own file
    del reloaded
    return {
        "merged": False,
        "kind": "model",
        "loads_with": f"{_auto_name(head)}.from_pretrained(DIR)",
        "verification": {
            "compared": f"nothing to rebuild: a copy of the run's {MODEL_DIR}/ folder (save_pretrained of the "
            "trained model, already loadable as it is); checked to load with plain transformers",
            "max_abs_logit_diff": None,
        },
    }


def _auto_name(head: str) -> str:
    from lorabench.models import HEAD_CLASSES

    return HEAD_CLASSES[head]


def _export_adapter(run_dir: Path, staging: Path, kind: str, merge: bool, record: dict) -> dict:
    rebuilt = load_run_model(run_dir, keep_base=(kind == "peft" and not merge))
    batch = probe_batch(rebuilt.tokenizer)
    reference = probe_logits(rebuilt.model, batch)
    head = rebuilt.task.head
    effect = float((reference - rebuilt.base_logits).abs().max())
    if merge:
        plain = merge_into_plain(rebuilt)
        plain.save_pretrained(staging, safe_serialization=True)
        rebuilt.tokenizer.save_pretrained(staging)
        got = probe_logits(_reload_plain(staging, head), batch)
        compared = f"lorabench's model vs this folder reloaded with plain transformers ({_auto_name(head)})"
        result = {"merged": True, "kind": "merged", "loads_with": f"{_auto_name(head)}.from_pretrained(DIR)"}
    elif kind == "peft":
        _check_base_untouched(rebuilt)
        shutil.copytree(run_dir / PEFT_DIR, staging, dirs_exist_ok=True)
        got = probe_logits(_plain_peft(staging, rebuilt), batch)
        compared = "lorabench's model vs plain peft (PeftModel.from_pretrained) on the run's base weights"
        result = {
            "merged": False,
            "kind": "peft_adapter",
            "loads_with": f"PeftModel.from_pretrained({_auto_name(head)}.from_pretrained(BASE), DIR)",
        }
    else:
        shutil.copy2(run_dir / ADAPTER_FILE, staging / ADAPTER_FILE)
        rebuilt.tokenizer.save_pretrained(staging)
        meta = {
            "format": "lorabench-adapter",
            "format_version": FORMAT_VERSION,
            "adapter_file": ADAPTER_FILE,
            "source_run": record["run_id"],
            "method": rebuilt.spec.describe(),
            "base_model": {"name": rebuilt.cfg.model.name, "hub_id": rebuilt.cfg.model.hub_id},
            "head": head,
            "load": "from lorabench.export import load_adapter_export; model, tokenizer = load_adapter_export(DIR)",
            "config": record["config"],
        }
        (staging / ADAPTER_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        got = probe_logits(load_adapter_export(staging)[0], batch)
        compared = "lorabench's model vs load_adapter_export(this folder)"
        result = {"merged": False, "kind": "lorabench_adapter", "loads_with": meta["load"]}
    check = _compare(reference, got)
    if not check["max_abs_logit_diff"] <= check["tolerance"]:  # also refuses NaN
        raise ExportError(
            f"method {rebuilt.spec.label!r}: the exported folder does not reproduce lorabench's model: max |logit "
            f"difference| {check['max_abs_logit_diff']:.3g} > tolerance {check['tolerance']:.3g} ({compared})"
            + ("" if merge else "; try --merge")
        )
    result["verification"] = {
        "compared": compared,
        "probe": list(PROBE_TEXTS),
        **check,
        "adapter_effect": effect,  # max |lorabench's logits - the base model's| on the probe
    }
    return result


# -- the command -------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lorabench export",
        description="Export a completed run as a folder plain transformers (or peft) loads; "
        "every export is verified on a probe batch (export.json).",
    )
    parser.add_argument("run", metavar="RUN", help="a run folder (holding record.json) or a run id under --results-dir")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="fold the adapter into the base weights and write a plain save_pretrained model",
    )
    parser.add_argument("--out", default=None, help="folder to write (default: RUN/exported/<merged|adapter|model>)")
    parser.add_argument("--results-dir", default="results/runs", help="where run ids are looked up")
    args = parser.parse_args(argv)
    try:
        run_dir = resolve_run(args.run, args.results_dir)
        info = export_run(run_dir, args.out, args.merge)
    except (ExportError, ConfigError, DataError, ModelSourceError) as exc:
        print(f"lorabench: error: {exc}", file=sys.stderr)
        return 2
    check = info["verification"]
    diff = check.get("max_abs_logit_diff")
    print(f"[lorabench] exported {info['source_run']} ({info['method']}, {info['kind']}) to {info['path']}")
    print(f"[lorabench] load it with {info['loads_with']}")
    if diff is not None:
        print(
            f"[lorabench] verified: max |logit difference| {diff:.3g} <= {check['tolerance']:.3g}; "
            f"the adapter moves the probe logits by up to {check['adapter_effect']:.3g}"
        )
    else:
        print(f"[lorabench] {check['compared']}")
    return 0
