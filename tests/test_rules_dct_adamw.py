"""DCT-AdamW's rules that the parity cases leave open: the matrix is scipy's orthonormal DCT-II to fp32
rounding, the projector always takes galore-torch's ``std`` side, the optimizer's defaults (lr 1e-3,
eps 1e-8, no decay) and the settings the builder passes, the max_shape bound (a dimension equal to
it is not projected) and validation messages that name the key and value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.fft import dct
from torch import nn

from lorabench.errors import ConfigError
from lorabench.methods.base import MethodContext
from lorabench.methods.optimizers.dct_adamw import (
    DCTAdamW,
    DCTAdamWOptimizer,
    DCTAdamWParams,
    DCTCache,
    DCTProjector,
    dct_matrix,
)


@pytest.mark.parametrize("d", [7, 64, 300])
def test_dct_matrix_is_scipys_orthonormal_dct_ii(d):
    reference = dct(np.eye(d), type=2, norm="ortho", axis=0)  # column j = DCT-II of e_j, i.e. Q itself
    q = dct_matrix(d)
    assert q.dtype == torch.float32
    np.testing.assert_allclose(q.numpy(), reference.astype(np.float32), rtol=0, atol=2e-7)


def test_projector_always_takes_the_std_side():
    tall = DCTProjector((12, 9), 3, 1, dct_cache=DCTCache(), proj_type="left")
    wide = DCTProjector((9, 12), 3, 1, dct_cache=DCTCache(), proj_type="right")
    assert (tall.side, tall.dim, wide.side, wide.dim) == ("right", 9, "left", 9)


def test_optimizer_defaults_are_lr_1e3_eps_1e8_and_no_decay():
    torch.manual_seed(0)
    ours, ref = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    ref.data.copy_(ours.data)
    opt, ref_opt = DCTAdamWOptimizer([{"params": [ours]}]), torch.optim.AdamW([ref], eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        g = torch.randn(5, generator=gen) * 1e-7  # small gradients: eps matters
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=0, atol=1e-7)


def test_optimizer_passes_betas_and_weight_decay():
    opt = DCTAdamWOptimizer([{"params": [nn.Parameter(torch.zeros(3))]}], betas=(0.5, 0.6), weight_decay=0.1)
    assert opt.param_groups[0]["betas"] == (0.5, 0.6) and opt.param_groups[0]["weight_decay"] == 0.1


def ctx() -> MethodContext:
    return MethodContext(["0", "1"], "classification", lr=0.1, weight_decay=0.0, max_steps=10, seed=0)


def test_builder_projects_only_weights_below_max_shape_and_passes_betas():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 15))  # dimensions 16 and 16 x 15
    opt = DCTAdamW().build(model, DCTAdamWParams(rank=2, max_shape=16, beta1=0.5, beta2=0.6), ctx())
    projected = [g for g in opt.param_groups if g.get("projector") is not None]
    assert len(projected) == 0  # both weights have a dimension of 16 = max_shape
    opt = DCTAdamW().build(model, DCTAdamWParams(rank=2, max_shape=17, beta1=0.5, beta2=0.6), ctx())
    projected = [g for g in opt.param_groups if g.get("projector") is not None]
    assert len(projected) == 1 and len(projected[0]["params"]) == 2
    assert all(g["betas"] == (0.5, 0.6) for g in opt.param_groups)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"rank": 0}, "method.rank=0 is invalid; it must be > 0"),
        ({"update_proj_gap": 0}, "method.update_proj_gap=0 is invalid; it must be > 0"),
        ({"max_shape": -1}, "method.max_shape=-1 is invalid; it must be > 0"),
        ({"beta1": 1.0}, "method.beta1=1.0 is invalid; it must be in [0, 1)"),
        ({"beta2": 1.5}, "method.beta2=1.5 is invalid; it must be in [0, 1)"),
        ({"eps": 0.0}, "method.eps=0.0 is invalid; it must be > 0"),
    ],
)
def test_invalid_hyper_parameters_name_the_key_and_value(params, message):
    with pytest.raises(ConfigError) as err:
        DCTAdamWParams(**params)
    assert str(err.value) == message


def test_beta_zero_is_accepted():
    assert DCTAdamWParams(beta1=0.0, beta2=0.0).beta2 == 0.0
