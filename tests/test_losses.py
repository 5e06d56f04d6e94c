import pytest
import torch
from torch import nn

from geoopt_sgd import HalfSquaredError
from geoopt_sgd._losses import per_sample_losses, square_loss_scale


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "loss_fn",
    [nn.MSELoss, nn.CrossEntropyLoss, HalfSquaredError],
    ids=["mse", "ce", "half_sse"],
)
def test_per_sample_losses_reduce_to_the_users_batch_loss(loss_fn, reduction):
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    if loss_fn is nn.CrossEntropyLoss:
        y = torch.randint(0, 3, (7,), generator=gen)
    else:
        y = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    fn = loss_fn(reduction=reduction)
    per = per_sample_losses(fn, out, y)
    assert per.shape == (7,)
    agg = per.mean() if reduction == "mean" else per.sum()
    torch.testing.assert_close(agg, fn(out, y), rtol=1e-14, atol=0)


def test_half_squared_error_is_half_the_squared_norm_per_sample():
    out = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    per = per_sample_losses(HalfSquaredError(), out, torch.zeros(2, 2).double())
    torch.testing.assert_close(per, torch.tensor([12.5, 0.5]).double())


def test_square_loss_scale_matches_the_output_hessian():
    K = 4
    out = torch.randn(K, dtype=torch.float64)
    y = torch.randn(K, dtype=torch.float64)
    for fn in (nn.MSELoss(), nn.MSELoss(reduction="sum"), HalfSquaredError()):
        c = square_loss_scale(fn, K)
        lam = torch.func.hessian(lambda o, fn=fn: fn(o[None], y[None]))(out)
        torch.testing.assert_close(lam, c * torch.eye(K, dtype=torch.float64))
    assert square_loss_scale(nn.CrossEntropyLoss(), K) is None


def test_half_squared_error_rejects_an_unknown_reduction():
    with pytest.raises(ValueError, match="`reduction` must be one of 'mean', 'sum'"):
        HalfSquaredError(reduction="none")
