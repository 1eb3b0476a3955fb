"""``lorabench export``: a completed run becomes a folder that plain transformers (or plain peft) loads
with the logits of lorabench's model.

Each case trains a tiny run (3 steps at a learning rate large enough that the adapter moves the
logits far beyond the tolerance), exports it, reloads the folder without lorabench and compares logits
with lorabench's model (rebuilt from the run, trained tensors loaded) on inputs that are not the
export's own probe. Tolerance: float32, ``ATOL`` absolute. Every merge case also checks that skipping
the merge (the plain model with the base's target weights put back) would be caught: that model is
more than ``100 * ATOL`` away.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lorabench.export import (
    ADAPTER_JSON,
    EXPORT_JSON,
    load_adapter_export,
    load_run_model,
    probe_logits,
)
from tests.conftest import tiny_overrides
from tests.test_resume import only_run_dir, train

ATOL = 1e-5
FAST = ["train.max_steps=3", "train.lr=0.05", "train.warmup_ratio=0", "analysis.intruders=false"]
TEXTS = ["wonderful acting , moving and funny", "the plot is a dull mess", "ok"]

_RUNS: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sst2_dir, gsm8k_dir):
    """run(method, *extra, kind=...) -> the folder of a completed tiny run, trained once per module."""

    def run(method: str, *extra: str, kind: str = "classification") -> Path:
        key = (method, extra, kind)
        if key not in _RUNS:
            root = tmp_path_factory.mktemp(f"run-{method}")
            data = sst2_dir if kind == "classification" else gsm8k_dir
            assert train(f"method={method}", *tiny_overrides(kind, data, root), *FAST, *extra) == 0
            _RUNS[key] = only_run_dir(root)
        return _RUNS[key]

    yield run
    _RUNS.clear()


def export(run_dir: Path, out: Path, *flags: str) -> int:
    from lorabench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--out", str(out), *flags])
    return exc.value.code


def batch_of(tokenizer, texts=TEXTS) -> dict:
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def skipped_merge(plain, rebuilt) -> torch.nn.Module:
    """The exported model with every adapted weight put back to the base's: what a merge that did
    nothing would have written."""
    state = plain.state_dict()
    for name in state:
        module = name.rsplit(".", 1)[0]
        if any(module == t or module.endswith("." + t) for t in rebuilt.targets) and name in rebuilt.base_state:
            state[name] = rebuilt.base_state[name]
    plain.load_state_dict(state)
    return plain


def check_merged(run_dir: Path, out: Path, auto_class, texts=TEXTS):
    assert export(run_dir, out, "--merge") == 0
    info = json.loads((out / EXPORT_JSON).read_text())
    assert info["merged"] is True and info["source_run"] == run_dir.name
    assert info["verification"]["max_abs_logit_diff"] <= ATOL
    rebuilt = load_run_model(run_dir, keep_base=True)
    plain = auto_class.from_pretrained(out).eval()
    batch = batch_of(rebuilt.tokenizer, texts)
    ours, theirs = probe_logits(rebuilt.model, batch), probe_logits(plain, batch)
    assert (ours - theirs).abs().max() <= ATOL
    unmerged_model = skipped_merge(auto_class.from_pretrained(out).eval(), rebuilt)
    unmerged = probe_logits(unmerged_model, batch)
    assert (ours - unmerged).abs().max() > 50 * ATOL  # a skipped merge would fail the comparison above
    return info, rebuilt, unmerged_model


# our own adapters, one per distinct merge path: the dense delta_weight() (svfit's diagonal, SALT,
# LoRA-SB's B R A between frozen factors, SoRA's gates, DyLoRA at its eval rank), the
# factor-by-factor difference (slora.TriLayer), NOLA's quantised coefficients (its own merge), and
# Hydra-LoRA's sequential branch with branch biases (its own merge, bias included)
OWN = [
    ("svfit", ()),
    ("salt", ()),
    ("lora_sb", ()),
    ("sora", ()),
    ("dylora", ()),
    ("slora", ()),
    ("nola", ("+method.coef_bits=4",)),
    ("hydra_lora", ("method.bias=true",)),
]


@pytest.mark.parametrize("method,extra", OWN, ids=[m for m, _ in OWN])
def test_own_adapters_merge_into_a_plain_transformers_model(method, extra, runs, tmp_path):
    run_dir = runs(method, *extra)
    info = check_merged(run_dir, tmp_path / "merged", AutoModelForSequenceClassification)[0]
    assert info["backed_by"] == "lorabench"
    assert not list((tmp_path / "merged").glob("adapter*"))  # no adapter file: a plain model


def test_peft_lora_merges_with_merge_and_unload(runs, tmp_path):
    check_merged(runs("lora"), tmp_path / "merged", AutoModelForSequenceClassification)


def test_causal_lm_merge_reproduces_the_runs_own_generations(runs, tmp_path):
    """tiny_llama (tied embeddings, AutoModelForCausalLM): the merged folder's greedy generations
    on the first eval problems are the ones the run recorded, so the rebuilt model is the trained one."""
    run_dir = runs("slora", kind="causal_lm")
    texts = ["Question: 2 + 3 = ?", "Tom has"]
    _, rebuilt, unmerged = check_merged(run_dir, tmp_path / "merged", AutoModelForCausalLM, texts=texts)
    recorded = [s["prediction"] for s in json.loads((run_dir / "record.json").read_text())["samples"]]
    examples = rebuilt.task.load(rebuilt.cfg.dataset).eval[: len(recorded)]

    def generations(model):
        return rebuilt.task.predict(model, rebuilt.tokenizer, examples, rebuilt.cfg.dataset, torch.device("cpu"))

    assert generations(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()) == recorded
    assert len(recorded) == 3 and generations(unmerged) != recorded  # the adapter's, not the base model's


def test_own_adapter_without_merge_is_the_adapter_file_and_a_description(runs, tmp_path):
    run_dir = runs("svfit")
    out = tmp_path / "adapter"
    assert export(run_dir, out) == 0
    meta = json.loads((out / ADAPTER_JSON).read_text())
    assert meta["method"]["label"] == "svfit" and meta["config"]["method"]["adapter"] == "svfit"
    assert json.loads((out / EXPORT_JSON).read_text())["merged"] is False
    assert (out / "adapter.safetensors").read_bytes() == (run_dir / "adapter.safetensors").read_bytes()
    model, tokenizer = load_adapter_export(out)
    batch = batch_of(tokenizer)
    ours = load_run_model(run_dir)
    assert torch.equal(probe_logits(model, batch), probe_logits(ours.model, batch))
    assert json.loads((out / EXPORT_JSON).read_text())["verification"]["adapter_effect"] > 100 * ATOL


def test_adalora_peft_folder_reloads_as_trained_in_plain_peft(runs, tmp_path):
    """Issue 21 item 4: peft drops the pruned triplets when it saves (the rank pattern is in
    adapter_config.json) and resizes the layers when it loads, so the factors come back smaller than
    lorabench holds them, but the function is the trained one (the export verifies it)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    run_dir = runs("adalora", "method.init_r=6", "method.target_r=2")
    out = tmp_path / "adapter"
    assert export(run_dir, out) == 0
    assert json.loads((out / EXPORT_JSON).read_text())["verification"]["max_abs_logit_diff"] <= ATOL
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and any(not all(v) for v in config["rank_pattern"].values())
    rebuilt = load_run_model(run_dir, keep_base=True)
    base = AutoModelForSequenceClassification.from_config(rebuilt.model.base_model.model.config)
    base.load_state_dict(rebuilt.base_state)
    batch = batch_of(rebuilt.tokenizer)
    base_logits = probe_logits(base, batch)
    plain = PeftModel.from_pretrained(base, out).eval()
    ours = load_file(str(run_dir / "adapter.safetensors"))
    theirs = dict(plain.named_parameters())
    resized = [n for n in ours if ".lora_A." in n and theirs[n].shape[0] < ours[n].shape[0]]
    assert resized  # the tensors are not the trained ones by name ...
    ref = probe_logits(rebuilt.model, batch)
    assert (ref - probe_logits(plain, batch)).abs().max() <= ATOL  # ... but the model is
    assert (ref - base_logits).abs().max() > 100 * ATOL  # and the adapter matters


def test_run_id_under_results_dir_and_default_folder(runs):
    run_dir = runs("svfit")
    from lorabench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export", run_dir.name, "--results-dir", str(run_dir.parent), "--merge"])
    assert exc.value.code == 0
    default = run_dir / "exported" / "merged"
    try:
        assert json.loads((default / EXPORT_JSON).read_text())["source_run"] == run_dir.name
    finally:
        shutil.rmtree(run_dir / "exported")


def test_full_weight_runs_export_their_model_folder(runs, tmp_path):
    run_dir = runs("full")
    out = tmp_path / "model"
    assert export(run_dir, out, "--merge") == 0
    info = json.loads((out / EXPORT_JSON).read_text())
    assert info["kind"] == "model" and info["merged"] is False
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    original = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    batch = batch_of(plain_tokenizer(out))
    assert torch.equal(probe_logits(plain, batch), probe_logits(original, batch))


def plain_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# -- refusals ---------------------------------------------------------------------------------------
def refused(run_dir: Path, out: Path, capsys, *flags: str) -> str:
    assert export(run_dir, out, *flags) == 2
    assert not out.exists() and not list(out.parent.glob(f".{out.name}-staging-*"))  # nothing left behind
    return capsys.readouterr().err


def test_non_mergeable_adapters_are_refused(runs, tmp_path, capsys, monkeypatch):
    from lorabench.methods.adapters.svfit import DiagLayer

    monkeypatch.setattr(DiagLayer, "mergeable", False)
    err = refused(runs("svfit"), tmp_path / "out", capsys, "--merge")
    assert "'svfit' cannot be merged" in err and "DiagLayer" in err and "mergeable=False" in err


def test_incomplete_runs_are_refused(sst2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORABENCH_FAULT_AT_STEP", "1")
    assert train("method=svfit", *tiny_overrides("classification", sst2_dir, tmp_path / "r"), *FAST) == 130
    run_dir = only_run_dir(tmp_path / "r")
    err = refused(run_dir, tmp_path / "out", capsys, "--merge")
    assert "method 'svfit'" in err and "is canceled at step 1, not completed" in err and "resume=auto" in err


def test_runs_without_weights_are_refused(sst2_dir, tmp_path, capsys):
    args = tiny_overrides("classification", sst2_dir, tmp_path / "r")
    assert train("method=full", *args, *FAST, "checkpoint.save_model=false") == 0
    err = refused(only_run_dir(tmp_path / "r"), tmp_path / "out", capsys)
    assert "method 'full', full-weight" in err and "checkpoint.save_model=false" in err


def test_peft_folder_of_an_init_that_rewrote_the_base_is_refused_without_merge(runs, tmp_path, capsys):
    run_dir = runs("pissa")
    err = refused(run_dir, tmp_path / "out", capsys)
    assert "init 'pissa' rewrote base weights" in err and "--merge" in err
    check_merged(run_dir, tmp_path / "merged", AutoModelForSequenceClassification)  # merged, it is exact


def test_a_merge_that_needs_a_tensor_the_architecture_lacks_is_refused(runs, tmp_path, capsys):
    """Hydra-LoRA's branch biases merge into the layer's bias; Llama's projections have none."""
    run_dir = runs("hydra_lora", "method.bias=true", kind="causal_lm")
    err = refused(run_dir, tmp_path / "out", capsys, "--merge")
    assert "'hydra_lora'" in err and "q_proj.bias" in err


def test_gpt2_conv1d_targets_merge_back_into_their_conv1d(tmp_path):
    """GPT-2's ``Conv1D`` (weight stored d_in x d_out): the adapter wraps a transposed view of it, and
    the merged model holds the original ``Conv1D`` again, which plain transformers loads."""
    from types import SimpleNamespace

    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorabench.export import Rebuilt, merge_into_plain
    from lorabench.methods.adapters.layer import AdapterLayer, as_linear, wrap_targets

    class Dense(AdapterLayer):  # the smallest own adapter: a trained dense Delta W
        def __init__(self, base):
            super().__init__(base)
            g = torch.Generator().manual_seed(1)
            self.delta = nn.Parameter(torch.randn(base.out_features, base.in_features, generator=g) * 0.1)

        def delta_weight(self):
            return self.delta

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    originals = {n: m for n, m in model.named_modules() if as_linear(m) is not None}
    keys, ids = set(model.state_dict()), torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        base = model(ids).logits
        wrap_targets(model, ["c_attn"], lambda name, linear: Dense(linear))
        ours = model(ids).logits
    rebuilt = Rebuilt(None, SimpleNamespace(label="dense"), None, model, None, None, ["c_attn"], originals, keys, None)
    plain = merge_into_plain(rebuilt)
    assert [type(m).__name__ for n, m in plain.named_modules() if n.endswith("c_attn")] == ["Conv1D", "Conv1D"]
    plain.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()(ids).logits
    assert (ours - theirs).abs().max() <= ATOL and (ours - base).abs().max() > 50 * ATOL
