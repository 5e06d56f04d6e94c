"""Lanczos eigensolver vs dense float64 eigh on matrices with known spectra."""

import math
import warnings

import pytest
import torch

from geoopt_sgd import DenseOperator, bottom_eigenpairs, top_eigenpairs
from geoopt_sgd.curvature.linop import LinearOperator


def sym(lams, seed=0, dtype=torch.float64):
    """Q diag(lams) Q^T with a seeded random orthogonal Q."""
    lams = torch.as_tensor(lams, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(
        torch.randn(len(lams), len(lams), generator=g, dtype=torch.float64)
    )
    return ((Q * lams) @ Q.T).to(dtype)


def outlier_spectrum(P=300, seed=1):
    """resnet-like: 15 positive outliers, a bulk near 0, 5 negative outliers that
    outrank most positive ones in magnitude."""
    g = torch.Generator().manual_seed(seed)
    top = torch.linspace(100, 20, 15, dtype=torch.float64)
    bulk = torch.randn(P - 20, generator=g, dtype=torch.float64)
    neg = -torch.linspace(90, 50, 5, dtype=torch.float64)
    return torch.cat([top, bulk, neg])


def assert_vectors_match(Y, U, tol):
    # eigenvectors up to sign: |<y, u>| = 1 for each column
    overlap = (Y.T @ U).diagonal().abs()
    assert torch.all((overlap - 1).abs() < tol), overlap


@pytest.mark.parametrize("k", [1, 5, 12])
def test_top_eigenpairs_match_eigh(k):
    lams = outlier_spectrum()
    A = sym(lams)
    lam_ref, U_ref = torch.linalg.eigh(A)
    lam_ref, U_ref = lam_ref.flip(0), U_ref.flip(1)
    res = top_eigenpairs(DenseOperator(A), k, tol=1e-8)
    assert res.converged
    assert res.eigenvalues.dtype == torch.float64 and res.eigenvalues.shape == (k,)
    assert torch.all(res.eigenvalues[:-1] >= res.eigenvalues[1:])
    # residual tol 1e-8 bounds |theta - lambda| <= 1e-8 |lambda| (Bauer-Fike);
    # gaps here are >= 5, so the eigenvalue error is ~res^2/gap, far below 1e-9
    torch.testing.assert_close(res.eigenvalues, lam_ref[:k], rtol=1e-9, atol=0)
    # vectors: sin(angle) <= res/gap ~ 1e-8 * 100 / 5
    assert_vectors_match(res.eigenvectors, U_ref[:, :k], 1e-10)
    assert torch.all(res.residuals <= 1e-8)
    # the reported residuals are true residuals
    R = A @ res.eigenvectors - res.eigenvectors * res.eigenvalues
    true = R.norm(dim=0) / res.eigenvalues.abs()
    torch.testing.assert_close(res.residuals, true, rtol=1e-2, atol=1e-13)
    assert res.n_matvec > 0 and res.wall_time >= 0


def test_la_never_reports_negative_outliers():
    # -90..-50 outrank the positive eigenvalues below 50 in magnitude
    A = sym(outlier_spectrum())
    res = top_eigenpairs(DenseOperator(A), 12, tol=1e-6)
    assert torch.all(res.eigenvalues > 0)
    lm = top_eigenpairs(DenseOperator(A), 12, which="LM", tol=1e-6)
    ref = torch.linalg.eigvalsh(A)
    ref_lm = ref[ref.abs().argsort(descending=True)][:12].sort(descending=True).values
    torch.testing.assert_close(lm.eigenvalues, ref_lm, rtol=1e-8, atol=0)
    assert (lm.eigenvalues < 0).sum() == 4  # -90, -80, -70, -60


def test_sa_be_and_bottom():
    A = sym(outlier_spectrum())
    ref = torch.linalg.eigvalsh(A)
    sa = top_eigenpairs(DenseOperator(A), 3, which="SA", tol=1e-8)
    # sorted descending even for SA
    torch.testing.assert_close(sa.eigenvalues, ref[:3].flip(0), rtol=1e-9, atol=0)
    bot = bottom_eigenpairs(DenseOperator(A), 3, tol=1e-8)
    torch.testing.assert_close(bot.eigenvalues, ref[:3], rtol=1e-9, atol=0)
    _, U = torch.linalg.eigh(A)
    assert_vectors_match(bot.eigenvectors, U[:, :3], 1e-10)
    be = top_eigenpairs(DenseOperator(A), 5, which="BE", tol=1e-8)
    expect = torch.cat([ref[-3:].flip(0), ref[:2].flip(0)])
    torch.testing.assert_close(be.eigenvalues, expect, rtol=1e-9, atol=0)


def test_restarts_bound_memory_and_converge():
    # a small basis forces many thick restarts; results stay exact
    A = sym(outlier_spectrum())
    ref = torch.linalg.eigvalsh(A).flip(0)
    res = top_eigenpairs(DenseOperator(A), 5, tol=1e-8, max_basis=9)
    assert res.converged and res.n_matvec > 9
    torch.testing.assert_close(res.eigenvalues, ref[:5], rtol=1e-9, atol=0)


def test_dense_cluster_none_missed():
    # 20 eigenvalues within 1% of each other above a bulk: the guards must keep
    # Lanczos from skipping one of the cluster
    g = torch.Generator().manual_seed(3)
    lams = torch.cat(
        [
            10 + 0.1 * torch.rand(20, generator=g, dtype=torch.float64),
            torch.rand(180, generator=g, dtype=torch.float64) * 5,
        ]
    )
    A = sym(lams)
    ref = torch.linalg.eigvalsh(A).flip(0)
    for seed in range(3):
        res = top_eigenpairs(DenseOperator(A), 10, tol=1e-6, seed=seed)
        # residual 1e-6 * 10 bounds each error; none missed means elementwise match
        torch.testing.assert_close(res.eigenvalues, ref[:10], rtol=2e-6, atol=0)


def test_gap_free_spectrum_fewer_missed_at_k20():
    # a gap-free top spectrum (squared linspace plus noise: neighbours ~0.3% apart,
    # lambda_20 and lambda_21 nearly equal), as dense as the tolerance. Over start
    # vectors 0-9 at k = 20, tol = 1e-3, one guard value returned lambda_21 in
    # place of a top-20 eigenvalue (error 4e-3) for 6 of them, scipy eigsh for 5,
    # and ceil(k / 8) = 3 guards for 3 (as on benchmarks/curvature.py's MLP, where
    # one guard skipped one for start vector 8 of 20 and three guards none).
    g = torch.Generator().manual_seed(111)
    lams = torch.linspace(1, 0, 600, dtype=torch.float64) ** 2
    lams = lams + 0.002 * torch.randn(600, generator=g, dtype=torch.float64)
    A = sym(lams, seed=11)
    ref = torch.linalg.eigvalsh(A).flip(0)[:20]
    skipped = 0
    for seed in range(10):
        res = top_eigenpairs(DenseOperator(A), 20, tol=1e-3, seed=seed)
        assert res.converged
        # each value within its residual bound of the matching eigenvalue, unless
        # one was skipped, which shifts the later values by a whole spacing
        err = ((res.eigenvalues - ref).abs() / ref).max()
        skipped += bool(err > 1e-3)
    assert skipped <= 3


def test_repeated_eigenvalues():
    lams = [5.0, 5.0, 5.0, 4.0, 3.0] + torch.linspace(2, 0, 95).tolist()
    A = sym(lams)
    res = top_eigenpairs(DenseOperator(A), 4, tol=1e-8)
    torch.testing.assert_close(
        res.eigenvalues,
        torch.tensor([5.0, 5.0, 5.0, 4.0], dtype=torch.float64),
        rtol=1e-8,
        atol=0,
    )
    # three orthonormal vectors spanning the 5-eigenspace
    Y = res.eigenvectors
    torch.testing.assert_close(
        Y.T @ Y, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0
    )


def test_indefinite_and_tiny_and_k_equals_p():
    A = sym([3.0, -7.0, 2.0])
    res = top_eigenpairs(DenseOperator(A), 2, tol=1e-10)
    torch.testing.assert_close(
        res.eigenvalues,
        torch.tensor([3.0, 2.0], dtype=torch.float64),
        rtol=1e-10,
        atol=0,
    )
    full = top_eigenpairs(DenseOperator(A), 3)
    assert full.n_matvec == 3 and full.converged
    torch.testing.assert_close(
        full.eigenvalues,
        torch.tensor([3.0, 2.0, -7.0], dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )
    one = top_eigenpairs(DenseOperator(torch.tensor([[2.5]], dtype=torch.float64)), 1)
    assert one.eigenvalues.tolist() == [2.5]


def test_zero_operator():
    res = top_eigenpairs(DenseOperator(torch.zeros(40, 40, dtype=torch.float64)), 3)
    assert res.converged
    assert torch.equal(res.eigenvalues, torch.zeros(3, dtype=torch.float64))
    Y = res.eigenvectors
    torch.testing.assert_close(
        Y.T @ Y, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert torch.equal(res.residuals, torch.zeros(3, dtype=torch.float64))


def test_float32_operator_keeps_dtype_and_accuracy():
    A = sym(outlier_spectrum())
    ref = torch.linalg.eigvalsh(A).flip(0)
    res = top_eigenpairs(DenseOperator(A.float()), 5, tol=1e-4)
    assert res.eigenvectors.dtype == torch.float32
    assert res.eigenvalues.dtype == torch.float64
    # float32 matrix rounding perturbs eigenvalues by ~1e-7 * ||A||
    torch.testing.assert_close(res.eigenvalues, ref[:5], rtol=1e-5, atol=0)


def test_warm_start_saves_matvecs():
    lams = outlier_spectrum()
    A = sym(lams)
    B = A + 1e-4 * sym(
        torch.randn(len(lams), generator=torch.Generator().manual_seed(9)), seed=5
    )
    prev = top_eigenpairs(DenseOperator(A), 1, tol=1e-6)
    cold = top_eigenpairs(DenseOperator(B), 1, tol=1e-6)
    warm = top_eigenpairs(DenseOperator(B), 1, tol=1e-6, v0=prev.eigenvectors)
    assert warm.converged
    assert warm.n_matvec < cold.n_matvec
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-8, atol=0)
    # block warm start (P, m) is accepted
    block = top_eigenpairs(
        DenseOperator(B), 3, tol=1e-6, v0=torch.randn(len(lams), 3, dtype=torch.float64)
    )
    assert block.converged


def test_budget_exhausted_warns_and_says_so():
    A = sym(outlier_spectrum())
    with pytest.warns(RuntimeWarning, match="did not converge within 6 matvecs"):
        res = top_eigenpairs(DenseOperator(A), 5, tol=1e-12, max_matvecs=6)
    assert not res.converged and res.n_matvec == 6
    assert res.residuals.max() > 1e-12


@pytest.mark.parametrize("which", ["LA", "SA", "BE", "LM", "bottom"])
def test_budget_below_k_is_refused_at_the_call(which):
    # m products span at most m Ritz pairs: a budget below k returned fewer
    # than the k pairs asked for (k = 5, budget 2: two values; mutation audit)
    op = DenseOperator(sym(outlier_spectrum()))
    fn = bottom_eigenpairs if which == "bottom" else top_eigenpairs
    kwargs = {} if which == "bottom" else {"which": which}
    for budget in (1, 2, 4):
        with pytest.raises(ValueError, match=r"`max_matvecs` must be >= k = 5"):
            fn(op, 5, max_matvecs=budget, **kwargs)
    assert op.n_matvec == 0
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = fn(op, 5, tol=1e-12, max_matvecs=5, **kwargs)
    assert res.eigenvalues.shape == (5,) and res.eigenvectors.shape[1] == 5


def test_seeded_deterministic_and_global_rng_untouched():
    A = DenseOperator(sym(outlier_spectrum()))
    state = torch.get_rng_state()
    a = top_eigenpairs(A, 3)
    b = top_eigenpairs(A, 3)
    c = top_eigenpairs(A, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.eigenvectors, b.eigenvectors) and a.n_matvec == b.n_matvec
    assert not torch.equal(a.eigenvectors, c.eigenvectors)


def test_result_is_frozen():
    res = top_eigenpairs(DenseOperator(sym([1.0, 2.0, 3.0, 4.0])), 1)
    with pytest.raises(AttributeError):
        res.converged = False


class _Counting(LinearOperator):
    def __init__(self, A):
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A

    def _matmat(self, V):
        return self.A @ V


def test_custom_operator_counts_products():
    op = _Counting(sym(outlier_spectrum()))
    res = top_eigenpairs(op, 2)
    assert op.n_matvec == res.n_matvec


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"k": 0}, ValueError, r"`k` must be >= 1; got 0"),
        ({"k": -2}, ValueError, r"`k` must be >= 1; got -2"),
        ({"k": 11}, ValueError, r"`k` must be <= P = 10 .*; got 11"),
        ({"k": 1.5}, TypeError, r"`k` must be an integer; got float"),
        (
            {"which": "LR"},
            ValueError,
            r"`which` must be one of 'LA', 'SA', 'LM', 'BE'; got 'LR'",
        ),
        ({"tol": 0.0}, ValueError, r"`tol` must be > 0; got 0.0"),
        ({"tol": -1e-3}, ValueError, r"`tol` must be > 0"),
        ({"max_matvecs": 0}, ValueError, r"`max_matvecs` must be >= 1; got 0"),
        ({"max_basis": 3, "k": 2}, ValueError, r"`max_basis` must be >= 4; got 3"),
        ({"seed": -1}, ValueError, r"`seed` must be >= 0; got -1"),
        (
            {"v0": torch.ones(9)},
            ValueError,
            r"`v0`: expected shape \(10,\) or \(10, m\), got \(9,\)",
        ),
        ({"v0": torch.full((10,), math.nan)}, ValueError, r"`v0` must be finite"),
        ({"v0": [1.0] * 10}, TypeError, r"`v0` must be a torch.Tensor; got list"),
    ],
    ids=lambda x: str(x) if not isinstance(x, dict) else ",".join(x),
)
def test_invalid_arguments(kwargs, err, match):
    op = DenseOperator(sym(range(10)))
    kwargs = {"k": 1, **kwargs}
    k = kwargs.pop("k")
    with pytest.raises(err, match=match):
        top_eigenpairs(op, k, **kwargs)


def test_operator_type_checked():
    with pytest.raises(
        TypeError, match="`operator` must be a LinearOperator; got Tensor"
    ):
        top_eigenpairs(torch.eye(3), 1)
    with pytest.raises(ValueError, match="`k` must be >= 1"):
        bottom_eigenpairs(DenseOperator(torch.eye(3)), 0)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("max_basis", [4, 7])
def test_low_rank_breakdown_with_small_basis(max_basis, verify):
    # rank 3: the Krylov space is invariant after 3 products; the solver must
    # continue from fresh directions (also when the basis is full) and return the
    # zero eigenvalues exactly
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(200, 3, generator=g, dtype=torch.float64))
    A = (U * torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)) @ U.T
    k = max_basis - 2
    res = top_eigenpairs(
        DenseOperator(A), k, max_basis=max_basis, tol=1e-8, verify=verify
    )
    expect = torch.tensor([5.0, 3.0, 1.0, 0.0, 0.0][:k], dtype=torch.float64)
    # the zero eigenvalues move by rounding during the skip check: no skip
    assert res.converged and res.verified == verify
    torch.testing.assert_close(res.eigenvalues, expect, rtol=0, atol=1e-12)
    Y = res.eigenvectors
    torch.testing.assert_close(
        Y.T @ Y, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0
    )


# --- the stopping rule, the DGKS pass and the dense path's residuals ---


@pytest.mark.parametrize("which", ["LA", "SA", "BE", "LM"])
def test_stops_converged_with_true_residuals_within_tol(which):
    # the solve stops when every returned pair's true residual is within tol
    # (not a multiple of it): converged, no warning, orthonormal vectors
    A = sym(outlier_spectrum())
    for tol in (1e-4, 1e-7):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = top_eigenpairs(
                DenseOperator(A), 5, which=which, tol=tol, verify=False
            )
        assert res.converged
        Y = res.eigenvectors
        true = (A @ Y - Y * res.eigenvalues).norm(dim=0) / res.eigenvalues.abs()
        assert bool((true <= tol).all()), (tol, true)
        torch.testing.assert_close(res.residuals, true, rtol=1e-3, atol=1e-12)
        torch.testing.assert_close(
            Y.T @ Y, torch.eye(5, dtype=torch.float64), atol=1e-13, rtol=0
        )


@pytest.mark.parametrize("scale", [1e-9, 1e-11])
def test_basis_stays_orthonormal_when_the_krylov_space_nearly_closes(scale):
    # rank 10 plus a bulk of size `scale`: after 10 steps A v is nearly in the
    # basis and one Gram-Schmidt pass cancels; the second (DGKS) pass keeps the
    # Ritz vectors orthonormal to round-off (one pass: ~1e-7 off)
    g = torch.Generator().manual_seed(4)
    lams = torch.cat(
        [
            torch.linspace(10, 1, 10, dtype=torch.float64),
            scale * torch.randn(190, generator=g, dtype=torch.float64),
        ]
    )
    A = sym(lams, seed=2)
    ref = torch.linalg.eigvalsh(A).flip(0)
    for k in (10, 12):
        res = top_eigenpairs(DenseOperator(A), k, tol=1e-8, verify=False)
        Y = res.eigenvectors
        torch.testing.assert_close(
            Y.T @ Y, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0
        )
        torch.testing.assert_close(res.eigenvalues[:10], ref[:10], rtol=1e-9, atol=0)


def test_dense_path_residuals_are_the_documented_relative_residuals():
    # k == P: dense eigh; residuals ||A u - lam u|| / max(|lam|, sqrt(eps) ||A||),
    # here with an exact zero eigenvalue (floor sqrt(eps) * 7)
    A = sym([3.0, -7.0, 2.0, 0.0], seed=1)
    res = top_eigenpairs(DenseOperator(A), 4)
    S = (A + A.T) / 2
    lam, U = torch.linalg.eigh(S)
    R = (S @ U - U * lam).norm(dim=0)
    denom = lam.abs().clamp_min(math.sqrt(torch.finfo(torch.float64).eps) * 7.0)
    idx = lam.argsort(descending=True)
    torch.testing.assert_close(res.eigenvalues, lam[idx], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(res.residuals, (R / denom)[idx], rtol=1e-12, atol=0)
    assert bool((res.residuals < 1e-7).all()) and res.converged and res.verified
    Y = res.eigenvectors
    torch.testing.assert_close(A @ Y, Y * res.eigenvalues, rtol=0, atol=1e-13)
