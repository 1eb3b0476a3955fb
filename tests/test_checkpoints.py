"""Checkpoints and caches that are verified before use.

Every checkpoint carries a manifest (size and sha256 of each file). A resume checks the newest
checkpoint against it and reads every file before applying any; a missing, truncated or corrupt file
is named (file and reason), the checkpoint is skipped with a warning for the previous valid one, and
the record's ``resumed_from`` says which was used and which skipped. The resumed run still ends
bitwise equal to the run that never stopped. Staging folders are unique per process and removed when
a save fails. The LoRA-GA gradient cache is safetensors, never a pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorabench.checkpoint as ckpt
from lorabench.checkpoint import list_checkpoints, newest_usable, save_checkpoint, verify_checkpoint
from lorabench.methods.build import apply_method
from tests.conftest import tiny_overrides
from tests.method_harness import build
from tests.test_resume import only_run_dir, train

STEPS = ["train.max_steps=6", "train.eval_every=3", "checkpoint.every=1", "train.warmup_ratio=0.2"]


def args(data: Path, root: Path, *extra: str) -> list[str]:
    base = [a for a in tiny_overrides("classification", data, root) if not a.startswith("train.max_steps")]
    return ["method=lora", *base, *STEPS, *extra]


def record_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


@pytest.fixture(scope="module")
def pair(sst2_dir, tmp_path_factory):
    """(uninterrupted run folder, run folder interrupted after step 3 with checkpoints step_2, step_3)."""
    root = tmp_path_factory.mktemp("pair")
    assert train(*args(sst2_dir, root / "a")) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORABENCH_FAULT_AT_STEP", "3")
        assert train(*args(sst2_dir, root / "b")) == 130
    b_dir = only_run_dir(root / "b")
    assert [p.name for p in list_checkpoints(b_dir)] == ["step_2", "step_3"]
    return only_run_dir(root / "a"), b_dir


def copy_run(run_dir: Path, root: Path) -> Path:
    copy = root / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def assert_same_result(a_dir: Path, b_dir: Path) -> None:
    a, b = record_of(a_dir), record_of(b_dir)
    assert b["status"] == "completed", b.get("error")
    assert a["history"] == b["history"] and a["train_log"] == b["train_log"]
    assert a["metrics"]["final"] == b["metrics"]["final"]
    wa, wb = (load_file(str(d / "adapter.safetensors")) for d in (a_dir, b_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- manifests ----------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_size_and_sha256(pair):
    _, b_dir = pair
    for path in list_checkpoints(b_dir):
        manifest = json.loads((path / "manifest.json").read_text())["files"]
        on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
        assert set(manifest) == on_disk and {"trainable.safetensors", "optimizer.pt", "rng_0.pt"} <= on_disk
        for name, entry in manifest.items():
            assert entry == {"bytes": (path / name).stat().st_size, "sha256": ckpt.file_sha256(path / name)}
        assert verify_checkpoint(path) is True
    assert not list((b_dir / "checkpoints").glob(".staging*"))


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def without_manifest(damage):
    def apply(file: Path) -> None:
        (file.parent / "manifest.json").unlink()
        damage(file)

    return apply


TRUNCATED = "bytes, manifest.json says"
CORRUPTIONS = {  # id: (file in the newest checkpoint, damage, words of the reason)
    "truncated-weights": ("trainable.safetensors", truncate, TRUNCATED),
    "truncated-optimizer": ("optimizer.pt", truncate, TRUNCATED),
    "truncated-meta": ("meta.json", truncate, TRUNCATED),
    "truncated-rng": ("rng_0.pt", truncate, TRUNCATED),
    "flipped-weights": ("trainable.safetensors", flip_byte, "sha256 differs"),
    "missing-scheduler": ("scheduler.json", Path.unlink, "missing"),
    "truncated-manifest": ("manifest.json", truncate, "unreadable manifest"),
    # checkpoints written before manifests: reading the file itself names it
    "legacy-truncated-optimizer": ("optimizer.pt", without_manifest(truncate), "unreadable"),
    "legacy-truncated-meta": ("meta.json", without_manifest(truncate), "unreadable"),
}


@pytest.mark.parametrize("name,damage,reason", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_newest_checkpoint_is_named_and_skipped(name, damage, reason, pair, tmp_path, sst2_dir, capsys):
    a_dir, b_dir = pair
    run_dir = copy_run(b_dir, tmp_path)
    damage(run_dir / "checkpoints" / "step_3" / name)
    assert train(*args(sst2_dir, tmp_path), "resume=auto") == 0
    err = capsys.readouterr().err
    assert "WARNING skipping checkpoint step_3" in err and name in err and reason in err, err
    entry = record_of(run_dir)["resumed_from"][-1]
    assert entry["step"] == 2 and entry["checkpoint"].endswith("step_2")
    (skipped,) = entry["skipped"]
    assert skipped["checkpoint"].endswith("step_3") and name in skipped["problem"] and reason in skipped["problem"]
    assert_same_result(a_dir, run_dir)  # resumed from step 2, still the uninterrupted run's result


def test_no_usable_checkpoint_fails_and_keeps_the_canceled_record(pair, tmp_path, sst2_dir, capsys):
    _, b_dir = pair
    run_dir = copy_run(b_dir, tmp_path)
    canceled = record_of(run_dir)
    for step in ("step_2", "step_3"):
        truncate(run_dir / "checkpoints" / step / "optimizer.pt")
    assert train(*args(sst2_dir, tmp_path), "resume=auto") == 1
    rec = record_of(run_dir)
    assert rec["status"] == "failed" and rec["error"]["type"] == "CheckpointError"
    assert "step_2/optimizer.pt" in rec["error"]["message"] and "step_3/optimizer.pt" in rec["error"]["message"]
    assert "resume=never" in rec["error"]["message"]  # says how to start over
    # what the canceled record knew is still there: its segment (status, error), log and history
    assert [s["status"] for s in rec["segments"]] == ["canceled", "failed"]
    assert rec["segments"][0]["error"]["type"] == "RunCanceled" and rec["segments"][0]["step"] == 3
    assert rec["train_log"] == canceled["train_log"] and rec["train_log"]
    assert rec["history"] == canceled["history"] and rec["history"]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_2", "step_3"]  # nothing deleted


def test_every_resume_is_recorded_and_times_add_up(pair, tmp_path, sst2_dir, monkeypatch):
    """Interrupted at step 3, resumed and interrupted again at step 5, resumed to the end: both
    resumes are in ``resumed_from``, three segments, and wall time is their sum."""
    a_dir, b_dir = pair
    run_dir = copy_run(b_dir, tmp_path)
    monkeypatch.setenv("LORABENCH_FAULT_AT_STEP", "5")
    assert train(*args(sst2_dir, tmp_path), "resume=auto") == 130
    monkeypatch.delenv("LORABENCH_FAULT_AT_STEP")
    assert train(*args(sst2_dir, tmp_path), "resume=auto") == 0
    rec = record_of(run_dir)
    assert [r["step"] for r in rec["resumed_from"]] == [3, 5]
    assert all(r["verified"] and r["skipped"] == [] for r in rec["resumed_from"])
    assert [s["status"] for s in rec["segments"]] == ["canceled", "canceled", "completed"]
    assert [s["step"] for s in rec["segments"]] == [3, 5, 6]
    walls = [s["wall_time_s"] for s in rec["segments"]]
    assert all(w > 0 for w in walls) and rec["cost"]["wall_time_s"] == pytest.approx(sum(walls))
    assert rec["cost"]["eval_time_s"] == pytest.approx(sum(s["eval_time_s"] for s in rec["segments"]))
    assert_same_result(a_dir, run_dir)


# -- saving ---------------------------------------------------------------------------------------------
class OneProcess:
    """The part of an ``Accelerator`` that checkpoints use, for one process."""

    is_main_process, num_processes, process_index = True, 1, 0

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, model):
        return model


def tiny_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "procedure": None}


def save(run_dir: Path, step: int, state: dict) -> Path:
    return save_checkpoint(run_dir, step, **state, meta={"consumed": step}, accelerator=OneProcess(), keep=5)


def test_staging_is_unique_per_process_and_removed_when_a_save_fails(tmp_path, monkeypatch):
    state = tiny_state()
    names = []
    real_manifest = ckpt.write_manifest
    monkeypatch.setattr(ckpt, "write_manifest", lambda folder: (names.append(folder.name), real_manifest(folder)))
    save(tmp_path, 1, state)
    host = re.escape(socket.gethostname())
    assert re.fullmatch(rf"\.staging_step_1-{host}-{os.getpid()}-[0-9a-f]{{8}}", names[0]), names
    # a staging folder a dead process left behind is removed by the next save (the saver holds the run lock)
    (tmp_path / "checkpoints" / ".staging_step_7-otherhost-99-deadbeef").mkdir()

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, state)
    assert not list((tmp_path / "checkpoints").glob(".staging*"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1"] and verify_checkpoint(
        tmp_path / "checkpoints" / "step_1"
    )


def test_newest_usable_reads_nothing_into_the_model_before_verifying(tmp_path):
    state = tiny_state()
    save(tmp_path, 1, state)
    save(tmp_path, 2, state)
    flip_byte(tmp_path / "checkpoints" / "step_2" / "trainable.safetensors")
    found, skipped = newest_usable(tmp_path, 0, warn=False)
    assert found.path.name == "step_1" and found.meta["step"] == 1 and found.verified
    assert [s["checkpoint"].rsplit("/", 1)[-1] for s in skipped] == ["step_2"]
    assert newest_usable(tmp_path / "nothing", 0) == (None, [])


# -- the LoRA-GA gradient cache -------------------------------------------------------------------------
def lora_ga_init(sst2_dir: Path, tmp_path: Path, monkeypatch) -> tuple[dict, list[torch.Tensor]]:
    """(the record's cache report, the gradient each LoRA layer's init consumed, in init order)."""
    from peft.tuners.lora.layer import LoraLayer

    consumed, real = [], LoraLayer.lora_ga_init

    def spy(self, *args, **kwargs):
        consumed.append(self.get_base_layer()._peft_loraga_grad.detach().clone())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "lora_ga_init", spy)
    _, spec, loaded, _, ctx = build("lora_ga", sst2_dir, tmp_path)
    ctx = dataclasses.replace(ctx, calibration_key="fixture")
    apply_method(loaded.model, spec, ctx)
    monkeypatch.setattr(LoraLayer, "lora_ga_init", real)
    return ctx.extras["lora_ga_gradient_cache"], consumed


def test_lora_ga_gradient_cache_is_safetensors_and_reproduces_the_estimate(sst2_dir, tmp_path, monkeypatch):
    """A hit hands every layer's init the very gradient a miss estimated (the init itself draws from
    the RNG in ``torch.svd_lowrank``, so hit and miss inits differ with the RNG state, as with peft's
    own cache)."""
    monkeypatch.setenv("LORABENCH_CACHE", str(tmp_path / "cache"))
    first, estimated = lora_ga_init(sst2_dir, tmp_path, monkeypatch)
    cache = Path(first["path"])
    assert first["hit"] is False and cache.suffix == ".safetensors" and cache.is_file()
    head = cache.read_bytes()[:8]
    assert not head.startswith(b"PK") and head[:1] != b"\x80"  # neither torch's zip format nor a raw pickle
    stored = {k: v.clone() for k, v in load_file(str(cache)).items()}  # a copy: the file is truncated below
    assert len(stored) == len(estimated) == 4 and all(k.endswith("._peft_loraga_grad") for k in stored)

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    second, loaded = lora_ga_init(sst2_dir, tmp_path, monkeypatch)
    assert second["hit"] is True and second["path"] == first["path"] and same(estimated, loaded)
    truncate(cache)  # a damaged cache is estimated again, not trusted, and rewritten whole
    third, again = lora_ga_init(sst2_dir, tmp_path, monkeypatch)
    assert third["hit"] is False and same(estimated, again)
    assert same(list(load_file(str(cache)).values()), list(stored.values()))
