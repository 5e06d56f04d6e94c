"""The pure noise samplers of geoopt_sgd.optim.noise vs dense float64 references."""

import math

import pytest
import torch

from geoopt_sgd.optim import noise as N


def _gen(seed=0, step=0, stream=0):
    return N.make_generator(seed, step, "cpu", stream)


def _second_moment(samples):
    return samples.T @ samples / samples.shape[0]


def _moment_tolerance(S, num):
    # Each entry of the empirical second moment of num Gaussian samples has
    # variance (S_aa S_bb + S_ab^2) / num <= 2 max_a(S_aa)^2 / num; 5 standard
    # deviations bound every entry of a P <= 6 matrix except with probability
    # ~1e-5 (and the seeds are fixed, so the test is deterministic).
    return 5 * math.sqrt(2 / num) * float(S.diagonal().max())


def _random_spd(P, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=torch.float64)
    return A @ A.T / P + 0.1 * torch.eye(P, dtype=torch.float64)


# ---------------------------------------------------------------- streams
def test_step_seed_is_a_pure_function_of_seed_step_stream():
    assert N.step_seed(3, 7) == N.step_seed(3, 7)
    seeds = {N.step_seed(s, t, r) for s in range(3) for t in range(5) for r in range(3)}
    assert len(seeds) == 45  # all distinct
    assert all(0 <= x < 2**63 for x in seeds)


def test_make_generator_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a = N.standard_normal(10, generator=_gen(1, 2))
    b = N.standard_normal(10, generator=_gen(1, 2))
    assert torch.equal(a, b)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=-1, step=0), r"`seed` must be >= 0; got -1"),
        (dict(seed=0, step=-2), r"`step` must be >= 0; got -2"),
        (dict(seed=0, step=0, stream=-1), r"`stream` must be >= 0; got -1"),
    ],
)
def test_step_seed_rejects_negative(kwargs, match):
    with pytest.raises(ValueError, match=match):
        N.step_seed(**kwargs)


def test_step_seed_rejects_non_integer():
    with pytest.raises(TypeError, match=r"`seed` must be an integer; got float"):
        N.step_seed(1.5, 0)


# -------------------------------------------------------------- isotropic
def test_isotropic_noise_is_the_stream_and_its_multiplier():
    # optax-style coupling: the same stream at scale s and 2s differs by exactly 2x
    a = N.isotropic_noise(1000, 0.3, generator=_gen(), dtype=torch.float64)
    b = N.isotropic_noise(1000, 0.6, generator=_gen(), dtype=torch.float64)
    z = N.standard_normal(1000, generator=_gen(), dtype=torch.float64)
    assert torch.equal(a.direction, z) and torch.equal(b.direction, z)
    assert (a.alpha, b.alpha) == (0.3, 0.6)
    assert a.target_sq_norm == 0.3 * 0.3 * 1000
    # variance sigma^2: alpha = s sigma, E||xi||^2 = s^2 sigma^2 P
    c = N.isotropic_noise(10, 2.0, variance=0.25, generator=_gen())
    assert (c.alpha, c.target_sq_norm) == (1.0, 10.0)


def test_isotropic_noise_fills_the_workspace():
    ws = torch.empty(7, dtype=torch.float64)
    out = N.isotropic_noise(7, 1.0, generator=_gen(2), out=ws)
    assert out.direction is ws
    assert torch.equal(ws, N.standard_normal(7, generator=_gen(2), dtype=ws.dtype))


# --------------------------------------------------------------- diagonal
def test_diagonal_noise_is_sqrt_variance_times_the_stream():
    v = torch.tensor([4.0, 0.25, 0.0, -1e-18], dtype=torch.float64)
    xi = N.diagonal_noise(v, generator=_gen(5))
    z = N.standard_normal(4, generator=_gen(5), dtype=torch.float64)
    # sqrt of 4, 0.25 and 0 are exact; the round-off negative counts as 0
    assert torch.equal(xi, z * torch.tensor([2.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    # coupling: variance x4 -> noise x2 exactly (sqrt is correctly rounded)
    assert torch.equal(N.diagonal_noise(4 * v, generator=_gen(5)), 2 * xi)


def test_diagonal_noise_covariance():
    v = torch.tensor([2.0, 0.5, 1.0, 0.1], dtype=torch.float64)
    num = 20000
    g = _gen(11)
    samples = torch.stack([N.diagonal_noise(v, generator=g) for _ in range(num)])
    S = torch.diag(v)
    err = (_second_moment(samples) - S).abs().max()
    assert err < _moment_tolerance(S, num)


# -------------------------------------------------------------- low rank
def test_clamp_eigenvalues_counts_negative_and_nan():
    lam = torch.tensor([3.0, 0.0, -1.0, float("nan"), -0.0])
    out, n = N.clamp_eigenvalues(lam)
    assert n == 2
    assert torch.equal(out, torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0]))


def test_low_rank_noise_is_the_eigenbasis_map_of_the_stream():
    H = _random_spd(6)
    lam, U = torch.linalg.eigh(H)
    lam, U = lam.flip(0)[:3], U.flip(1)[:, :3]
    xi = N.low_rank_noise(lam, U, generator=_gen(2), scale=1.5)
    z = N.standard_normal(3, generator=_gen(2), dtype=torch.float64)
    # same operations as the sampler: exact
    assert torch.equal(xi, U @ (z * lam.sqrt() * 1.5))


def test_low_rank_noise_covariance_matches_top_k_of_dense_matrix():
    H = _random_spd(5, seed=3)
    lam, U = torch.linalg.eigh(H)
    lam, U = lam.flip(0)[:2], U.flip(1)[:, :2]
    num, g = 20000, _gen(4)
    samples = torch.stack(
        [N.low_rank_noise(lam, U, generator=g, scale=2.0) for _ in range(num)]
    )
    S = 4.0 * (U * lam) @ U.T
    assert (_second_moment(samples) - S).abs().max() < _moment_tolerance(S, num)
    # nothing outside the top-2 eigenspace (round-off only)
    P = torch.eye(5, dtype=torch.float64) - U @ U.T
    assert (samples @ P).abs().max() < 1e-12


def test_low_rank_noise_with_no_positive_eigenvalue_is_zero_not_nan():
    U = torch.linalg.qr(_random_spd(4)[:, :2])[0]
    lam, n = N.clamp_eigenvalues(torch.tensor([-1.0, -2.0], dtype=torch.float64))
    xi = N.low_rank_noise(lam, U, generator=_gen())
    assert n == 2
    assert torch.equal(xi, torch.zeros(4, dtype=torch.float64))


def test_low_rank_noise_counts_negative_eigenvalues_as_zero():
    # unclamped Ritz values: a negative eigenvalue adds nothing (not sqrt|lambda|)
    U = torch.linalg.qr(_random_spd(5)[:, :3])[0]
    lam = torch.tensor([4.0, -1.0, 0.25], dtype=torch.float64)
    xi = N.low_rank_noise(lam, U, generator=_gen(3), scale=2.0)
    z = N.standard_normal(3, generator=_gen(3), dtype=torch.float64)
    roots = torch.tensor([2.0, 0.0, 0.5], dtype=torch.float64)
    assert torch.equal(xi, U @ (z * roots * 2.0))


def test_low_rank_noise_errors():
    U = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"`eigenvectors`: expected shape \(P, 3\)"):
        N.low_rank_noise(torch.ones(3), U, generator=_gen())
    with pytest.raises(ValueError, match=r"`scale` must be >= 0; got -1"):
        N.low_rank_noise(torch.ones(2), U, generator=_gen(), scale=-1)


# ----------------------------------------------------- mini-batch statistics
def _batch_grads(M=7, P=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, P, generator=g, dtype=torch.float64) + 0.3


def test_minibatch_statistics_match_explicit_covariance():
    G = _batch_grads()
    mean, diag, trace = N.minibatch_statistics(G)
    C = G.T @ G / G.shape[0] - torch.outer(G.mean(0), G.mean(0))
    # float64 with 7 rows: the two formulas agree to round-off
    torch.testing.assert_close(mean, G.mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(diag, C.diagonal(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(trace, C.trace(), rtol=1e-12, atol=1e-13)


def test_minibatch_eigenpairs_match_dense_eigh():
    G = _batch_grads(M=6, P=9)
    C = G.T @ G / G.shape[0] - torch.outer(G.mean(0), G.mean(0))
    ref_e, ref_V = torch.linalg.eigh(C)
    ref_e, ref_V = ref_e.flip(0), ref_V.flip(1)
    e, V = N.minibatch_eigenpairs(G, 3)
    # Gram route vs P x P eigh, float64, well-separated eigenvalues
    torch.testing.assert_close(e, ref_e[:3], rtol=1e-10, atol=1e-12)
    overlap = (V.T @ ref_V[:, :3]).abs()
    torch.testing.assert_close(
        overlap, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0
    )
    # C has rank M - 1 = 5: asking for 6 gives one zero column, never NaN
    e6, V6 = N.minibatch_eigenpairs(G, 8)
    assert e6.shape == (6,) and V6.shape == (9, 6)
    assert e6[-1] == 0 and torch.equal(V6[:, -1], torch.zeros(9, dtype=torch.float64))
    torch.testing.assert_close(V6 @ torch.diag(e6) @ V6.T, C, atol=1e-12, rtol=0)


def test_minibatch_eigenpairs_drop_the_round_off_null_direction():
    # C has rank M - 1: its Gram's last eigenvalue is round-off, of either sign
    # (positive ~1e-16 for seeds 1, 3, 4): it is dropped below tol = 1e-12 M
    # e_max, never kept as a direction scaled by 1 / sqrt(1e-16)
    for seed in range(6):
        G = _batch_grads(M=6, P=9, seed=seed)
        e, V = N.minibatch_eigenpairs(G, 6)
        assert e[-1] == 0 and torch.equal(V[:, -1], torch.zeros(9, dtype=G.dtype))
        torch.testing.assert_close(
            V[:, :5].T @ V[:, :5], torch.eye(5, dtype=G.dtype), atol=1e-10, rtol=0
        )


def test_minibatch_errors():
    with pytest.raises(ValueError, match=r"with M >= 2 mini-batches; got \(1, 3\)"):
        N.minibatch_statistics(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"with M >= 2 mini-batches; got \(3,\)"):
        N.minibatch_eigenpairs(torch.zeros(3), 1)
    with pytest.raises(ValueError, match=r"`k` must be >= 1; got 0"):
        N.minibatch_eigenpairs(torch.zeros(3, 3), 0)


# ------------------------------------------------------------ reweighting
def test_reweighting_gives_exactly_the_sgd_covariance():
    # xi = sum_i w_i grad L_i is linear in z: xi = A z with A = Gs^T (I - 11^T/n)
    # / sqrt(nB). Its covariance A A^T must equal Sigma / B, the per-sample
    # gradient covariance (1/n) over the batch size, up to float64 round-off.
    n, P, B = 10, 4, 3
    Gs = _batch_grads(M=n, P=P, seed=7)  # rows: per-sample gradients
    cols = [
        Gs.T @ N.reweighting_weights(e, B) for e in torch.eye(n, dtype=torch.float64)
    ]
    A = torch.stack(cols, 1)
    centred = Gs - Gs.mean(0)
    Sigma = centred.T @ centred / n
    torch.testing.assert_close(A @ A.T, Sigma / B, rtol=1e-12, atol=1e-14)


def test_reweighting_weights_sum_to_zero_and_split_across_ranks():
    z = N.standard_normal(9, generator=_gen(3), dtype=torch.float64)
    w = N.reweighting_weights(z, 2)
    assert abs(float(w.sum())) < 1e-14
    # two "ranks" holding 4 and 5 samples, sharing n and z-bar, give the same weights
    parts = [
        N.reweighting_weights(part, 2, total=9, z_mean=z.mean())
        for part in (z[:4], z[4:])
    ]
    assert torch.equal(torch.cat(parts), w)


def test_reweighting_errors():
    with pytest.raises(ValueError, match=r"`batch_size` must be >= 1; got 0"):
        N.reweighting_weights(torch.ones(3), 0)
    with pytest.raises(ValueError, match=r"`z` must hold at least one sample"):
        N.reweighting_weights(torch.ones(0), 1)


# ------------------------------------------------- one sampler per noise kind
def _statistics():
    """Statistics of one refresh and the dense C they come from (float64)."""
    G = _batch_grads(M=6, P=5, seed=2)
    _, diag, trace = N.minibatch_statistics(G)
    e, V = N.minibatch_eigenpairs(G, 3)
    stats = dict(
        trace_c=trace,
        variance=diag,
        eigenvalues=e,
        eigenvectors=V,
        loss=torch.tensor(0.7, dtype=torch.float64),
        trace_h=torch.tensor(3.2, dtype=torch.float64),
    )
    C = G.T @ G / G.shape[0] - torch.outer(G.mean(0), G.mean(0))
    return stats, C


def _dense_covariance(kind, magnitude, C, B):
    """The covariance of each kind at s = 1 from the dense C (class table)."""
    P = C.shape[0]
    eye = torch.eye(P, dtype=torch.float64)
    e, V = torch.linalg.eigh(C)
    e, V = e.flip(0)[:3], V.flip(1)[:, :3]
    if kind in ("top_eigvec",):
        e, V = e[:1], V[:, :1]
    low_rank = (V * e) @ V.T
    if kind == "isotropic_matched":
        return eye / P if magnitude == "unit" else C.trace() / P * eye
    if kind == "diagonal":
        D = torch.diag(C.diagonal())
        return D / D.trace() if magnitude == "unit" else D
    if kind in ("sgd_leading", "hessian", "top_eigvec"):
        norm = {"sgd": C.trace() / e.sum(), "unit": 1 / e.sum(), "raw": 1.0}
        return norm[magnitude] * low_rank
    if kind == "geometry_aware":
        return 2 * 0.7 / B * low_rank
    if kind == "geometry_aware_isotropic":
        return 2 * 0.7 * 3.2 / (B * P) * eye
    raise AssertionError(kind)


@pytest.mark.parametrize("magnitude", ["sgd", "unit", "raw"])
@pytest.mark.parametrize("kind", sorted(N.SAMPLERS))
def test_each_sampler_realises_its_covariance(kind, magnitude):
    # the statistics come from the (exact) Gram route, the reference from the
    # dense C: the target is the covariance's trace to round-off, and 20000
    # draws of alpha * direction have its second moment
    stats, C = _statistics()
    S = 1.5**2 * _dense_covariance(kind, magnitude, C, B=4)
    sampler = N.SAMPLERS[kind]
    g = _gen(7)
    options = N.DrawOptions(
        numel=5, magnitude=magnitude, batch_size=4, generator=g, dtype=torch.float64
    )
    first = sampler(stats, 1.5, options)
    assert first.target_sq_norm == pytest.approx(float(S.trace()), rel=1e-10)
    num = 20000
    draws = [first] + [sampler(stats, 1.5, options) for _ in range(num - 1)]
    samples = torch.stack([d.alpha * d.direction for d in draws])
    assert (_second_moment(samples) - S).abs().max() < _moment_tolerance(S, num)


def test_samplers_draw_from_the_generator_only():
    # same generator state -> the same sample; the global RNG is untouched
    stats, _ = _statistics()
    kw = dict(numel=5, magnitude="sgd", batch_size=4, dtype=torch.float64)
    before = torch.get_rng_state()
    for kind, sampler in N.SAMPLERS.items():
        a = sampler(stats, 0.5, N.DrawOptions(generator=_gen(1, 3), **kw))
        b = sampler(stats, 0.5, N.DrawOptions(generator=_gen(1, 3), **kw))
        assert torch.equal(a.direction, b.direction), kind
        assert (a.alpha, a.target_sq_norm) == (b.alpha, b.target_sq_norm), kind
    assert torch.equal(before, torch.get_rng_state())


def test_low_rank_samplers_with_no_positive_mass_give_zero_noise_not_nan():
    stats, _ = _statistics()
    stats["eigenvalues"] = torch.zeros(3, dtype=torch.float64)
    kw = dict(numel=5, batch_size=4, dtype=torch.float64)
    for kind in ("sgd_leading", "hessian", "top_eigvec"):
        for magnitude in ("sgd", "unit"):
            options = N.DrawOptions(generator=_gen(), magnitude=magnitude, **kw)
            out = N.SAMPLERS[kind](stats, 1.0, options)
            assert out.alpha == 0.0 and out.target_sq_norm == 0.0
            assert torch.equal(out.direction, torch.zeros(5, dtype=torch.float64))
