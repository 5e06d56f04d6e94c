"""One per-sample loss convention: every curvature source measures the loss as passed.

For ``nn.MSELoss()`` on a ``K = 3``-output model, ``nn.CrossEntropyLoss()`` and a
custom callable, the top eigenvalues of the probes' curvature
(:func:`geoopt_sgd.noise_geometry`), of :class:`~geoopt_sgd.GGNOperator` and
:class:`~geoopt_sgd.HessianOperator` (by :func:`~geoopt_sgd.top_eigenpairs`) and of
:class:`~geoopt_sgd.NoisyGD`'s Hessian-aligned noise source agree
with the dense ``torch.func`` Hessian (and GGN) of the loss ``loss_fn(f(X), y)``.
A further curvature source joins the test as one more entry of ``SOURCES``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from geoopt_sgd import (
    GGNOperator,
    HalfSquaredError,
    HessianOperator,
    NoisyGD,
    noise_geometry,
    top_eigenpairs,
)

K = 3  # outputs per sample
TOP = 3  # eigenvalues compared
TOL = 1e-7  # eigensolver residual: eigenvalues to ~TOL^2 relative


def _log_cosh(out: Tensor, y: Tensor) -> Tensor:
    """A custom loss with a non-constant output Hessian (mean over samples)."""
    return torch.log(torch.cosh(out - y)).sum(-1).mean()


class _ScaledMSE(nn.MSELoss):
    """A subclass computing another loss: MSELoss's closed form must not apply."""

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        return 3.0 * super().forward(out, y)


class _PenalisedCE(nn.CrossEntropyLoss):
    """Cross-entropy plus a logit penalty: not the softmax closed form."""

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        return super().forward(out, y) + 0.1 * (out**2).sum(-1).mean()


LOSSES = {
    "mse": (nn.MSELoss(), "regression"),
    "ce": (nn.CrossEntropyLoss(), "classes"),
    "custom": (_log_cosh, "regression"),
    "mse_subclass": (_ScaledMSE(), "regression"),
    "ce_subclass": (_PenalisedCE(), "classes"),
}


def _problem(name: str) -> tuple[nn.Module, object, Tensor, Tensor]:
    loss_fn, kind = LOSSES[name]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, K)).double()
    X = torch.randn(10, 4, generator=g, dtype=torch.float64)
    if kind == "classes":
        y = torch.randint(0, K, (10,), generator=g)
    else:
        y = torch.randn(10, K, generator=g, dtype=torch.float64)
    return model, loss_fn, X, y


def _dense(model: nn.Module, loss_fn, X: Tensor, y: Tensor, curvature: str) -> Tensor:
    """The dense Hessian, or GGN ``J^T (d^2 L / d f^2) J``, of ``loss_fn(f(X), y)``."""
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def outputs(t: Tensor) -> Tensor:
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            ps[n] = t[i : i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, ps, (X,))

    if curvature == "hessian":
        return hessian(lambda t: loss_fn(outputs(t), y))(theta)
    out = outputs(theta).detach()
    J = jacrev(outputs)(theta).reshape(out.numel(), -1)
    lam = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ lam @ J


def _probes(model, loss_fn, X, y, curvature):
    res = noise_geometry(
        model,
        loss_fn,
        (X, y),
        k=TOP,
        curvature=curvature,
        route="exact",
        metrics=["noise_energies"],
        tol=TOL,
    )
    return res.eigenvalues


def _operator(model, loss_fn, X, y, curvature):
    cls = GGNOperator if curvature == "ggn" else HessianOperator
    return top_eigenpairs(cls(model, loss_fn, (X, y)), TOP, tol=TOL).eigenvalues


def _noisy_gd(model, loss_fn, X, y, curvature):
    # NoisyGD's Hessian-aligned noise draws from the top-k eigenpairs of its
    # curvature source; lr = 0 leaves the parameters where the others measure
    opt = NoisyGD(
        model.parameters(),
        lr=0.0,
        noise="hessian",
        magnitude="unit",
        k=TOP,
        model=model,
        loss_fn=loss_fn,
        data=(X, y),
        curvature=curvature,
        tol=TOL,
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    opt.step(closure)
    return opt.state_dict()["noisy_gd"]["cache"]["eigenvalues"]


SOURCES = {"noise_geometry": _probes, "operator": _operator, "noisy_gd": _noisy_gd}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_top_eigenvalues_agree_with_dense_hessian(loss, curvature, source):
    model, loss_fn, X, y = _problem(loss)
    dense = _dense(model, loss_fn, X, y, curvature)
    want = torch.linalg.eigvalsh((dense + dense.T) / 2).flip(0)[:TOP]
    got = SOURCES[source](model, loss_fn, X, y, curvature)
    torch.testing.assert_close(
        got.double().cpu(), want, rtol=1e-5, atol=1e-12 * float(want.abs().max())
    )


def test_mse_is_not_converted():
    # nn.MSELoss on K outputs is (1/K) ||r||^2 per sample: its GGN is 2/K J^T J
    model, loss_fn, X, y = _problem("mse")
    J = _dense(model, lambda o, t: 0.5 * ((o - t) ** 2).sum(-1).mean(), X, y, "ggn")
    want = torch.linalg.eigvalsh(2 / K * J).flip(0)[:TOP]
    got = _probes(model, loss_fn, X, y, "ggn")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize(
    ("loss_fn", "scale"),
    [(nn.MSELoss(reduction="sum"), 2.0), (HalfSquaredError(), 1.0)],
    ids=["mse-sum", "half-squared"],
)
def test_square_losses_probe_curvature(loss_fn, scale):
    # the probes' L is the mean of the per-sample losses whatever the reduction;
    # the output Hessian of every square loss is scale * I
    model, _, X, y = _problem("mse")
    G = _dense(model, HalfSquaredError(), X, y, "ggn")
    want = torch.linalg.eigvalsh(scale * G).flip(0)[:TOP]
    got = _probes(model, loss_fn, X, y, "ggn")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("cls", [GGNOperator, HessianOperator])
def test_loss_reduction_contradicting_the_loss_is_refused(cls):
    # the batches would be weighted for the other reduction
    model, _, X, y = _problem("mse")
    with pytest.raises(ValueError, match="`loss_reduction`='mean' contradicts"):
        cls(model, nn.MSELoss(reduction="sum"), (X, y), loss_reduction="mean")
    with pytest.raises(ValueError, match="`loss_reduction`='sum' contradicts"):
        cls(model, nn.MSELoss(), (X, y), loss_reduction="sum")
    # agreeing, or for a loss without the attribute, it is taken as given
    cls(model, nn.MSELoss(reduction="sum"), (X, y), loss_reduction="sum")
    cls(model, _log_cosh, (X, y), loss_reduction="sum")
    # another reduction attribute (KLDivLoss's "batchmean", a mean over samples)
    kl = nn.KLDivLoss(reduction="batchmean")
    cls(model, kl, (X, torch.softmax(y, -1)), loss_reduction="mean")
