"""Trace, diagonal, Frobenius and spectral-density estimators vs exact values."""

import math
import warnings

import pytest
import torch

from geoopt_sgd import (
    DenseOperator,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    squared_frobenius,
)


def sym(lams, seed=0):
    lams = torch.as_tensor(lams, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(
        torch.randn(len(lams), len(lams), generator=g, dtype=torch.float64)
    )
    return (Q * lams) @ Q.T


def spectrum(P=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            torch.linspace(20, 5, 5, dtype=torch.float64),
            torch.rand(P - 5, generator=g, dtype=torch.float64) * 2 - 0.5,
        ]
    )


# --- exact cases: Rademacher probes make these estimators exact ---------------


def test_trace_exact_for_diagonal():
    # z_i^2 = 1, so z^T D z = tr D for every probe: zero variance
    D = DenseOperator(
        torch.diag(torch.tensor([1.0, -2.0, 3.5, 4.0], dtype=torch.float64))
    )
    est = hutchinson_trace(D, num_probes=5)
    assert est.value == 6.5 and est.stderr == 0.0
    assert est.n_matvec == 5 and est.num_probes == 5


def test_diagonal_exact_for_diagonal():
    d = torch.tensor([1.0, -2.0, 3.5, 4.0], dtype=torch.float64)
    est = hutchinson_diagonal(DenseOperator(torch.diag(d)), num_probes=3)
    assert torch.equal(est.value, d) and torch.equal(
        est.stderr, torch.zeros(4, dtype=torch.float64)
    )


def test_frobenius_exact_for_scaled_orthogonal():
    # A = 3 Q diag(+-1) Q^T: ||A z||^2 = 9 ||z||^2 = 9 P for Rademacher z
    P = 30
    A = 3 * sym([1.0, -1.0] * (P // 2))
    est = squared_frobenius(DenseOperator(A), num_probes=4)
    assert est.value == pytest.approx(9 * P, rel=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-9)


def test_hutchpp_exact_for_low_rank():
    # rank 4 <= sketch size 10: Q spans range(A), the deflated remainder is 0
    A = sym([7.0, 3.0, -2.0, 1.0] + [0.0] * 46)
    est = hutchpp_trace(DenseOperator(A), num_matvecs=30)
    assert est.value == pytest.approx(9.0, abs=1e-10)
    assert est.n_matvec == 30


# --- statistical: seeded, within a budget, tolerance from the known variance ---


def test_hutchinson_trace_converges_with_correct_stderr():
    A = sym(spectrum())
    est = hutchinson_trace(DenseOperator(A), num_probes=2000, chunk_size=100)
    # Var(z^T A z) = 2 sum_{i != j} A_ij^2 for Rademacher z
    var = 2 * (A.square().sum() - A.diagonal().square().sum())
    exact_se = math.sqrt(var / 2000)
    assert est.stderr == pytest.approx(exact_se, rel=0.1)  # sample sd of 2000 draws
    assert abs(est.value - float(A.trace())) < 4 * exact_se


def test_rtol_stops_early_and_max_matvecs_caps():
    A = DenseOperator(sym(spectrum()))
    est = hutchinson_trace(A, num_probes=5000, rtol=0.05)
    assert est.n_matvec < 5000 and est.stderr <= 0.05 * abs(est.value)
    capped = hutchinson_trace(A, num_probes=5000, max_matvecs=37)
    assert capped.n_matvec == 37 and capped.num_probes == 37
    assert A.n_matvec == est.n_matvec + 37


def test_rtol_waits_for_min_num_probes_and_ten():
    # zero variance (diagonal A): the stderr test passes from the second probe,
    # but the stop waits for min(num_probes, 10) probes
    d = torch.tensor([1.0, -2.0, 3.5, 4.0], dtype=torch.float64)
    A = DenseOperator(torch.diag(d))
    kw = {"rtol": 0.5, "chunk_size": 1}
    for est in (
        hutchinson_trace(A, num_probes=100, **kw),
        hutchinson_diagonal(A, num_probes=100, **kw),
        squared_frobenius(A, num_probes=100, **kw),
    ):
        assert est.num_probes == 10 and est.n_matvec == 10
    assert hutchinson_trace(A, num_probes=4, **kw).num_probes == 4


def test_chunk_size_does_not_change_probes():
    A = DenseOperator(sym(spectrum()))
    a = hutchinson_trace(A, num_probes=23, chunk_size=5, seed=3)
    b = hutchinson_trace(A, num_probes=23, chunk_size=23, seed=3)
    assert a.value == pytest.approx(b.value, rel=1e-13)
    c = hutchinson_trace(A, num_probes=23, seed=4)
    assert c.value != a.value


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    A = DenseOperator(sym(spectrum()))
    exact = float(spectrum().sum())
    hpp = hutchpp_trace(A, num_matvecs=45)
    # the top 5 outliers are deflated; what remains has small variance
    assert abs(hpp.value - exact) < 4 * hpp.stderr
    assert hpp.stderr < hutchinson_trace(A, num_probes=45).stderr


def test_squared_frobenius_converges():
    lams = spectrum()
    est = squared_frobenius(DenseOperator(sym(lams)), num_probes=1000)
    assert abs(est.value - float(lams.square().sum())) < 4 * est.stderr
    assert est.stderr < 0.05 * est.value


def test_hutchinson_diagonal_converges():
    A = sym(spectrum())
    est = hutchinson_diagonal(DenseOperator(A), num_probes=400, chunk_size=50)
    assert est.value.shape == (60,) and est.value.dtype == torch.float64
    # 60 entries, each within 5 standard errors (seeded; a 5-sigma excursion has
    # probability ~6e-7 per entry)
    assert torch.all((est.value - A.diagonal()).abs() < 5 * est.stderr)
    early = hutchinson_diagonal(DenseOperator(A), num_probes=10000, rtol=0.2)
    assert early.n_matvec < 10000
    assert early.stderr.norm() <= 0.2 * early.value.norm()


def test_float32_operator_accumulates_in_float64():
    A = sym(spectrum())
    a = hutchinson_trace(DenseOperator(A.float()), num_probes=50)
    b = hutchinson_trace(DenseOperator(A), num_probes=50)
    # same probes; float32 matrix rounding only (~1e-7 relative)
    assert a.value == pytest.approx(b.value, rel=1e-5)


# --- spectral density --------------------------------------------------------


def test_density_integrates_to_one_and_matches_histogram():
    # two clusters: 40 eigenvalues near 1, 20 near 6
    g = torch.Generator().manual_seed(2)
    lams = torch.cat(
        [
            1 + 0.2 * torch.rand(40, generator=g, dtype=torch.float64),
            6 + 0.2 * torch.rand(20, generator=g, dtype=torch.float64),
        ]
    )
    sd = spectral_density(
        DenseOperator(sym(lams)), num_probes=20, num_steps=60, sigma=0.1
    )
    dx = float(sd.grid[1] - sd.grid[0])
    assert float(sd.density.sum()) * dx == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(sd.weights.sum(1), torch.ones(20, dtype=torch.float64))
    low = float(sd.density[sd.grid < 3.5].sum()) * dx
    # exact mass 2/3; the probes' weights (v^T u_j)^2 have relative sd ~sqrt(2/P)
    # per eigenvalue, averaged over 40 eigenvalues and 20 probes
    assert low == pytest.approx(2 / 3, abs=0.03)
    # with num_steps = P the quadrature nodes are the eigenvalues themselves
    nodes = sd.nodes[0][sd.weights[0] > 1e-10]
    assert torch.allclose(nodes.sort().values, lams.sort().values, atol=1e-8)
    assert sd.n_matvec == 20 * 60


def test_density_fewer_steps_and_explicit_grid():
    A = DenseOperator(sym(spectrum()))
    grid = torch.linspace(-5, 25, 301, dtype=torch.float64)
    sd = spectral_density(A, num_probes=4, num_steps=12, grid=grid, chunk_size=3)
    assert torch.equal(sd.grid, grid) and sd.nodes.shape == (4, 12)
    # the extreme node converges to lambda_max fast (outlier with a large gap)
    assert float(sd.nodes.max()) == pytest.approx(20.0, rel=1e-6)
    dx = 0.1
    assert float(sd.density.sum()) * dx == pytest.approx(1.0, abs=1e-2)


def test_density_zero_operator():
    sd = spectral_density(
        DenseOperator(torch.zeros(10, 10, dtype=torch.float64)), num_probes=2
    )
    assert sd.sigma == 1.0 and torch.all(torch.isfinite(sd.density))


def test_global_rng_untouched():
    A = DenseOperator(sym(spectrum()))
    state = torch.get_rng_state()
    hutchinson_trace(A, num_probes=5)
    hutchpp_trace(A, num_matvecs=9)
    hutchinson_diagonal(A, num_probes=5)
    squared_frobenius(A, num_probes=5)
    spectral_density(A, num_probes=2, num_steps=5)
    assert torch.equal(torch.get_rng_state(), state)


# --- errors -------------------------------------------------------------------

SCALAR = [hutchinson_trace, squared_frobenius, hutchinson_diagonal]


@pytest.mark.parametrize("fn", SCALAR, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"num_probes": 0}, ValueError, r"`num_probes` must be >= 1; got 0"),
        ({"num_probes": 2.0}, TypeError, r"`num_probes` must be an integer; got float"),
        ({"seed": -3}, ValueError, r"`seed` must be >= 0; got -3"),
        ({"rtol": 0.0}, ValueError, r"`rtol` must be > 0; got 0.0"),
        ({"max_matvecs": 0}, ValueError, r"`max_matvecs` must be >= 1; got 0"),
        ({"chunk_size": 0}, ValueError, r"`chunk_size` must be >= 1; got 0"),
    ],
    ids=lambda x: ",".join(x) if isinstance(x, dict) else str(x),
)
def test_invalid_arguments(fn, kwargs, err, match):
    with pytest.raises(err, match=match):
        fn(DenseOperator(torch.eye(3)), **kwargs)


@pytest.mark.parametrize(
    "fn", [*SCALAR, hutchpp_trace, spectral_density], ids=lambda f: f.__name__
)
def test_operator_type_checked(fn):
    with pytest.raises(
        TypeError, match="`operator` must be a LinearOperator; got Tensor"
    ):
        fn(torch.eye(3))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"num_matvecs": 2}, ValueError, r"`num_matvecs` must be >= 3; got 2"),
        ({"seed": -1}, ValueError, r"`seed` must be >= 0"),
        ({"chunk_size": 0}, ValueError, r"`chunk_size` must be >= 1"),
    ],
)
def test_hutchpp_invalid(kwargs, err, match):
    with pytest.raises(err, match=match):
        hutchpp_trace(DenseOperator(torch.eye(3)), **kwargs)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"num_probes": 0}, ValueError, r"`num_probes` must be >= 1; got 0"),
        ({"num_steps": 0}, ValueError, r"`num_steps` must be >= 1; got 0"),
        ({"num_points": 1}, ValueError, r"`num_points` must be >= 2; got 1"),
        ({"sigma": -0.1}, ValueError, r"`sigma` must be > 0; got -0.1"),
        ({"seed": -1}, ValueError, r"`seed` must be >= 0"),
        ({"chunk_size": 0}, ValueError, r"`chunk_size` must be >= 1"),
        ({"grid": [0.0, 1.0]}, TypeError, r"`grid` must be a torch.Tensor; got list"),
        (
            {"grid": torch.zeros(2, 2)},
            ValueError,
            r"`grid` must be one-dimensional \(G,\); got shape \(2, 2\)",
        ),
    ],
)
def test_density_invalid(kwargs, err, match):
    with pytest.raises(err, match=match):
        spectral_density(DenseOperator(torch.eye(3)), **kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize(
    "fn",
    [
        lambda A: hutchpp_trace(A, num_matvecs=9),
        lambda A: spectral_density(A, num_probes=2, num_steps=3),
        lambda A: hutchinson_trace(A, num_probes=4),
        lambda A: hutchinson_diagonal(A, num_probes=4),
        lambda A: squared_frobenius(A, num_probes=4),
    ],
    ids=["hutchpp", "density", "hutchinson", "diagonal", "frobenius"],
)
def test_non_finite_operator_is_named_not_blamed_on_an_argument(fn, bad):
    # a NaN/Inf product used to be reported as "`V` must be finite", an
    # argument the caller never passed (audit)
    M = torch.eye(6, dtype=torch.float64)
    M[2, 2] = bad
    with pytest.raises(ValueError, match="operator's output is non-finite"):
        fn(DenseOperator(M))


# --- exact given the probes: the seeded Rademacher draws replayed ------------


def _probes(P, n, seed):
    # the estimators' probes: n x P signs, drawn probe by probe from the seed
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randint(0, 2, (n, P), generator=g) - 1).double().T


def _mean_se(x):
    # sample mean and standard error (sd with n - 1) over the last dimension
    n = x.shape[-1]
    return x.mean(-1), x.std(-1, correction=1) / math.sqrt(n)


@pytest.mark.parametrize("chunk_size", [3, 10])
def test_estimates_and_stderrs_are_the_formulas_on_their_probes(chunk_size):
    P, n, seed = 20, 7, 5
    A = sym(spectrum(P=P), seed=2)
    Z = _probes(P, n, seed)
    AZ = A @ Z
    kw = {"num_probes": n, "seed": seed, "chunk_size": chunk_size}
    for est, samples in (
        (hutchinson_trace(DenseOperator(A), **kw), (Z * AZ).sum(0)),
        (squared_frobenius(DenseOperator(A), **kw), AZ.square().sum(0)),
    ):
        v, se = _mean_se(samples)
        assert est.value == pytest.approx(float(v), rel=1e-12)
        assert est.stderr == pytest.approx(float(se), rel=1e-12)
    dg = hutchinson_diagonal(DenseOperator(A), **kw)
    v, se = _mean_se(Z * AZ)
    torch.testing.assert_close(dg.value, v, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(dg.stderr, se, rtol=1e-10, atol=1e-13)


def test_hutchpp_is_its_formula_on_its_probes():
    # s = (m + 2) // 3 sketch probes S, Q = orth(A S), tr(Q^T A Q) plus the
    # Hutchinson mean of the next m - 2 s probes deflated by Q
    P, m, seed = 20, 13, 3
    A = sym(spectrum(P=P), seed=2)
    s = (m + 2) // 3
    Z = _probes(P, s + m - 2 * s, seed)
    Q, _ = torch.linalg.qr(A @ Z[:, :s])
    G = Z[:, s:] - Q @ (Q.T @ Z[:, s:])
    v, se = _mean_se((G * (A @ G)).sum(0))
    est = hutchpp_trace(DenseOperator(A), num_matvecs=m, seed=seed, chunk_size=2)
    assert est.value == pytest.approx(float(torch.trace(Q.T @ A @ Q) + v), rel=1e-12)
    assert est.stderr == pytest.approx(float(se), rel=1e-10)
    assert est.n_matvec == m and est.num_probes == s + m - 2 * s


def test_hutchpp_exact_when_the_sketch_spans_everything():
    # s = min((m + 2) // 3, P) = P: Q spans R^P, tr(Q^T A Q) = tr A exactly and
    # no Hutchinson part is left: standard error 0
    A = sym([3.0, -1.0, 0.5, 2.0])
    est = hutchpp_trace(DenseOperator(A), num_matvecs=12)
    assert est.value == pytest.approx(4.5, rel=1e-12)
    assert est.stderr == 0.0


def test_density_is_the_gaussian_mixture_of_its_nodes_at_the_default_width():
    # sigma defaults to 1% of the node range; with num_steps = P the nodes are the
    # eigenvalues, so the range is lambda_max - lambda_min. The density is
    # (1/n_v) sum_l sum_i tau_li^2 N(x; theta_li, sigma^2) on the returned nodes
    lams = spectrum(P=30)
    sd = spectral_density(
        DenseOperator(sym(lams)), num_probes=3, num_steps=30, num_points=50
    )
    span = float(lams.max() - lams.min())
    assert sd.sigma == pytest.approx(0.01 * span, rel=1e-8)
    assert float(sd.grid[0]) == pytest.approx(float(lams.min()) - 5 * sd.sigma)
    assert float(sd.grid[-1]) == pytest.approx(float(lams.max()) + 5 * sd.sigma)
    x = sd.grid[:, None, None]
    kern = torch.exp(-((x - sd.nodes) ** 2) / (2 * sd.sigma**2))
    kern = kern / (sd.sigma * math.sqrt(2 * math.pi))
    want = (kern * sd.weights).sum((1, 2)) / 3
    torch.testing.assert_close(sd.density, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad_call", [2, 3], ids=["deflated-part", "hutchinson-part"])
def test_hutchpp_checks_every_product(bad_call):
    # Hutch++ takes three sets of products (the sketch A S, A Q and the
    # deflated Hutchinson probes): a non-finite one in any of them is named,
    # not summed into a NaN estimate (review)
    class Flaky(DenseOperator):
        calls = 0

        def _matmat(self, V):
            type(self).calls += 1
            out = super()._matmat(V)
            return out * math.nan if type(self).calls == bad_call else out

    A = Flaky(torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64)))
    with pytest.raises(ValueError, match="operator's output is non-finite"):
        hutchpp_trace(A, num_matvecs=12, chunk_size=10)


def density_probes(seed, P, num_probes, chunk_size):
    """The unit Rademacher probes of ``spectral_density``, replayed (one row each)."""
    g = torch.Generator().manual_seed(seed)
    rows, done = [], 0
    while done < num_probes:
        c = min(chunk_size, num_probes - done)
        Z = torch.randint(0, 2, (c, P), generator=g)
        rows.append((2 * Z - 1).double() / math.sqrt(P))
        done += c
    return torch.cat(rows)


@pytest.mark.parametrize("num_steps", [1, 4, 7])
def test_density_quadrature_is_gauss_on_its_probes(num_steps):
    # m Lanczos steps from v give the m-point Gauss rule of v's spectral measure:
    # sum_i tau_i^2 theta_i^p = v^T A^p v exactly for p < 2m (probes replayed)
    A = sym(spectrum(P=40))
    sd = spectral_density(
        DenseOperator(A), num_probes=5, num_steps=num_steps, seed=4, chunk_size=2
    )
    V = density_probes(4, 40, 5, 2)
    for p in range(2 * num_steps):
        want = (V * (torch.linalg.matrix_power(A, p) @ V.T).T).sum(1)
        got = (sd.weights * sd.nodes**p).sum(1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * 20.0**p)


def test_density_full_krylov_weights_are_the_squared_overlaps():
    # num_steps = P: the nodes are the eigenvalues and the weights (u_j^T v)^2
    A = sym(spectrum(P=30))
    lam, U = torch.linalg.eigh(A)
    sd = spectral_density(DenseOperator(A), num_probes=3, num_steps=30, seed=2)
    V = density_probes(2, 30, 3, 10)
    for i in range(3):
        order = sd.nodes[i].argsort()
        torch.testing.assert_close(sd.nodes[i][order], lam, rtol=0, atol=1e-10)
        want = (U.T @ V[i]) ** 2
        torch.testing.assert_close(sd.weights[i][order], want, rtol=0, atol=1e-10)


def test_density_exhausted_krylov_space_pads_and_spans_the_live_nodes():
    # three distinct eigenvalues, five times each: every probe's Krylov space has
    # dimension 3, so each row has 3 live nodes (the eigenvalues, weighted by the
    # probe's mass on each eigenspace) and zero-weight padding, which must not
    # widen the default width or grid (node 0.0 is padding, not an eigenvalue)
    A = sym([2.0] * 5 + [3.0] * 5 + [5.0] * 5, seed=3)
    _, U = torch.linalg.eigh(A)
    sd = spectral_density(
        DenseOperator(A), num_probes=2, num_steps=8, num_points=40, seed=1
    )
    V = density_probes(1, 15, 2, 10)
    for i in range(2):
        live = sd.weights[i] > 0
        assert int(live.sum()) == 3
        nodes, order = sd.nodes[i][live].sort()
        torch.testing.assert_close(
            nodes,
            torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64),
            rtol=0,
            atol=1e-10,
        )
        mass = ((U.T @ V[i]) ** 2).reshape(3, 5).sum(1)
        torch.testing.assert_close(sd.weights[i][live][order], mass, rtol=0, atol=1e-10)
    assert sd.sigma == pytest.approx(0.01 * 3.0, rel=1e-8)
    assert float(sd.grid[0]) == pytest.approx(2.0 - 5 * sd.sigma, rel=1e-6)
    assert float(sd.grid[-1]) == pytest.approx(5.0 + 5 * sd.sigma, rel=1e-6)


@pytest.mark.parametrize("c", [3.0, -3.0])
def test_density_of_a_multiple_of_the_identity(c):
    # c I in a rotated basis (round-off in every product): one live node c per
    # probe, the Krylov space ends after one step whatever the sign of c, and the
    # default width is 1% of |c| (the node range is only round-off)
    A = sym([c] * 12, seed=5)
    sd = spectral_density(DenseOperator(A), num_probes=2, num_points=11)
    assert sd.nodes.shape == (2, 12)
    want = torch.full((2,), c, dtype=torch.float64)
    torch.testing.assert_close(sd.nodes[:, 0], want, rtol=1e-13, atol=0)
    assert bool((sd.weights[:, 0] == 1).all() and (sd.weights[:, 1:] == 0).all())
    assert sd.sigma == pytest.approx(0.01 * abs(c), rel=1e-10)
    assert float(sd.grid[0]) == pytest.approx(c - 5 * sd.sigma, rel=1e-6)
    assert sd.n_matvec == 2


# --- mutation audit: stopping rule and standard-error edge cases -------------


def _first_stop(samples, rtol, num_probes):
    # the documented rule on replayed samples, one probe per chunk: the first
    # n >= min(num_probes, 10), n > 1, with stderr_n <= rtol * |mean_n|
    for n in range(2, samples.shape[0] + 1):
        m, se = _mean_se(samples[:n])
        if n >= min(num_probes, 10) and se <= rtol * abs(m):
            return n
    return samples.shape[0]


def test_rtol_stop_uses_the_magnitude_of_a_negative_trace():
    # a negative trace (a Hessian near a saddle or maximum) stops as early as the
    # positive one: the rule is stderr <= rtol * |value|, not rtol * value
    P, num_probes, rtol, seed = 60, 400, 0.05, 2
    A = -sym(spectrum(P=P))
    Z = _probes(P, num_probes, seed)
    want = _first_stop((Z * (A @ Z)).sum(0), rtol, num_probes)
    assert want < num_probes  # the test exercises an early stop
    est = hutchinson_trace(
        DenseOperator(A), num_probes=num_probes, rtol=rtol, seed=seed, chunk_size=1
    )
    assert est.value < 0 and est.num_probes == want and est.n_matvec == want
    pos = hutchinson_trace(
        DenseOperator(-A), num_probes=num_probes, rtol=rtol, seed=seed, chunk_size=1
    )
    assert pos.num_probes == want and pos.value == -est.value


def test_rtol_stops_at_ten_for_an_exact_zero_estimate():
    # zero variance and a zero estimate: stderr 0 <= rtol * 0 holds, so the stop
    # comes after min(num_probes, 10) probes, not after all of them
    D = DenseOperator(torch.diag(torch.tensor([1.0, -1.0, 2.5, -2.5])))
    Zero = DenseOperator(torch.zeros(4, 4, dtype=torch.float64))
    kw = {"num_probes": 100, "rtol": 0.1, "chunk_size": 1}
    for est in (
        hutchinson_trace(D, **kw),
        squared_frobenius(Zero, **kw),
        hutchinson_diagonal(Zero, **kw),
    ):
        assert est.num_probes == 10 and est.n_matvec == 10
        assert float(torch.as_tensor(est.value).abs().max()) == 0.0
        assert float(torch.as_tensor(est.stderr).abs().max()) == 0.0


def test_diagonal_stderr_of_a_zero_variance_entry_is_zero_not_nan():
    # s2 - n * mean^2 of a constant entry rounds to a tiny negative number for
    # values such as 0.1 (checked: n = 3 already); the variance is clamped at 0,
    # so the stderr is ~0 rather than sqrt(negative) = nan, and rtol still stops
    d = torch.tensor([0.1, 0.2, 0.3, 0.7, 1.1, 1 / 3], dtype=torch.float64)
    A = DenseOperator(torch.diag(d))
    for n in (3, 6, 12, 34):
        est = hutchinson_diagonal(A, num_probes=n, chunk_size=1)
        assert torch.all(torch.isfinite(est.stderr)), n
        assert float(est.stderr.max()) < 1e-7
        torch.testing.assert_close(est.value, d, rtol=1e-14, atol=0)
    early = hutchinson_diagonal(A, num_probes=100, rtol=1e-3, chunk_size=1)
    assert early.num_probes == 10


def test_single_probe_has_nan_stderr_and_no_warning():
    # one sample: stderr is nan (documented), computed without a "degrees of
    # freedom <= 0" warning from std
    A = sym(spectrum(P=12))
    z = _probes(12, 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = hutchinson_trace(DenseOperator(A), num_probes=1)
        fr = squared_frobenius(DenseOperator(A), num_probes=1)
        dg = hutchinson_diagonal(DenseOperator(A), num_probes=1)
        hpp = hutchpp_trace(DenseOperator(A), num_matvecs=5)  # s = 2, one probe left
    assert tr.value == pytest.approx(float((z * (A @ z)).sum()), rel=1e-12)
    assert fr.value == pytest.approx(float((A @ z).square().sum()), rel=1e-12)
    torch.testing.assert_close(dg.value, (z * (A @ z))[:, 0], rtol=1e-12, atol=1e-14)
    assert math.isnan(tr.stderr) and math.isnan(fr.stderr) and math.isnan(hpp.stderr)
    assert bool(torch.isnan(dg.stderr).all())
    assert tr.num_probes == fr.num_probes == dg.num_probes == 1


def test_seed_none_means_seed_zero():
    # documented: seed=None draws the probes of seed=0
    A = DenseOperator(sym(spectrum(P=20)))
    for fn, kw in (
        (hutchinson_trace, {"num_probes": 7}),
        (squared_frobenius, {"num_probes": 7}),
        (hutchinson_diagonal, {"num_probes": 7}),
        (hutchpp_trace, {"num_matvecs": 10}),
    ):
        a, b, c = fn(A, **kw), fn(A, seed=0, **kw), fn(A, seed=1, **kw)
        assert torch.equal(torch.as_tensor(a.value), torch.as_tensor(b.value))
        assert not torch.equal(torch.as_tensor(a.value), torch.as_tensor(c.value))
    kw = {"num_probes": 2, "num_steps": 6, "num_points": 20}
    a, b = spectral_density(A, **kw), spectral_density(A, seed=0, **kw)
    c = spectral_density(A, seed=1, **kw)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.nodes, c.nodes)
