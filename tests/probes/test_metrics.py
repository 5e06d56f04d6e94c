import json
import math

import cases
import pytest
import torch
from torch import nn

from geoopt_sgd import noise_geometry
from geoopt_sgd.probes import _context, _exact
from geoopt_sgd.probes._eigenbasis import _zyt_metrics
from geoopt_sgd.probes._stats import haar, linregress, random_directions, spearman
from geoopt_sgd.probes.metrics import DEFAULT_METRICS, METRICS, NoiseGeometry
from geoopt_sgd.testing import (
    dense_curvature,
    dense_metrics,
    gradient_covariance,
    per_sample_gradients_loop,
)

# Exact route vs explicit float64 matrices: the same quantities summed in a different
# order (Gram identities vs P x P products), so agreement to ~1e-12 relative;
# 1e-9 leaves room for the conditioning of ratios such as alpha and mu.
RTOL = 1e-9
ALL = [m for m in METRICS]
K = 3
SEED = 7


def _case(name):
    return cases.problem(name, n=10 if name == "linear-mse" else 12)


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def _compare(res, ref, keys):
    for key in keys:
        got, want = res.values[key], ref[key]
        assert math.isclose(got, want, rel_tol=RTOL, abs_tol=1e-12), (key, got, want)


CONFIGS = [
    ("linear-mse", {}),
    ("mlp-mse", {}),
    ("mlp-ce", {}),
    ("mlp-bce", {}),
    ("cnn-ce", {}),
    ("cnn-ce", {"mode": "train"}),
    ("mlp-ce", {"curvature": "hessian"}),
    ("mlp-mse", {"curvature": "hessian"}),
    ("mlp-mse", {"cov": "minibatch", "batch_size": 3}),
    # a trailing partial batch (dropped): the batch means' mean is not grad L
    ("mlp-ce", {"cov": "minibatch", "batch_size": 5}),
    ("mlp-mse", {"cov": "minibatch", "batch_size": 3, "curvature": "hessian"}),
]


@pytest.mark.parametrize(
    ("name", "kw"),
    CONFIGS,
    ids=[
        f"{n}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'default'}"
        for n, kw in CONFIGS
    ],
)
def test_exact_route_matches_dense(name, kw):
    model, loss_fn, X, y = _case(name)
    P = _numel(model)
    delta = torch.linspace(-1, 1, P, dtype=torch.float64)
    before = cases.model_state(model)
    res = noise_geometry(
        model,
        loss_fn,
        (X, y),
        metrics=ALL,
        k=K,
        seed=SEED,
        route="exact",
        displacement=delta,
        tol=1e-6,  # the eigenvalues are checked below to 1e-6
        **kw,
    )
    cases.assert_same_state(before, cases.model_state(model))
    assert res.route == "exact"
    gen = torch.Generator().manual_seed(SEED)
    R = random_directions(P, 8, gen)
    rots = haar(K, 8, gen)
    ref = dense_metrics(
        model,
        loss_fn,
        X,
        y,
        k=K,
        curvature=kw.get("curvature", "ggn"),
        batch_size=kw.get("batch_size"),
        mode=kw.get("mode", "eval"),
        eigenvalues=res.eigenvalues,
        eigenvectors=res.eigenvectors,
        random_directions=R,
        rotations=rots,
        displacement=delta,
    )
    _compare(
        res,
        ref,
        [m for m in ALL if m not in ("noise_energies", "directional_alignment")],
    )
    for arr in (
        "noise_energies",
        "directional_alignment",
        "direction_shares",
        "loss_shares",
    ):
        torch.testing.assert_close(getattr(res, arr), ref[arr], rtol=RTOL, atol=1e-12)
    assert res.values["n_nonfinite"] == 0
    assert res.num_samples == y.shape[0]
    # the eigenpairs are the dense curvature's top-k (up to the solver's tolerance)
    C = dense_curvature(
        model,
        loss_fn,
        X,
        y,
        kind=kw.get("curvature", "ggn"),
        mode=kw.get("mode", "eval"),
    )
    lam = torch.linalg.eigvalsh(C).flip(0)[:K]
    torch.testing.assert_close(res.eigenvalues, lam, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "gram_chunk", "kw"),
    [
        ("mlp-ce", 60, {}),
        ("mlp-ce", 400, {}),
        ("mlp-mse", 60, {"cov": "minibatch", "batch_size": 5}),
    ],
)
def test_exact_route_gram_chunks_match_dense(monkeypatch, name, gram_chunk, kw):
    # the Gram products are formed in row chunks of ~_GRAM_CHUNK entries; at the
    # test sizes every loop is one chunk, so shrink it until the loops of
    # exact_traces run several chunks (checked; with n = 12 the per-sample cases
    # also end on a shorter chunk: 5+5+2 rows, 11+1)
    seen = []

    def spy(n, c):
        out = list(_context.chunks(n, c))
        seen.append([s.stop - s.start for s in out])
        return out

    monkeypatch.setattr(_exact, "_GRAM_CHUNK", gram_chunk)
    monkeypatch.setattr(_exact, "chunks", spy)
    model, loss_fn, X, y = _case(name)
    keys = [
        "tr_sigma",
        "tr_h_sigma",
        "tr_h_sigma_iso",
        "alpha",
        "beta",
        "mu",
        "mu1",
        "mu2",
        "gradient_uniformity",
    ]
    res = noise_geometry(
        model, loss_fn, (X, y), metrics=keys, route="exact", seed=SEED, **kw
    )
    assert len(seen) == 3  # Sigma's Gram, the GGN's Gram, R M^T
    assert sum(len(sizes) > 1 for sizes in seen) >= 2, seen
    ref = dense_metrics(model, loss_fn, X, y, batch_size=kw.get("batch_size"))
    _compare(res, ref, keys)


def test_exact_route_hessian_hutchinson_fallback_matches_dense(monkeypatch):
    # beyond _DENSE_HESSIAN_MAX parameters the exact route takes Tr H and ||H||_F^2
    # from Rademacher probes: forced here on a tiny model and checked against the
    # same probes (the call's generator's first draw, one (P, s) block: the
    # operator takes at least 8 columns per pass) applied to the dense Hessian
    monkeypatch.setattr(_exact, "_DENSE_HESSIAN_MAX", 0)
    model, loss_fn, X, y = _case("mlp-ce")
    P, s = _numel(model), 5
    keys = ["tr_sigma", "tr_h_sigma", "tr_h_sigma_iso", "alpha", "beta", "mu"]
    res = noise_geometry(
        model,
        loss_fn,
        (X, y),
        metrics=keys,
        curvature="hessian",
        route="exact",
        num_probes=s,
        seed=SEED,
    )
    H = dense_curvature(model, loss_fn, X, y, kind="hessian")
    gen = torch.Generator().manual_seed(SEED)
    Z = torch.randint(0, 2, (P, s), generator=gen, dtype=torch.int8).double() * 2 - 1
    HZ = H @ Z
    tr_h, fro2_h = float((Z * HZ).sum()) / s, float((HZ * HZ).sum()) / s
    assert not math.isclose(tr_h, float(H.trace()), rel_tol=1e-3)  # probes, not H
    sigma = gradient_covariance(per_sample_gradients_loop(model, loss_fn, X, y))
    sigma = sigma["sigma"]
    with torch.no_grad():
        L = float(loss_fn(model(X), y))
    tr_s, fro_s, tr_hs = (
        float(sigma.trace()),
        float(sigma.norm()),
        float((H * sigma).sum()),
    )
    want = {
        "tr_sigma": tr_s,
        "tr_h_sigma": tr_hs,
        "tr_h_sigma_iso": tr_h * tr_s / P,
        "alpha": tr_hs / (math.sqrt(fro2_h) * fro_s),
        "beta": fro_s / (2 * L * math.sqrt(fro2_h)),
        "mu": tr_hs / (2 * L * fro2_h),
    }
    _compare(res, want, keys)


def test_default_metrics_and_json():
    model, loss_fn, X, y = _case("mlp-ce")
    res = noise_geometry(model, loss_fn, (X, y), k=2)
    assert set(res.values) == set(DEFAULT_METRICS) - {
        "noise_energies",
        "directional_alignment",
    } | {"n_nonfinite"}
    d = res.as_dict()
    text = json.dumps(d)
    assert "NaN" not in text
    P = _numel(model)
    for key, val in d.items():
        assert not isinstance(val, list) or len(val) < P, key
    assert len(d["eigenvalues"]) == 2 and len(d["noise_energies"]) == 2
    assert d["num_samples"] == 12 and d["route"] == "exact"
    assert d["cost_n_per_sample_grad"] == 12 and d["cost_seconds"] > 0


def test_metric_table_and_as_dict_arrays():
    # one table gives the names, the default set and the families' members
    assert METRICS[0] == "loss" and len(METRICS) == len(set(METRICS)) == 24
    escape = ("sharp_fraction", "loss_energy_fraction")
    assert DEFAULT_METRICS == tuple(
        m for m in METRICS if m not in ("mu_hessian", *escape)
    )
    t = torch.arange(3.0)
    res = NoiseGeometry(
        values={"mu": 1.0},
        eigenvalues=t,
        eigenvectors=torch.ones(100, 3),
        noise_energies=t,
        directional_alignment=t,
        direction_shares=t,
        loss_shares=t,
    )
    # the (k,) arrays in field order, never the (P, k) eigenvectors
    assert [k for k, v in res.as_dict().items() if isinstance(v, list)] == [
        "eigenvalues",
        "noise_energies",
        "directional_alignment",
        "direction_shares",
        "loss_shares",
    ]


def test_escape_metrics_added_with_displacement_and_list_form():
    model, loss_fn, X, y = _case("mlp-mse")
    P = _numel(model)
    delta = torch.randn(
        P, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    a = noise_geometry(model, loss_fn, (X, y), k=2, displacement=delta)
    parts = [
        t.clone() for t in torch.split(delta, [p.numel() for p in model.parameters()])
    ]
    parts = [t.reshape(p.shape) for t, p in zip(parts, model.parameters(), strict=True)]
    b = noise_geometry(model, loss_fn, (X, y), k=2, displacement=parts)
    for key in ("sharp_fraction", "loss_energy_fraction"):
        assert 0 < a.values[key] < 1
        assert a.values[key] == b.values[key]
    torch.testing.assert_close(
        a.direction_shares.sum(),
        torch.tensor(a.values["sharp_fraction"], dtype=torch.float64),
    )
    torch.testing.assert_close(
        a.loss_shares.sum(), torch.tensor(1.0, dtype=torch.float64)
    )


def test_gd_escape_direction_is_sharpest():
    # delta along u_1 exactly: all of its energy is in the top-1 direction
    model, loss_fn, X, y = _case("mlp-mse")
    res = noise_geometry(model, loss_fn, (X, y), k=3, metrics=["noise_energies"])
    delta = 0.3 * res.eigenvectors[:, 0]
    esc = noise_geometry(
        model,
        loss_fn,
        (X, y),
        k=3,
        displacement=delta,
        metrics=["sharp_fraction", "loss_energy_fraction"],
        v0=res.eigenvectors,
    )
    assert esc.values["sharp_fraction"] == pytest.approx(1.0, rel=1e-9)
    assert esc.values["loss_energy_fraction"] == pytest.approx(1.0, rel=1e-9)
    assert esc.direction_shares[0] == pytest.approx(1.0, rel=1e-9)


def test_loss_shares_signed_with_negative_hessian_eigenvalues():
    # loss_shares = lambda_i c_i^2 / sum_j lambda_j c_j^2, signed: with
    # curvature="hessian" the top-k may hold negative eigenvalues (here k = P on
    # a tanh net away from a minimum), checked against eigh of the dense Hessian
    model = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-0.8, 0.9, p.numel()).reshape(p.shape) + 0.1 * i)
    X = torch.linspace(-2, 2, 8, dtype=torch.float64).reshape(-1, 1)
    y = torch.sin(3 * X)
    loss_fn = nn.MSELoss()
    P = _numel(model)
    delta = torch.linspace(-1, 1, P, dtype=torch.float64)
    res = noise_geometry(
        model,
        loss_fn,
        (X, y),
        metrics=["sharp_fraction", "loss_energy_fraction"],
        k=P,
        curvature="hessian",
        displacement=delta,
        tol=1e-8,
        seed=SEED,
    )
    H = dense_curvature(model, loss_fn, X, y, kind="hessian")
    e, Q = torch.linalg.eigh(H)
    assert float(e[0]) < -0.1  # indefinite: the shares have both signs
    lc = e.flip(0) * (Q.flip(1).T @ delta) ** 2
    torch.testing.assert_close(res.loss_shares, lc / lc.sum(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_sketch_route_statistical(curvature):
    # Each sketch quantity is a mean of s = 600 Gaussian-probe quadratic forms
    # w^T A w (w ~ N(0, G)) or xi^T A xi (xi ~ (0, Sigma)); for PSD A their
    # relative standard deviation is sqrt(2 Tr((AG)^2)) / Tr(AG) <= sqrt(2 / s)
    # = 0.058. Ratios of up to three such estimates (mu, alpha, beta) get
    # <= 0.1; a tolerance of 0.25 is > 2.5 sigma of that worst case, and the
    # seed is fixed, so the test is deterministic. With the (indefinite)
    # Hessian the bound holds for the PSD parts; its Rademacher Hutchinson
    # estimates of Tr H and ||H||_F^2 have relative std <= sqrt(2 / s) as well.
    X, y = cases.make_data(n=16, classification=False)
    model, loss_fn = cases.mlp(), nn.MSELoss()
    ms = [
        "loss",
        "alpha",
        "beta",
        "mu",
        "mu1",
        "mu2",
        "tr_sigma",
        "tr_h_sigma",
        "tr_h_sigma_iso",
        "gradient_uniformity",
    ]
    if curvature == "hessian":
        ms.append("mu_hessian")
    kw = {"metrics": ms, "curvature": curvature}
    ex = noise_geometry(model, loss_fn, (X, y), route="exact", **kw)
    sk = noise_geometry(
        model, loss_fn, (X, y), route="sketch", num_probes=600, seed=0, **kw
    )
    assert sk.route == "sketch" and sk.cost["n_per_sample_grad"] == 0
    for key in ms:
        assert sk.values[key] == pytest.approx(ex.values[key], rel=0.25), key
    # mu2 uses the exact Tr(Sigma_2 G) but the estimated ||G||_F; loss is exact
    assert sk.values["loss"] == pytest.approx(ex.values["loss"], rel=1e-12)


@pytest.mark.parametrize("name", ["mlp-ce", "mlp-bce"])
def test_sketch_route_minibatch_statistical(name):
    # same derivation as above, with the mini-batch covariance (B = 2, M = 6);
    # cross-entropy uses the closed-form Lambda, BCE the stored dense one
    model, loss_fn, X, y = _case(name)
    ms = ["mu", "mu1", "tr_sigma", "tr_h_sigma", "gradient_uniformity"]
    kw = {"metrics": ms, "cov": "minibatch", "batch_size": 2}
    ex = noise_geometry(model, loss_fn, (X, y), route="exact", **kw)
    sk = noise_geometry(
        model, loss_fn, (X, y), route="sketch", num_probes=600, seed=1, **kw
    )
    for key in ms:
        assert sk.values[key] == pytest.approx(ex.values[key], rel=0.25), key


def test_eigen_metrics_same_on_both_routes():
    # the eigenbasis metrics are exact on either route (one jvp per direction)
    model, loss_fn, X, y = _case("mlp-ce")
    ms = [
        "noise_energies",
        "directional_alignment",
        "power_law_exponent",
        "commutativity_error",
    ]
    ex = noise_geometry(model, loss_fn, (X, y), metrics=ms, route="exact", k=3)
    sk = noise_geometry(model, loss_fn, (X, y), metrics=ms, route="sketch", k=3)
    torch.testing.assert_close(sk.noise_energies, ex.noise_energies, rtol=1e-10, atol=0)
    assert sk.values["commutativity_error"] == pytest.approx(
        ex.values["commutativity_error"], rel=1e-9
    )


def test_online_linear_model_mu_at_least_one():
    # WWS22 Prop. 2.3: for f = theta^T x, x ~ N(0, S), noiseless
    # teacher, e = theta - theta*: Sigma = 2L G + S e e^T S with G = S, so
    # mu = 1 + e^T S^3 e / (e^T S e ||S||_F^2) = 1.348 here. The finite-sample mu
    # fluctuates around it through the empirical fourth moments: over seeds we
    # measured a spread of about 3% at n = 4000, so 10% is > 3 sigma, and
    # mu > 1 is > 10 sigma away.
    g = torch.Generator().manual_seed(0)
    d, n = 3, 4000
    S_half = torch.diag(torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64))
    S = S_half @ S_half
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ S_half
    teacher = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    y = (X @ teacher).unsqueeze(1)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64))
    e = model.weight.detach().reshape(-1) - teacher
    mu_pop = 1 + float(e @ S @ S @ S @ e) / (float(e @ S @ e) * float((S * S).sum()))
    res = noise_geometry(
        model,
        nn.MSELoss(),
        (X, y),
        metrics=["mu", "mu1"],
        route="exact",
        max_samples=n,
    )
    assert res.values["mu"] == pytest.approx(mu_pop, rel=0.1)
    assert res.values["mu"] > 1.0
    assert res.values["mu1"] >= res.values["mu"]


def test_linregress_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(20, generator=g, dtype=torch.float64)
    y = 2 * x + 0.3 * torch.randn(20, generator=g, dtype=torch.float64)
    ref = stats.linregress(x.numpy(), y.numpy())
    slope, r2 = linregress(x, y)
    assert slope == pytest.approx(ref.slope, rel=1e-12)
    assert r2 == pytest.approx(ref.rvalue**2, rel=1e-12)
    y[3] = y[5]  # a tie: average ranks, as scipy
    assert spearman(x, y) == pytest.approx(
        stats.spearmanr(x.numpy(), y.numpy())[0], rel=1e-12
    )
    assert math.isnan(linregress(x[:1], y[:1])[0])
    assert math.isnan(spearman(x[:1], y[:1]))


def test_power_law_and_spearman_leave_out_nonpositive_entries():
    # the fit and the rank correlation use the entries where both the eigenvalue
    # and the noise energy are positive (docs/science/metrics.md): an exactly
    # zero eigenvalue (a null direction of the Hessian) or noise energy (no
    # spread of the per-sample gradients along u_j) is left out, not log10(0)
    stats = pytest.importorskip("scipy.stats")
    lam = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    diag = torch.tensor([3.0, 0.0, 1.1, 0.2, 0.7], dtype=torch.float64)
    values = {}
    _zyt_metrics(
        lam,
        diag,
        torch.diag(diag),
        [],
        {"power_law_exponent", "power_law_r2", "spearman"},
        values,
    )
    keep = [0, 2, 3]
    ref = stats.linregress(lam[keep].log10().numpy(), diag[keep].log10().numpy())
    assert values["power_law_exponent"] == pytest.approx(ref.slope, rel=1e-12)
    assert values["power_law_r2"] == pytest.approx(ref.rvalue**2, rel=1e-12)
    assert values["spearman"] == pytest.approx(1.0, rel=1e-12)


def test_spearman_of_constant_ranks_is_nan_not_error():
    # all ranks tied on one side: the correlation is undefined, NaN (not a
    # ZeroDivisionError that would end the probe)
    x = torch.ones(3, dtype=torch.float64)
    y = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert math.isnan(spearman(x, y))
    assert math.isnan(spearman(y, x))


def test_haar_rotations_are_haar_distributed():
    # commutativity_baseline averages over Haar rotations: the entries of a Haar
    # orthogonal matrix have mean 0 and variance 1/k. QR of Gaussians without the
    # sign fix gives E Q_jj of about -0.5 for k = 3; over 4000 draws the mean of
    # each entry has a standard deviation of 0.009
    Qs = torch.stack(haar(3, 4000, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(
        Qs.transpose(1, 2) @ Qs, torch.eye(3, dtype=torch.float64).expand(4000, 3, 3)
    )
    assert float(Qs.mean(0).abs().max()) < 0.06
    torch.testing.assert_close(
        (Qs * Qs).mean(0),
        torch.full((3, 3), 1 / 3, dtype=torch.float64),
        atol=0.03,
        rtol=0,
    )


def test_commutativity_error_and_baseline_bounds():
    # Both are ||C~ A - A C~||_F / ||C~ A||_F for symmetric C~, A; since
    # ||A C~||_F = ||(C~ A)^T||_F = ||C~ A||_F the triangle inequality bounds them
    # by 2, and a Haar rotation of Lambda almost surely does not commute with C~,
    # so the baseline is strictly positive. (Whether the measured error lies below
    # the baseline is an empirical property of a trained network, not of this tiny
    # random MLP; the values themselves are checked against dense_metrics above.)
    model, loss_fn, X, y = _case("mlp-mse")
    res = noise_geometry(
        model,
        loss_fn,
        (X, y),
        k=4,
        metrics=["commutativity_error", "commutativity_baseline"],
    )
    assert 0 <= res.values["commutativity_error"] <= 2
    assert 1e-3 < res.values["commutativity_baseline"] <= 2


def test_warm_start_and_max_samples():
    model, loss_fn, X, y = _case("mlp-ce")
    kw = {"k": 2, "metrics": ["noise_energies"], "tol": 1e-6}
    a = noise_geometry(model, loss_fn, (X, y), **kw)
    b = noise_geometry(model, loss_fn, (X, y), v0=a.eigenvectors, **kw)
    torch.testing.assert_close(b.eigenvalues, a.eigenvalues, rtol=1e-6, atol=1e-9)
    sub = noise_geometry(
        model,
        loss_fn,
        [(X[:5], y[:5]), (X[5:], y[5:])],
        max_samples=8,
        metrics=["mu", "loss"],
    )
    first = noise_geometry(model, loss_fn, (X[:8], y[:8]), metrics=["mu", "loss"])
    assert sub.num_samples == 8
    assert sub.values["mu"] == pytest.approx(first.values["mu"], rel=1e-12)


def test_nonfinite_gives_nan_not_error():
    model, loss_fn, X, y = _case("mlp-ce")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    before = cases.model_state(model)
    res = noise_geometry(model, loss_fn, (X, y), k=2)
    cases.assert_same_state(before, cases.model_state(model))  # NaN compared by bits
    assert all(math.isnan(v) for k, v in res.values.items() if k != "n_nonfinite")
    assert res.values["n_nonfinite"] == len(res.values) - 1 > 0
    json.dumps(res.as_dict())  # NaN is still serialisable by json (as NaN)


def test_loss_is_measured_as_passed():
    # nn.MSELoss is the mean over samples and outputs; the papers' 1/2 ||r||^2
    # is the explicit HalfSquaredError
    from geoopt_sgd import HalfSquaredError

    model, _, X, y = _case("mlp-mse")
    out = model(X).detach()
    res = noise_geometry(model, nn.MSELoss(), (X, y), metrics=["loss"])
    expected = nn.MSELoss()(out, y)
    assert res.values["loss"] == pytest.approx(float(expected), rel=1e-12)
    res = noise_geometry(model, HalfSquaredError(), (X, y), metrics=["loss"])
    expected = 0.5 * ((out - y) ** 2).sum(1).mean()
    assert res.values["loss"] == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (
            {"metrics": ["mu", "nope"]},
            ValueError,
            "`metrics` must be one of 'loss', .*; got 'nope'",
        ),
        ({"k": 0}, ValueError, "`k` must be >= 1; got 0"),
        ({"k": 1000}, ValueError, r"`k` must be <= P = 57; got 1000"),
        ({"k": 2.5}, TypeError, "`k` must be an integer; got float"),
        (
            {"curvature": "fisher"},
            ValueError,
            "`curvature` must be one of 'ggn', 'hessian'; got 'fisher'",
        ),
        (
            {"cov": "full"},
            ValueError,
            "`cov` must be one of 'per_sample', 'minibatch'; got 'full'",
        ),
        (
            {"route": "dense"},
            ValueError,
            "`route` must be one of 'auto', 'exact', 'sketch'; got 'dense'",
        ),
        (
            {"mode": "test"},
            ValueError,
            "`mode` must be one of 'eval', 'train'; got 'test'",
        ),
        (
            {"cov": "minibatch"},
            ValueError,
            "`batch_size` must be given with cov='minibatch'",
        ),
        (
            {"cov": "minibatch", "batch_size": 0},
            ValueError,
            "`batch_size` must be >= 1; got 0",
        ),
        (
            {"cov": "minibatch", "batch_size": 7},
            ValueError,
            "at least 2 batches of 7 for a covariance; got 12 samples",
        ),
        ({"seed": -1}, ValueError, "`seed` must be >= 0; got -1"),
        ({"max_samples": 1}, ValueError, "`max_samples` must be >= 2; got 1"),
        ({"num_probes": 1}, ValueError, "`num_probes` must be >= 2; got 1"),
        ({"tol": 0.0}, ValueError, "`tol` must be > 0; got 0.0"),
        ({"metrics": ["sharp_fraction"]}, ValueError, "`displacement` must be given"),
        (
            {"displacement": torch.zeros(3)},
            ValueError,
            r"`displacement`: expected shape \(57,\), got \(3,\)",
        ),
        (
            {"displacement": [torch.zeros(3)]},
            ValueError,
            "`displacement` as a list must hold one tensor",
        ),
        ({"displacement": 1.0}, TypeError, "`displacement` must be a \\(P,\\) tensor"),
        (
            {"v0": torch.zeros(4)},
            ValueError,
            r"`v0`: expected shape \(57,\) or \(57, m\); got \(4,\)",
        ),
    ],
)
def test_errors(kw, exc, match):
    model, loss_fn, X, y = _case("mlp-ce")
    with pytest.raises(exc, match=match):
        noise_geometry(model, loss_fn, (X, y), **kw)


def test_error_single_sample():
    model, loss_fn, X, y = _case("mlp-ce")
    with pytest.raises(
        ValueError, match="at least 2 samples for a covariance; got 1 samples"
    ):
        noise_geometry(model, loss_fn, (X[:1], y[:1]))


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("name", ["mlp-ce", "mlp-mse"])
def test_curvature_agrees_with_curvature_operators(name, curvature):
    # one loss convention: the probes measure the loss as passed, so for
    # nn.MSELoss (mean over N * K entries) and cross-entropy alike their matrix
    # is the package's HessianOperator/GGNOperator, with no constant between.
    from geoopt_sgd import GGNOperator, HessianOperator

    model, loss_fn, X, y = _case(name)
    cls = GGNOperator if curvature == "ggn" else HessianOperator
    dense = cls(model, loss_fn, (X, y)).to_dense()
    lam = torch.linalg.eigvalsh(dense).flip(0)[:K]
    res = noise_geometry(
        model,
        loss_fn,
        (X, y),
        k=K,
        curvature=curvature,
        metrics=["noise_energies"],
        tol=1e-4,
    )
    # both are float64 matrices from different autodiff routes; eigenvalues by
    # Lanczos at tol 1e-4 are accurate to ~tol^2 relative
    torch.testing.assert_close(res.eigenvalues, lam, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_timm_vit_forward_mode_through_attention():
    # jvp through F.scaled_dot_product_attention: the CPU flash kernel has no
    # forward-mode AD, so the probes select the math backend locally. Checked
    # against explicit per-sample gradients from a loop of backward passes.
    timm = pytest.importorskip("timm")
    from geoopt_sgd.testing import gradient_covariance, per_sample_gradients_loop

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        num_classes=3,
        depth=1,
        embed_dim=16,
        num_heads=2,
    ).double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    res = noise_geometry(model, loss_fn, (X, y), k=2, metrics=["noise_energies"])
    D = per_sample_gradients_loop(model, loss_fn, X, y)
    S = gradient_covariance(D)["sigma"]
    U = res.eigenvectors
    # same quantity from jvp vs explicit gradients: float64 rounding only
    torch.testing.assert_close(
        res.noise_energies, torch.diagonal(U.T @ S @ U), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("model_name", ["linear", "mlp"])
def test_wws22_lemmas_scalar_output(model_name):
    # WWS22 Lemma 2.2: with square loss and scalar outputs,
    # mu_1 = sum r_i^2 chi_i / (sum r_i^2 mean chi) >= min chi / mean chi = gamma,
    # and mu_2 <= tau(G) = lambda_1(G)^2 / ||G||_F^2 (||grad L||^2 <= 2 L lambda_1).
    X, y = cases.make_data(n=15, k=1, classification=False, seed=4)
    model = cases.linear() if model_name == "linear" else cases.mlp(k=1)
    res = noise_geometry(
        model, nn.MSELoss(), (X, y), metrics=["mu1", "mu2", "gradient_uniformity"]
    )
    G = dense_curvature(model, nn.MSELoss(), X, y)
    tau = float(torch.linalg.eigvalsh(G)[-1] ** 2 / (G * G).sum())
    gamma = res.values["gradient_uniformity"]
    assert 0 < gamma <= 1
    assert res.values["mu1"] >= gamma
    assert 0 <= res.values["mu2"] <= tau


def test_bitwise_equal_compares_nan_and_signed_zero():
    a = torch.tensor([1.0, float("nan"), 0.0])
    assert cases.bitwise_equal(a, a.clone())
    assert not torch.equal(a, a.clone())  # why torch.equal cannot be used
    assert not cases.bitwise_equal(a, torch.tensor([1.0, float("nan"), -0.0]))
    assert not cases.bitwise_equal(a, torch.tensor([1.0, 2.0, 0.0]))
    assert not cases.bitwise_equal(a, a.double())
    assert cases.bitwise_equal(torch.tensor(3.0), torch.tensor(3.0))
    assert cases.bitwise_equal(torch.arange(3), torch.arange(3))
