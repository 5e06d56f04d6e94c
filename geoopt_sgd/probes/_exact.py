"""The exact route of :func:`~geoopt_sgd.probes.metrics.noise_geometry`.

Per-sample gradients ``D`` ``(n, P)`` and rows ``M_i = Lambda_i^{1/2} J_i`` are
materialised and every trace and norm follows from Gram identities (the
:mod:`~geoopt_sgd.probes.metrics` docstring). Single process only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._context import ProbeContext, Traces, chunks

__all__ = ["exact_traces"]

# Gram products are formed in row chunks of about this many entries
_GRAM_CHUNK = 4e6
# up to this many parameters Tr H and ||H||_F come from P HVPs, beyond by Hutchinson
_DENSE_HESSIAN_MAX = 4096


def exact_traces(
    ctx: ProbeContext, need_ggn: bool, need_hess: bool, num_probes: int
) -> tuple[float, float, dict[str, Traces]]:
    """``Tr Sigma``, ``||Sigma||_F^2`` and the traces of the curvatures asked for.

    Args:
        ctx: The call's context (here ``n_local == n``).
        need_ggn: Compute the GGN's traces (with ``chi``).
        need_hess: Compute the Hessian's traces.
        num_probes: Hutchinson probes for ``Tr H``, ``||H||_F`` when ``P`` is large.

    Returns:
        ``(tr_sigma, fro2_sigma, traces)`` with ``traces`` keyed ``"ggn"`` and/or
        ``"hessian"``.
    """
    M = ctx.M
    D = ctx.probe.per_sample_rows()  # (n, P), here n_local == n
    R = ctx.W @ D
    rbar = R.mean(0)
    Rt = R - rbar
    tr_sigma = float((Rt * Rt).sum()) / M
    fro2_sigma = 0.0
    for sl in chunks(M, max(1, int(_GRAM_CHUNK // M))):
        Gs = Rt[sl] @ Rt.T
        fro2_sigma += float((Gs * Gs).sum())
    fro2_sigma /= M**2
    stats: dict[str, Traces] = {}
    if need_ggn:
        stats["ggn"] = _ggn_traces(ctx, R, rbar)
    if need_hess:
        stats["hessian"] = _hessian_traces(ctx, R, rbar, num_probes)
    return tr_sigma, fro2_sigma, stats


def _ggn_traces(ctx: ProbeContext, R: Tensor, rbar: Tensor) -> Traces:
    """The GGN's traces from the Gram blocks of ``M = (M_i)`` and ``R``."""
    n, M, P = ctx.n, ctx.M, ctx.P
    Mf = ctx.probe.jacobian_rows()  # (n, K, P)
    Kk = Mf.shape[1]
    Mf = Mf.reshape(n * Kk, P)
    st = Traces()
    # Gram blocks Theta = M M^T (nK x nK) in row chunks of ~4e6 entries
    rows = max(1, int(_GRAM_CHUNK // (Kk * Kk * n)))
    fro2, chi = 0.0, torch.zeros(n, dtype=ctx.dtype, device=ctx.device)
    for sl in chunks(n, rows):
        Gc = Mf[sl.start * Kk : sl.stop * Kk] @ Mf.T
        Gc = (Gc * Gc).reshape(-1, Kk, n * Kk).sum((1, 2))
        chi[sl] = Gc / n
        fro2 += float(Gc.sum())
    st.fro2_c = fro2 / n**2
    st.chi = chi
    st.tr_c = float((Mf * Mf).sum()) / n
    t1 = 0.0
    for sl in chunks(M, max(1, int(_GRAM_CHUNK // (n * Kk)))):
        RM = R[sl] @ Mf.T
        t1 += float((RM * RM).sum())
    st.tr_s1c = t1 / (M * n)
    Mr = Mf @ rbar
    st.tr_s2c = float(Mr @ Mr) / n
    return st


def _hessian_traces(
    ctx: ProbeContext, R: Tensor, rbar: Tensor, num_probes: int
) -> Traces:
    """The Hessian's traces from HVPs along the batch gradients ``R``."""
    M, P = ctx.M, ctx.P
    st = Traces()
    HR = ctx.matmat("hessian", R.T)  # (P, M)
    st.tr_s1c = float((R.T * HR).sum()) / M
    st.tr_s2c = float(rbar @ HR.mean(1))
    if P <= _DENSE_HESSIAN_MAX:
        Hd = ctx.matmat("hessian", torch.eye(P, dtype=ctx.dtype, device=ctx.device))
        st.tr_c = float(torch.trace(Hd))
        st.fro2_c = float((Hd * Hd).sum())
    else:
        ctx.hutchinson_hessian(st, num_probes)
    return st
