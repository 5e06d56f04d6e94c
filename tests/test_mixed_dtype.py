"""Mixed float32/float64 parameters: curvature and probes compute in the widest dtype.

The reference is the model's float64 twin (the float32 part upcast): the only
difference is the float32 layer's forward rounding, so values agree to ~1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from geoopt_sgd import HessianOperator, noise_geometry, sharpness, top_eigenpairs
from geoopt_sgd.testing import dense_hessian


class _Mixed(nn.Module):
    """A float32 layer feeding a float64 layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.to(self.a.weight.dtype))).double())


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = _Mixed()
    twin = copy.deepcopy(model).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randn(12, 2, dtype=torch.float64)
    return model, twin, (x, y)


def test_operator_is_float64_and_matches_the_dense_hessian(setup):
    model, twin, data = setup
    op = HessianOperator(model, nn.MSELoss(), data)
    assert op.dtype == torch.float64  # every parameter exactly, whatever its order
    res = top_eigenpairs(op, k=3, tol=1e-6)  # the float32 layer rounds at ~1e-7
    assert res.eigenvectors.dtype == torch.float64
    H = dense_hessian(twin, nn.MSELoss(), data)
    ref = torch.linalg.eigvalsh(H).flip(0)[:3]
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-5, atol=1e-7)
    lam = sharpness(model, nn.MSELoss(), data, k=1).lambda_max
    assert lam == pytest.approx(float(ref[0]), rel=1e-5)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_noise_geometry_exact_route_matches_the_float64_twin(setup, curvature):
    model, twin, data = setup
    got = noise_geometry(
        model, nn.MSELoss(), data, k=3, route="exact", curvature=curvature
    )
    ref = noise_geometry(
        twin, nn.MSELoss(), data, k=3, route="exact", curvature=curvature
    )
    assert got.eigenvalues.dtype == torch.float64
    for name, value in ref.values.items():
        assert got.values[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, rtol=1e-5, atol=1e-9)
