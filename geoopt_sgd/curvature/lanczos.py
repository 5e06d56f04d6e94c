"""Thick-restart Lanczos eigensolver for symmetric :class:`LinearOperator` s.

The solver keeps an orthonormal Krylov basis of at most ``max_basis`` vectors on
the operator's device and in its dtype, fully reorthogonalised (classical
Gram-Schmidt with a DGKS second pass, inner products accumulated in float64), and a
projected matrix and its Ritz values in float64. When the basis is full it
restarts by keeping the wanted Ritz vectors (thick restart, Wu & Simon 2000),
so memory is bounded by ``max_basis``, not by the number of iterations.

Convergence is decided on the true residual of each Ritz pair
``(theta, y)``, ``||A y - theta y||``, which the Lanczos relation
``A V = V H + v_{m+1} b^T`` gives without extra products, relative to
``max(|theta|, sqrt(eps) * ||A||)``. Extra *guard* Ritz values, one per 8
wanted values at each wanted end (at least one), must converge as well, to
``10 * tol`` (dense clusters otherwise hide an eigenvalue).

The basis may hold several vectors whose products are still pending (band
Lanczos, Ruhe 1979): the skip check adds a fresh random direction near
convergence, and a block warm start leaves the residual directions of its
block pending. The relation then reads
``A V_j = V_n H[:n, :j]`` with ``n - j`` pending vectors, and the residuals come
from it the same way.

References:
    K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric
    eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2), 2000.
    A. Ruhe, "Implementation aspects of band Lanczos algorithms for computation
    of eigenvalues of large sparse symmetric matrices", Math. Comp. 33, 1979.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .. import distributed
from .._checks import check_choice, check_int, check_number, check_vector_shape
from .._linalg import CHUNK, rowdot64
from .._model import full_precision
from .linop import LinearOperator

__all__ = ["EigenResult", "bottom_eigenpairs", "top_eigenpairs"]

Which = Literal["LA", "SA", "LM", "BE"]
_WHICH = ("LA", "SA", "LM", "BE")
# Extra Ritz values that must converge beyond the k wanted ones, one per 8 wanted
# values at each end (at least one): a plain Lanczos that stops on the top-k
# residuals missed an eigenvalue of a dense cluster in 2 of 5 seeds at k=20 on
# resnet18, and guards fix that. At k=5 one guard is enough and a second cost
# 9-15% more products for no miss (MLP, P=6.9k, clustered spectrum: mean products
# over 20 start vectors 66.2 with one guard, 72.2 with two, scipy eigsh 72.8). At
# k=20 on the same spectrum one or two guards missed an eigenvalue for 1 of 20
# start vectors and three missed none (mean 175.8 products, eigsh 181.9); on a
# synthetic spectrum as dense as the tolerance one guard skipped one for 6 of 10
# start vectors, three guards for 3, scipy eigsh for 5.
_GUARD_PER = 8


def _guards(n: int) -> int:
    """Guard Ritz values for ``n`` wanted values at one end."""
    return 0 if n <= 0 else max(1, math.ceil(n / _GUARD_PER))


# Guards only have to show that no eigenvalue hides above them, so they stop at
# 10 * tol: on a clustered MLP spectrum (P=6.9k, k=5) that cut the products from
# ~86 to ~71, level with scipy eigsh, with the same errors of the k returned values.
_GUARD_TOL = 10.0
# Fraction of the free basis (beyond the wanted values) kept at a restart; 0.3-0.7
# made no measurable difference.
_KEEP = 0.5
# Skip check: a fresh random direction joins the pending vectors and the band
# Lanczos expands both chains, first in first out (the pending Lanczos vector,
# then the fresh one, alternately), with Rayleigh-Ritz on the whole basis.
# Both chains are needed. The pending vector holds the unexplored part of the
# Krylov space, where a skipped member of a close cluster sits; the fresh
# vector, orthogonal to it, has almost nothing there (giving the fresh chain
# all the check's products, the first version, missed a member of a run of
# four values tol/2 apart for 16 of 20 start vectors of
# benchmarks/curvature.py's "clustered", k=20, with verified=True). The fresh
# vector finds what no Krylov space of the start vector holds: a second copy
# of an exactly repeated eigenvalue (a double lambda_16 of 20, float64, 10
# start vectors: continuing the pending chain alone missed it 10 times, the
# band none).
#
# The fresh direction joins once every wanted residual is within _EARLY times
# its limit, so that its products also serve the last steps of convergence;
# at convergence the wanted values are recorded, and once _check_steps(k, ...)
# products have passed since it joined and _AFTER since convergence they are
# compared. If one rose by more than _RISE * tol, an eigenvalue had been
# skipped: iterate to convergence and check again (a new fresh direction,
# joining at convergence, with max(10, k) products), at most _CHECKS times
# (_RISE 0.1 and 0.2 caught nothing more than 0.5).
#
# Measured (tol=1e-3, 20 start vectors per workload; HVPs per solve, misses;
# scipy eigsh for scale): benchmarks/curvature.py's digits MLP (k=5, 20) and
# "clustered" (k=5, 20): joining at _EARLY=30, max(8, ceil(k/2)), _AFTER=3:
# 21.8, 85.0, 28.6, 74.5, none missed; joining after convergence with
# max(10, k) more products (the previous check): 25.1, 91.6, 32.2, 100.7,
# none missed; eigsh 21.0, 73.3, 28.7, 72.2 (5 missed at clustered k=20);
# unchecked 15.2, 71.3, 22.2, 61.7 (19 missed at clustered k=20). On the
# tests' clustered spectra (P=1000, k=20; runs of six values tol/2, tol and
# 2 tol apart across lambda_17..lambda_22, 5 bulks each: 300 solves; and 20 on
# a run of four tol/2 apart ending at lambda_20): unchecked 69 + 6 skipped,
# the previous check 0 + 1, this one 0 + 0, with 4-9% fewer products. (The
# bulks barely change a solve: the same start vectors skip on every bulk, so
# those 300 were about 60 cases. benchmarks/cluster_skips.py counts 300
# distinct solves per k: see benchmarks/README.md.)
# Variants: _AFTER=2 saved one product more and skipped 1 of the 320 (and 2 of
# 20 at clustered k=20 when joining from the start); _AFTER=4 cost 1 more per
# solve; joining as soon as the wanted values are in the basis (_EARLY
# infinite) cost 87.4 at digits k=20 (the band slows convergence for longer);
# _EARLY=20 gave 22.1, 84.8, 28.5, 75.0 (none of 340 skipped; the quick MLP
# of benchmarks/curvature.py 81.2 at k=5 against 84.0, the worst row 1.16x
# eigsh either way); _EARLY=10 (with max(10, k) and _AFTER=2) skipped 5 of
# the 320; giving the fresh chain 1 product in 3 instead of 1 in 2 cost more
# everywhere (89.3 at digits k=20); focusing the pending rows on the residuals
# (as after a block start) once the fresh chain had half of its products met
# eigsh + 15% everywhere but skipped 12 of 340 (the fresh chain running on to
# convergence is what makes this check work). With a block warm start (the
# drifting operator of benchmarks/warm_start.py, P=800, 5 solves each), the
# checked warm solve took 15-24 products at k=5 and 42-48 at k=20, against
# 18-26 and 54-61 with the check after convergence: the block's residual focus
# stops when the fresh direction joins, and the check's savings outweigh it.
_EARLY = 30.0
_AFTER = 3
_CHECKS = 3
_RISE = 0.5
# Exact multiplicities. The Krylov spaces of c start directions (the start
# vector and the fresh ones) hold at most c vectors of one eigenspace, so the
# check above finds the second copy of a double but not the third of a triple
# (a triple l_3 at k = 5, or l_16 at k = 20, P = 400, float64: 2 of the 3
# copies returned, verified, for 8-10 of 10 start vectors). When, after a
# check passed, as many returned values as there are start directions agree
# within _COINCIDE * tol (relative) and a value beyond them is returned at
# that end, another fresh direction joins and the comparison waits _EMERGE
# times the products the solve took to bring in the group's first member (the
# fresh chain gets every other product and starts from a smaller component
# in the eigenspace: 2x missed a copy for 5 of 10 start vectors on a
# quintuple l_1 at k = 5 (ratio 0.98), 4x none on the cases of
# tests/curvature/test_lanczos_verify.py). A group that ends at the k-th value
# needs no more copies: more would not change the returned values.
_COINCIDE = 0.1
_EMERGE = 4
# ... but at least this many eps * ||A||: Ritz values near 0 move by rounding
# (1e-15 at ||A|| = 5 in float64), more than _RISE * tol * sqrt(eps) * ||A|| at
# tol=1e-8, and a rank-3 operator's zero eigenvalues then failed the check three
# times. A floor, not a sum: it changes nothing where the tol term is larger
# (tol=1e-3: every value above 0.76% of ||A|| in float32, 1.4e-11 in float64).
_RISE_EPS = 32.0
# Start rows taken from a block v0 (the rest summed into the last one).
_START_ROWS = 1
# A (P, m) v0 becomes a block warm start when the first product A v (v the sum
# of v0's unit columns) leaves span(v0) by rho <= _WARM_RHO * tol / m of
# ||A v||; further out the single-vector Lanczos from v (the summed start, as
# before) is kept. On a drifting operator (P=800, 30 outliers, tol=1e-3, v0 =
# the previous eigenvectors and guards): m=6 (k=5), rho = 1.5 tol: 10-11
# products against 19-23 summed; rho = 8 tol: 15-16 against 20-23; m=23
# (k=20), rho = 1.5-2 tol: 35-38 against 41-44; rho = 12 tol: 53-59 against
# 42-46 (every column's residual must be corrected, at up to one product per
# column and Krylov degree).
_WARM_RHO = 64.0
# Rows of span(v0) left shorter than this after removing the first two basis
# vectors are dropped from the block (the pending A v covers them).
_DROP = 0.1


def _check_steps(k: int, early: bool) -> int:
    """Products from the fresh direction's arrival to the comparison.

    ``max(8, ceil(k / 2))`` when it joined before convergence, ``max(10, k)``
    when it joined at convergence (a solve that converged in the product that
    brought its residuals within ``_EARLY`` times their limits, or a check
    after a skipped value was found).
    """
    return max(8, math.ceil(k / 2)) if early else max(10, k)


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator, with their residuals and cost.

    Attributes:
        eigenvalues: ``(k,)`` float64 CPU tensor, sorted descending (ascending for
            :func:`bottom_eigenpairs`).
        eigenvectors: ``(P, k)`` orthonormal columns in the operator's dtype and
            device, in the order of ``eigenvalues``; each is defined up to sign.
        residuals: ``(k,)`` float64, the relative true residuals
            ``||A v - lambda v|| / max(|lambda|, sqrt(eps) * ||A||)`` (``0`` for an
            exact zero operator).
        n_matvec: Matrix-vector products used by this call.
        converged: Whether every returned pair reached the requested tolerance
            and (when ``verified`` applies) the skip check passed.
        wall_time: Seconds spent in the call.
        verified: Whether the skip check ran and passed: with a fresh random
            direction in the Krylov space for at least ``max(8, ceil(k / 2))``
            products (``max(10, k)`` when it joined at convergence) and 3
            after convergence, no returned value rose by more than ``tol / 2``,
            and no group of equal returned values may hide another copy (see
            :func:`top_eigenpairs`; ``True`` for a dense solve, ``False`` with
            ``verify=False``). It
            lowers the odds that an eigenvalue of a tight cluster was skipped;
            it is no proof (see :func:`top_eigenpairs`).
        next_eigenvalue: The best Ritz value beyond the returned ones at the
            wanted end (the ``(k+1)``-th largest for ``"LA"``, ``"BE"`` (top end)
            and ``"LM"`` (by magnitude), the ``(k+1)``-th smallest for ``"SA"``);
            a lower bound (upper for ``"SA"``) on the eigenvalue that would come
            next; ``nan`` when there is none.
        next_eigenvectors: ``(P, g)``, the Ritz vectors of the guard values
            beyond the returned ones (``g = ceil(k / 8)`` per wanted end),
            converged to ``10 * tol`` only; ``None`` for a dense solve
            (``k == P``). With ``eigenvectors`` they make the next warm start:
            pass the result itself as ``v0`` (see :meth:`warm_start`).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    n_matvec: int
    converged: bool
    wall_time: float
    verified: bool = True
    next_eigenvalue: float = math.nan
    next_eigenvectors: Tensor | None = None

    def warm_start(self) -> Tensor:
        """The ``v0`` for the next solve: ``eigenvectors`` and ``next_eigenvectors``.

        Returns:
            ``(P, k + g)``, the returned vectors then the guards' (``(P, k)``
            when there are none).
        """
        return warm_start_columns(self.eigenvectors, self.next_eigenvectors)


def warm_start_columns(vectors: Tensor, more: Tensor | None) -> Tensor:
    """``vectors`` then the columns of ``more`` (none: ``vectors`` itself)."""
    if more is None or more.shape[1] == 0:
        return vectors
    return torch.cat([vectors, more], dim=1)


def _orthogonalize(Vt: Tensor, w: Tensor) -> tuple[Tensor, float]:
    """Orthogonalise ``w`` against the rows of ``Vt`` in place.

    Classical Gram-Schmidt, repeated once when the norm dropped by more than
    ``1/sqrt(2)`` (the DGKS criterion ARPACK uses): a second pass over the basis
    costs as much memory traffic as an HVP on large models, and is only needed
    after cancellation.

    Returns:
        The float64 coefficients ``Vt @ w`` (before projection) and ``||w||`` after.
    """
    h = torch.zeros(Vt.shape[0], dtype=torch.float64, device=w.device)
    nrm = math.sqrt(max(float(rowdot64(w.unsqueeze(0), w)[0]), 0.0))
    for _ in range(2):
        if Vt.shape[0] == 0:
            break
        c = rowdot64(Vt, w)
        w -= c.to(w.dtype) @ Vt
        h += c
        before, nrm = nrm, math.sqrt(max(float(rowdot64(w.unsqueeze(0), w)[0]), 0.0))
        if nrm > 0.7071 * before:
            break
    return h, nrm


def _select(theta: Tensor, n_top: int, n_bottom: int, magnitude: bool) -> Tensor:
    """Indices of the wanted Ritz values (``theta`` ascending), best first."""
    j = theta.shape[0]
    if magnitude:
        order = torch.argsort(theta.abs(), descending=True, stable=True)
        return order[: min(n_top, j)]
    dev = theta.device
    top = torch.arange(j - 1, max(j - n_top, 0) - 1, -1, device=dev)
    bottom = torch.arange(0, min(n_bottom, max(j - top.numel(), 0)), device=dev)
    return torch.cat([top, bottom])


def _random_unit(P: int, gen: torch.Generator, Vt: Tensor, like: Tensor) -> Tensor:
    """A random unit vector orthogonal to the rows of ``Vt`` (rank 0's draw)."""
    for _ in range(3):
        z = torch.randn(P, generator=gen, device=like.device, dtype=torch.float32)
        z = z.to(like.dtype)
        # ranks may hold differently seeded generators: all take rank 0's draw,
        # as for the start block, or their Krylov bases part ways
        distributed.broadcast(z)
        _, nrm = _orthogonalize(Vt, z)
        if nrm > 1e-3 * math.sqrt(P):
            return z / nrm
    raise RuntimeError("could not draw a vector outside the Krylov basis.")


def _start_block(
    v0: Tensor | None, P: int, b_max: int, gen: torch.Generator, Vt: Tensor
) -> int:
    """Write the orthonormal start rows into ``Vt``; return their number.

    A ``(P, m)`` ``v0`` gives up to ``b_max`` orthonormalised columns (nearly
    dependent ones are dropped; columns beyond ``b_max`` are summed into the
    last one kept); no usable column falls back to a random vector.
    """
    dtype, device = Vt.dtype, Vt.device
    if v0 is None:
        v = torch.randn(P, generator=gen, device=device, dtype=torch.float32)
        cols = v.to(dtype).unsqueeze(1)
    else:
        cols = v0.to(device=device, dtype=dtype)
        if cols.dim() == 1:
            cols = cols.unsqueeze(1).clone()
        else:
            cols = cols / cols.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)
        if cols.shape[1] > b_max:
            tail = cols[:, b_max - 1 :].sum(dim=1, keepdim=True)
            cols = torch.cat([cols[:, : b_max - 1], tail], dim=1)
    distributed.broadcast(cols)
    n = 0
    for c in range(cols.shape[1]):
        z = cols[:, c].clone()
        before = math.sqrt(max(float(rowdot64(z.unsqueeze(0), z)[0]), 0.0))
        _, nrm = _orthogonalize(Vt[:n], z)
        # a column (nearly) inside the span of the earlier ones adds nothing
        if nrm > 0 and nrm > 1e3 * torch.finfo(dtype).eps * before:
            Vt[n] = z / nrm
            n += 1
    if n == 0:
        Vt[0] = _random_unit(P, gen, Vt[:0], Vt)
        n = 1
    return n


@dataclass
class LanczosSolve:
    """What :func:`thick_restart_lanczos` found: the wanted pairs and their checks."""

    theta: Tensor  # wanted Ritz values, order of selection
    Y: Tensor  # their vectors (P, n)
    rel: Tensor  # relative residuals
    n_mv: int
    ok: bool  # every returned pair reached tol (and, if verifying, verified)
    verified: bool
    next_value: float
    G: Tensor  # the guards' Ritz vectors (P, g)
    reached: bool  # every returned pair reached tol (verified or not)

    def shortfall(self) -> str | None:
        """Why the solve is not ``ok``: the check unfinished, or ``None``.

        ``"could not verify that no eigenvalue was skipped"`` when every pair
        reached the tolerance but the skip check did not pass; ``None`` when the
        pairs themselves did not converge (the caller names its tolerance).
        """
        if self.reached and not self.verified:
            return "could not verify that no eigenvalue was skipped"
        return None


def thick_restart_lanczos(
    operator: LinearOperator,
    n_top: int,
    n_bottom: int,
    *,
    magnitude: bool,
    tol: float,
    max_matvecs: int | None,
    max_basis: int | None,
    seed: int | None,
    v0: Tensor | None,
    bottom_absolute: bool = False,
    verify: bool = False,
) -> LanczosSolve:
    """Band thick-restart Lanczos with an optional skip check (see module doc).

    The basis ``Vt[:n]`` holds ``j`` vectors whose products are known and
    ``n - j`` pending ones (one for plain Lanczos, more after a block start or
    during the skip check); ``A V_j = V_n H[:n, :j]``.
    """
    P = operator.shape[0]
    dtype, device = operator.dtype, operator.device
    k = n_top + n_bottom
    eps = torch.finfo(dtype).eps
    floor = math.sqrt(eps)
    # wanted Ritz values during the iteration: k plus guards at each wanted end
    g_top = _guards(n_top)
    g_bot = _guards(n_bottom) if not magnitude else 0
    m = max_basis
    if m is None:
        m = max(2 * (k + g_top + g_bot) + 10, 30)
    m = min(P, m)
    w_top = min(n_top + g_top, P)
    w_bot = min(n_bottom + g_bot, P - min(n_top, P))
    if w_top + w_bot >= m and m < P:  # leave room in the basis to expand
        w_top = min(w_top, max(n_top, m - 1 - w_bot))
        w_bot = min(w_bot, max(n_bottom, m - 1 - w_top))
    n_need = w_top + w_bot
    if max_matvecs is None:
        max_matvecs = max(20 * m, 500)
    gen = torch.Generator(device=device).manual_seed(0 if seed is None else seed)

    # start row: one, the sum of v0's unit columns (a random vector without
    # v0). A (P, m) v0 with m > 1 may then become a block warm start
    # (Rayleigh-Ritz, see _WARM_RHO): after the first product, when A v0_sum
    # stays close to span(v0), the rest of span(v0) joins the basis with its
    # products in one block, and each later product expands the pending
    # direction that carries most of the unconverged residuals
    # (_focus_pending). Expanding every column as a band (first in first out)
    # was measured slower: on a drifting operator (P=800, 30 outliers, k=20,
    # tol=1e-3) warm solves took 132-170 products against 38-40 with the
    # columns summed and 39-42 cold (the block's Krylov degree grows by one per
    # b products).
    b_max = _START_ROWS
    Q = None  # orthonormal rows spanning v0, while the block start is open
    if v0 is not None and v0.dim() == 2 and v0.shape[1] > 1:
        q_max = max(1, min(v0.shape[1], (m - 2) // 2))
        Q = torch.empty(q_max, P, dtype=dtype, device=device)
        spare = torch.Generator(device=device).manual_seed(0)
        nq = _start_block(v0, P, q_max, spare, Q)
        Q = Q[:nq] if nq > 1 else None
    # rows are written before they are read: no need to zero (and touch) them
    rows = m + b_max + 4
    Vt = torch.empty(rows, P, dtype=dtype, device=device)
    H = torch.zeros(rows, rows, dtype=torch.float64, device="cpu")  # small: on the CPU
    n = _start_block(v0, P, b_max, gen, Vt)
    pre_lo = pre_hi = 0  # rows Vt[pre_lo:pre_hi] have products in W
    W = None
    j = 0  # vectors whose product is known
    n_mv = 0
    anorm = 0.0
    theta = S = R = None
    converged = False
    verified = not verify
    checks = 0  # skip checks started
    check_mv = 0  # products at the start of the current check
    snap = None  # wanted Ritz values when the current check started
    early = False  # the first check's fresh vector joined before convergence
    conv_mv = 0  # products at convergence, in the current check
    chains = 1  # start directions: the start vector, fresh ones (check, breakdown)
    spawned = 0  # checks started for a possible exact multiplicity
    first_conv = 0  # products at the first convergence
    window = 0  # products a multiplicity check waits for (0: the usual check)
    # (products, outermost Ritz values at each end) per step
    history: list[tuple[int, Tensor, Tensor]] = []
    while True:
        if pre_lo <= j < pre_hi:
            assert W is not None
            w = W[:, j - pre_lo].clone()
            if j + 1 == pre_hi:
                W = None  # free the block
        else:
            w = operator.matvec(Vt[j])
            n_mv += 1
            check_operator_output(w)
        h, beta = _orthogonalize(Vt[:n], w)
        anorm = max(anorm, math.sqrt(float(h.square().sum()) + beta * beta))
        H[:n, j] = h.cpu()
        H[n, j] = beta
        j += 1
        # Rayleigh-Ritz on the symmetrised projection
        T = torch.triu(H[:j, :j]) + torch.triu(H[:j, :j], 1).T
        theta, S = torch.linalg.eigh(T)
        anorm = max(anorm, float(theta.abs().max()))
        R = H[: n + 1, :j] @ S - torch.cat([S, S.new_zeros(n + 1 - j, j)]) * theta
        R = R.norm(dim=0)
        denom = theta.abs().clamp_min(floor * anorm)
        want = _select(theta, w_top, w_bot, magnitude)
        scale = denom[want]
        if bottom_absolute and w_bot:
            is_bot = torch.zeros(j, dtype=torch.bool, device="cpu")
            is_bot[:w_bot] = True
            scale = torch.where(is_bot[want], anorm, scale)
        # guards (wanted beyond the k returned) converge to a looser tolerance
        tols = torch.full((want.numel(),), tol, dtype=torch.float64, device="cpu")
        nt = min(w_top, j)
        tols[n_top:nt] = tol * _GUARD_TOL
        tols[nt + n_bottom :] = tol * _GUARD_TOL
        done = j >= max(n_need, pre_hi) and bool((R[want] <= tols * scale).all())
        if verify and not first_conv:
            history.append((n_mv, *_outermost(theta, n_top, n_bottom, magnitude)))
        breakdown = beta <= 10 * eps * anorm * math.sqrt(j)
        if j >= P:
            converged = verified = True
            break
        inject = False
        if (
            not verified
            and not done
            and checks == 0
            and not early
            and j >= max(n_need, pre_hi)
            and n + 2 < P
            and bool((R[want] <= _EARLY * tols * scale).all())
        ):
            # nearly converged: the first check's fresh direction joins now
            inject = early = True
            check_mv = n_mv
        if done and not first_conv:
            first_conv = n_mv
        if done and not verified:
            # skip check: has a fresh direction raised a wanted value?
            fin = _select(theta, n_top, n_bottom, magnitude)
            now = _goodness(theta[fin], n_top, magnitude)
            if early and checks == 0:
                # converged with the fresh direction in: the first check starts
                snap, conv_mv, checks = now, n_mv, 1
            if (
                snap is not None
                and n_mv - check_mv
                >= max(window, _check_steps(k, early and checks == 1))
                and n_mv - conv_mv >= _AFTER
            ):
                # a rise of rounding size (values near 0 at a tight tol) is no skip
                rise = (_RISE * tol * denom[fin]).clamp_min(_RISE_EPS * eps * anorm)
                if bool((now <= snap + rise).all()):
                    close = _COINCIDE * rise / _RISE
                    group = _may_hide_copies(now, n_top, chains, close)
                    if group is not None:
                        spawned += 1
                        snap = None  # as many equal values as chains: one more
                        window = _EMERGE * _emergence(history, *group)
                    else:
                        verified = True
                elif checks >= _CHECKS + spawned:
                    break  # kept finding skipped values: not verified
                else:
                    snap = None  # a skipped value was found: check again
            if not verified and snap is None and n + 1 < P:
                snap, check_mv, conv_mv, checks = now, n_mv, n_mv, checks + 1
                inject = True
            done = verified
        if done:
            converged = True
            break
        if n_mv >= max_matvecs:
            break
        if breakdown:
            # invariant subspace: drop the direction; with nothing pending,
            # continue with a fresh one, decoupled (a restart carries it over)
            H[n, j - 1] = 0.0
            if n == j:
                Vt[n] = _random_unit(P, gen, Vt[:n], Vt)
                n += 1
                chains += 1  # a start direction of its own
        else:
            Vt[n] = w / beta
            n += 1
        if inject:
            # a fresh random direction, queued behind the pending ones
            Vt[n] = _random_unit(P, gen, Vt[:n], Vt)
            n += 1
            chains += 1
        if Q is not None:
            # first product done: is A v0_sum close enough to span(v0)? (the
            # block adds at most m - 1 products: never past the budget)
            opened = (
                not breakdown
                and n == 2
                and n_mv + Q.shape[0] - 1 <= max_matvecs
                and _outside(Q, Vt[1], h, beta) * Q.shape[0] <= _WARM_RHO * tol
            )
            if opened:
                pre_lo, n = 1, _open_block(Vt, H, Q)
                pre_hi = n - 1
                chains = n - 1  # the block's rows start chains of their own
            Q = None  # free it before the block's products
            if opened:
                W = operator.matmat(Vt[pre_lo:pre_hi].T)
                n_mv += pre_hi - pre_lo
                check_operator_output(W)
        elif pre_hi and snap is None and not early and j >= pre_hi and n - j > 1:
            _focus_pending(Vt, H, j, n, S[:, want], R[want], tols * scale)
        if n <= m:
            continue
        # thick restart: keep the wanted Ritz vectors (and as many neighbours)
        p = n - j
        n_keep = min(m - p, max(n_need, int(n_need + _KEEP * (m - n_need))))
        n_keep = max(n_keep, n_need)  # a tiny basis overflows by a few rows
        if magnitude:
            keep = _select(theta, n_keep, 0, True)
        else:
            t_extra = n_keep - n_need
            kt = w_top + (t_extra if w_top else 0)
            kb = w_bot + (t_extra if not w_top else 0)
            if w_top and w_bot:
                kt = w_top + t_extra // 2
                kb = w_bot + t_extra - t_extra // 2
            keep = _select(theta, kt, kb, False)
        Sk = S[:, keep]
        Sk_dev = Sk.to(device=device, dtype=dtype)
        for s in range(0, P, CHUNK):
            Vt[: keep.numel(), s : s + CHUNK] = Sk_dev.T @ Vt[:j, s : s + CHUNK]
        lk = keep.numel()
        Vt[lk : lk + p] = Vt[j:n].clone()
        coupling = H[j:n, :j] @ Sk
        H.zero_()
        H[:lk, :lk] = torch.diag(theta[keep])
        H[lk : lk + p, :lk] = coupling
        j, n = lk, lk + p

    # final wanted pairs
    assert theta is not None and S is not None and R is not None
    final = _select(theta, n_top, n_bottom, magnitude)
    denom = theta.abs().clamp_min(floor * anorm)
    if bottom_absolute:
        denom = denom.clone()
        denom[: min(n_bottom, j)] = max(anorm, 0.0)
    rel = torch.where(denom[final] > 0, R[final] / denom[final], R[final] * 0.0)
    if j >= P:
        converged = verified = True
    ok = bool((rel <= tol).all()) or (j >= P and converged)
    # the best Ritz value beyond the returned ones at the wanted end
    if n_top:
        beyond = _select(theta, n_top + 1, 0, magnitude)[n_top:]
    else:
        beyond = _select(theta, 0, n_bottom + 1, False)[n_bottom:]
    next_value = float(theta[beyond[0]]) if beyond.numel() else math.nan
    Sf = S[:, final].to(device=device, dtype=dtype)
    Y = Vt[:j].T @ Sf
    # the guards' Ritz vectors (beyond the k, at each wanted end): with the
    # returned ones they make the next warm start (the guards must converge
    # too, and a warm start whose columns hold them need not search for them)
    want = _select(theta, w_top, w_bot, magnitude)
    nt = min(w_top, j)
    guard = torch.cat([want[n_top:nt], want[nt + n_bottom :]])
    G = Vt[:j].T @ S[:, guard].to(device=device, dtype=dtype)
    checked = verified if verify else j >= P
    return LanczosSolve(
        theta[final].clone(), Y, rel, n_mv, ok and verified, checked, next_value, G, ok
    )


def _outside(Q: Tensor, z: Tensor, h: Tensor, beta: float) -> float:
    """How far ``A v`` leaves ``span(Q)`` (``v`` in it), relative to ``||A v||``.

    ``A v = h[0] v + beta z`` with unit ``z``; the part of ``beta z`` outside
    the span of the orthonormal rows ``Q``, over ``||A v||``.
    """
    c = rowdot64(Q, z)
    out = beta * math.sqrt(max(1.0 - float(c.square().sum()), 0.0))
    total = math.sqrt(float(h.square().sum()) + beta * beta)
    return out / total if total > 0 else 0.0


def _open_block(Vt: Tensor, H: Tensor, Q: Tensor) -> int:
    """Put the rest of ``span(Q)`` into the basis as pending rows.

    ``Vt[0]`` (known) lies in ``span(Q)`` and ``Vt[1]`` is pending. The rows of
    ``Q`` orthogonalised against both (those left shorter than ``_DROP``
    dropped: ``Vt[1]`` nearly in ``span(Q)`` already covers them) go to
    ``Vt[1:q+1]`` and ``Vt[1]`` moves behind them, its coupling ``H[1, 0]``
    with it; the new rows couple to nothing known, so ``A V_1 = V_n H[:n, :1]``
    still holds.

    Returns:
        The new number of basis rows ``n = q + 2``.
    """
    n = 2
    for r in range(Q.shape[0]):
        z = Q[r].clone()
        _, nrm = _orthogonalize(Vt[:n], z)
        if nrm > _DROP:
            Vt[n] = z / nrm
            n += 1
    order = [0, *range(2, n), 1]
    Vt[:n] = Vt[order].clone()
    H[:n, 0] = H[order, 0].clone()
    return n


def _focus_pending(
    Vt: Tensor, H: Tensor, j: int, n: int, S_want: Tensor, res: Tensor, lim: Tensor
) -> None:
    """Rotate the pending rows ``Vt[j:n]`` so that ``Vt[j]`` is expanded first.

    The residual of a Ritz pair ``(theta, V_j s)`` is ``V_n H[:n, :j] s -
    theta V_j s``; its part in the pending vectors is ``H[j:n, :j] s``. Those
    parts of the wanted pairs whose residual ``res`` is still above its limit
    ``lim`` (all of them when none is), each divided by ``lim``, form an
    ``(n - j, w)`` matrix; its dominant left singular vector is the pending
    direction that carries most of what is left to converge, and it becomes
    ``Vt[j]``. An orthogonal change of the pending rows and of ``H[j:n, :j]``
    together keeps ``A V_j = V_n H[:n, :j]`` exact.
    """
    lim = lim.clamp_min(torch.finfo(torch.float64).tiny)
    cols = res > lim
    if not bool(cols.any()):
        cols = torch.ones_like(cols)
    C = (H[j:n, :j] @ S_want[:, cols]) / lim[cols]
    U, _, _ = torch.linalg.svd(C, full_matrices=True)
    H[j:n, :j] = U.T @ H[j:n, :j]
    U_dev = U.to(device=Vt.device, dtype=Vt.dtype)
    for s in range(0, Vt.shape[1], CHUNK):
        Vt[j:n, s : s + CHUNK] = U_dev.T @ Vt[j:n, s : s + CHUNK]


def _may_hide_copies(
    now: Tensor, n_top: int, chains: int, close: Tensor
) -> tuple[bool, int, float] | None:
    """Whether a group of equal returned values may hide more copies.

    ``chains`` start directions (the start vector and the fresh ones) span at
    most ``chains`` vectors of one eigenspace in their Krylov spaces, so a
    group of at least ``chains`` returned values within ``close`` of each
    other (at one end, ``now`` as from :func:`_goodness`) may be a multiple
    eigenvalue with a copy still missing; unless the group ends at the last
    returned value of its end, a missing copy would change the returned values.

    Returns:
        ``(top, rank, level)`` for the first such group: its end (``True`` for
        the top one), the rank of its first member at that end, and the level
        half way between the group and the next value; ``None`` when there is
        no such group.
    """
    for lo, hi in ((0, n_top), (n_top, now.numel())):
        if hi - lo < 2:
            continue
        vals, order = now[lo:hi].sort(descending=True)
        tol_ = close[lo:hi][order]
        run = 1
        for i in range(1, hi - lo):
            gap = float(vals[i - 1] - vals[i])
            same = gap <= float(torch.maximum(tol_[i - 1], tol_[i]))
            run = run + 1 if same else 1
            if run >= chains and i < hi - lo - 1:
                nxt = float(vals[i] - vals[i + 1])
                if nxt > float(torch.maximum(tol_[i], tol_[i + 1])):
                    level = float(vals[i] + vals[i + 1]) / 2
                    return lo == 0 and n_top > 0, i + 1 - run, level
    return None


def _outermost(
    theta: Tensor, n_top: int, n_bottom: int, magnitude: bool
) -> tuple[Tensor, Tensor]:
    """The ``n_top`` and ``n_bottom`` outermost Ritz values as goodness.

    Each end's values are taken from all of ``theta`` (ascending), as
    "larger is further out" (see :func:`_goodness`), whatever the other end
    holds: all that :func:`_emergence` reads of a step, since the groups it
    looks up sit among the returned values.
    """
    if magnitude:
        # copies, not views: a view would keep the whole step's values
        good = theta.abs().sort(descending=True).values[:n_top].clone()
        return good, theta.new_empty(0)
    j = theta.shape[0]
    return theta[max(j - n_top, 0) :].flip(0), -theta[: min(n_bottom, j)]


def _emergence(
    history: list[tuple[int, Tensor, Tensor]],
    top: bool,
    rank: int,
    level: float,
) -> int:
    """Products until the solve first had ``rank + 1`` Ritz values past ``level``.

    ``history`` holds, after each product up to the first convergence, the
    outermost Ritz values of each end (see :func:`_outermost`); ``level`` is a
    goodness at the top end (``top``) or the bottom one, and ``rank`` is below
    that end's count of returned values. The first member of a group of equal
    values emerged then, and a fresh chain needs about as many products of its
    own to bring in another copy.
    """
    for n_mv, good_top, good_bottom in history:
        good = good_top if top else good_bottom
        if int((good >= level).sum()) > rank:
            return n_mv
    return history[-1][0] if history else 0


def _goodness(vals: Tensor, n_top: int, magnitude: bool) -> Tensor:
    """Wanted Ritz values (order of selection) as "larger is further out"."""
    if magnitude:
        return vals.abs()
    out = vals.clone()
    out[n_top:] = -out[n_top:]
    return out


def _validate(
    operator: LinearOperator,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int | None,
    max_basis: int | None,
    seed: int | None,
    v0: Tensor | None,
) -> None:
    if not isinstance(operator, LinearOperator):
        raise TypeError(
            f"`operator` must be a LinearOperator; got {type(operator).__name__}."
        )
    P = operator.shape[0]
    check_int("k", k, ge=1)
    if k > P:
        raise ValueError(f"`k` must be <= P = {P} (the operator's size); got {k}.")
    check_choice("which", which, _WHICH)
    check_number("tol", tol, gt=0)
    check_int("max_matvecs", max_matvecs, ge=1, allow_none=True)
    if max_matvecs is not None and k < P and max_matvecs < k:
        raise ValueError(
            f"`max_matvecs` must be >= k = {k}: m products span at most m "
            f"eigenpairs; got {max_matvecs}."
        )
    check_int("max_basis", max_basis, ge=min(k + 2, P), allow_none=True)
    check_int("seed", seed, ge=0, allow_none=True)
    if v0 is not None:
        check_vector_shape("v0", v0, P)
        if not bool(torch.isfinite(v0).all()):
            raise ValueError("`v0` must be finite; it has non-finite entries.")


def check_operator_output(w: Tensor) -> None:
    """Raise if a product ``A v`` holds NaN or infinite entries.

    Raises:
        ValueError: Naming the operator's output (not the vector ``v``), so a
            non-finite operator is never reported as a bad argument nor as
            converged.
    """
    if w.is_floating_point() and bool(torch.isfinite(w.sum())):
        return
    n_bad = int((~torch.isfinite(w)).sum())
    if n_bad:
        raise ValueError(
            f"the operator's output is non-finite ({n_bad} NaN or infinite entries "
            "in A v): the operator is not finite here (e.g. a NaN or infinite "
            "loss, or non-finite parameters); nothing can be estimated from it."
        )


def _dense(operator: LinearOperator) -> tuple[Tensor, Tensor, Tensor]:
    """Dense eigendecomposition via ``P`` products (ascending)."""
    A = operator.to_dense()
    check_operator_output(A)
    A = A.double()
    A = (A + A.T) / 2
    lam, U = torch.linalg.eigh(A)
    R = (A @ U - U * lam).norm(dim=0)
    return lam.cpu(), U, R.cpu()


@full_precision
def top_eigenpairs(
    operator: LinearOperator,
    k: int,
    *,
    which: Which = "LA",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    max_basis: int | None = None,
    seed: int | None = None,
    v0: Tensor | EigenResult | None = None,
    verify: bool = True,
) -> EigenResult:
    """Compute ``k`` extreme eigenpairs of a symmetric operator by Lanczos.

    Thick-restart Lanczos with full reorthogonalisation; see the module docstring.
    ``which`` selects the end of the spectrum:

    * ``"LA"``: the ``k`` largest algebraic eigenvalues (the sharpness default; a
      large negative eigenvalue is never reported as ``lambda_max``),
    * ``"SA"``: the ``k`` smallest algebraic (most negative),
    * ``"LM"``: the ``k`` largest in magnitude,
    * ``"BE"``: both ends, ``ceil(k/2)`` largest and ``floor(k/2)`` smallest.

    The result is always sorted descending. A pair is converged when its true
    residual ``||A v - lambda v||`` is at most ``tol * max(|lambda|, sqrt(eps) *
    ||A||)`` (``eps`` of the operator's dtype); the eigenvalue is then within that
    residual of a true eigenvalue. Guard Ritz values beyond the ``k`` (one per 8
    wanted values at each end, at least one) must converge too, to ``10 * tol``.
    If ``max_matvecs`` runs out first, the best pairs so far come back with
    ``converged=False`` and a :class:`RuntimeWarning` names their residuals.

    A residual test cannot see an eigenvalue that the Krylov space never reached
    (an eigenvector nearly missing from the start vector, inside a cluster as
    tight as ``tol``). With ``verify=True`` (the default), once every wanted
    residual is within 30 times its limit a fresh random direction (from the
    private generator) joins the Krylov basis, and the Lanczos expands the
    pending Lanczos vector and the fresh one in turn, so that the check's
    products also finish the convergence. The wanted values at convergence are
    compared with those ``max(8, ceil(k / 2))`` products after the fresh
    direction joined and at least 3 after convergence: if one rose by more than
    ``tol / 2`` (fell, for the bottom end; grew in magnitude for ``"LM"``;
    either end for ``"BE"``), a value had been skipped, and the solver iterates
    to convergence with it and checks again with another fresh direction (at
    most 3 checks). ``verified`` says whether the last check passed;
    ``converged`` is ``False`` when a check kept finding values or the budget
    ran out during a check. ``next_eigenvalue`` is the best Ritz value beyond
    the returned ones. The check lowers the odds of a skip (on synthetic
    spectra with a run of six values as tight as ``tol`` straddling the k-th,
    P=1000, tol=1e-3, 300 distinct solves for each k of 3, 4, 5, 8, 10 and
    20: 0 to 5 skipped, against 54 to 62 without it and 11 to 51 for scipy's
    ``eigsh``) at the cost of its extra products (1.2-1.4x the unchecked
    solve's, 1.03-1.17x ``eigsh``'s there); it is no proof. A ``tol`` three
    times tighter than the accuracy needed lowers the odds further (on the
    same spectra at k <= 8: 0 or 1 of 300, at 9-10% more products; 5-14% more
    on two small timm/MLP Hessians at k = 5; k >= 10 not measured). Pass
    ``verify=False`` where speed matters more than a skip inside a tight
    cluster, as in a periodic refresh (unchecked, about one solve in five
    skipped a value on the spectra above).

    Special cases: ``k == P`` materialises the operator (``P`` products) and uses a
    dense float64 ``eigh``; a zero operator returns zeros with orthonormal vectors.
    Exactly repeated eigenvalues: the Krylov spaces of c start directions (the
    start vector and the check's fresh ones) hold at most c copies, so with
    ``verify=True``, when as many returned values as there are start directions
    agree within ``tol / 10`` and a value beyond them is returned, another fresh
    direction joins and the comparison waits 4 times the products the solve
    took to bring in the group's first member (on synthetic spectra with an
    exact triple, 1.2-6.1x the products of the check without this rule, which
    returned two of the three copies as verified; values within ``tol / 10``
    of each other count as equal, and with ``"LM"`` so do ``+-lambda``).
    Where each new direction keeps finding another copy, the result says it
    could not verify. With ``verify=False`` a multiple
    eigenvalue can come back as one copy.

    Args:
        operator: The symmetric operator ``A`` (size ``P``).
        k: Number of eigenpairs, ``1 <= k <= P``.
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
        tol: Relative residual tolerance, ``> 0``.
        max_matvecs: Budget of products; default ``max(20 * max_basis, 500)``.
        max_basis: Most basis vectors kept (memory ``max_basis * P`` in the
            operator's dtype); default ``max(2 * (k + g) + 10, 30)`` capped at
            ``P``, with ``g`` the guards (``ceil(k / 8)`` for ``"LA"``). Must be
            ``>= min(k + 2, P)``.
        seed: Seed of the private generator for the start vector (the global RNG
            is never used); ``None`` means ``0``, so calls are deterministic.
        v0: Warm start: ``(P,)``, ``(P, m)``, or a previous
            :class:`EigenResult` (its :meth:`~EigenResult.warm_start`: the
            eigenvectors and the guards' vectors). Lanczos starts from the sum
            of the unit columns. With ``m > 1`` columns, when the first product
            ``A v`` leaves ``span(v0)`` by at most ``64 * tol / m`` of its norm
            (the subspace moved little), the rest of ``span(v0)`` joins the
            basis in one block of products (Rayleigh-Ritz on it), and each
            later product expands the pending direction that carries most of
            the unconverged residuals; the relation between basis and
            products stays exact, so residuals and ``converged`` mean the
            same. When the guards are among the columns, a small move costs
            about ``m`` products plus a few (k = 5, drifting synthetic
            operator: 10-11 against 19-23 from the summed vector). Farther
            out the solve is the single-vector one from the summed start.
            A block start from a result that missed a copy of a repeated
            value (one solved with ``verify=False``) can miss it again with
            ``verified=True``: the solve converges in a few products, too
            few for the check's fresh direction to bring the copy in (an
            exact double l_3 at k = 5, P = 400: 10 of 10 start vectors; warm
            from a verified result: none). Warm-start from verified results.
        verify: Run the skip check (see above; default ``True``); ``False``
            returns as soon as the residuals converge (``verified=False``), the
            solver as it was before the check.

    Returns:
        An :class:`EigenResult`, eigenvalues sorted descending.

    Raises:
        TypeError: If ``operator`` is not a :class:`LinearOperator`, ``v0`` is not a
            tensor, or an integer argument is not an integer.
        ValueError: If ``k`` is not in ``[1, P]``, ``which`` is unknown, ``tol <= 0``,
            ``max_matvecs < 1`` (or ``< k`` when ``k < P``),
            ``max_basis < min(k + 2, P)``, ``seed < 0``, or
            ``v0`` has the wrong shape or non-finite entries; or if the
            operator's output is non-finite (a NaN operator is never returned
            as converged).

    Example:
        >>> import torch
        >>> from geoopt_sgd import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64)))
        >>> res = top_eigenpairs(A, 3, tol=1e-8)
        >>> res.eigenvalues.round(decimals=6)
        tensor([40., 39., 38.], dtype=torch.float64)
        >>> res.converged
        True
    """
    t0 = time.perf_counter()
    if isinstance(v0, EigenResult):
        v0 = v0.warm_start()
    _validate(operator, k, which, tol, max_matvecs, max_basis, seed, v0)
    if not isinstance(verify, bool):
        raise TypeError(f"`verify` must be True or False; got {verify!r}.")
    P = operator.shape[0]
    if k == P:
        lam, U, R = _dense(operator)
        lam_s, idx = torch.sort(lam, descending=True, stable=True)
        anorm = float(lam.abs().max())
        denom = lam_s.abs().clamp_min(
            math.sqrt(torch.finfo(operator.dtype).eps) * anorm
        )
        rel = torch.where(denom > 0, R[idx] / denom, R[idx] * 0.0)
        return EigenResult(
            lam_s,
            U[:, idx.to(U.device)].to(operator.dtype),
            rel,
            P,
            True,
            time.perf_counter() - t0,
        )
    if which == "LA":
        n_top, n_bottom = k, 0
    elif which == "SA":
        n_top, n_bottom = 0, k
    elif which == "BE":
        n_top, n_bottom = (k + 1) // 2, k // 2
    else:
        n_top, n_bottom = k, 0
    sol = thick_restart_lanczos(
        operator,
        n_top,
        n_bottom,
        magnitude=which == "LM",
        tol=tol,
        max_matvecs=max_matvecs,
        max_basis=max_basis,
        seed=seed,
        v0=v0,
        verify=verify,
    )
    lam, Y, rel, n_mv = sol.theta, sol.Y, sol.rel, sol.n_mv
    if not sol.ok:
        what = sol.shortfall() or "did not converge"
        warnings.warn(
            f"top_eigenpairs {what} within {n_mv} matvecs (tol={tol}); "
            f"relative residuals: {[float(f'{r:.3g}') for r in rel.tolist()]}.",
            RuntimeWarning,
            stacklevel=2,
        )
    order = torch.argsort(lam, descending=True, stable=True)
    in_order = torch.arange(order.numel(), device=order.device)
    if not bool((order == in_order).all()):  # else no P x k copy
        lam, Y, rel = lam[order], Y[:, order.to(Y.device)], rel[order]
    return EigenResult(
        lam,
        Y,
        rel,
        n_mv,
        sol.ok,
        time.perf_counter() - t0,
        sol.verified,
        sol.next_value,
        sol.G,
    )


@full_precision
def bottom_eigenpairs(
    operator: LinearOperator,
    k: int,
    *,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    max_basis: int | None = None,
    seed: int | None = None,
    v0: Tensor | EigenResult | None = None,
    verify: bool = True,
) -> EigenResult:
    """Compute the ``k`` smallest algebraic eigenpairs, sorted ascending.

    Equivalent to ``top_eigenpairs(operator, k, which="SA", ...)`` with the result
    reversed, so ``eigenvalues[0]`` is the most negative eigenvalue.

    Args:
        operator: The symmetric operator ``A`` (size ``P``).
        k: Number of eigenpairs, ``1 <= k <= P``.
        tol: Relative residual tolerance, ``> 0``.
        max_matvecs: Budget of products (see :func:`top_eigenpairs`).
        max_basis: Most basis vectors kept (see :func:`top_eigenpairs`).
        seed: Seed of the private start-vector generator (``None`` means ``0``).
        v0: Warm start, ``(P,)``, ``(P, m)`` or a previous result (see
            :func:`top_eigenpairs`).
        verify: Run the skip check (see :func:`top_eigenpairs`; default
            ``True``).

    Returns:
        An :class:`EigenResult`, eigenvalues sorted ascending.

    Raises:
        TypeError: As :func:`top_eigenpairs`.
        ValueError: As :func:`top_eigenpairs`.
    """
    t0 = time.perf_counter()
    res = top_eigenpairs(
        operator,
        k,
        which="SA",
        tol=tol,
        max_matvecs=max_matvecs,
        max_basis=max_basis,
        seed=seed,
        v0=v0,
        verify=verify,
    )
    return EigenResult(
        res.eigenvalues.flip(0),
        res.eigenvectors.flip(1),
        res.residuals.flip(0),
        res.n_matvec,
        res.converged,
        time.perf_counter() - t0,
        res.verified,
        res.next_eigenvalue,
        res.next_eigenvectors,
    )
