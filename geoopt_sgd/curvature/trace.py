r"""Randomised trace, diagonal and squared-Frobenius estimators.

All estimators draw Rademacher probes ``z`` (entries ``+-1``, so ``E[z z^T] = I``)
from a private, seeded :class:`torch.Generator` (the global RNG is never
touched), apply the operator to ``chunk_size`` probes at a time through
:meth:`LinearOperator.matmat` (memory ``O(chunk_size * P)``), accumulate in
float64, and return an :class:`Estimate` with the standard error of the mean.

.. math::

    \operatorname{tr}(A) = \mathbb{E}[z^\top A z], \qquad
    \operatorname{diag}(A) = \mathbb{E}[z \odot A z], \qquad
    \|A\|_F^2 = \operatorname{tr}(A^\top A) = \mathbb{E}[\|A z\|^2].

With ``rtol`` set, sampling stops as soon as the standard error is at most
``rtol * |estimate|`` (after at least ``min(num_probes, 10)`` probes).

References:
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines", 1990.
    R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: optimal stochastic
    trace estimation", SOSA 2021.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed
from .._checks import check_int, check_number
from .._linalg import coldot64
from .._model import full_precision
from .lanczos import check_operator_output
from .linop import LinearOperator

__all__ = [
    "Estimate",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "squared_frobenius",
]

_MIN_PROBES = 10


@dataclass(frozen=True)
class Estimate:
    """A Monte-Carlo estimate with its standard error and cost.

    Attributes:
        value: The estimate: a float, or a float64 tensor (e.g. ``(P,)`` for
            :func:`hutchinson_diagonal`).
        stderr: Standard error of ``value`` (same type and shape); ``nan`` when
            fewer than two samples were drawn.
        n_matvec: Matrix-vector products used (``0`` for loss-only estimators).
        num_probes: Probes (samples) averaged.
    """

    value: float | Tensor
    stderr: float | Tensor
    n_matvec: int
    num_probes: int


def _check_operator(operator: object) -> None:
    if not isinstance(operator, LinearOperator):
        raise TypeError(
            f"`operator` must be a LinearOperator; got {type(operator).__name__}."
        )


def _check_common(
    num_probes: int,
    seed: int | None,
    rtol: float | None,
    max_matvecs: int | None,
    chunk_size: int,
) -> None:
    check_int("num_probes", num_probes, ge=1)
    check_int("seed", seed, ge=0, allow_none=True)
    check_number("rtol", rtol, gt=0, allow_none=True)
    check_int("max_matvecs", max_matvecs, ge=1, allow_none=True)
    check_int("chunk_size", chunk_size, ge=1)


def _generator(operator: LinearOperator, seed: int | None) -> torch.Generator:
    # ranks may be given different seeds, and their products are summed over
    # ranks: every rank draws rank 0's probes (one integer sent, not the probes)
    seed = distributed.rank0_seed(0 if seed is None else seed, operator.device)
    return torch.Generator(device=operator.device).manual_seed(seed)


def _rademacher(P: int, n: int, gen: torch.Generator, operator: LinearOperator):
    # drawn probe by probe, so the probes do not depend on ``chunk_size``
    Z = torch.randint(0, 2, (n, P), generator=gen, device=operator.device)
    return (2 * Z - 1).to(operator.dtype).T.contiguous()


def rademacher_probes(
    operator: LinearOperator,
    num_probes: int,
    chunk_size: int,
    max_matvecs: int | None,
    seed: int | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(Z, A Z)`` for Rademacher ``Z`` ``(P, c)``, chunk by chunk.

    Stops after ``num_probes`` probes or ``max_matvecs`` products, whichever is
    fewer; the probes come from the operator's seeded generator, drawn probe by
    probe, so they do not depend on ``chunk_size``.

    Raises:
        ValueError: If a product holds NaN or infinite entries.
    """
    P = operator.shape[0]
    gen = _generator(operator, seed)
    budget = num_probes if max_matvecs is None else min(num_probes, max_matvecs)
    done = 0
    while done < budget:
        c = min(chunk_size, budget - done)
        Z = _rademacher(P, c, gen, operator)
        AZ = operator.matmat(Z)
        check_operator_output(AZ)
        yield Z, AZ
        done += c


def mean_stderr(samples: Tensor) -> tuple[float, float]:
    """Return the mean of ``(n,)`` samples and its standard error (NaN if ``n = 1``)."""
    n = samples.shape[0]
    mean = float(samples.mean())
    se = float(samples.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
    return mean, se


def _stop(mean: float, se: float, n: int, rtol: float | None, num_probes: int) -> bool:
    return (
        rtol is not None
        and n >= min(num_probes, _MIN_PROBES)
        and n > 1
        and se <= rtol * abs(mean)
    )


def _scalar_estimator(
    operator: LinearOperator,
    stat,
    num_probes: int,
    seed: int | None,
    rtol: float | None,
    max_matvecs: int | None,
    chunk_size: int,
) -> Estimate:
    samples: list[Tensor] = []
    n_mv0 = operator.n_matvec
    mean, se = math.nan, math.nan
    for Z, AZ in rademacher_probes(operator, num_probes, chunk_size, max_matvecs, seed):
        samples.append(stat(Z, AZ).cpu())
        mean, se = mean_stderr(torch.cat(samples))
        if _stop(mean, se, sum(s.numel() for s in samples), rtol, num_probes):
            break
    n = sum(s.numel() for s in samples)
    return Estimate(mean, se, operator.n_matvec - n_mv0, n)


@full_precision
def hutchinson_trace(
    operator: LinearOperator,
    *,
    num_probes: int = 100,
    seed: int | None = None,
    rtol: float | None = None,
    max_matvecs: int | None = None,
    chunk_size: int = 10,
) -> Estimate:
    """Estimate ``tr(A)`` as the mean of ``z^T A z`` over Rademacher probes.

    Args:
        operator: The symmetric operator ``A``.
        num_probes: Most probes to draw (one product each).
        seed: Seed of the private probe generator; ``None`` means ``0``.
        rtol: Stop early once ``stderr <= rtol * |value|`` (at least
            ``min(num_probes, 10)`` probes); ``None`` draws all ``num_probes``.
        max_matvecs: Cap on products (probes), if lower than ``num_probes``.
        chunk_size: Probes applied per :meth:`~LinearOperator.matmat` call.

    Returns:
        An :class:`Estimate` with a float ``value`` and ``stderr``.

    Raises:
        TypeError: If ``operator`` is not a :class:`LinearOperator` or an integer
            argument is not an integer.
        ValueError: If ``num_probes``, ``max_matvecs`` or ``chunk_size`` is
            ``< 1``, ``seed < 0`` or ``rtol <= 0``, or the operator's products
            are not finite (NaN or infinite entries).

    Example:
        >>> import torch
        >>> from geoopt_sgd import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
        >>> hutchinson_trace(A, num_probes=4).value  # exact for a diagonal A
        6.0
    """
    _check_operator(operator)
    _check_common(num_probes, seed, rtol, max_matvecs, chunk_size)
    return _scalar_estimator(
        operator, coldot64, num_probes, seed, rtol, max_matvecs, chunk_size
    )


@full_precision
def squared_frobenius(
    operator: LinearOperator,
    *,
    num_probes: int = 100,
    seed: int | None = None,
    rtol: float | None = None,
    max_matvecs: int | None = None,
    chunk_size: int = 10,
) -> Estimate:
    """Estimate ``||A||_F^2 = tr(A^T A)`` as the mean of ``||A z||^2``.

    Args:
        operator: The operator ``A``.
        num_probes: Most probes to draw (one product each).
        seed: Seed of the private probe generator; ``None`` means ``0``.
        rtol: Stop early once ``stderr <= rtol * value`` (see
            :func:`hutchinson_trace`).
        max_matvecs: Cap on products, if lower than ``num_probes``.
        chunk_size: Probes applied per :meth:`~LinearOperator.matmat` call.

    Returns:
        An :class:`Estimate` of ``||A||_F^2`` (take ``sqrt`` for the norm).

    Raises:
        TypeError: As :func:`hutchinson_trace`.
        ValueError: As :func:`hutchinson_trace`.
    """
    _check_operator(operator)
    _check_common(num_probes, seed, rtol, max_matvecs, chunk_size)
    return _scalar_estimator(
        operator,
        lambda Z, AZ: coldot64(AZ, AZ),
        num_probes,
        seed,
        rtol,
        max_matvecs,
        chunk_size,
    )


@full_precision
def hutchinson_diagonal(
    operator: LinearOperator,
    *,
    num_probes: int = 100,
    seed: int | None = None,
    rtol: float | None = None,
    max_matvecs: int | None = None,
    chunk_size: int = 10,
) -> Estimate:
    """Estimate ``diag(A)`` as the mean of ``z * (A z)`` over Rademacher probes.

    Args:
        operator: The symmetric operator ``A`` (size ``P``).
        num_probes: Most probes to draw (one product each).
        seed: Seed of the private probe generator; ``None`` means ``0``.
        rtol: Stop early once ``||stderr|| <= rtol * ||value||`` (Euclidean norms
            over the ``P`` entries; at least ``min(num_probes, 10)`` probes).
        max_matvecs: Cap on products, if lower than ``num_probes``.
        chunk_size: Probes applied per :meth:`~LinearOperator.matmat` call.

    Returns:
        An :class:`Estimate` whose ``value`` and ``stderr`` are ``(P,)`` float64
        tensors on the operator's device.

    Raises:
        TypeError: As :func:`hutchinson_trace`.
        ValueError: As :func:`hutchinson_trace`.
    """
    _check_operator(operator)
    _check_common(num_probes, seed, rtol, max_matvecs, chunk_size)
    P = operator.shape[0]
    s1 = torch.zeros(P, dtype=torch.float64, device=operator.device)
    s2 = torch.zeros_like(s1)
    n, n_mv0 = 0, operator.n_matvec
    mean, se = s1, torch.full_like(s1, math.nan)
    for Z, AZ in rademacher_probes(operator, num_probes, chunk_size, max_matvecs, seed):
        D = Z.double() * AZ.double()
        s1 += D.sum(1)
        s2 += D.square().sum(1)
        n += Z.shape[1]
        mean = s1 / n
        if n > 1:
            var = ((s2 - n * mean.square()) / (n - 1)).clamp_min(0)
            se = var.sqrt() / math.sqrt(n)
            if _stop(float(mean.norm()), float(se.norm()), n, rtol, num_probes):
                break
    return Estimate(mean, se, operator.n_matvec - n_mv0, n)


@full_precision
def hutchpp_trace(
    operator: LinearOperator,
    *,
    num_matvecs: int = 99,
    seed: int | None = None,
    chunk_size: int = 10,
) -> Estimate:
    """Estimate ``tr(A)`` with Hutch++ (low-rank deflation plus Hutchinson).

    The budget is split in three (Meyer et al. 2021, Algorithm 1): ``s`` products
    sketch the range, ``Q = orth(A S)``; ``s`` more give the exact
    ``tr(Q^T A Q)``; the rest estimate the trace of the deflated remainder
    ``(I - Q Q^T) A (I - Q Q^T)`` by Hutchinson. Far fewer products than
    :func:`hutchinson_trace` for operators with decaying spectra.

    Args:
        operator: The symmetric operator ``A`` (size ``P``).
        num_matvecs: Total products, ``>= 3``.
        seed: Seed of the private probe generator; ``None`` means ``0``.
        chunk_size: Probes applied per :meth:`~LinearOperator.matmat` call in
            the Hutchinson part.

    Returns:
        An :class:`Estimate`; ``stderr`` is that of the Hutchinson part (``nan``
        when it used fewer than two probes; ``0.0`` when the sketch spans all
        ``P`` dimensions, so the trace is exact).

    Raises:
        TypeError: If ``operator`` is not a :class:`LinearOperator` or an integer
            argument is not an integer.
        ValueError: If ``num_matvecs < 3``, ``seed < 0`` or ``chunk_size < 1``,
            or the operator's products are not finite (NaN or infinite entries).
    """
    _check_operator(operator)
    check_int("num_matvecs", num_matvecs, ge=3)
    check_int("seed", seed, ge=0, allow_none=True)
    check_int("chunk_size", chunk_size, ge=1)
    P = operator.shape[0]
    n_mv0 = operator.n_matvec
    gen = _generator(operator, seed)
    s = min((num_matvecs + 2) // 3, P)
    S = _rademacher(P, s, gen, operator)
    AS = operator.matmat(S)
    check_operator_output(AS)
    Q, _ = torch.linalg.qr(AS.double())
    Q = Q.to(operator.dtype)
    AQ = operator.matmat(Q)
    check_operator_output(AQ)
    t_low = float(coldot64(Q, AQ).sum())
    n_rest = num_matvecs - 2 * s
    samples: list[Tensor] = []
    done = 0
    while done < n_rest and s < P:
        c = min(chunk_size, n_rest - done)
        G = _rademacher(P, c, gen, operator)
        G = G - Q @ (Q.T @ G)
        AG = operator.matmat(G)
        check_operator_output(AG)
        samples.append(coldot64(G, AG).cpu())
        done += c
    if samples:
        mean, se = mean_stderr(torch.cat(samples))
    else:
        mean, se = 0.0, 0.0 if s >= P else math.nan
    return Estimate(
        t_low + mean, se, operator.n_matvec - n_mv0, s + sum(map(len, samples))
    )
