"""The sketch route's deflated isotropic estimators and the Lanczos side products."""

import math
import statistics

import cases
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from geoopt_sgd import noise_geometry
from geoopt_sgd._model import FunctionalModel
from geoopt_sgd.curvature.lanczos import top_eigenpairs
from geoopt_sgd.probes._sketch import trace1, trace2
from geoopt_sgd.probes._stats import random_directions
from geoopt_sgd.probes.primitives import CurvatureOperator, ProbeSet
from geoopt_sgd.testing import dense_curvature, gradient_covariance
from geoopt_sgd.testing import per_sample_gradients_loop as psg

SKETCH = [
    "alpha",
    "beta",
    "mu",
    "mu1",
    "mu2",
    "loss_alignment",
    "gradient_uniformity",
    "tr_sigma",
    "tr_h_sigma",
    "tr_h_sigma_iso",
]


def _case(name):
    return cases.problem(name)


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def _isotropic_probes(P, s, gen):
    """The sketch's ``s`` isotropic probes, replayed from its generator (the
    eigensolve's 8 random directions come first and serve as probes)."""
    Zu = random_directions(P, 8, gen)
    if s > 8:
        Zu = torch.cat([Zu, random_directions(P, s - 8, gen)], 1)
    return Zu[:, :s]


def _hessian_probes(P, n, s, seed):
    """The Hessian sketch route's draws, replayed in its order: the ``s``
    isotropic probes, the natural probes' normals ``(s, n)``, then the
    Rademacher signs ``(P, s)``."""
    gen = torch.Generator().manual_seed(seed)
    Zu = _isotropic_probes(P, s, gen)
    z = torch.randn(s, n, generator=gen, dtype=torch.float64)
    Z = torch.randint(0, 2, (P, s), generator=gen, dtype=torch.int8).double() * 2 - 1
    return Zu, z, Z


def _dense_pieces(model, loss_fn, X, y, batch_size=None):
    """Explicit Sigma (or C), G and the per-sample M_i = J_i^T Lambda_i J_i (eval)."""
    cov = gradient_covariance(psg(model, loss_fn, X, y), batch_size=batch_size)
    G = dense_curvature(model, loss_fn, X, y)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(v):
        d, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            d[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, (d,), (X,)).reshape(X.shape[0], -1)

    was = model.training
    model.eval()
    try:
        J = jacrev(out)(flat).detach()  # (n, K, P)
        o = out(flat).detach()
    finally:
        model.train(was)
    if isinstance(loss_fn, nn.MSELoss):
        lam = torch.eye(o.shape[1], dtype=o.dtype).expand(o.shape[0], -1, -1)
    else:
        lam = torch.stack(
            [
                hessian(lambda z, i=i: loss_fn(z[None], y[i : i + 1]))(o[i])
                for i in range(o.shape[0])
            ]
        )
    Mi = torch.einsum("nkp,nkl,nlq->npq", J, lam, J)
    return cov, G, Mi


def _dense_estimates(S, S2, G, Mi, U, Zu):
    """The sketch's estimator from explicit matrices (metrics module docstring)."""
    P = G.shape[0]
    e, Qe = torch.linalg.eigh(U.T @ U)
    Q = U @ (Qe / e.sqrt()) @ Qe.T  # orthonormal, same span
    Z = P**0.5 * Zu
    Zp = Z - Q @ (Q.T @ Z)

    def blocks(A):
        return Q.T @ A @ Q, Q.T @ A @ Zp, Zp.T @ A @ Zp

    def tr1(A):
        a, _, c = blocks(A)
        return float(torch.trace(a) + torch.diagonal(c).mean())

    def tr2(A, B):
        (a1, b1, c1), (a2, b2, c2) = blocks(A), blocks(B)
        s = Z.shape[1]
        off = (c1 * c2).sum() - (torch.diagonal(c1) * torch.diagonal(c2)).sum()
        return float(
            torch.trace(a1 @ a2) + 2 * (b1 * b2).sum(0).mean() + off / (s * (s - 1))
        )

    chi = torch.tensor([tr2(M, G) for M in Mi], dtype=torch.float64)
    return {
        "tr_sigma": tr1(S),
        "fro2_sigma": tr2(S, S),
        "tr_c": tr1(G),
        "fro2_c": tr2(G, G),
        "tr_sc": tr2(S, G),
        "tr_s2c": float((S2 * G).sum()),
        "chi": chi,
    }


def _metrics(est, L, P):
    fro_c, fro_s = math.sqrt(est["fro2_c"]), math.sqrt(est["fro2_sigma"])
    den = 2 * L * est["fro2_c"]
    tr_s1c = est["tr_sc"] + est["tr_s2c"]
    chi = est["chi"]
    return {
        "alpha": est["tr_sc"] / (fro_c * fro_s),
        "beta": fro_s / (2 * L * fro_c),
        "mu": est["tr_sc"] / den,
        "mu1": tr_s1c / den,
        "mu2": est["tr_s2c"] / den,
        "loss_alignment": tr_s1c / den,
        "gradient_uniformity": float(chi.min() / chi.mean()),
        "tr_sigma": est["tr_sigma"],
        "tr_h_sigma": est["tr_sc"],
        "tr_h_sigma_iso": est["tr_c"] * est["tr_sigma"] / P,
    }


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("mlp-ce", {}),
        ("mlp-mse", {}),
        ("mlp-bce", {}),
        ("cnn-ce", {"mode": "train"}),
        ("mlp-mse", {"cov": "minibatch", "batch_size": 3}),
        # a trailing partial batch: the batch means' mean is not grad L
        ("mlp-ce", {"cov": "minibatch", "batch_size": 5}),
    ],
)
def test_sketch_is_exact_when_the_eigenbasis_spans_everything(name, kw):
    # k = P: the deflation basis spans R^P, the probes' remainders are zero and
    # the estimator reduces to its exact part, the same sums as the Gram route
    model, loss_fn, X, y = _case(name)
    P = _numel(model)
    ex = noise_geometry(model, loss_fn, (X, y), metrics=SKETCH, route="exact", **kw)
    sk = noise_geometry(
        model, loss_fn, (X, y), metrics=SKETCH, route="sketch", k=P, num_probes=4, **kw
    )
    assert sk.route == "sketch"
    for key in SKETCH:
        assert sk.values[key] == pytest.approx(ex.values[key], rel=1e-9), key
        assert sk.standard_errors[key] <= 1e-9 * abs(ex.values[key]) + 1e-12, key


@pytest.mark.parametrize("name", ["mlp-ce", "mlp-mse"])
@pytest.mark.parametrize("num_probes", [5, 12])
def test_sketch_matches_dense_estimator(name, num_probes):
    # the same probes (the private generator's draws replayed: r = 8 random
    # directions, then num_probes - r more) and eigenvectors, put through the
    # estimator with explicit P x P matrices: equal to float64 rounding
    model, loss_fn, X, y = _case(name)
    P = _numel(model)
    res = noise_geometry(
        model,
        loss_fn,
        (X, y),
        metrics=SKETCH,
        route="sketch",
        k=3,
        num_probes=num_probes,
        seed=4,
    )
    gen = torch.Generator().manual_seed(4)
    Zu = _isotropic_probes(P, num_probes, gen)
    cov, G, Mi = _dense_pieces(model, loss_fn, X, y)
    U = res.eigenvectors
    est = _dense_estimates(cov["sigma"], cov["sigma2"], G, Mi, U, Zu)
    L = noise_geometry(model, loss_fn, (X, y), metrics=["loss"]).values["loss"]
    want = _metrics(est, L, P)
    for key in SKETCH:
        assert res.values[key] == pytest.approx(want[key], rel=1e-9), key
    # jackknife: leave each probe out, recompute densely
    reps = []
    for t in range(num_probes):
        keep = [i for i in range(num_probes) if i != t]
        reps.append(
            _metrics(
                _dense_estimates(cov["sigma"], cov["sigma2"], G, Mi, U, Zu[:, keep]),
                L,
                P,
            )
        )
    s = num_probes
    for key in SKETCH:
        v = torch.tensor([r[key] for r in reps], dtype=torch.float64)
        se = float(((s - 1) / s * ((v - v.mean()) ** 2).sum()).sqrt())
        assert res.standard_errors[key] == pytest.approx(se, rel=1e-7, abs=1e-14), key


@pytest.mark.parametrize("num_probes", [5, 10])
def test_sketch_hessian_traces_match_dense_probes(num_probes):
    # curvature="hessian": Tr(Sigma_1 H) from s natural probes xi_t = D^T z_t /
    # sqrt(n), Tr H and ||H||_F^2 from s Rademacher probes. The private
    # generator's draws replayed (r = 8 random directions, num_probes - r more,
    # the natural probes' normals, then the Rademacher signs) through the
    # explicit Hessian and per-sample gradients D: equal to float64 rounding
    model, loss_fn, X, y = _case("mlp-ce")
    P, n, s = _numel(model), X.shape[0], num_probes
    keys = ["tr_h_sigma", "mu", "mu1", "mu2", "loss_alignment"]
    res = noise_geometry(
        model,
        loss_fn,
        (X, y),
        metrics=[*keys, "tr_sigma", "tr_h_sigma_iso"],
        curvature="hessian",
        route="sketch",
        k=3,
        num_probes=s,
        seed=4,
    )
    _, z, Z = _hessian_probes(P, n, s, seed=4)
    D = psg(model, loss_fn, X, y)
    H = dense_curvature(model, loss_fn, X, y, kind="hessian")
    xi = D.T @ z.T / math.sqrt(n)
    gbar = D.mean(0)
    tr_s1h = float((xi * (H @ xi)).sum()) / s
    tr_s2h = float(gbar @ H @ gbar)
    tr_h = float((Z * (H @ Z)).sum()) / s
    fro2_h = float((H @ Z).square().sum()) / s
    with torch.no_grad():
        L = float(loss_fn(model(X), y))
    den = 2 * L * fro2_h
    want = {
        "tr_h_sigma": tr_s1h - tr_s2h,
        "mu": (tr_s1h - tr_s2h) / den,
        "mu1": tr_s1h / den,
        "mu2": tr_s2h / den,
        "loss_alignment": tr_s1h / den,
    }
    for key in keys:
        assert res.values[key] == pytest.approx(want[key], rel=1e-9), key
    # tr_h_sigma_iso = Tr H Tr Sigma / P with the sketch's Tr Sigma
    iso = tr_h * res.values["tr_sigma"] / P
    assert res.values["tr_h_sigma_iso"] == pytest.approx(iso, rel=1e-9)


def test_trace_estimators_leave_one_out_and_exact_part():
    g = torch.Generator().manual_seed(0)

    def sym(n):
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        return A + A.T

    s, k = 6, 3
    A = (sym(k), torch.randn(k, s, generator=g, dtype=torch.float64), sym(s))
    B = (sym(k), torch.randn(k, s, generator=g, dtype=torch.float64), sym(s))
    loo1, loo2 = trace1(A, True), trace2(A, B, True)
    for t in range(s):
        idx = torch.tensor([i for i in range(s) if i != t])

        def sub(X, idx=idx):
            return X[0], X[1][:, idx], X[2][idx][:, idx]

        assert float(loo1[t]) == pytest.approx(float(trace1(sub(A))), rel=1e-12)
        assert float(loo2[t]) == pytest.approx(float(trace2(sub(A), sub(B))), rel=1e-12)
    # per-sample (leading dimension) blocks broadcast against shared ones
    stacked = tuple(torch.stack([a, 2 * a]) for a in A)
    torch.testing.assert_close(
        trace2(stacked, B), torch.stack([trace2(A, B), 2 * trace2(A, B)])
    )


@pytest.mark.slow
def test_sketch_traces_are_unbiased():
    # tr_sigma and tr_h_sigma are linear (trace) and bilinear (pair U-statistic)
    # estimators with known exact parts: unbiased for any deflation basis. Their
    # mean over 120 seeds at s = 4, k = 2 must lie within 4 standard errors of the
    # mean (a fixed seed range, so deterministic). The implementation equals the
    # formula (test_sketch_matches_dense_estimator); this checks the formula.
    model, loss_fn, X, y = _case("mlp-ce")
    ms = ["tr_sigma", "tr_h_sigma", "tr_h_sigma_iso"]
    ex = noise_geometry(model, loss_fn, (X, y), metrics=ms, route="exact")
    vals = {m: [] for m in ms}
    for seed in range(150):
        r = noise_geometry(
            model,
            loss_fn,
            (X, y),
            metrics=ms,
            route="sketch",
            k=2,
            num_probes=4,
            seed=seed,
        )
        for m in ms:
            vals[m].append(r.values[m])
    for m in ms:
        mean = statistics.mean(vals[m])
        sem = statistics.stdev(vals[m]) / math.sqrt(len(vals[m]))
        assert abs(mean - ex.values[m]) < 4 * sem, m
        assert sem < 0.1 * abs(ex.values[m]), m  # the test has power


def test_standard_errors_cover_the_error():
    # many probes: every estimate within 4 of its own jackknife standard errors
    X, y = cases.make_data(n=16, classification=False)
    model, loss_fn = cases.mlp(), nn.MSELoss()
    ex = noise_geometry(model, loss_fn, (X, y), metrics=SKETCH, route="exact")
    sk = noise_geometry(
        model, loss_fn, (X, y), metrics=SKETCH, route="sketch", k=2, num_probes=200
    )
    for key in SKETCH:
        if key == "gradient_uniformity":
            continue  # a minimum over estimates: biased low, its SE is not an error bar
        se = sk.standard_errors[key]
        assert 0 < se < 0.1 * abs(ex.values[key]), key
        assert abs(sk.values[key] - ex.values[key]) < 4 * se, key
    d = sk.as_dict()
    assert d["se_mu"] == sk.standard_errors["mu"]
    assert "se_loss" not in d


def test_eigenvector_tangents_from_lanczos_side_products():
    # the Ritz vectors lie in the span of the multiplied vectors, so their
    # tangents J_i u are combinations of the recorded J_i v: equal to fresh jvps
    model, loss_fn, X, y = _case("mlp-ce")
    fm = FunctionalModel(model, None, mode="eval")
    probe = ProbeSet(fm, loss_fn, [(X[:7], y[:7]), (X[7:], y[7:])])
    op = CurvatureOperator(probe, "ggn")
    with probe.recording(64):
        res = top_eigenpairs(op, 3, tol=1e-3)
    got = probe.span_tangents(res.eigenvectors)
    assert got is not None and probe.span_residual < 1e-12
    want = probe.tangents(res.eigenvectors)
    torch.testing.assert_close(got.T, want.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.loss(), want.loss(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.LT, want.LT, rtol=1e-10, atol=1e-12)
    # a vector outside the span is refused (the fit's residual is checked)
    P = probe.P
    with probe.recording(64):
        top_eigenpairs(op, 1, tol=1e-1)
    assert probe.span_tangents(torch.ones(P, 1, dtype=torch.float64)) is None
    # too many products: recording stops, the caller falls back to jvps
    with probe.recording(3):
        top_eigenpairs(op, 3, tol=1e-3)
    assert probe.span_tangents(res.eigenvectors) is None


def test_default_probe_counts():
    # the default sketch reuses the eigenvectors' tangents and the random
    # directions: jvps = r + 1 (Tr(Sigma_2 G)), one backward (grad L), and the
    # products of the eigensolver; no jvp along the eigenvectors
    model, loss_fn, X, y = _case("mlp-ce")
    res = noise_geometry(model, loss_fn, (X, y), route="sketch", k=3)
    assert res.cost["n_backward"] == 1
    assert res.cost["n_jvp"] == 8 + 1
    assert res.cost["n_ggnvp"] > 0 and res.cost["n_hvp"] == 0
    assert set(res.standard_errors) <= set(res.values)
    assert res.cost["seconds_eigen"] > 0 and res.cost["seconds_sketch"] > 0
    # more probes than random directions: the extra ones cost one jvp each
    more = noise_geometry(model, loss_fn, (X, y), route="sketch", k=3, num_probes=12)
    assert more.cost["n_jvp"] == 12 + 1


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_each_metric_alone_on_the_sketch_route(curvature):
    # every metric must be computable by itself with either curvature (mu_hessian
    # with curvature="ggn" once built no GGN blocks yet asked for their jackknife)
    from geoopt_sgd import METRICS

    model, loss_fn, X, y = _case("mlp-ce")
    delta = torch.randn(
        _numel(model), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    for name in METRICS:
        if name == "n_nonfinite":
            continue
        res = noise_geometry(
            model,
            loss_fn,
            (X, y),
            metrics=[name],
            k=3,
            route="sketch",
            curvature=curvature,
            displacement=delta,
        )
        if name in ("noise_energies", "directional_alignment"):  # arrays
            assert bool(torch.isfinite(getattr(res, name)).all()), name
        else:
            assert math.isfinite(res.values[name]), (name, res.values)
        assert res.values["n_nonfinite"] == 0
        assert set(res.standard_errors) <= set(res.values)


# every metric the Hessian sketch route estimates by probes
HESSIAN_SE = [
    "alpha",
    "beta",
    "mu",
    "mu1",
    "mu2",
    "loss_alignment",
    "tr_sigma",
    "tr_h_sigma",
    "tr_h_sigma_iso",
    "projection_coefficient",
    "mu_hessian",
]


def test_hessian_sketch_reports_standard_errors():
    # curvature="hessian": every probe estimate gets a positive, finite jackknife
    # standard error, as on the GGN route (gradient_uniformity from the GGN's chi)
    model, loss_fn, X, y = _case("mlp-ce")
    keys = [*HESSIAN_SE, "gradient_uniformity"]
    res = noise_geometry(
        model, loss_fn, (X, y), metrics=keys, curvature="hessian", route="sketch", k=3
    )
    for key in keys:
        se = res.standard_errors[key]
        assert math.isfinite(se) and se > 0, key
    assert res.as_dict()["se_mu"] == res.standard_errors["mu"]
    # mu_hessian with curvature="ggn": the same Hessian probes, the same error bar
    ggn = noise_geometry(
        model, loss_fn, (X, y), metrics=["mu", "mu_hessian"], route="sketch", k=3
    )
    assert ggn.standard_errors["mu_hessian"] == res.standard_errors["mu"]


@pytest.mark.parametrize("num_probes", [5, 10])
def test_hessian_standard_errors_match_dense_jackknife(num_probes):
    # replicate t leaves out isotropic probe t, natural probe t and Rademacher
    # probe t together (Tr(Sigma_2 H) is exact and stays). The private
    # generator's draws replayed (as in the test above) through the explicit
    # Hessian, covariance and eigenvectors, each replicate recomputed from the
    # remaining probes: the standard errors agree to float64 rounding. Not
    # deleting a family's probe, or deleting another index, changes them.
    model, loss_fn, X, y = _case("mlp-ce")
    P, n, s = _numel(model), X.shape[0], num_probes
    res = noise_geometry(
        model,
        loss_fn,
        (X, y),
        metrics=HESSIAN_SE,
        curvature="hessian",
        route="sketch",
        k=3,
        num_probes=s,
        seed=4,
    )
    Zu, z, Z = _hessian_probes(P, n, s, seed=4)
    D = psg(model, loss_fn, X, y)
    H = dense_curvature(model, loss_fn, X, y, kind="hessian")
    cov, _, Mi = _dense_pieces(model, loss_fn, X, y)
    xi = D.T @ z.T / math.sqrt(n)
    gbar = D.mean(0)
    nat = (xi * (H @ xi)).sum(0)  # xi_t^T H xi_t
    rad = (Z * (H @ Z)).sum(0)  # z_t^T H z_t
    rad2 = (H @ Z).square().sum(0)  # ||H z_t||^2
    tr_s2h = float(gbar @ H @ gbar)
    with torch.no_grad():
        L = float(loss_fn(model(X), y))
    proj = float(res.noise_energies[0] / res.eigenvalues[0])
    reps = []
    for t in range(s):
        keep = [i for i in range(s) if i != t]
        est = _dense_estimates(
            cov["sigma"], cov["sigma2"], H, Mi, res.eigenvectors, Zu[:, keep]
        )
        tr_s, fro2_s = est["tr_sigma"], est["fro2_sigma"]
        tr_s1h = float(nat[keep].mean())
        tr_h, fro2_h = float(rad[keep].mean()), float(rad2[keep].mean())
        tr_sh = tr_s1h - tr_s2h
        den = 2 * L * fro2_h
        reps.append(
            {
                "alpha": tr_sh / math.sqrt(fro2_h * fro2_s),
                "beta": math.sqrt(fro2_s) / (2 * L * math.sqrt(fro2_h)),
                "mu": tr_sh / den,
                "mu1": tr_s1h / den,
                "mu2": tr_s2h / den,
                "loss_alignment": tr_s1h / den,
                "tr_sigma": tr_s,
                "tr_h_sigma": tr_sh,
                "tr_h_sigma_iso": tr_h * tr_s / P,
                "projection_coefficient": proj * tr_h / tr_s,
                "mu_hessian": tr_sh / den,
            }
        )
    for key in HESSIAN_SE:
        v = torch.tensor([r[key] for r in reps], dtype=torch.float64)
        se = float(((s - 1) / s * ((v - v.mean()) ** 2).sum()).sqrt())
        assert res.standard_errors[key] == pytest.approx(se, rel=1e-7, abs=1e-14), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp-ce", "mlp-mse"])
def test_hessian_standard_errors_are_calibrated(name):
    # over 60 seeds (s = 8, k = 3, a fixed seed range, so deterministic) the
    # spread of each Hessian-route estimate must match its mean reported
    # standard error, and the exact value lie within 3 reported SEs for most
    # seeds. Measured (mean SE / std over the seeds): mlp-ce 1.00-1.15,
    # mlp-mse 0.89-1.08; within 3 SEs: 0.92-1.00 and 0.90-0.98 of the seeds.
    # Not deleting the Rademacher probes gave ratios 0.21-0.22 (tr_h_sigma_iso,
    # projection_coefficient; 0 for mu2) and 0.43-0.50 within 3 SEs on mlp-ce;
    # not deleting the natural probes 0.24-0.39 (mu, mu1, alpha; 0 for
    # tr_h_sigma) and 0.52-0.68.
    model, loss_fn, X, y = _case(name)
    kw = {"metrics": HESSIAN_SE, "curvature": "hessian", "k": 3}
    ex = noise_geometry(model, loss_fn, (X, y), route="exact", **kw)
    vals = {m: [] for m in HESSIAN_SE}
    ses = {m: [] for m in HESSIAN_SE}
    for seed in range(60):
        r = noise_geometry(
            model, loss_fn, (X, y), route="sketch", num_probes=8, seed=seed, **kw
        )
        for m in HESSIAN_SE:
            vals[m].append(r.values[m])
            ses[m].append(r.standard_errors[m])
    for m in HESSIAN_SE:
        ratio = statistics.mean(ses[m]) / statistics.stdev(vals[m])
        assert 0.7 < ratio < 1.4, (m, ratio)
        within = sum(
            abs(v - ex.values[m]) < 3 * e for v, e in zip(vals[m], ses[m], strict=True)
        )
        assert within >= 0.85 * 60, (m, within)


def test_sketch_depends_on_the_deflation_basis_only_through_its_span(monkeypatch):
    # the sketch orthonormalises its deflation basis (Q = U S^{-1/2}) and drops
    # only numerically dependent directions (S's eigenvalues below 1e-12 of the
    # largest). Handing it U A for an ill-conditioned A (cond 100, so S's
    # eigenvalues spread over 1e-4) plus a dependent column spans the same
    # space: every estimate and standard error is unchanged to rounding.
    # Not orthonormalising (Q = U S^{-1}), or dropping well-conditioned
    # directions, changes them.
    from geoopt_sgd.probes import _sketch

    model, loss_fn, X, y = _case("mlp-ce")
    kw = {"metrics": SKETCH, "route": "sketch", "k": 3, "num_probes": 6, "seed": 2}
    ref = noise_geometry(model, loss_fn, (X, y), **kw)
    g = torch.Generator().manual_seed(1)
    R, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    A = R @ torch.diag(torch.tensor([3.0, 1.0, 0.03], dtype=torch.float64))
    A = torch.cat([A, A[:, :1] - 2 * A[:, 2:]], 1)  # (3, 4), rank 3

    class Rebased(_sketch.Sketch):
        def __init__(self, ctx, Zu, tZ, U, tU, need_ggn):
            Ad = A.to(U)
            super().__init__(ctx, Zu, tZ, U @ Ad, tU.combine(Ad), need_ggn)

    monkeypatch.setattr(_sketch, "Sketch", Rebased)
    got = noise_geometry(model, loss_fn, (X, y), **kw)
    for key in SKETCH:
        assert got.values[key] == pytest.approx(ref.values[key], rel=1e-9), key
        assert got.standard_errors[key] == pytest.approx(
            ref.standard_errors[key], rel=1e-7, abs=1e-14
        ), key
