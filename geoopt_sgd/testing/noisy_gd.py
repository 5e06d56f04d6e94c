"""The covariance of each :class:`~geoopt_sgd.NoisyGD` noise kind, formed densely.

A twin of the optimizer's noise source and samplers that shares none of their
code paths: per-sample gradients by a loop of backward passes
(:func:`~geoopt_sgd.testing.per_sample_gradients_loop`), the curvature by
:func:`~geoopt_sgd.testing.dense_hessian` / :func:`~geoopt_sgd.testing.dense_ggn`,
and every eigenpair by a dense ``eigh``. For small models (``P`` up to a few
thousand) in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from ..optim.noisy_gd import NoisyGD
from .curvature import dense_ggn, dense_hessian
from .noise import per_sample_gradients_loop

__all__ = ["noisy_gd_covariance"]

# kinds whose covariance involves the mini-batch covariance C
_USES_C = ("isotropic_matched", "diagonal", "sgd_leading")


def _top(M: Tensor, k: int) -> tuple[Tensor, Tensor]:
    e, V = torch.linalg.eigh(M)
    return e.flip(0)[:k], V.flip(1)[:, :k]


def noisy_gd_covariance(
    kind: str,
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    batch_size: int,
    k: int,
    magnitude: Literal["sgd", "unit", "raw"] = "sgd",
    curvature: Literal["hessian", "ggn"] = "hessian",
) -> Tensor:
    r"""The covariance ``S`` of ``NoisyGD(noise=kind)``'s noise at ``noise_scale=1``.

    With ``Σ`` the per-sample gradient covariance (``1/n``), ``C`` the mini-batch
    covariance, ``H`` the curvature with top eigenpairs ``(λ_j, u_j)`` and ``L``
    the loss, ``S`` is the table of :class:`~geoopt_sgd.NoisyGD` (e.g.
    ``(Tr C/Σ_j λ_j) Σ_j λ_j u_j u_jᵀ`` for ``"hessian"``, ``Σ/B`` for
    ``"sgd_matched"``, ``(2L/B) Σ_j λ_j u_j u_jᵀ`` for ``"geometry_aware"``).

    ``C`` depends on NoisyGD's random partition into mini-batches unless
    ``batch_size=1``, where every mini-batch is one sample and ``C = Σ``
    exactly; the kinds that use ``C`` therefore need ``batch_size=1``.

    Args:
        kind: A noise kind of :attr:`~geoopt_sgd.NoisyGD.NOISE_KINDS`.
        model: The model (float64 recommended; eval mode policy).
        loss_fn: The loss, as passed to NoisyGD (mean reduction).
        inputs: Inputs ``(n, ...)``, one batch.
        targets: Targets ``(n, ...)``.
        batch_size: ``B``.
        k: Number of eigenpairs of the low-rank kinds.
        magnitude: ``"sgd"``, ``"unit"`` or ``"raw"``, as in NoisyGD.
        curvature: ``"hessian"`` or ``"ggn"``.

    Returns:
        ``S``, shape ``(P, P)``, float64.

    Raises:
        ValueError: If ``kind`` is unknown, or needs ``C`` with ``batch_size != 1``
            (or ``C`` through ``magnitude="sgd"`` of ``"hessian"``/``"top_eigvec"``).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1).double()
        >>> X = torch.eye(2, dtype=torch.float64)
        >>> S = noisy_gd_covariance(
        ...     "isotropic", model, torch.nn.MSELoss(), X, X[:, :1], batch_size=1, k=1
        ... )
        >>> S.shape
        torch.Size([3, 3])
    """
    if kind not in NoisyGD.NOISE_KINDS:
        kinds = ", ".join(map(repr, NoisyGD.NOISE_KINDS))
        raise ValueError(f"`kind` must be one of {kinds}; got {kind!r}.")
    grads = per_sample_gradients_loop(model, loss_fn, inputs, targets).double()
    n, P = grads.shape
    centred = grads - grads.mean(0)
    sigma = centred.T @ centred / n
    eye = torch.eye(P, dtype=torch.float64, device=grads.device)
    if kind == "none":
        return grads.new_zeros(P, P)
    if kind == "isotropic":
        return eye
    if kind == "sgd_matched":
        return sigma / batch_size
    uses_c = kind in _USES_C or (
        kind in ("hessian", "top_eigvec") and magnitude == "sgd"
    )
    if uses_c and batch_size != 1:
        raise ValueError(
            f"noise={kind!r} involves the mini-batch covariance C, which depends on "
            f"NoisyGD's random partition unless batch_size=1; got {batch_size}."
        )
    C = sigma  # batch_size 1: the mini-batches are the samples
    if kind == "isotropic_matched":
        return (1.0 if magnitude == "unit" else C.trace()) / P * eye
    if kind == "diagonal":
        D = torch.diag(C.diagonal())
        return D / D.trace() if magnitude == "unit" else D
    dense = dense_hessian if curvature == "hessian" else dense_ggn
    H = dense(model, loss_fn, (inputs, targets)).double()
    L = float(loss_fn(model(inputs), targets).detach())
    if kind == "geometry_aware_isotropic":
        return 2 * L * H.trace() / (batch_size * P) * eye
    source = C if kind == "sgd_leading" else H
    lam, U = _top(source, 1 if kind == "top_eigvec" else k)
    lam = lam.clamp(min=0)
    low_rank = (U * lam) @ U.T
    if kind == "geometry_aware":
        return 2 * L / batch_size * low_rank
    if magnitude == "sgd":
        return C.trace() / lam.sum() * low_rank
    if magnitude == "unit":
        return low_rank / lam.sum()
    return low_rank
