r"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v``, ``m`` Lanczos steps give a tridiagonal ``T`` whose
eigenvalues ``theta_i`` (nodes) and squared first eigenvector components
``tau_i^2`` (weights) form the Gauss quadrature of the measure
``sum_j (v^T u_j)^2 delta(x - lambda_j)``, whose mean over Rademacher probes is the
spectral density ``(1/P) sum_j delta(x - lambda_j)``. The smoothed density is

.. math::

    \phi_\sigma(x) = \frac{1}{n_v} \sum_{l=1}^{n_v} \sum_{i=1}^{m}
    \tau_{l,i}^2 \, \mathcal{N}(x;\, \theta_{l,i}, \sigma^2),

which integrates to one. Tridiagonals, nodes, weights and the density are float64.

References:
    L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large
    matrices", SIAM Review 58(1), 2016. B. Ghorbani, S. Krishnan, Y. Xiao, "An
    investigation into neural net optimization via Hessian eigenvalue density",
    ICML 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed
from .._checks import check_finite_tensor, check_int, check_number
from .._linalg import coldot64
from .._model import full_precision
from .lanczos import check_operator_output
from .linop import LinearOperator

__all__ = ["SpectralDensity", "spectral_density"]


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed spectral density on a grid, with its quadrature.

    Attributes:
        grid: ``(num_points,)`` float64, ascending.
        density: ``(num_points,)`` float64, integrating to about one over ``grid``.
        nodes: ``(num_probes, num_steps)`` float64 quadrature nodes (Ritz values).
        weights: ``(num_probes, num_steps)`` float64 weights; each row sums to one
            (padded with zero weight where a probe's Krylov space was exhausted).
        sigma: Width of the Gaussian kernel.
        n_matvec: Matrix-vector products used.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    n_matvec: int


def _block_lanczos_tridiag(
    operator: LinearOperator, V0: Tensor, num_steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Run independent Lanczos recurrences on the columns of ``V0`` (unit norm).

    Returns:
        ``alpha`` and ``beta`` ``(c, num_steps)`` float64 and the number of valid
        steps per column, ``(c,)``.
    """
    P, c = V0.shape
    eps = torch.finfo(operator.dtype).eps
    basis = [V0]
    # the recurrence coefficients are small: kept on the CPU
    cpu = torch.device("cpu")
    alpha = torch.zeros(c, num_steps, dtype=torch.float64, device=cpu)
    beta = torch.zeros(c, num_steps, dtype=torch.float64, device=cpu)
    steps = torch.full((c,), num_steps, dtype=torch.long, device=cpu)
    alive = torch.ones(c, dtype=torch.bool, device=cpu)
    anorm = torch.zeros(c, dtype=torch.float64, device=cpu)
    for j in range(num_steps):
        W = operator.matmat(basis[-1])
        check_operator_output(W)
        alpha[:, j] = coldot64(basis[-1], W).cpu()
        anorm = torch.maximum(anorm, alpha[:, j].abs())
        for _ in range(2):  # full reorthogonalisation, column by column
            for Vb in basis:
                W -= Vb * coldot64(Vb, W).to(W.dtype)
        b = coldot64(W, W).clamp_min(0).sqrt().cpu()
        anorm = torch.maximum(anorm, b)
        newly_dead = alive & (b <= 10 * eps * anorm.clamp_min(1e-300) * math.sqrt(P))
        steps[newly_dead] = j + 1
        alive &= ~newly_dead
        if j == num_steps - 1 or not bool(alive.any()):
            break
        beta[:, j] = torch.where(alive, b, torch.zeros_like(b))
        scale = torch.where(alive, b, torch.ones_like(b)).to(W.device, W.dtype)
        basis.append(W / scale)
    return alpha, beta, steps


@full_precision
def spectral_density(
    operator: LinearOperator,
    *,
    num_probes: int = 10,
    num_steps: int = 30,
    num_points: int = 1000,
    sigma: float | None = None,
    grid: Tensor | None = None,
    seed: int | None = None,
    chunk_size: int = 10,
) -> SpectralDensity:
    """Estimate the eigenvalue density of ``A`` by stochastic Lanczos quadrature.

    Each Rademacher probe (normalised) runs ``num_steps`` Lanczos steps with full
    reorthogonalisation; ``chunk_size`` probes run side by side through
    :meth:`~LinearOperator.matmat` (memory ``chunk_size * num_steps * P``).

    Args:
        operator: The symmetric operator ``A`` (size ``P``).
        num_probes: Number of probes, ``>= 1``.
        num_steps: Lanczos steps per probe (capped at ``P``). Default ``30``.
        num_points: Grid size when ``grid`` is not given.
        sigma: Gaussian kernel width; default ``1%`` of the node range (or of
            ``max |node|`` when all nodes coincide, ``1`` for a zero operator).
        grid: Explicit ``(G,)`` grid; default ``num_points`` points spanning the
            nodes plus ``5 * sigma`` on each side.
        seed: Seed of the private probe generator; ``None`` means ``0``.
        chunk_size: Probes per block of products.

    Returns:
        A :class:`SpectralDensity` (float64, CPU).

    Raises:
        TypeError: If ``operator`` is not a :class:`LinearOperator`, ``grid`` is
            not a real tensor with data, or an integer argument is not an integer.
        ValueError: If ``num_probes``, ``num_steps`` or ``chunk_size`` is ``< 1``,
            ``num_points < 2``, ``sigma <= 0``, ``seed < 0`` or ``grid`` is not
            one-dimensional or has non-finite entries, or the operator's
            products are not finite (NaN or infinite entries).

    Example:
        >>> import torch
        >>> from geoopt_sgd import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.arange(10.0, dtype=torch.float64)))
        >>> sd = spectral_density(A, num_probes=2, num_steps=10, sigma=0.1)
        >>> dx = sd.grid[1] - sd.grid[0]
        >>> round(float(sd.density.sum() * dx), 3)
        1.0
    """
    if not isinstance(operator, LinearOperator):
        raise TypeError(
            f"`operator` must be a LinearOperator; got {type(operator).__name__}."
        )
    check_int("num_probes", num_probes, ge=1)
    check_int("num_steps", num_steps, ge=1)
    check_int("num_points", num_points, ge=2)
    check_number("sigma", sigma, gt=0, allow_none=True)
    check_int("seed", seed, ge=0, allow_none=True)
    check_int("chunk_size", chunk_size, ge=1)
    if grid is not None:
        if not isinstance(grid, Tensor):
            raise TypeError(
                f"`grid` must be a torch.Tensor; got {type(grid).__name__}."
            )
        if grid.dim() != 1:
            raise ValueError(
                f"`grid` must be one-dimensional (G,); got shape {tuple(grid.shape)}."
            )
        if grid.is_complex() or grid.dtype == torch.bool or grid.is_meta:
            raise TypeError(
                f"`grid` must be a real tensor with data; got dtype {grid.dtype} on "
                f"{grid.device}."
            )
        check_finite_tensor("grid", grid)
    P = operator.shape[0]
    m = min(num_steps, P)
    n_mv0 = operator.n_matvec
    gen = torch.Generator(device=operator.device).manual_seed(
        0 if seed is None else seed
    )
    nodes, weights = [], []
    done = 0
    while done < num_probes:
        c = min(chunk_size, num_probes - done)
        Z = torch.randint(0, 2, (c, P), generator=gen, device=operator.device)
        V0 = ((2 * Z - 1).to(operator.dtype) / math.sqrt(P)).T.contiguous()
        distributed.broadcast(V0)
        alpha, beta, steps = _block_lanczos_tridiag(operator, V0, m)
        for i in range(c):
            n = int(steps[i])
            T = torch.diag(alpha[i, :n])
            if n > 1:
                off = beta[i, : n - 1]
                T = T + torch.diag(off, 1) + torch.diag(off, -1)
            theta, S = torch.linalg.eigh(T)
            tau2 = S[0].square()
            nodes.append(torch.cat([theta, theta.new_zeros(m - n)]))
            weights.append(torch.cat([tau2 / tau2.sum(), tau2.new_zeros(m - n)]))
        done += c
    N = torch.stack(nodes)
    W = torch.stack(weights)
    live = N[W > 0]
    lo, hi = float(live.min()), float(live.max())
    if sigma is None:
        span = hi - lo
        if span <= 1e-12 * max(abs(lo), abs(hi)):
            span = max(abs(lo), abs(hi))
        sigma = 0.01 * span if span > 0 else 1.0
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, device="cpu")
    grid = grid.detach().to("cpu", torch.float64)
    diff = (grid[:, None, None] - N[None]) / sigma
    kern = torch.exp(-0.5 * diff.square()) / (sigma * math.sqrt(2 * math.pi))
    density = (kern * W[None]).sum(dim=(1, 2)) / N.shape[0]
    return SpectralDensity(grid, density, N, W, float(sigma), operator.n_matvec - n_mv0)
