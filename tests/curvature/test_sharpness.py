"""sharpness() and expected_sharpness() vs dense float64 Hessians."""

import json
import math
import warnings

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

from geoopt_sgd import HessianOperator, expected_sharpness, sharpness, top_eigenpairs
from geoopt_sgd.testing import dense_hessian


def mlp_case():
    model = mlp(d=5, h=8, k=3)
    X, y = make_data(n=20, d=5, k=3)
    return model, nn.CrossEntropyLoss(), (X, y)


def test_sharpness_matches_dense_hessian():
    model, loss_fn, data = mlp_case()
    H = dense_hessian(model, loss_fn, data)
    lam = torch.linalg.eigvalsh(H)
    before = model_state(model)
    rep = sharpness(model, loss_fn, data, k=3, lr=0.1, tol=1e-8, trace_probes=150)
    assert_same_state(before, model_state(model))
    assert rep.converged
    # residual tol 1e-8 bounds the relative eigenvalue error by 1e-8
    torch.testing.assert_close(rep.top_eigenvalues, lam.flip(0)[:3], rtol=1e-8, atol=0)
    assert rep.lambda_max == pytest.approx(float(lam[-1]), rel=1e-8)
    # lambda_min is accurate to tol * |lambda_max| in absolute terms
    assert rep.lambda_min == pytest.approx(float(lam[0]), abs=1e-8 * float(lam[-1]))
    assert rep.stability_ratio == pytest.approx(0.1 * float(lam[-1]) / 2, rel=1e-12)
    # Hutchinson with 150 probes: within 4 standard errors of the exact values
    assert abs(rep.trace - float(H.trace())) < 4 * rep.trace_stderr
    fro = float(H.square().sum().sqrt())
    assert abs(rep.frobenius - fro) < 4 * rep.frobenius_stderr
    assert rep.n_hvp > 150 and rep.seconds > 0
    assert rep.eigenvectors.shape == (H.shape[0], 3)
    d = rep.as_dict()
    json.dumps(d)
    assert (
        "eigenvectors" not in d and d["top_eigenvalues"] == rep.top_eigenvalues.tolist()
    )


def test_sharpness_indefinite_hessian_lambda_min_negative():
    # far from a minimum the MLP Hessian is indefinite; lambda_max stays the
    # largest algebraic eigenvalue
    model = mlp(d=5, h=8, k=2, seed=3)
    X, y = make_data(n=16, d=5, k=2, classification=False, seed=3)
    loss_fn = nn.MSELoss()
    lam = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, (X, y)))
    assert lam[0] < 0
    rep = sharpness(model, loss_fn, (X, y), k=2, tol=1e-8, trace_probes=0)
    assert rep.trace is None and rep.frobenius is None and rep.stability_ratio is None
    assert rep.lambda_max == pytest.approx(float(lam[-1]), rel=1e-8)
    assert rep.lambda_min == pytest.approx(float(lam[0]), abs=1e-8 * float(lam[-1]))


def test_sharpness_batchnorm_list_of_batches_and_warm_start():
    model = tiny_cnn()
    X, y = image_data(n=10)
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    loss_fn = nn.CrossEntropyLoss()
    lam = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, data))
    before = model_state(model)
    rep = sharpness(model, loss_fn, data, k=2, tol=1e-6, trace_probes=2)
    assert_same_state(before, model_state(model))
    torch.testing.assert_close(rep.top_eigenvalues, lam.flip(0)[:2], rtol=1e-6, atol=0)
    warm = sharpness(
        model, loss_fn, data, k=2, tol=1e-6, trace_probes=0, v0=rep.eigenvectors
    )
    torch.testing.assert_close(
        warm.top_eigenvalues, rep.top_eigenvalues, rtol=1e-6, atol=0
    )


def test_sharpness_report_is_a_block_warm_start():
    # the same Hessian twice: the report (top-k, lambda_min and guard vectors)
    # as v0 opens the block start and costs fewer products than the summed
    # eigenvectors or a cold solve, with the same values as the dense Hessian
    model, loss_fn, data = mlp_case()
    lam = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, data).double())
    rep = sharpness(model, loss_fn, data, k=4, tol=1e-6, trace_probes=0)
    V = rep.warm_start()
    assert V.shape == (rep.eigenvectors.shape[0], 4 + rep.next_eigenvectors.shape[1])
    assert rep.next_eigenvectors.shape[1] >= 2  # lambda_min's vector and a guard
    eye = torch.eye(V.shape[1], dtype=V.dtype)
    torch.testing.assert_close(V.T @ V, eye, atol=1e-5, rtol=0)
    warm = sharpness(model, loss_fn, data, k=4, tol=1e-6, trace_probes=0, v0=rep)
    summed = sharpness(
        model, loss_fn, data, k=4, tol=1e-6, trace_probes=0, v0=rep.eigenvectors
    )
    for r in (warm, summed):
        assert r.converged
        torch.testing.assert_close(
            r.top_eigenvalues, lam.flip(0)[:4], rtol=1e-5, atol=1e-7
        )
        assert r.lambda_min == pytest.approx(float(lam[0]), rel=1e-4, abs=1e-6)
    assert warm.n_hvp < summed.n_hvp and warm.n_hvp < rep.n_hvp
    assert warm.n_hvp <= V.shape[1] + 3
    # a top_eigenpairs result is a warm start too (eigenvectors and guards)
    top = top_eigenpairs(HessianOperator(model, loss_fn, data), 4, tol=1e-6)
    again = sharpness(model, loss_fn, data, k=4, tol=1e-6, trace_probes=0, v0=top)
    assert again.converged and again.n_hvp < summed.n_hvp
    torch.testing.assert_close(
        again.top_eigenvalues, lam.flip(0)[:4], rtol=1e-5, atol=1e-7
    )


def test_sharpness_verify_runs_the_skip_check():
    # verify=True: the same values as the dense Hessian, the check's products
    # on top of the unchecked solve, and the flag in the report and its dict
    model, loss_fn, data = mlp_case()
    lam = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, data).double())
    plain = sharpness(model, loss_fn, data, k=4, tol=1e-6, trace_probes=0)
    checked = sharpness(
        model, loss_fn, data, k=4, tol=1e-6, trace_probes=0, verify=True
    )
    assert not plain.verified and checked.verified and checked.converged
    assert checked.as_dict()["verified"] is True
    # the check's products, fewer than a check started at convergence adds
    assert plain.n_hvp < checked.n_hvp < plain.n_hvp + 10
    torch.testing.assert_close(
        checked.top_eigenvalues, lam.flip(0)[:4], rtol=1e-5, atol=1e-7
    )
    with pytest.raises(TypeError, match="verify"):
        sharpness(model, loss_fn, data, verify=1)


def test_sharpness_tiny_model_dense_path():
    # P = 3 parameters, k + 1 >= P: exact dense eigh
    model = linear(d=2, k=1)
    X, y = make_data(n=8, d=2, k=1, classification=False)
    lam = torch.linalg.eigvalsh(dense_hessian(model, nn.MSELoss(), (X, y)))
    rep = sharpness(model, nn.MSELoss(), (X, y), k=2, trace_probes=0)
    torch.testing.assert_close(rep.top_eigenvalues, lam.flip(0)[:2], rtol=1e-12, atol=0)
    assert rep.lambda_min == pytest.approx(float(lam[0]), rel=1e-10)
    assert rep.n_hvp == 3


def test_sharpness_budget_warning():
    model, loss_fn, data = mlp_case()
    with pytest.warns(RuntimeWarning, match="did not reach tol=1e-12"):
        rep = sharpness(
            model, loss_fn, data, k=3, tol=1e-12, trace_probes=0, max_matvecs=4
        )
    assert not rep.converged


def test_hessian_operator_eigenpairs_vs_eigh():
    model, loss_fn, data = mlp_case()
    H = dense_hessian(model, loss_fn, data)
    lam, U = torch.linalg.eigh(H)
    res = top_eigenpairs(HessianOperator(model, loss_fn, data), 4, tol=1e-9)
    torch.testing.assert_close(res.eigenvalues, lam.flip(0)[:4], rtol=1e-9, atol=0)
    # vectors up to sign; gaps >= ~1e-2 * lambda_max make them well determined
    overlap = (res.eigenvectors.T @ U.flip(1)[:, :4]).diagonal().abs()
    assert torch.all((overlap - 1).abs() < 1e-6)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"k": 0}, ValueError, r"`k` must be >= 1; got 0"),
        ({"k": 10_000}, ValueError, r"`k` must be <= P = \d+ .*; got 10000"),
        ({"lr": 0.0}, ValueError, r"`lr` must be > 0; got 0.0"),
        ({"tol": -1.0}, ValueError, r"`tol` must be > 0; got -1.0"),
        ({"trace_probes": -1}, ValueError, r"`trace_probes` must be >= 0; got -1"),
        ({"seed": -1}, ValueError, r"`seed` must be >= 0; got -1"),
        ({"max_matvecs": 0}, ValueError, r"`max_matvecs` must be >= 1; got 0"),
        (
            {"v0": torch.ones(3)},
            ValueError,
            r"`v0`: expected shape \(\d+,\) or \(\d+, m\)",
        ),
        ({"v0": "warm"}, TypeError, r"`v0` must be a torch.Tensor; got str"),
        ({"method": "magic"}, ValueError, r"`method` must be one of"),
    ],
)
def test_sharpness_invalid_arguments(kwargs, err, match):
    model, loss_fn, data = mlp_case()
    with pytest.raises(err, match=match):
        sharpness(model, loss_fn, data, **kwargs)


# --- expected sharpness ------------------------------------------------------


def test_expected_sharpness_exact_for_quadratic_loss():
    # linear model + MSE: L is quadratic, so each antithetic sample is exactly
    # nu^T H nu / 2 and E = sigma^2 / 2 tr H
    model = linear(d=4, k=2)
    X, y = make_data(n=30, d=4, k=2, classification=False)
    loss_fn = nn.MSELoss()
    H = dense_hessian(model, loss_fn, (X, y))
    sigma = 0.1
    before = model_state(model)
    est = expected_sharpness(model, loss_fn, (X, y), sigma=sigma, num_samples=800)
    assert_same_state(before, model_state(model))
    exact = sigma**2 / 2 * float(H.trace())
    # Var(nu^T H nu / 2) = sigma^4 ||H||_F^2 / 2 for Gaussian nu
    exact_se = sigma**2 * math.sqrt(float(H.square().sum()) / 2 / 800)
    assert est.stderr == pytest.approx(exact_se, rel=0.15)
    assert abs(est.value - exact) < 4 * exact_se
    assert est.num_probes == 800 and est.n_matvec == 0


def test_expected_sharpness_second_order_on_mlp():
    model, loss_fn, data = mlp_case()
    H = dense_hessian(model, loss_fn, data)
    sigma = 0.01
    est = expected_sharpness(model, loss_fn, data, sigma=sigma, num_samples=200, seed=1)
    # Z19: S ~ sigma^2/2 tr H; the O(sigma^4) remainder is ~1e-4 relative here
    exact = sigma**2 / 2 * float(H.trace())
    assert abs(est.value - exact) < 4 * est.stderr + 1e-3 * abs(exact)
    # absolute form is never below the signed one
    ab = expected_sharpness(
        model, loss_fn, data, sigma=sigma, num_samples=50, absolute=True
    )
    signed = expected_sharpness(model, loss_fn, data, sigma=sigma, num_samples=50)
    assert ab.value >= signed.value and ab.value > 0
    one_sided = expected_sharpness(
        model, loss_fn, data, sigma=sigma, num_samples=50, antithetic=False
    )
    # without antithetic pairs the first-order term adds variance
    assert one_sided.stderr > signed.stderr


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_expected_sharpness_second_order_needs_a_smooth_loss(act):
    # the docstring's sigma^2/2 tr H holds for a twice-differentiable loss; with
    # ReLU the perturbations cross kinks, a term of the same order sigma^2 that the
    # dense Hessian (zero across a kink) misses
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), act(), nn.Linear(16, 3)).double()
    X, y = make_data(n=64, d=5, k=3)
    data = (X.double(), y)
    loss_fn = nn.CrossEntropyLoss()
    sigma = 1e-3
    exact = sigma**2 / 2 * float(dense_hessian(model, loss_fn, data).trace())
    est = expected_sharpness(model, loss_fn, data, sigma=sigma, num_samples=200, seed=0)
    if act is nn.Tanh:
        assert abs(est.value - exact) < 4 * est.stderr
    else:  # measured: 2.16 times exact, standard error 0.11 times exact
        assert abs(est.value - exact) > 6 * est.stderr


def test_expected_sharpness_seeded_and_rng_untouched():
    model, loss_fn, data = mlp_case()
    state = torch.get_rng_state()
    a = expected_sharpness(model, loss_fn, data, num_samples=5)
    b = expected_sharpness(model, loss_fn, data, num_samples=5)
    c = expected_sharpness(model, loss_fn, data, num_samples=5, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b and a.value != c.value


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_expected_sharpness_skips_an_empty_batch(reduction):
    # an empty batch's mean loss is NaN: it made the estimate NaN, where the
    # operators and noise_geometry skip it (audit)
    model, _, (X, y) = mlp_case()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    ref = expected_sharpness(model, loss_fn, [(X[:7], y[:7]), (X[7:], y[7:])])
    got = expected_sharpness(
        model, loss_fn, [(X[:7], y[:7]), (X[:0], y[:0]), (X[7:], y[7:])]
    )
    assert math.isfinite(got.value)
    assert got.value == pytest.approx(ref.value, rel=1e-12)


def test_expected_sharpness_sum_reduction_and_params_subset():
    model = linear(d=4, k=1)
    X, y = make_data(n=10, d=4, k=1, classification=False)
    loss_fn = nn.MSELoss(reduction="sum")
    H = dense_hessian(model, loss_fn, (X, y), params=[model.weight])
    est = expected_sharpness(
        model,
        loss_fn,
        [(X[:7], y[:7]), (X[7:], y[7:])],
        sigma=0.1,
        num_samples=400,
        params=[model.weight],
    )
    exact = 0.01 / 2 * float(H.trace())
    assert abs(est.value - exact) < 4 * est.stderr


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"sigma": 0.0}, ValueError, r"`sigma` must be > 0; got 0.0"),
        ({"sigma": "big"}, TypeError, r"`sigma` must be a real number; got str"),
        ({"num_samples": 0}, ValueError, r"`num_samples` must be >= 1; got 0"),
        ({"seed": -5}, ValueError, r"`seed` must be >= 0; got -5"),
        (
            {"mode": "test"},
            ValueError,
            r"`mode` must be one of 'eval', 'train'; got 'test'",
        ),
    ],
)
def test_expected_sharpness_invalid(kwargs, err, match):
    model, loss_fn, data = mlp_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(err, match=match):
            expected_sharpness(model, loss_fn, data, **kwargs)


# --- autocast: curvature computes in the parameters' dtype (#13) --------------------
def _conv_problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 4 * 4, 3),
    )
    X = torch.randn(8, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, torch.nn.CrossEntropyLoss(), (X, y)


def test_sharpness_under_autocast_is_bitwise_the_same():
    from geoopt_sgd import sharpness

    model, loss_fn, data = _conv_problem()
    ref = sharpness(model, loss_fn, data, k=2, trace_probes=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sharpness(model, loss_fn, data, k=2, trace_probes=3)
    assert torch.equal(got.top_eigenvalues, ref.top_eigenvalues)
    assert got.lambda_min == ref.lambda_min and got.trace == ref.trace
    assert torch.equal(got.eigenvectors, ref.eigenvectors)
    assert got.eigenvectors.dtype == torch.float32


def test_operators_and_eigensolver_under_autocast_are_bitwise_the_same():
    from geoopt_sgd import GGNOperator, HessianOperator, top_eigenpairs

    model, loss_fn, data = _conv_problem()
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))
    for Op in (HessianOperator, GGNOperator):
        op = Op(model, loss_fn, data)
        ref, ref_eig = op.matvec(v), top_eigenpairs(op, 2, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, got_eig = op.matvec(v), top_eigenpairs(op, 2, seed=0)
        assert got.dtype == torch.float32 and torch.equal(got, ref)
        assert torch.equal(got_eig.eigenvalues, ref_eig.eigenvalues)
        assert torch.equal(got_eig.eigenvectors, ref_eig.eigenvectors)


def test_operator_loss_and_gradient_under_autocast_are_bitwise_the_same():
    # loss() and gradient() are no products: the mode policy itself turns
    # autocast off around the model's evaluation
    from geoopt_sgd import GGNOperator, HessianOperator

    model, loss_fn, data = _conv_problem()
    for Op in (HessianOperator, GGNOperator):
        op = Op(model, loss_fn, data)
        ref_loss, ref_grad = op.loss(), op.gradient()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_loss, got_grad = op.loss(), op.gradient()
        assert got_loss == ref_loss
        assert got_grad.dtype == torch.float32 and torch.equal(got_grad, ref_grad)


def test_sharpness_trace_and_frobenius_are_the_formulas_on_their_probes():
    # the seeded Rademacher probes replayed through the dense Hessian: the mean of
    # z^T H z and its standard error (sd with n - 1); ||H||_F = sqrt(mean ||H z||^2)
    # with the delta-method error se(f) / (2 sqrt(f))
    model, loss_fn, data = mlp_case()
    H = dense_hessian(model, loss_fn, data)
    P, n, seed = H.shape[0], 13, 2
    rep = sharpness(model, loss_fn, data, k=1, trace_probes=n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    Z = (2 * torch.randint(0, 2, (n, P), generator=g) - 1).double().T
    HZ = H @ Z
    t, f = (Z * HZ).sum(0), HZ.square().sum(0)
    fro = math.sqrt(float(f.mean()))
    assert rep.trace == pytest.approx(float(t.mean()), rel=1e-10)
    assert rep.trace_stderr == pytest.approx(float(t.std()) / math.sqrt(n), rel=1e-10)
    assert rep.frobenius == pytest.approx(fro, rel=1e-10)
    se_f = float(f.std()) / math.sqrt(n)
    assert rep.frobenius_stderr == pytest.approx(se_f / (2 * fro), rel=1e-10)


@pytest.mark.parametrize("absolute", [False, True])
def test_expected_sharpness_one_sided_is_the_mean_loss_change(absolute):
    # antithetic=False: each sample is L(theta + nu) - L(theta) (its absolute
    # value with absolute=True), nu drawn per parameter from the seeded generator
    # (float32 normals times sigma); replayed here with the model's own forward
    model, loss_fn, data = mlp_case()
    X, y = data
    sigma, n, seed = 0.05, 6, 3
    est = expected_sharpness(
        model,
        loss_fn,
        data,
        sigma=sigma,
        num_samples=n,
        seed=seed,
        antithetic=False,
        absolute=absolute,
    )
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        base = float(loss_fn(model(X), y))
        diffs = []
        for _ in range(n):
            moved = {
                k: p + sigma * torch.randn(p.shape, generator=g).to(p.dtype)
                for k, p in params.items()
            }
            d = float(loss_fn(torch.func.functional_call(model, moved, (X,)), y)) - base
            diffs.append(abs(d) if absolute else d)
    d = torch.tensor(diffs, dtype=torch.float64)
    assert est.value == pytest.approx(float(d.mean()), rel=1e-10)
    assert est.stderr == pytest.approx(float(d.std()) / math.sqrt(n), rel=1e-8)


def test_sharpness_dense_path_eigenvectors_are_the_top_ones():
    # k + 1 >= P takes the dense eigh: the top-k eigenvectors (up to sign) in
    # the order of the values, no guard vectors
    model = linear(d=2, k=1)
    X, y = make_data(n=8, d=2, k=1, classification=False)
    H = dense_hessian(model, nn.MSELoss(), (X, y)).double()
    _, U = torch.linalg.eigh(H)
    rep = sharpness(model, nn.MSELoss(), (X, y), k=2, trace_probes=0)
    overlap = (rep.eigenvectors.double().T @ U.flip(1)[:, :2]).diagonal().abs()
    torch.testing.assert_close(
        overlap, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert rep.next_eigenvectors is None and rep.verified and rep.converged


def test_sharpness_lambda_min_converges_in_absolute_terms():
    # lambda_min = 1e-6 lambda_max on an explicit quadratic (H = 2 X^T X / n):
    # lambda_min needs only tol * lambda_max in absolute terms (as documented),
    # which took 11 products here; relative to |lambda_min| it took 20
    P, n = 60, 200
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [
            torch.tensor([4.0, 3.0, 2.5], dtype=torch.float64),
            0.5 + torch.rand(P - 4, generator=g, dtype=torch.float64),
            torch.tensor([4e-6], dtype=torch.float64),
        ]
    )
    U, _ = torch.linalg.qr(torch.randn(n, P, generator=g, dtype=torch.float64))
    X = math.sqrt(n / 2) * (U * lam.sqrt()) @ Q.T
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(P, 1, bias=False).double()
    ref = torch.linalg.eigvalsh(dense_hessian(model, nn.MSELoss(), (X, y)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = sharpness(
            model, nn.MSELoss(), (X, y), k=2, trace_probes=0, max_matvecs=15
        )
    assert rep.converged and rep.n_hvp <= 15
    torch.testing.assert_close(rep.top_eigenvalues, ref.flip(0)[:2], rtol=1e-3, atol=0)
    assert abs(rep.lambda_min - float(ref[0])) <= 1e-3 * float(ref[-1])


@pytest.mark.parametrize("k, budget", [(1, 1), (3, 2), (3, 3)])
def test_sharpness_budget_below_k_plus_one_is_refused(k, budget):
    # the k top eigenvalues and lambda_min are k + 1 Ritz values: a budget of at
    # most k products cannot give them (it raised an IndexError, mutation audit)
    model, loss_fn, data = mlp_case()
    with pytest.raises(ValueError, match="max_matvecs"):
        sharpness(model, loss_fn, data, k=k, max_matvecs=budget, trace_probes=0)
    # k + 1 products give k + 1 values (unconverged, with a warning)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        rep = sharpness(model, loss_fn, data, k=k, max_matvecs=k + 1, trace_probes=0)
    assert rep.top_eigenvalues.shape == (k,) and rep.n_hvp == k + 1
    assert rep.lambda_min <= float(rep.top_eigenvalues[-1])
