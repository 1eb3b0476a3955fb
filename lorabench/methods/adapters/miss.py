"""MiSS / Bone (Kang et al., 2024, "Bone: Block-Affine Adaptation of Large Language Models", later
"MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure", arXiv:2409.15371),
backed by peft's ``MissConfig`` (peft's ``BoneConfig`` was removed in 0.19).

Update rules (x in R^d_in, W0 in R^{d_out x d_in}):
* ``mode: miss`` (peft ``init_weights=True``, the default): one trainable shard D in R^{r x d_out},
  zero init, shared by all d_in / r input shards: y = W0 x + (sum_k x[k r:(k+1) r]) D.
  Trainable per target: r * d_out.
* ``mode: bat`` (= Bone, block-affine): W0 is cut into r x r blocks W_ij; one trainable block
  tensor (d_out / r blocks of r x r, zero init) gives dW_ij = W_ij Bhat + Bhat ("weight-guided").
  Needs r | d_in and r | d_out. Trainable per target: (d_out / r) * r * r = r * d_out.
* ``mode: mini``: a smaller shard (r x mini_r) shared along d_out. Trainable per target: r * mini_r.
Hyper-parameters (peft ``MissConfig`` defaults and the paper's): r = 64, mini_r = 1, dropout 0.0.
"""

from __future__ import annotations

from torch import nn

from lorabench.errors import ConfigError
from lorabench.method_params.adapters import MODES, MissParams
from lorabench.methods.adapters.lora import TASK_TYPES
from lorabench.methods.base import Adapter, MethodContext, head_parameter_count, target_linear_weights
from lorabench.registry import ADAPTERS


@ADAPTERS.register("miss")
class MissAdapter(Adapter):
    Params = MissParams
    paper = "Kang et al., 2024, arXiv:2409.15371"
    backed_by = "peft"
    size_knob = "rank"  # what a size budget sets (lorabench/budget.py); bat mode: a rank that divides every target

    @staticmethod
    def rank_problem(model: nn.Module, params: MissParams, ctx: MethodContext) -> str | None:
        """Why ``params.rank`` cannot shard every target (None: it can)."""
        for name, w in target_linear_weights(model, ctx.target_modules):
            d_out, d_in = w.shape
            if params.rank > d_in or (params.mode == "bat" and (d_in % params.rank or d_out % params.rank)):
                need = "divide d_in and d_out" if params.mode == "bat" else "be <= d_in"
                return f"method.rank={params.rank} must {need} of every target ({name} is {d_out}x{d_in})"
        return None

    def size_is_valid(self, model: nn.Module, params: MissParams, ctx: MethodContext) -> bool:
        """Whether a budget may pick ``params.rank`` (lorabench/budget.py steps down until it may)."""
        return self.rank_problem(model, params, ctx) is None

    def apply(self, model: nn.Module, params: MissParams, ctx: MethodContext, init_kwargs: dict) -> nn.Module:
        from peft import MissConfig, get_peft_model

        problem = self.rank_problem(model, params, ctx)
        if problem:
            raise ConfigError(problem)
        config = MissConfig(
            task_type=TASK_TYPES[ctx.head],
            r=params.rank,
            init_weights=MODES[params.mode],
            mini_r=params.mini_r,
            miss_dropout=params.dropout,
            target_modules=ctx.target_modules,
            **init_kwargs,
        )
        return get_peft_model(model, config)

    def expected_trainable(self, base_model: nn.Module, params: MissParams, ctx: MethodContext) -> int:
        """r * d_out per targeted linear layer (r * mini_r in mini mode), plus the task head."""
        per = (
            (lambda d_out: params.rank * params.mini_r)
            if params.mode == "mini"
            else (lambda d_out: params.rank * d_out)
        )
        total = sum(per(w.shape[0]) for _, w in target_linear_weights(base_model, ctx.target_modules))
        return total + head_parameter_count(base_model, ctx.head)
