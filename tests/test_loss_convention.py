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


# --- losses whose "mean" is not the mean over samples ---------------------------
_W = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)


def _refusers(loss_fn, X, y):
    # every per-sample tool, as a user calls it (NoisyGD: its first step)
    from geoopt_sgd import NoiseProbe, per_sample_gradients

    model = _problem("ce")[0]

    def noisy_gd_step():
        opt = NoisyGD(
            model.parameters(), lr=0.1, noise="sgd_matched", batch_size=2,
            model=model, loss_fn=loss_fn, data=(X, y),
        )  # fmt: skip
        loss_fn(model(X), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step()
        finally:
            for a, b in zip(before, model.parameters(), strict=True):
                assert torch.equal(a, b)  # nothing changed

    return {
        "noise_geometry": lambda: noise_geometry(model, loss_fn, (X, y), k=2),
        "per_sample_gradients": lambda: per_sample_gradients(model, loss_fn, X, y),
        "NoiseProbe": lambda: NoiseProbe(model, loss_fn, (X, y), k=2),
        "NoisyGD": noisy_gd_step,
    }


@pytest.mark.parametrize(
    "tool", ["noise_geometry", "per_sample_gradients", "NoiseProbe", "NoisyGD"]
)
@pytest.mark.parametrize("cls", [nn.CrossEntropyLoss, nn.NLLLoss])
def test_weighted_or_ignoring_mean_loss_is_refused(cls, tool):
    # CE/NLL with reduction="mean" divide by the batch's summed class weights:
    # on one sample a class weight cancels (L_i unweighted) and an ignored
    # target gives 0/0, so the per-sample tools would measure another loss
    # than the user's (or NaN): a clear error where the loss enters (audit)
    _, _, X, y = _problem("ce")
    with pytest.raises(ValueError, match="divides by the batch's summed class"):
        _refusers(cls(weight=_W), X, y)[tool]()
    y_ign = y.clone()
    y_ign[3] = -100
    with pytest.raises(ValueError, match=r"ignore_index=-100, and the data holds 1"):
        _refusers(cls(), X, y_ign)[tool]()


def test_weighted_losses_that_decompose_are_measured_weighted():
    # reduction="sum" (every sample carries its weight), and probability
    # targets (averaged over samples) pass; their per-sample losses are the
    # weighted ones, so their mean (sum) is the loss itself
    from geoopt_sgd._losses import per_sample_losses

    model, _, X, y = _problem("ce")
    out = model(X).detach()
    soft = torch.softmax(torch.randn(10, K, dtype=torch.float64), -1)
    keep = (y != 1).double()
    # the weighted per-sample losses written out: w_{y_i} (-log softmax)_{y_i},
    # sum_c w_c p_ic (-log softmax)_c, and 0 for an ignored target
    cases = [
        (
            nn.CrossEntropyLoss(weight=_W, reduction="sum"), y,
            lambda o: -_W[y] * torch.log_softmax(o, -1)[torch.arange(10), y],
        ),
        (
            nn.CrossEntropyLoss(weight=_W), soft,
            lambda o: -(_W * soft * torch.log_softmax(o, -1)).sum(-1),
        ),
        (
            nn.CrossEntropyLoss(ignore_index=1, reduction="sum"), y,
            lambda o: -keep * torch.log_softmax(o, -1)[torch.arange(10), y],
        ),
    ]  # fmt: skip
    for loss_fn, targets, by_hand in cases:
        losses = per_sample_losses(loss_fn, out, targets)
        torch.testing.assert_close(losses, by_hand(out), rtol=1e-12, atol=1e-14)
        reduce = torch.sum if loss_fn.reduction == "sum" else torch.mean
        assert float(reduce(losses)) == pytest.approx(
            float(loss_fn(out, targets)), rel=1e-12
        )
        res = noise_geometry(
            model, loss_fn, (X, targets), k=2, route="exact", metrics=["tr_sigma"]
        )
        G = torch.stack(
            [
                torch.cat(
                    [
                        g.reshape(-1)
                        for g in torch.autograd.grad(
                            by_hand(model(X))[i], list(model.parameters())
                        )
                    ]
                )
                for i in range(10)
            ]
        )
        tr_sigma = float((G - G.mean(0)).square().sum(1).mean())
        assert res.values["tr_sigma"] == pytest.approx(tr_sigma, rel=1e-9)
    # with reduction="sum" the ignored samples' rows are zero (not NaN)
    ce = nn.CrossEntropyLoss(weight=_W, ignore_index=1, reduction="sum")
    assert torch.isfinite(per_sample_losses(ce, out, y)).all()


@pytest.mark.parametrize(
    "case", ["weighted_soft", "unnormalised_soft", "weighted_sum", "smoothing"]
)
def test_probe_curvature_of_weighted_and_soft_target_ce(case):
    # the probes' output curvature of a CE that is not the plain softmax case
    # (class weights, probability targets whose weights do not sum to 1) is
    # that loss's, not diag(p) - p p^T: the GGN's top eigenvalues against the
    # dense GGN of the mean of the per-sample losses (audit)
    model, _, X, y = _problem("ce")
    g = torch.Generator().manual_seed(1)
    soft = torch.softmax(torch.randn(10, K, generator=g, dtype=torch.float64), -1)
    loss_fn, targets = {
        "weighted_soft": (nn.CrossEntropyLoss(weight=_W), soft),
        "unnormalised_soft": (nn.CrossEntropyLoss(), 3.0 * soft),
        "weighted_sum": (nn.CrossEntropyLoss(weight=_W, reduction="sum"), y),
        "smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), y),
    }[case]
    # the per-sample tools report per-sample averages for either reduction
    scale = 1.0 / len(y) if loss_fn.reduction == "sum" else 1.0
    want = torch.linalg.eigvalsh(_dense(model, loss_fn, X, targets, "ggn"))
    got = _probes(model, loss_fn, X, targets, "ggn")
    torch.testing.assert_close(got, scale * want.flip(0)[:TOP], rtol=1e-6, atol=0.0)


def test_noise_probe_refuses_a_later_loader_batch_of_ignored_targets():
    # a loader's first batch is checked when the probe is built, the others at
    # a probe; a batch whose targets are all ignore_index has a NaN loss, and
    # the refusal must not be recorded as a NaN (diverged) probe (review)
    from geoopt_sgd import NoiseProbe

    model, _, X, y = _problem("ce")
    y = y.clone()
    y[8:] = -100  # the last batch, ignored entirely
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=4
    )
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), loader, k=2)
    with pytest.raises(ValueError, match=r"ignore_index=-100, and the data holds 2"):
        probe.measure()
