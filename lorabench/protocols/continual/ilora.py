"""I-LoRA (Ren et al., 2024, "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient
Tuning", arXiv:2402.18865; ICASSP 2025): a dual-memory experience-replay method on LoRA.

Rules (``protocol.continual.strategy=ilora``):

* fast learner = the trained adapter (every trainable tensor: adapter factors and task heads);
  slow learner = a copy of it taken when the method is applied, updated after every optimizer step
  by ``slow <- lam * slow + (1 - lam) * fast`` with ``lam = protocol.continual.ema_decay``;
* on the replayed rows of a micro-batch (lorabench.protocols.continual.batches) the consistency
  loss is ``mean over hidden layers, tokens and features of (h_f - max(h_f, h_s))^2``, ``h_f`` the
  fast model's and ``h_s`` the slow model's hidden states (``output_hidden_states``: the embedding
  output and every layer's), the slow forward without gradient; it is added with weight
  ``consistency_weight`` to the task loss of the whole (current + replayed) micro-batch;
* every evaluation, and the final model (outputs, analyses), uses the slow weights.

Taken from the official code, github.com/which47/LLMCL, ``method/ILORA.py`` (commit a9dae12):
``ILoRAModel.update_ema_weights`` (the EMA, called from ``CLSCallback.on_step_end`` after every
optimizer step, over the parameters that train, i.e. the LoRA factors), ``ILoRAModel.forward`` (the
consistency loss: ``reg = where(plastic > stable, plastic, stable)`` per hidden state,
``MSELoss(reduction='none')`` of plastic against it, concatenated over the layers and averaged,
weighted by ``reg_weight = 1.0``; the stable forward under ``no_grad``; replay only after the first
task), the replay buffer class there and in ``method/ER.py``.

Deviations, each deliberate:

* the EMA coefficient: the official one is ``min(1 - 1/(step+1), ema_alpha)`` with ``ema_alpha =
  0.25``; at ``on_step_end`` the step is >= 1, so the first term is >= 0.5 and the coefficient is the
  constant 0.25. We use the constant ``lam = ema_decay`` (default 0.99; 0.25 reproduces the code).
  The official update also matches parameter names of the 'default' adapter against the 'ema'
  adapter's, which peft names differently (``lora_A.default`` / ``lora_A.ema``), so as released it
  interpolates the fast adapter with itself and leaves the slow one at its initialisation; we
  update the slow copy as the paper's equation says. The slow copy starts as a copy of the fast
  adapter (the official one is a second, freshly initialised adapter; for LoRA both start with
  B = 0, i.e. the base model's function);
* the buffer: the official one is a reservoir of 500 examples over every training batch seen
  (the current task's included), sampled as many as the current batch (so the loss is the mean of
  the current and the replayed batch's); ours keeps ``replay_size`` examples per finished task
  and replaces ``replay_ratio`` of each micro-batch (``replay_ratio=0.5`` gives the official
  weighting of the two losses);
* the official replayed batches are left-padded without an attention mask; ours carry their mask,
  and the consistency loss averages over real tokens only (with no padding it is the official value).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lorabench.methods.fidelity import Fidelity

FIDELITY = Fidelity(
    reference="which47/LLMCL method/ILORA.py @ a9dae12 (ILoRAModel.update_ema_weights, ILoRAModel.forward)",
    status="parity",
    tolerance="EMA tensors exact; consistency loss to rel 1e-6, its gradient sums to rel 1e-5",
    fixture="tests/test_continual.py::test_ilora_rules_match_the_official_code (numbers from the official functions)",
    deviations=(
        "EMA: the paper's equation with a constant ema_decay (the released update matches no peft parameter "
        "names and leaves the slow adapter unchanged; its coefficient is the constant 0.25 after step 1)",
        "replay: replay_size examples per finished task at replay_ratio of each micro-batch, "
        "not a 500-example reservoir",
        "replayed batches keep their attention mask",
    ),
)


def ema_step(slow: torch.Tensor, fast: torch.Tensor, decay: float) -> None:
    """``slow <- decay * slow + (1 - decay) * fast``, in place."""
    slow.mul_(decay).add_(fast, alpha=1.0 - decay)


def consistency_loss(fast_hidden, slow_hidden, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``(h_f - max(h_f, h_s))^2`` over every hidden state, token (where ``mask`` is 1;
    ``mask`` is batch x tokens) and feature; the gradient flows into ``fast_hidden`` only where it
    is below the slow one."""
    total, count = 0.0, 0.0
    for fast, slow in zip(fast_hidden, slow_hidden):
        slow = slow.detach().to(fast.dtype)
        target = torch.where(fast > slow, fast, slow)
        squared = (fast - target) ** 2
        if mask is None:
            total, count = total + squared.sum(), count + squared.numel()
        else:
            weights = mask.to(squared.dtype).unsqueeze(-1)
            total = total + (squared * weights).sum()
            count = count + weights.sum() * squared.shape[-1]
    return total / count


class ILoRA:
    """The slow copy, the captured fast hidden states of the current micro-batch and the rules."""

    def __init__(self, decay: float, weight: float):
        self.decay, self.weight = decay, weight
        self.module: nn.Module | None = None
        self.selector = None
        self.slow: dict[str, torch.Tensor] = {}
        self.pending = None  # (batch, task_ids, replay rows) of the micro-batch being trained
        self.fast_out = None
        self.capturing = False
        self.last_consistency: float | None = None

    def setup(self, module: nn.Module, selector) -> None:
        """Copy the trainable tensors of ``module`` (the unwrapped model) as the slow learner and hook
        its forward to keep the fast hidden states of micro-batches with replayed rows."""
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("strategy=ilora: the model has no trainable tensors to interpolate")
        self.module, self.selector = module, selector
        params = dict(module.named_parameters())
        self.slow = {n: params[n].detach().clone() for n in trainable}
        module.register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        if self.capturing:
            self.fast_out, self.capturing = output, False

    def on_batch(self, batch: dict, task_ids: torch.Tensor, replay_rows: list[int]) -> None:
        self.pending, self.fast_out = None, None
        if replay_rows and self.weight > 0:
            batch["output_hidden_states"] = True
            self.pending, self.capturing = (batch, task_ids, replay_rows), True

    def consistency(self) -> torch.Tensor | None:
        """``weight`` x the consistency loss of the pending micro-batch's replayed rows, or None."""
        if self.pending is None or self.fast_out is None:
            return None
        batch, task_ids, replay_rows = self.pending
        self.pending, fast_out = None, self.fast_out
        self.fast_out = None
        rows = torch.tensor(replay_rows, device=batch["input_ids"].device)
        fast = [h.index_select(0, rows) for h in fast_out.hidden_states]
        inputs = {
            "input_ids": batch["input_ids"].index_select(0, rows),
            "attention_mask": batch["attention_mask"].index_select(0, rows),
            "output_hidden_states": True,
        }
        routed = self.selector.task_ids if self.selector is not None else None
        try:
            if self.selector is not None:
                self.selector.task_ids = task_ids.index_select(0, rows.cpu())
            with torch.no_grad():
                slow_out = torch.func.functional_call(self.module, self.slow, args=(), kwargs=inputs, strict=False)
        finally:
            if self.selector is not None:
                self.selector.task_ids = routed
        loss = consistency_loss(fast, slow_out.hidden_states, inputs["attention_mask"])
        self.last_consistency = float(loss.detach())
        return self.weight * loss

    @torch.no_grad()
    def ema_update(self) -> None:
        """After an optimizer step: every slow tensor moves toward its fast one."""
        params = dict(self.module.named_parameters())
        for name, slow in self.slow.items():
            ema_step(slow, params[name].detach(), self.decay)

    @contextlib.contextmanager
    def slow_weights(self):
        """The slow tensors in the model for the duration (the fast ones restored after)."""
        params = dict(self.module.named_parameters())
        fast = {n: params[n].detach().clone() for n in self.slow}
        with torch.no_grad():
            for name, slow in self.slow.items():
                params[name].copy_(slow)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in fast.items():
                    params[name].copy_(value)

    @torch.no_grad()
    def keep_slow(self) -> None:
        """The slow tensors into the model for good (the final model is the slow learner)."""
        params = dict(self.module.named_parameters())
        for name, slow in self.slow.items():
            params[name].copy_(slow)

    def slow_tensors(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.slow.items()}

    def load_slow(self, tensors: dict[str, torch.Tensor], device) -> None:
        missing = sorted(set(self.slow) - set(tensors))
        if missing:
            raise ValueError(f"the stage checkpoint lacks I-LoRA slow tensors {missing[:5]}")
        self.slow = {n: tensors[n].to(self.slow[n].device) for n in self.slow}
