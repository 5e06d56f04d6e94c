"""GGNOperator against the dense J^T Lambda J reference and the Hessian.

Tolerance: float64 sums of O(100) terms of size O(1): agreement is ~1e-15
relative, so rtol=1e-10 has a wide margin and still catches any wrong term.
"""

import pytest
import torch
from cases import (
    assert_same_state,
    image_data,
    linear,
    make_data,
    mlp,
    model_state,
    tiny_cnn,
)
from torch import nn

from geoopt_sgd.curvature import GGNOperator, HessianOperator
from geoopt_sgd.testing.curvature import (
    assert_close_report,
    dense_ggn,
    dense_hessian,
)

RTOL, ATOL = 1e-10, 1e-12
CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()


def test_linear_mse_ggn_equals_hessian():
    # model linear in its parameters + square loss: H = G exactly
    model = linear(5, 2)
    X, y = make_data(12, k=2, classification=False)
    G = GGNOperator(model, MSE, (X, y)).to_dense()
    assert_close_report(G, dense_hessian(model, MSE, (X, y)), RTOL, ATOL)
    assert_close_report(G, HessianOperator(model, MSE, (X, y)).to_dense(), RTOL, ATOL)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mlp_matches_dense_ggn(loss):
    model = mlp()
    X, y = make_data(12, classification=loss == "ce")
    loss_fn = CE if loss == "ce" else MSE
    ref = dense_ggn(model, loss_fn, (X, y))
    G = GGNOperator(model, loss_fn, (X, y)).to_dense()
    assert_close_report(G, ref, RTOL, ATOL)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD (rounding only)
    # a nonlinear model: the GGN is not the Hessian
    assert (ref - dense_hessian(model, loss_fn, (X, y))).abs().max() > 1e-3


def test_loss_linear_in_the_outputs_has_zero_ggn():
    # Lambda = d^2 loss / d f^2 = 0: G = 0 (while H, from the model's curvature,
    # is not)
    model = mlp()
    X, y = make_data(12, classification=False)

    def loss_fn(out, t):
        return (out * t).mean()

    ref = dense_ggn(model, loss_fn, (X, y), loss_reduction="mean")
    G = GGNOperator(model, loss_fn, (X, y), loss_reduction="mean").to_dense()
    assert_close_report(G, ref, RTOL, ATOL)
    assert G.abs().max() == 0
    H = dense_hessian(model, loss_fn, (X, y), loss_reduction="mean")
    assert H.abs().max() > 1e-3


def test_cross_entropy_ggn_closed_form():
    # linear model: J_i is explicit and Lambda_i = (diag(p_i) - p_i p_i^T) / N
    model = linear(5, 3)
    X, y = make_data(12)
    p = torch.softmax(model(X), dim=1).detach()
    G_ref = torch.zeros(18, 18, dtype=torch.float64)
    for i in range(12):
        Lam = (torch.diag(p[i]) - torch.outer(p[i], p[i])) / 12
        J = torch.zeros(3, 18, dtype=torch.float64)  # rows: outputs; W then b
        for c in range(3):
            J[c, c * 5 : (c + 1) * 5] = X[i]
            J[c, 15 + c] = 1.0
        G_ref += J.T @ Lam @ J
    G = GGNOperator(model, CE, (X, y)).to_dense()
    assert_close_report(G, G_ref, RTOL, ATOL)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cnn_batchnorm_ragged_batches(mode):
    model, (Xi, yi) = tiny_cnn(), image_data(10)
    data = [(Xi[:4], yi[:4]), (Xi[4:8], yi[4:8]), (Xi[8:], yi[8:])]
    ref = dense_ggn(model, CE, data, mode=mode)
    G = GGNOperator(model, CE, data, mode=mode)
    assert G.num_samples == 10
    assert_close_report(G.to_dense(), ref, RTOL, ATOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_streaming_loader_and_reduction(reduction):
    model, (X, y) = mlp(), make_data(12)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=5
    )
    G = GGNOperator(model, loss_fn, loader)
    assert not G.cacheable
    assert_close_report(G.to_dense(), dense_ggn(model, loss_fn, (X, y)), RTOL, ATOL)


def test_subset_frozen_and_unused():
    model, (X, y) = mlp(), make_data(12)
    model[0].bias.requires_grad_(False)
    model.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    sel = ["unused", "0.bias", "2.weight"]
    ref = dense_ggn(model, CE, (X, y), params=sel)
    G = GGNOperator(model, CE, (X, y), params=sel).to_dense()
    assert_close_report(G, ref, RTOL, ATOL)
    assert torch.equal(G[:2], torch.zeros_like(G[:2]))
    assert G[2:8].abs().max() > 1e-4  # frozen bias still differentiated


def test_no_side_effects_and_matmat():
    model, (Xi, yi) = tiny_cnn(), image_data(10)
    CE(model(Xi), yi).backward()
    V = torch.randn(51, 3, generator=torch.Generator().manual_seed(0)).double()
    before = model_state(model)
    G = GGNOperator(model, CE, (Xi, yi), mode="train")
    GV = G.matmat(V)
    assert G.n_matvec == 3
    assert_close_report(G.matvec(V[:, 1]), GV[:, 1], 1e-13, 1e-15)
    G.loss()
    G.gradient()
    G.release()
    assert_same_state(before, model_state(model))


def test_timm_vit_subset():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=3).double()
    X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).double()
    y = torch.tensor([0, 2])
    sel = ["blocks.0.norm1.weight", "head.bias"]  # before the attention
    ref = dense_ggn(model, CE, (X, y), params=sel)
    V = torch.randn(67, 3, generator=torch.Generator().manual_seed(1)).double()
    GV = GGNOperator(model, CE, (X, y), params=sel).matmat(V)
    assert_close_report(GV, ref @ V, RTOL, 1e-12 * float((ref @ V).abs().max()))


def test_errors():
    model, (X, y) = mlp(), make_data(12)
    with pytest.raises(ValueError, match="`mode` must be one of 'eval', 'train'"):
        GGNOperator(model, CE, (X, y), mode="predict")
    with pytest.raises(ValueError, match="`data` is empty"):
        GGNOperator(model, CE, [])
    with pytest.raises(ValueError, match="`loss_reduction` must be one of"):
        GGNOperator(model, CE, (X, y), loss_reduction="none")
    G = GGNOperator(model, CE, (X, y))
    with pytest.raises(ValueError, match=r"`V`: expected leading dimension P = 57"):
        G.matmat(torch.ones(58, 2, dtype=torch.float64))
