"""Eigenbasis and escape metrics of :func:`~geoopt_sgd.probes.metrics.noise_geometry`.

The top-``k`` eigenpairs of the curvature, the per-sample derivatives along them
and along random directions, and from these the WW23 directional alignments, the
ZYT metrics in the eigenbasis, Z19's projection coefficient and the escape
metrics of a displacement (definitions in :func:`noise_geometry`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed
from ..curvature.lanczos import top_eigenpairs
from ._context import ProbeContext, Traces, div
from ._stats import fro, haar, linregress, random_directions, spearman
from .primitives import OutputTangents

__all__ = ["Eigenbasis", "eigen_metrics", "eigenbasis", "escape_metrics"]

# Haar rotations averaged by commutativity_baseline
_NUM_ROTATIONS = 8
# most GGN products whose inputs are kept for the eigenvectors' tangents (memory
# _RECORD_MAX x P); a Lanczos run that needs more falls back to k jvps
_RECORD_MAX = 64


@dataclass
class Eigenbasis:
    """The top-``k`` eigenpairs and the random directions, with their tangents.

    Attributes:
        lam: Eigenvalues ``(k,)``, descending.
        U: Eigenvectors ``(P, k)``.
        tU: Their output tangents.
        R: Unit random directions ``(P, r)``.
        tR: Their output tangents.
        rots: Haar rotations for ``commutativity_baseline`` (empty when not asked).
    """

    lam: Tensor
    U: Tensor
    tU: OutputTangents
    R: Tensor
    tR: OutputTangents
    rots: list[Tensor]


def _check_v0(v0: Tensor, P: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The warm start as ``(P, m)`` on the model's device and dtype."""
    v0_ = v0.detach().to(device, dtype)
    if v0_.dim() == 1:
        v0_ = v0_.reshape(-1, 1)
    if v0_.shape[0] != P:
        raise ValueError(
            f"`v0`: expected shape ({P},) or ({P}, m); got {tuple(v0.shape)}."
        )
    return v0_


def eigenbasis(
    ctx: ProbeContext,
    curvature: str,
    k: int,
    v0: Tensor | None,
    seed: int | None,
    tol: float,
    num_random_directions: int,
    rotations: bool,
) -> Eigenbasis:
    """Solve for the top-``k`` eigenpairs and push the directions' tangents.

    Args:
        ctx: The call's context.
        curvature: ``"ggn"`` or ``"hessian"``.
        k: Eigenpairs asked for (at most ``P`` are computed).
        v0: Warm start ``(P,)`` or ``(P, m)``, or ``None``.
        seed: Seed of the eigensolver (``None``: 0).
        tol: Relative residual tolerance of the eigensolver.
        num_random_directions: Random unit directions drawn after the solve.
        rotations: Draw the Haar rotations of ``commutativity_baseline``.

    Returns:
        The :class:`Eigenbasis`.

    Raises:
        ValueError: A ``v0`` of the wrong shape.
    """
    P, dtype, device = ctx.P, ctx.dtype, ctx.device
    v0_ = None if v0 is None else _check_v0(v0, P, dtype, device)
    # GGN products keep their inputs and J v: the Ritz vectors' tangents
    # are then combinations of them (no jvp along the eigenvectors)
    record = curvature == "ggn"
    probe = ctx.probe
    with probe.recording(_RECORD_MAX) if record else contextlib.nullcontext():
        res = top_eigenpairs(
            ctx.ops[curvature],
            min(k, P),
            tol=tol,
            seed=0 if seed is None else seed,
            v0=v0_,
            verify=False,  # periodic, as before: the check's cost in every probe
        )
    lam, U = res.eigenvalues.to(device, dtype), res.eigenvectors.to(device, dtype)
    tU = probe.span_tangents(U) if record else None
    if tU is None:
        tU = ctx.tangents(U)
    Rnd = random_directions(P, num_random_directions, ctx.gen, dtype).to(device)
    rots = haar(lam.numel(), _NUM_ROTATIONS, ctx.gen) if rotations else []
    return Eigenbasis(lam, U, tU, Rnd, ctx.tangents(Rnd), rots)


def eigen_metrics(
    ctx: ProbeContext,
    eig: Eigenbasis,
    curvature: str,
    L: float,
    wanted: set[str],
    traces: dict[str, Traces],
    tr_sigma: float,
    values: dict[str, float],
) -> tuple[dict[str, Tensor], float]:
    """Add the eigenbasis metrics in ``wanted`` to ``values``.

    Args:
        ctx: The call's context.
        eig: The eigenbasis.
        curvature: ``"ggn"`` or ``"hessian"``.
        L: The mean loss.
        wanted: The metric names asked for.
        traces: The curvature traces by kind (for ``projection_coefficient``).
        tr_sigma: ``Tr Sigma`` (for ``projection_coefficient``).
        values: The scalar metrics, updated in place.

    Returns:
        The arrays by :class:`~geoopt_sgd.probes.metrics.NoiseGeometry` field and
        ``u_1^T Sigma u_1 / lambda_1`` (for the jackknife of
        ``projection_coefficient``).
    """
    lam, U, tU, tR = eig.lam, eig.U, eig.tU, eig.tR
    kk = lam.numel()
    A = torch.cat([tU.loss(), tR.loss()], 1)
    if curvature == "ggn":
        Qd = torch.cat([tU.ggn_quad(), tR.ggn_quad()], 1)
        quad = distributed.all_reduce_sum(Qd.sum(0)) / ctx.n
    else:
        V = torch.cat([U, eig.R], 1)
        quad = (V * ctx.matmat("hessian", V)).sum(0)
    Bv = ctx.batch_proj(A)  # (M, k + r)
    Bc = Bv - Bv.mean(0, keepdim=True)
    energies = (Bc * Bc).mean(0)
    Ct = (Bc[:, :kk].T @ Bc[:, :kk]) / ctx.M
    diag = energies[:kk]
    lam64, diag64, Ct64 = lam.double().cpu(), diag.double().cpu(), Ct.double().cpu()
    arrays = {
        "eigenvalues": lam.detach(),
        "eigenvectors": U.detach(),
        "noise_energies": diag.detach(),
        "directional_alignment": (diag / (2 * L * quad[:kk])).detach(),
    }
    if "directional_alignment_random" in wanted:
        values["directional_alignment_random"] = float(
            (energies[kk:] / (2 * L * quad[kk:])).mean()
        )
    proj = div(float(diag64[0]), float(lam64[0]))
    if "projection_coefficient" in wanted:
        tr_c = traces[curvature].tr_c
        values["projection_coefficient"] = div(proj * tr_c, tr_sigma)
    _zyt_metrics(lam64, diag64, Ct64, eig.rots, wanted, values)
    return arrays, proj


def _zyt_metrics(
    lam64: Tensor,
    diag64: Tensor,
    Ct64: Tensor,
    rots: list[Tensor],
    wanted: set[str],
    values: dict[str, float],
) -> None:
    """ZYT's metrics of ``C~ = U^T Sigma U`` in the eigenbasis, into ``values``."""
    mask = (lam64 > 0) & (diag64 > 0)
    if wanted & {"power_law_exponent", "power_law_r2"}:
        slope, r2 = linregress(lam64[mask].log10(), diag64[mask].log10())
        values["power_law_exponent"], values["power_law_r2"] = slope, r2
    if "spearman" in wanted:
        values["spearman"] = spearman(lam64[mask], diag64[mask])
    if "eigen_alignment" in wanted:
        values["eigen_alignment"] = float((diag64 * diag64).sum() / (Ct64 * Ct64).sum())
    Lam = torch.diag(lam64)
    if "commutativity_error" in wanted:
        values["commutativity_error"] = float(
            fro(Ct64 @ Lam - Lam @ Ct64) / fro(Ct64 @ Lam)
        )
    if "commutativity_baseline" in wanted:
        vals = []
        for Qr in rots:
            Hq = Qr @ Lam @ Qr.T
            vals.append(float(fro(Ct64 @ Hq - Hq @ Ct64) / fro(Ct64 @ Hq)))
        values["commutativity_baseline"] = sum(vals) / len(vals)


def escape_metrics(
    ctx: ProbeContext,
    eig: Eigenbasis,
    curvature: str,
    delta: Tensor,
    wanted: set[str],
    values: dict[str, float],
    arrays: dict[str, Tensor],
) -> None:
    """Add the escape metrics of the displacement ``delta`` to ``values``/``arrays``.

    Args:
        ctx: The call's context.
        eig: The eigenbasis.
        curvature: ``"ggn"`` or ``"hessian"``.
        delta: The displacement ``(P,)``.
        wanted: The metric names asked for.
        values: The scalar metrics, updated in place.
        arrays: The arrays, updated in place (``direction_shares``,
            ``loss_shares``).
    """
    lam64 = eig.lam.double().cpu()
    cvec = (eig.U.T @ delta).double().cpu()
    dd = float(delta.double() @ delta.double())
    lc = lam64 * cvec * cvec
    arrays["direction_shares"] = (cvec * cvec / dd).to(ctx.dtype)
    arrays["loss_shares"] = (lc / lc.sum()).to(ctx.dtype)
    if "sharp_fraction" in wanted:
        values["sharp_fraction"] = div(float((cvec * cvec).sum()), dd)
    if "loss_energy_fraction" in wanted:
        Hd = ctx.matmat(curvature, delta.reshape(ctx.P, 1))[:, 0]
        values["loss_energy_fraction"] = div(
            float(lc.sum()), float(delta.double() @ Hd.double())
        )
