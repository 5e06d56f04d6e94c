"""The sketch route of :func:`~geoopt_sgd.probes.metrics.noise_geometry`.

Deflated isotropic estimates of the traces and norms from output tangents only,
nothing of size ``n x P``, and their leave-one-probe-out jackknife (the estimator
and its unbiasedness are derived in the :mod:`~geoopt_sgd.probes.metrics`
docstring).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .. import distributed
from .._linalg import gram64
from ._context import ProbeContext, Traces, chunks, div, ratio_metrics
from ._eigenbasis import Eigenbasis
from ._stats import jackknife, random_directions
from .primitives import OutputTangents

__all__ = [
    "Blocks",
    "Sketch",
    "sketch_standard_errors",
    "sketch_traces",
    "trace1",
    "trace2",
]

Blocks = tuple[Tensor, Tensor, Tensor]


def trace1(A: Blocks, loo: bool = False) -> Tensor:
    """Deflated estimate of ``Tr A`` (module docstring) from the blocks of ``A``.

    With ``loo`` the ``s`` leave-one-probe-out estimates, in a trailing dimension.
    """
    AQQ, _, APP = A
    known = torch.diagonal(AQQ, dim1=-2, dim2=-1).sum(-1)
    d = torch.diagonal(APP, dim1=-2, dim2=-1)
    s = d.shape[-1]
    if loo:
        return known.unsqueeze(-1) + (d.sum(-1, keepdim=True) - d) / (s - 1)
    return known + d.mean(-1)


def trace2(A: Blocks, B: Blocks, loo: bool = False) -> Tensor:
    """Deflated estimate of ``Tr(A B)`` for symmetric ``A``, ``B`` (module docstring).

    Blocks ``(Q^T X Q, Q^T X Z, Z^T X Z)`` of each matrix ``X`` for the orthonormal
    deflation basis ``Q`` and the deflated isotropic probes ``Z = (I - Q Q^T) Z0``;
    leading dimensions broadcast (per-sample ``A``). With ``loo`` the ``s``
    leave-one-probe-out estimates, in a trailing dimension.
    """
    AQQ, AQP, APP = A
    BQQ, BQP, BPP = B
    s = APP.shape[-1]
    known = (AQQ * BQQ).sum((-2, -1))
    c = (AQP * BQP).sum(-2)  # (..., s): cross term of each probe
    prod = APP * BPP
    diag = torch.diagonal(prod, dim1=-2, dim2=-1)
    row = prod.sum(-1) - diag  # (..., s): pairs of each probe with the others
    off = row.sum(-1, keepdim=True)
    if not loo:
        return known + 2 * c.mean(-1) + off[..., 0] / (s * (s - 1))
    cross = 2 * (c.sum(-1, keepdim=True) - c) / (s - 1)
    # prod is symmetric: dropping probe t removes its row and its column
    return known.unsqueeze(-1) + cross + (off - 2 * row) / ((s - 1) * (s - 2))


class Sketch:
    """Deflated isotropic estimates of the traces and norms (module docstring).

    Args:
        ctx: The call's context.
        Zu: Unit probe directions ``(P, s)``; the probes are ``sqrt(P) Zu``.
        tZ: Their output tangents.
        U: Deflation directions ``(P, k)`` (the eigenvectors).
        tU: Their output tangents.
        need_ggn: Build the GGN blocks as well.
    """

    def __init__(
        self,
        ctx: ProbeContext,
        Zu: Tensor,
        tZ: OutputTangents,
        U: Tensor,
        tU: OutputTangents,
        need_ggn: bool,
    ) -> None:
        probe = ctx.probe
        s = Zu.shape[1]
        scale = math.sqrt(probe.P)
        eye = torch.eye(s, dtype=torch.float64, device="cpu")
        tZ = tZ.combine(scale * eye)
        # Q = U S^{-1/2} (S = U^T U): orthonormal to float64 accuracy
        e, Qe = torch.linalg.eigh(gram64(U, U).cpu())
        keep = e > e.max() * 1e-12
        Sm = Qe[:, keep] / e[keep].sqrt()  # (k, k')
        C = Sm.T @ (gram64(U, Zu).cpu() * scale)  # Q^T Z0, (k', s)
        tQ = tU.combine(Sm)
        tP = tZ.cat(tQ).combine(torch.cat([eye, -C], 0))
        self.probe, self.need_ggn = probe, need_ggn
        BQ, BP = (ctx.batch_proj(t.loss()).double() for t in (tQ, tP))
        BQ, BP = BQ - BQ.mean(0, keepdim=True), BP - BP.mean(0, keepdim=True)
        M = BQ.shape[0]
        self.sig: Blocks = (BQ.T @ BQ / M, BQ.T @ BP / M, BP.T @ BP / M)
        if need_ggn:
            n = probe.n
            F = tuple(
                a.ggn_forms(b).double() for a, b in ((tQ, tQ), (tQ, tP), (tP, tP))
            )
            self.per_sample: Blocks = F  # type: ignore[assignment]
            self.ggn: Blocks = tuple(  # type: ignore[assignment]
                distributed.all_reduce_sum(f.sum(0)) / n for f in F
            )

    def tr_sigma(self) -> float:
        """``Tr Sigma``."""
        return float(trace1(self.sig))

    def fro2_sigma(self) -> float:
        """``||Sigma||_F^2``."""
        return float(trace2(self.sig, self.sig))

    def ggn_stats(self) -> Traces:
        """``Tr G``, ``||G||_F^2``, ``Tr(Sigma G)`` and ``chi_i = Tr(M_i G)``."""
        p = self.probe
        st = Traces()
        st.tr_c = float(trace1(self.ggn))
        st.fro2_c = float(trace2(self.ggn, self.ggn))
        st.tr_sc_direct = float(trace2(self.sig, self.ggn))
        chi = torch.zeros(p.n, dtype=torch.float64, device=p.device)
        chi[p.offset : p.offset + p.n_local] = trace2(self.per_sample, self.ggn)
        st.chi = distributed.all_reduce_sum(chi)
        return st

    def leave_one_out(self) -> dict[str, Tensor]:
        """The ``s`` leave-one-probe-out values of every estimate (``s >= 3``).

        Returns:
            ``(s,)`` tensors by name, ``chi`` ``(n, s)``.
        """
        out = {
            "tr_sigma": trace1(self.sig, True).cpu(),
            "fro2_sigma": trace2(self.sig, self.sig, True).cpu(),
        }
        if self.need_ggn:
            p = self.probe
            out["tr_c"] = trace1(self.ggn, True).cpu()
            out["fro2_c"] = trace2(self.ggn, self.ggn, True).cpu()
            out["tr_sc"] = trace2(self.sig, self.ggn, True).cpu()
            s = out["tr_c"].shape[0]
            chi = torch.zeros(p.n, s, dtype=torch.float64, device=p.device)
            chi[p.offset : p.offset + p.n_local] = trace2(
                self.per_sample, self.ggn, True
            )
            out["chi"] = distributed.all_reduce_sum(chi).cpu()
        return out


def sketch_traces(
    ctx: ProbeContext,
    eig: Eigenbasis,
    grad_L: Tensor,
    num_probes: int,
    need_ggn: bool,
    need_hess: bool,
) -> tuple[Sketch, float, float, dict[str, Traces]]:
    """``Tr Sigma``, ``||Sigma||_F^2`` and the curvatures' traces, deflated by ``eig``.

    Args:
        ctx: The call's context.
        eig: The eigenbasis (deflation basis; its random directions are the first
            probes).
        grad_L: The mean gradient ``(P,)``.
        num_probes: Isotropic probes ``s``.
        need_ggn: Estimate the GGN's traces (with ``chi``).
        need_hess: Estimate the Hessian's traces (natural probes, Hutchinson).

    Returns:
        ``(sketch, tr_sigma, fro2_sigma, traces)`` with ``traces`` keyed ``"ggn"``
        and/or ``"hessian"``.
    """
    P, M, B, n = ctx.P, ctx.M, ctx.B, ctx.n
    dtype, device, probe = ctx.dtype, ctx.device, ctx.probe
    # isotropic probes z (E z z^T = I): the random directions scaled by
    # sqrt(P), topped up to num_probes; deflated by the eigenbasis
    s = num_probes
    r = eig.R.shape[1]
    Zu, tZ = eig.R[:, :s], eig.tR.select(slice(0, min(s, r)))
    if s > r:
        extra = random_directions(P, s - r, ctx.gen, dtype).to(device)
        Zu, tZ = torch.cat([Zu, extra], 1), tZ.cat(ctx.tangents(extra))
    sk = Sketch(ctx, Zu, tZ, eig.U, eig.tU, need_ggn)
    tr_sigma, fro2_sigma = sk.tr_sigma(), sk.fro2_sigma()
    if M * B == n:  # the mean of the batch means is grad L
        rbar = grad_L
    else:
        rbar = probe.weighted_gradient(
            ctx.W.T @ torch.full((M,), 1.0 / M, dtype=dtype, device=device)
        )
    stats: dict[str, Traces] = {}
    if need_ggn:
        st = sk.ggn_stats()
        # Tr(Sigma_2 G) = rbar^T G rbar exactly, one jvp
        q_r = ctx.tangents(rbar.reshape(P, 1)).ggn_quad()
        st.tr_s2c = float(distributed.all_reduce_sum(q_r.sum(0))) / n
        st.tr_s1c = st.tr_sc_direct + st.tr_s2c
        stats["ggn"] = st
    if need_hess:
        stats["hessian"] = _hessian_traces(ctx, rbar, num_probes)
    return sk, tr_sigma, fro2_sigma, stats


def _hessian_traces(ctx: ProbeContext, rbar: Tensor, s: int) -> Traces:
    """``Tr(Sigma_1 H)`` from ``s`` natural probes; ``Tr H``, ``||H||_F`` Hutchinson."""
    # uncentred xi_1 probes, Cov = Sigma_1: Tr(Sigma_1 H); Hutchinson
    P, M = ctx.P, ctx.M
    st = Traces()
    z = torch.randn(s, M, generator=ctx.gen, dtype=torch.float64, device="cpu")
    c1 = (ctx.W.T @ z.to(ctx.device, ctx.dtype).T) / M**0.5
    t1 = 0.0
    terms = []
    for sl in chunks(s, ctx.vec_chunk):
        xi1 = ctx.probe.weighted_gradient(c1[:, sl]).reshape(-1, P).T
        prod = xi1 * ctx.matmat("hessian", xi1)
        t1 += float(prod.sum())
        # per-probe xi_t^T H xi_t for the jackknife; xi_t and H xi_t are
        # reduced over ranks already, so the terms agree on every rank
        terms.append(prod.sum(0).double().cpu())
    st.tr_s1c = t1 / s
    st.terms["tr_s1c"] = torch.cat(terms)
    st.tr_s2c = float(rbar @ ctx.matmat("hessian", rbar.reshape(P, 1))[:, 0])
    ctx.hutchinson_hessian(st, s)
    return st


def sketch_standard_errors(
    sk: Sketch,
    traces: dict[str, Traces],
    curvature: str,
    proj: float,
    L: float,
    P: int,
) -> dict[str, float]:
    """Leave-one-probe-out jackknife standard errors of the sketch estimates.

    Replicate ``t`` leaves out isotropic probe ``t`` of the sketch and, with the
    Hessian, natural probe ``t`` (``Tr(Sigma_1 H)``) and Rademacher probe ``t``
    (``Tr H``, ``||H||_F^2``) together; ``Tr(Sigma_2 H)`` is exact and stays.
    The three families are drawn independently, so the triples ``t`` are
    independent and identically distributed and the estimates a function of
    them: deleting triple ``t`` is a valid delete-one jackknife.

    Args:
        sk: The sketch (``s >= 3`` probes).
        traces: The curvatures' traces of the full sketch (the Hessian's with
            their per-probe ``terms``).
        curvature: ``"ggn"`` or ``"hessian"``.
        proj: ``u_1^T Sigma u_1 / lambda_1`` (``projection_coefficient``'s factor).
        L: The mean loss.
        P: Number of parameters.

    Returns:
        Standard errors by metric name: ``tr_sigma``; with the ``curvature``
        matrix's traces the ratio metrics and ``projection_coefficient``; with
        the GGN's ``gradient_uniformity``; with the Hessian's ``mu_hessian``.
    """
    loo = sk.leave_one_out()
    s = loo["tr_sigma"].shape[0]
    # the Hessian's probe means without probe t: (sum - term_t) / (s - 1)
    hess_loo: dict[str, Tensor] = {}
    if "hessian" in traces:
        for name, v in traces["hessian"].terms.items():
            hess_loo[name] = (v.sum() - v) / (s - 1)
    reps = []
    for t in range(s):
        tr_s = float(loo["tr_sigma"][t])
        fro2_s = float(loo["fro2_sigma"][t])
        rep = {"tr_sigma": tr_s}
        kinds: dict[str, Traces] = {}
        if sk.need_ggn:
            st = Traces()
            st.tr_c = float(loo["tr_c"][t])
            st.fro2_c = float(loo["fro2_c"][t])
            st.tr_s2c = traces["ggn"].tr_s2c
            st.tr_sc_direct = float(loo["tr_sc"][t])
            st.tr_s1c = st.tr_sc_direct + st.tr_s2c
            kinds["ggn"] = st
        if "hessian" in traces:
            kinds["hessian"] = dataclasses.replace(
                traces["hessian"], **{a: float(v[t]) for a, v in hess_loo.items()}
            )
        if curvature in kinds:
            rep.update(ratio_metrics(kinds[curvature], tr_s, fro2_s, L, P))
        if sk.need_ggn:
            chi = loo["chi"][:, t]
            rep["gradient_uniformity"] = float(chi.min() / chi.mean())
        if curvature in kinds:
            rep["projection_coefficient"] = div(proj * kinds[curvature].tr_c, tr_s)
        if "hessian" in kinds:
            ratios = ratio_metrics(kinds["hessian"], tr_s, fro2_s, L, P)
            rep["mu_hessian"] = ratios["mu"]
        reps.append(rep)
    return jackknife(reps)
