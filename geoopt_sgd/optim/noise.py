"""Noise models for :class:`~geoopt_sgd.NoisyGD`: pure samplers given a generator.

Every sampler here is a pure function of its inputs and a :class:`torch.Generator`; none
touches the global RNG. Samples are flat vectors ``(P,)`` over all parameters. The
covariance each sampler realises is stated in its docstring in the notation of
``docs/science/dynamics.md`` (``C`` the covariance of mini-batch gradients, ``H`` the
curvature, ``(λ_j, u_j)`` its top eigenpairs).

Draws of a given covariance:

* :func:`isotropic_noise`: ``s² σ² I``;
* :func:`diagonal_noise`: ``diag(v)``;
* :func:`low_rank_noise`: ``s² Σ_j λ_j u_j u_jᵀ`` (negative ``λ_j`` clamped to 0).

One sampler per noise kind of :class:`~geoopt_sgd.NoisyGD` that draws from
refreshed statistics (:data:`SAMPLERS`, all called as
``sampler(stats, scale, options)`` with :class:`DrawOptions`): each turns the
statistics (``Tr C``, ``diag C``, eigenpairs, ``L``, ``Tr H``) and the
``magnitude`` option into a :class:`NoiseSample`.

Statistics:

* :func:`minibatch_statistics` / :func:`minibatch_eigenpairs`: ``C`` from ``M``
  mini-batch gradients, its diagonal, trace and top eigenpairs (no ``P x P``
  matrix is formed);
* :func:`clamp_eigenvalues`: a PSD spectrum from Ritz values;
* :func:`reweighting_weights`: the per-sample weights whose reweighted-loss
  gradient has exactly the covariance ``Σ/B`` of mini-batch SGD.

Streams are derived from ``(seed, step)`` by :func:`step_seed`, so a resumed run
needs only the integer step count to continue bit for bit, and every rank of a
distributed job draws identical noise without communication.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_int, check_number

__all__ = [
    "SAMPLERS",
    "DrawOptions",
    "NoiseSample",
    "Sampler",
    "clamp_eigenvalues",
    "diagonal_noise",
    "geometry_aware_isotropic_variance",
    "isotropic_noise",
    "low_rank_noise",
    "make_generator",
    "minibatch_eigenpairs",
    "minibatch_statistics",
    "reweighting_weights",
    "sample_diagonal",
    "sample_geometry_aware",
    "sample_geometry_aware_isotropic",
    "sample_hessian",
    "sample_isotropic_matched",
    "sample_sgd_leading",
    "sample_top_eigvec",
    "standard_normal",
    "step_seed",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser (Steele et al. 2014): a bijection on 64-bit integers
    # whose outputs for consecutive inputs are statistically independent.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """Derive the seed of one step's noise stream from ``(seed, step, stream)``.

    Args:
        seed: The run's seed (any non-negative integer).
        step: The step count (0 for the first step).
        stream: A sub-stream index, for independent draws within one step
            (e.g. the eigensolver's start vector, or a rank's share of a sum).

    Returns:
        A non-negative integer below ``2**63`` (valid for ``manual_seed``).

    Raises:
        TypeError: If an argument is not an integer.
        ValueError: If an argument is negative.

    Example:
        >>> step_seed(0, 1) == step_seed(0, 1)
        True
        >>> step_seed(0, 1) != step_seed(0, 2)
        True
    """
    check_int("seed", seed, ge=0)
    check_int("step", step, ge=0)
    check_int("stream", stream, ge=0)
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (step & _MASK64))
    h = _splitmix64(h ^ (stream & _MASK64))
    return h >> 1


def make_generator(
    seed: int, step: int, device: torch.device | str = "cpu", stream: int = 0
) -> torch.Generator:
    """Return a fresh generator on ``device`` seeded by :func:`step_seed`.

    Args:
        seed: The run's seed.
        step: The step count.
        device: Where the generator lives (the parameters' device, so that noise
            is drawn where it is used).
        stream: A sub-stream index.

    Returns:
        A :class:`torch.Generator`; the global RNG is not touched.
    """
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, stream))


def standard_normal(
    numel: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Draw ``z ~ N(0, I)`` of shape ``(numel,)``.

    Args:
        numel: Number of entries.
        generator: The source of randomness; its device must match ``device``.
        dtype: A floating dtype.
        device: Defaults to the generator's device.
        out: Optional flat workspace ``(numel,)`` to fill in place (same values
            as a fresh draw, without allocating; ``dtype``/``device`` ignored).

    Returns:
        A flat tensor ``(numel,)`` (``out`` when given).
    """
    if out is not None:
        return out.normal_(generator=generator)
    device = generator.device if device is None else device
    return torch.randn(numel, generator=generator, dtype=dtype, device=device)


class NoiseSample(NamedTuple):
    """One draw ``ξ = alpha · direction``, kept as a product.

    :class:`~geoopt_sgd.NoisyGD` multiplies ``direction`` by ``alpha`` inside its
    fused update, so the scaled vector is never formed.

    Attributes:
        direction: The flat draw, shape ``(P,)``.
        alpha: Its multiplier.
        target_sq_norm: ``E‖ξ‖²`` (NaN where it is not computed).
    """

    direction: Tensor
    alpha: float
    target_sq_norm: float


def isotropic_noise(
    numel: int,
    scale: float,
    *,
    variance: float = 1.0,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    out: Tensor | None = None,
) -> NoiseSample:
    """Sample ``ξ = s σ z`` with covariance ``s² σ² I``.

    Args:
        numel: ``P``, the number of entries.
        scale: ``s``, a multiplier (not checked: NoisyGD's schedule sets it).
        variance: ``σ²``, the variance per coordinate before scaling.
        generator: The source of randomness.
        dtype: A floating dtype.
        device: Defaults to the generator's device.
        out: Optional flat workspace ``(P,)`` to draw ``z`` into (see
            :func:`standard_normal`).

    Returns:
        ``NoiseSample(z, s σ, s² σ² P)``.
    """
    z = standard_normal(numel, generator=generator, dtype=dtype, device=device, out=out)
    return NoiseSample(z, scale * math.sqrt(variance), scale * scale * variance * numel)


def diagonal_noise(variance: Tensor, *, generator: torch.Generator) -> Tensor:
    """Sample ``ξ = sqrt(v) ⊙ z`` with covariance ``diag(v)``.

    Args:
        variance: ``v``, shape ``(P,)``; negative entries (round-off) count as 0.
        generator: The source of randomness, on ``variance``'s device.

    Returns:
        ``ξ``, shape ``(P,)``, same dtype and device as ``variance``;
        ``E‖ξ‖² = Σ_j max(v_j, 0)``.
    """
    z = standard_normal(
        variance.numel(),
        generator=generator,
        dtype=variance.dtype,
        device=variance.device,
    )
    return z.mul_(variance.reshape(-1).clamp(min=0).sqrt())


def clamp_eigenvalues(eigenvalues: Tensor) -> tuple[Tensor, int]:
    """Clamp negative (or NaN) eigenvalues to zero and count them.

    Away from a minimum the Hessian is indefinite; a covariance must be PSD.
    Z19's code takes ``|λ|``; we drop negative directions instead,
    so noise never points along directions of negative curvature, and we count
    them so the user can audit how much of the spectrum was discarded.

    Args:
        eigenvalues: Ritz values, shape ``(k,)``.

    Returns:
        ``(clamped, count)``: the eigenvalues with negative or non-finite entries
        set to 0, and how many were set.
    """
    bad = ~(eigenvalues >= 0)  # catches NaN too
    return torch.where(bad, torch.zeros_like(eigenvalues), eigenvalues), int(bad.sum())


def low_rank_noise(
    eigenvalues: Tensor,
    eigenvectors: Tensor,
    *,
    generator: torch.Generator,
    scale: float = 1.0,
) -> Tensor:
    """Sample ``ξ = s Σ_j sqrt(λ_j) z_j u_j`` with covariance ``s² U diag(λ) Uᵀ``.

    Args:
        eigenvalues: ``λ``, shape ``(k,)``, non-negative (use
            :func:`clamp_eigenvalues` first; negative entries count as 0 here).
        eigenvectors: ``U``, shape ``(P, k)``, orthonormal columns.
        generator: The source of randomness (``k`` normals are drawn), on
            ``eigenvectors``' device.
        scale: ``s``, a non-negative multiplier.

    Returns:
        ``ξ``, shape ``(P,)``; ``E‖ξ‖² = s² Σ_j λ_j``.

    Raises:
        ValueError: If the shapes disagree or ``scale`` is negative.
    """
    check_number("scale", scale, ge=0)
    k = eigenvalues.numel()
    if eigenvectors.dim() != 2 or eigenvectors.shape[1] != k:
        raise ValueError(
            f"`eigenvectors`: expected shape (P, {k}), got {tuple(eigenvectors.shape)}."
        )
    z = standard_normal(
        k, generator=generator, dtype=eigenvectors.dtype, device=eigenvectors.device
    )
    lam = eigenvalues.to(eigenvectors).clamp(min=0)
    return eigenvectors @ (z * lam.sqrt() * scale)


def minibatch_statistics(batch_gradients: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, diagonal and trace of the mini-batch gradient covariance ``C``.

    ``C = (1/M) Σ_b g_b g_bᵀ - ḡ ḡᵀ`` over ``M`` mini-batch gradients (the
    ZYT estimator with ``1/M``); with disjoint batches of size ``B`` it
    estimates the SGD noise covariance ``Σ/B``. When the batches split ``n``
    samples at random, its mean is ``(n - B)/(n - 1) · Σ/B``, the covariance of
    sampling without replacement (``docs/science/conventions.md``).

    Args:
        batch_gradients: ``g_b`` stacked as rows, shape ``(M, P)``, ``M >= 2``.

    Returns:
        ``(ḡ, diag(C), Tr C)`` with shapes ``(P,)``, ``(P,)`` and ``()``.

    Raises:
        ValueError: If fewer than two gradients are given.
    """
    if batch_gradients.dim() != 2 or batch_gradients.shape[0] < 2:
        raise ValueError(
            "`batch_gradients` must have shape (M, P) with M >= 2 mini-batches; got "
            f"{tuple(batch_gradients.shape)}. Use more data or a smaller batch_size."
        )
    mean = batch_gradients.mean(0)
    dev = batch_gradients - mean
    diag = (dev * dev).mean(0)
    return mean, diag, diag.sum()


def minibatch_eigenpairs(batch_gradients: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of the mini-batch covariance ``C`` via its Gram matrix.

    With ``D = (g_b - ḡ)_b / sqrt(M)`` (shape ``(M, P)``), ``C = DᵀD`` and the
    ``M x M`` Gram ``DDᵀ = W diag(e) Wᵀ`` has the same non-zero eigenvalues; the
    eigenvectors are ``v_j = Dᵀ w_j / sqrt(e_j)``. No ``P x P`` matrix is formed.

    Args:
        batch_gradients: ``g_b`` as rows, shape ``(M, P)``, ``M >= 2``.
        k: Number of pairs; at most ``M - 1`` are non-zero, and the result has
            ``min(k, M)`` columns.

    Returns:
        ``(e, V)``: eigenvalues ``(k',)`` in descending order (clamped at 0) and
        orthonormal eigenvectors ``(P, k')``; columns of zero eigenvalue are 0.

    Raises:
        ValueError: If fewer than two gradients are given or ``k < 1``.
    """
    check_int("k", k, ge=1)
    if batch_gradients.dim() != 2 or batch_gradients.shape[0] < 2:
        raise ValueError(
            "`batch_gradients` must have shape (M, P) with M >= 2 mini-batches; got "
            f"{tuple(batch_gradients.shape)}. Use more data or a smaller batch_size."
        )
    M = batch_gradients.shape[0]
    D = (batch_gradients - batch_gradients.mean(0)) / M**0.5
    # float64 for the small eigenproblem: the Gram squares the condition number
    gram = (D @ D.T).to(torch.float64)
    e, W = torch.linalg.eigh(gram)
    e, W = e.flip(0)[: min(k, M)], W.flip(1)[:, : min(k, M)]
    e = e.clamp(min=0)
    tol = e.max().clamp(min=torch.finfo(torch.float64).tiny) * M * 1e-12
    keep = e > tol
    inv = torch.where(keep, e.clamp(min=tol).rsqrt(), torch.zeros_like(e))
    V = D.T @ (W * inv).to(D.dtype)
    e = torch.where(keep, e, torch.zeros_like(e))
    return e.to(D.dtype), V


def reweighting_weights(
    z: Tensor,
    batch_size: int,
    *,
    total: int | None = None,
    z_mean: float | Tensor | None = None,
) -> Tensor:
    r"""Per-sample weights whose reweighted gradient is exact SGD-covariance noise.

    For ``z_i ~ N(0, 1)`` and ``w_i = (z_i - z̄) / sqrt(n B)``,

    .. math::

        ξ = \sum_i w_i ∇L_i = (nB)^{-1/2} \sum_i z_i (∇L_i - ∇L),
        \qquad \operatorname{Cov} ξ = Σ / B

    exactly (``Σ`` the per-sample gradient covariance with
    ``1/n``), and ``ξ`` is one backward pass of ``Σ_i w_i L_i``: no per-sample
    gradient is formed.

    Args:
        z: Standard normal draws, shape ``(m,)`` (this rank's samples; ``m`` may
            be 0 on a rank whose shard is empty when ``total`` is given).
        batch_size: ``B``, the SGD batch size being imitated.
        total: ``n``, the number of samples over all ranks (defaults to ``m``).
        z_mean: ``z̄`` over all ranks (defaults to ``z.mean()``).

    Returns:
        ``w``, shape ``(m,)``, same dtype and device as ``z``.

    Raises:
        TypeError: If ``batch_size`` is not an integer.
        ValueError: If ``batch_size`` is below 1, or ``z`` is empty without a
            positive ``total`` (an empty shard of a distributed batch is allowed).

    Example:
        >>> w = reweighting_weights(torch.tensor([1.0, -1.0, 3.0]), 1)
        >>> round(float(w.sum()), 6)
        0.0
    """
    check_int("batch_size", batch_size, ge=1)
    if z.numel() == 0 and not total:
        # an empty shard is fine under torch.distributed (``total`` > 0): no weights
        raise ValueError("`z` must hold at least one sample; got an empty tensor.")
    n = z.numel() if total is None else total
    zbar = z.mean() if z_mean is None else z_mean
    return (z - zbar) / (n * batch_size) ** 0.5


# ------------------------------------------------- one sampler per noise kind
# Every sampler takes the statistics of the last refresh (``stats``: the tensors
# each names), the multiplier ``s`` and one DrawOptions, so that NoisyGD
# dispatches through SAMPLERS; a sampler ignores the options it does not need.


class DrawOptions(NamedTuple):
    """What every sampler of :data:`SAMPLERS` is given besides the statistics.

    Attributes:
        numel: ``P``, the number of parameters.
        magnitude: ``"sgd"``, ``"unit"`` or ``"raw"``: the trace of the kinds
            matched to SGD (ISO and GEO have their own magnitude).
        batch_size: ``B``, for the kinds whose magnitude involves it.
        generator: The source of randomness, on the statistics' device.
        dtype: The noise dtype, for the kinds that draw ``P`` normals (the others
            take the statistics' dtype).
    """

    numel: int
    magnitude: str
    batch_size: int | None
    generator: torch.Generator
    dtype: torch.dtype


Sampler = Callable[[Mapping[str, Tensor], float, DrawOptions], NoiseSample]
"""``sampler(stats, scale, options) -> NoiseSample``: ``stats`` the statistics of
the last refresh, ``scale`` the multiplier ``s`` of the draw."""


def geometry_aware_isotropic_variance(
    stats: Mapping[str, Tensor], batch_size: int, numel: int
) -> float:
    """The ISO variance per coordinate ``2 L Tr(H) / (B P)`` (negatives count as 0).

    Args:
        stats: Holds ``"loss"`` (``L``) and ``"trace_h"`` (``Tr H``), scalars.
        batch_size: ``B``.
        numel: ``P``.

    Returns:
        The variance, a float.
    """
    loss = max(float(stats["loss"]), 0.0)
    trace_h = max(float(stats["trace_h"]), 0.0)
    return 2.0 * loss * trace_h / (batch_size * numel)


def sample_isotropic_matched(
    stats: Mapping[str, Tensor], scale: float, options: DrawOptions
) -> NoiseSample:
    """``"isotropic_matched"``: covariance ``s² (Tr C / P) I`` (``s²/P I`` for "unit").

    Reads ``stats["trace_c"]`` (``Tr C``; ``magnitude`` ``"sgd"`` and ``"raw"``
    both keep it) and draws ``P`` normals.

    Returns:
        ``NoiseSample(z, s sqrt(Tr C / P), s² Tr C)``.
    """
    numel = options.numel
    trace = 1.0 if options.magnitude == "unit" else float(stats["trace_c"])
    return isotropic_noise(
        numel,
        scale,
        variance=trace / numel,
        generator=options.generator,
        dtype=options.dtype,
    )


def sample_geometry_aware_isotropic(
    stats: Mapping[str, Tensor], scale: float, options: DrawOptions
) -> NoiseSample:
    """``"geometry_aware_isotropic"`` (ISO): covariance ``s² (2L/B) (Tr H / P) I``.

    Reads ``stats["loss"]`` and ``stats["trace_h"]`` (see
    :func:`geometry_aware_isotropic_variance`) and draws ``P`` normals;
    ``magnitude`` is unused (ISO has its own).

    Returns:
        ``NoiseSample(z, s sqrt(v), s² v P)`` with ``v`` the ISO variance.
    """
    numel, batch_size = options.numel, options.batch_size
    assert batch_size is not None
    var = geometry_aware_isotropic_variance(stats, batch_size, numel)
    return isotropic_noise(
        numel, scale, variance=var, generator=options.generator, dtype=options.dtype
    )


def sample_diagonal(
    stats: Mapping[str, Tensor], scale: float, options: DrawOptions
) -> NoiseSample:
    """``"diagonal"`` (GLD-diag): covariance ``s² diag(C)`` (trace ``s²`` for "unit").

    Reads ``stats["variance"]`` (``diag C``, shape ``(P,)``; ``magnitude``
    ``"sgd"`` and ``"raw"`` both keep it) and draws in its dtype.

    Returns:
        ``NoiseSample(sqrt(diag C) ⊙ z, s a, (s a)² Tr C)``, ``a = 1`` or
        ``1/sqrt(Tr C)``.
    """
    variance = stats["variance"]
    total = float(variance.sum())
    if options.magnitude == "unit":
        a = 1.0 / math.sqrt(total) if total > 0 else 0.0
    else:
        a = 1.0
    xi = diagonal_noise(variance, generator=options.generator)
    return NoiseSample(xi, scale * a, (scale * a) ** 2 * total)


def _low_rank_sample(
    eigenvalues: Tensor,
    eigenvectors: Tensor,
    scale: float,
    factor: Callable[[float], float],
    generator: torch.Generator,
) -> NoiseSample:
    # ξ = s sqrt(a²) Σ_j sqrt(λ_j) z_j u_j with a² = factor(Σ_j λ_j)
    mass = float(eigenvalues.clamp(min=0).sum())
    a2 = factor(mass)
    xi = low_rank_noise(eigenvalues, eigenvectors, generator=generator)
    return NoiseSample(xi, scale * math.sqrt(a2), scale * scale * a2 * mass)


def _matched_factor(stats: Mapping[str, Tensor], magnitude: str) -> Callable:
    # a² that gives the top-k mass Σ λ_j the trace Tr C ("sgd"), 1 ("unit"), or
    # leaves it ("raw")
    def factor(mass: float) -> float:
        if magnitude == "sgd":
            return float(stats["trace_c"]) / mass if mass > 0 else 0.0
        if magnitude == "unit":
            return 1.0 / mass if mass > 0 else 0.0
        return 1.0

    return factor


def sample_sgd_leading(
    stats: Mapping[str, Tensor], scale: float, options: DrawOptions
) -> NoiseSample:
    """``"sgd_leading"`` (GLD-lead) and ``"hessian"`` (GLD-Hess): top-``k`` eigenpairs.

    Covariance ``s² a² Σ_j λ_j u_j u_jᵀ`` with ``a² = Tr C / Σ_j λ_j``
    (``"sgd"``), ``1 / Σ_j λ_j`` (``"unit"``) or ``1`` (``"raw"``); ``(λ_j, u_j)``
    are the top eigenpairs of ``C`` (``"sgd_leading"``) or of the curvature
    (``"hessian"``). Reads ``stats["eigenvalues"]`` ``(k,)``,
    ``stats["eigenvectors"]`` ``(P, k)`` and, for ``"sgd"``, ``stats["trace_c"]``;
    draws ``k`` normals in the eigenvectors' dtype.

    Returns:
        ``NoiseSample(Σ_j sqrt(λ_j) z_j u_j, s a, s² a² Σ_j λ_j)``.
    """
    return _low_rank_sample(
        stats["eigenvalues"],
        stats["eigenvectors"],
        scale,
        _matched_factor(stats, options.magnitude),
        options.generator,
    )


sample_hessian = sample_sgd_leading


def sample_top_eigvec(
    stats: Mapping[str, Tensor], scale: float, options: DrawOptions
) -> NoiseSample:
    """``"top_eigvec"`` (GLD-1eig): covariance ``s² a² λ_1 u_1 u_1ᵀ``.

    With ``a² = Tr C / λ_1`` (``"sgd"``: ``s² Tr C u_1 u_1ᵀ``), ``1/λ_1``
    (``"unit"``) or ``1`` (``"raw"``). Reads what :func:`sample_sgd_leading`
    reads but uses only the first pair; draws one normal.

    Returns:
        ``NoiseSample(sqrt(λ_1) z u_1, s a, s² a² λ_1)``.
    """
    return _low_rank_sample(
        stats["eigenvalues"][:1],
        stats["eigenvectors"][:, :1],
        scale,
        _matched_factor(stats, options.magnitude),
        options.generator,
    )


def sample_geometry_aware(
    stats: Mapping[str, Tensor], scale: float, options: DrawOptions
) -> NoiseSample:
    """``"geometry_aware"`` (GEO): covariance ``s² (2L/B) Σ_j λ_j u_j u_jᵀ``.

    Reads ``stats["eigenvalues"]``, ``stats["eigenvectors"]`` and
    ``stats["loss"]`` (``L``; a negative loss counts as 0); draws ``k`` normals;
    ``magnitude`` is unused (GEO has its own).

    Returns:
        ``NoiseSample(Σ_j sqrt(λ_j) z_j u_j, s sqrt(2L/B), s² (2L/B) Σ_j λ_j)``.
    """
    batch_size = options.batch_size
    assert batch_size is not None
    loss = max(float(stats["loss"]), 0.0)
    return _low_rank_sample(
        stats["eigenvalues"],
        stats["eigenvectors"],
        scale,
        lambda mass: 2.0 * loss / batch_size,
        options.generator,
    )


SAMPLERS: dict[str, Sampler] = {
    "isotropic_matched": sample_isotropic_matched,
    "diagonal": sample_diagonal,
    "sgd_leading": sample_sgd_leading,
    "hessian": sample_hessian,
    "top_eigvec": sample_top_eigvec,
    "geometry_aware": sample_geometry_aware,
    "geometry_aware_isotropic": sample_geometry_aware_isotropic,
}
"""The sampler of each noise kind drawn from refreshed statistics (every kind
but ``"none"``, ``"isotropic"`` and ``"sgd_matched"``, whose draws need none)."""
