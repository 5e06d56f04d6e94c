"""Block warm starts of top_eigenpairs on drifting operators, against eigh."""

import pytest
import torch

from geoopt_sgd import DenseOperator, EigenResult, bottom_eigenpairs, top_eigenpairs
from geoopt_sgd.curvature import lanczos


def drifting(P=400, outliers=30, seed=0):
    """``A`` with 30 outliers 7% apart over a [0, 1] bulk, and a symmetric ``E``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [
            10 * 0.93 ** torch.arange(outliers, dtype=torch.float64),
            torch.rand(P - outliers, generator=g, dtype=torch.float64),
        ]
    )
    E = torch.randn(P, P, generator=g, dtype=torch.float64)
    return (Q * lam) @ Q.T, (E + E.T) / (2 * P**0.5)


@pytest.fixture
def calls(monkeypatch):
    """Counts of block starts opened and focused expansions."""
    counts = {"open": 0, "focus": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(lanczos, "_open_block", counted("open", lanczos._open_block))
    monkeypatch.setattr(
        lanczos, "_focus_pending", counted("focus", lanczos._focus_pending)
    )
    return counts


def check_exact(A, res, k, tol, which="LA"):
    lam = torch.linalg.eigvalsh(A)
    ref = lam.flip(0)[:k] if which == "LA" else lam[:k].flip(0)
    assert res.converged
    assert float(((res.eigenvalues - ref).abs() / ref.abs()).max()) <= tol
    Y = res.eigenvectors
    true = (A @ Y - Y * res.eigenvalues).norm(dim=0) / res.eigenvalues.abs()
    # the reported residuals are the true ones: nothing was dropped
    torch.testing.assert_close(res.residuals, true, rtol=1e-6, atol=1e-13)
    assert bool((true <= tol).all())
    torch.testing.assert_close(
        Y.T @ Y, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("k", [5, 20])
def test_warm_block_matches_eigh_and_is_cheaper(k, calls):
    # A_t = A + t E with a small step: the previous result (with its guards)
    # starts the next solve; values match eigh and cost fewer products than
    # a cold start
    A, E = drifting()
    tol = 1e-3
    prev = top_eigenpairs(DenseOperator(A), k, tol=tol, verify=False)
    assert prev.next_eigenvectors.shape == (400, 1 if k == 5 else 3)
    for t in (1, 2, 3):
        At = A + 0.01 * t * E
        op = DenseOperator(At)
        cold = top_eigenpairs(op, k, tol=tol, seed=t, verify=False)
        V = prev.warm_start()
        summed = top_eigenpairs(
            op, k, tol=tol, seed=t, v0=(V / V.norm(dim=0)).sum(1), verify=False
        )
        warm = top_eigenpairs(op, k, tol=tol, seed=t, v0=prev, verify=False)
        for res in (cold, summed, warm):
            check_exact(At, res, k, tol)
        assert warm.n_matvec < cold.n_matvec
        assert calls["open"] == t  # the block start opened each time
        if k == 5:  # at k = 20 the summed start is level (37-45 products)
            assert warm.n_matvec <= 12 and warm.n_matvec < summed.n_matvec
        prev = warm


def test_warm_tight_tolerance_and_restarts(calls):
    # a tight tolerance and a small basis: the block start, the focused
    # expansions and thick restarts keep the Lanczos relation exact
    A, E = drifting(P=300)
    prev = top_eigenpairs(DenseOperator(A), 6, tol=1e-10)
    At = A + 1e-9 * E  # moved by less than tol: the block start opens
    for mb in (None, 16):
        res = top_eigenpairs(DenseOperator(At), 6, tol=1e-9, v0=prev, max_basis=mb)
        check_exact(At, res, 6, 1e-9)
    assert calls["open"] == 2


def test_far_move_falls_back_to_the_summed_start(calls):
    # v0 far from the operator's top eigenvectors: the solve is the summed
    # start's, product for product
    A, E = drifting(P=300)
    V = torch.randn(300, 5, generator=torch.Generator().manual_seed(3), dtype=A.dtype)
    op = DenseOperator(A)
    block = top_eigenpairs(op, 5, tol=1e-6, v0=V)
    summed = top_eigenpairs(op, 5, tol=1e-6, v0=(V / V.norm(dim=0)).sum(1))
    assert block.n_matvec == summed.n_matvec
    assert torch.equal(block.eigenvalues, summed.eigenvalues)
    check_exact(A, block, 5, 1e-6)
    assert calls["open"] == 0


def test_exact_invariant_subspace_returns_after_the_block(calls):
    # v0 spans the top 6 eigenvectors exactly (5 wanted and the guard): one
    # summed product, the rest of the span in one block, then done
    A, _ = drifting(P=300)
    lam, U = torch.linalg.eigh(A)
    V = U[:, -6:].flip(1) @ torch.linalg.qr(torch.randn(6, 6, dtype=A.dtype))[0]
    op = DenseOperator(A)
    res = top_eigenpairs(op, 5, tol=1e-8, v0=V, verify=False)
    check_exact(A, res, 5, 1e-8)
    assert res.n_matvec <= 7
    assert op.n_matvec == res.n_matvec
    assert calls["open"] == 1


@pytest.mark.parametrize("which", ["LA", "SA", "BE", "LM"])
def test_warm_every_end_with_the_skip_check(which, calls):
    # the block start opens at each end; with verify=True the skip check runs
    # after it and the values equal a cold verified solve's
    lam = torch.cat(
        [
            torch.linspace(10, 8, 8, dtype=torch.float64),
            torch.linspace(-1, 1, 280, dtype=torch.float64),
            -torch.linspace(9, 7, 8, dtype=torch.float64),
        ]
    )
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(296, 296, generator=g, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    E = torch.randn(296, 296, generator=g, dtype=torch.float64)
    At = A + 1e-5 * (E + E.T) / (2 * 296**0.5)
    prev = top_eigenpairs(DenseOperator(A), 6, which=which, tol=1e-6)
    res = top_eigenpairs(
        DenseOperator(At), 6, which=which, tol=1e-6, v0=prev, verify=True
    )
    assert calls["open"] == 1 and calls["focus"] >= 1
    cold = top_eigenpairs(DenseOperator(At), 6, which=which, tol=1e-6, verify=True)
    assert res.converged and res.verified
    assert res.n_matvec < cold.n_matvec
    torch.testing.assert_close(res.eigenvalues, cold.eigenvalues, rtol=1e-9, atol=0)
    ev = torch.linalg.eigvalsh(At)
    for v in res.eigenvalues:  # each value is an eigenvalue of At
        assert float((ev - v).abs().min()) <= 1e-6 * abs(float(v))
    Y = res.eigenvectors
    true = (At @ Y - Y * res.eigenvalues).norm(dim=0) / res.eigenvalues.abs()
    torch.testing.assert_close(res.residuals, true, rtol=1e-6, atol=1e-13)


def test_bottom_eigenpairs_warm_and_result_fields():
    A, E = drifting(P=300)
    prev = bottom_eigenpairs(DenseOperator(-A), 4, tol=1e-6)
    assert isinstance(prev, EigenResult) and prev.next_eigenvectors.shape == (300, 1)
    assert prev.warm_start().shape == (300, 5)
    At = -(A + 1e-5 * E)
    res = bottom_eigenpairs(DenseOperator(At), 4, tol=1e-6, v0=prev)
    ref = torch.linalg.eigvalsh(At)[:4]
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-6, atol=0)
    # a dense solve has no guards
    full = top_eigenpairs(DenseOperator(torch.eye(3, dtype=torch.float64)), 3)
    assert full.next_eigenvectors is None
    assert full.warm_start().shape == (3, 3)


def test_warm_start_does_not_touch_the_global_rng_and_is_deterministic():
    A, E = drifting(P=200)
    prev = top_eigenpairs(DenseOperator(A), 5, tol=1e-6)
    state = torch.get_rng_state()
    a = top_eigenpairs(DenseOperator(A + 1e-6 * E), 5, tol=1e-6, v0=prev)
    b = top_eigenpairs(DenseOperator(A + 1e-6 * E), 5, tol=1e-6, v0=prev)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.eigenvectors, b.eigenvectors) and a.n_matvec == b.n_matvec


def test_single_column_and_none_take_the_plain_path(calls):
    # the block code is never reached without a multi-column v0
    A, E = drifting(P=200)
    op = DenseOperator(A)
    for v0 in (
        None,
        torch.ones(200, dtype=A.dtype),
        torch.ones(200, 1, dtype=A.dtype),
    ):
        check_exact(A, top_eigenpairs(op, 5, tol=1e-6, v0=v0), 5, 1e-6)
    assert calls["open"] == 0
    # positive control: the previous result after a tiny move opens the block
    prev = top_eigenpairs(op, 5, tol=1e-6)
    At = A + 1e-7 * E
    check_exact(At, top_eigenpairs(DenseOperator(At), 5, tol=1e-6, v0=prev), 5, 1e-6)
    assert calls["open"] == 1


def test_block_start_keeps_the_budget(calls):
    # the block (8 more products after the first) opens only within the budget
    A, E = drifting(P=200)
    prev = top_eigenpairs(DenseOperator(A), 8, tol=1e-6, verify=False)
    At = A + 1e-7 * E
    for budget in (8,):  # a budget below k is refused (test_lanczos.py)
        op = DenseOperator(At)
        with pytest.warns(RuntimeWarning, match="did not converge"):
            res = top_eigenpairs(
                op, 8, tol=1e-6, v0=prev, max_matvecs=budget, verify=False
            )
        assert res.n_matvec == op.n_matvec == budget and not res.converged
    assert calls["open"] == 0
    op = DenseOperator(At)
    res = top_eigenpairs(op, 8, tol=1e-6, v0=prev, max_matvecs=12, verify=False)
    # one product for the summed start, 7 in the block, 1 for A v's direction,
    # 3 more to bring the pairs (at about tol before the move) below tol
    assert calls["open"] == 1 and res.n_matvec == op.n_matvec <= 12
    check_exact(At, res, 8, 1e-6)
