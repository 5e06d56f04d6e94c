"""What the routes of :func:`~geoopt_sgd.probes.metrics.noise_geometry` share.

:class:`ProbeContext` holds one call's probe set, its batching and its operators;
:class:`Traces` the traces and norms of one curvature matrix, from which
:func:`ratio_metrics` forms ``alpha``, ``beta`` and the ``mu`` family (notation in
the :mod:`~geoopt_sgd.probes.metrics` docstring).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import distributed
from .primitives import CurvatureOperator, OutputTangents, ProbeSet

__all__ = ["ProbeContext", "Traces", "chunks", "div", "ratio_metrics"]


def div(a: float, b: float) -> float:
    """``a / b`` for Python floats, NaN where the ratio is undefined (``b == 0``).

    On a saturated network the curvature is exactly zero, so ratios such as
    ``Tr(Sigma H) / ||H||_F^2`` are undefined: they come out NaN (and counted in
    ``n_nonfinite``), never a ``ZeroDivisionError``.
    """
    return a / b if b != 0 else math.nan


def chunks(n: int, c: int) -> Iterable[slice]:
    """Consecutive slices of at most ``c`` of ``range(n)``."""
    for i in range(0, n, c):
        yield slice(i, min(n, i + c))


@dataclass
class ProbeContext:
    """One call's probe set, its batching and its curvature operators.

    Attributes:
        probe: The probe set (this rank's samples).
        n: Probe samples over all ranks.
        M: Batches of the covariance (``n`` for ``cov="per_sample"``).
        B: Samples per batch (``1`` for ``cov="per_sample"``).
        P: Number of measured parameters.
        W: ``(M, n_local)``; row ``b`` averages the samples of batch ``b`` held by
            this rank.
        dtype: The parameters' dtype.
        device: The parameters' device.
        gen: The call's private generator.
        vec_chunk: Vectors pushed per vmapped pass.
        ops: The ``"ggn"`` and ``"hessian"`` operators of the probe set.
    """

    probe: ProbeSet
    n: int
    M: int
    B: int
    P: int
    W: Tensor
    dtype: torch.dtype
    device: torch.device
    gen: torch.Generator
    vec_chunk: int
    ops: dict[str, CurvatureOperator]

    @classmethod
    def create(
        cls,
        probe: ProbeSet,
        B: int,
        P: int,
        dtype: torch.dtype,
        device: torch.device,
        gen: torch.Generator,
    ) -> ProbeContext:
        """Build the batch weights, the vector chunk and the operators."""
        n = probe.n
        M = n // B
        # built on the CPU, then moved
        gidx = torch.arange(probe.offset, probe.offset + probe.n_local, device="cpu")
        W = torch.zeros(M, probe.n_local, dtype=dtype, device="cpu")
        keep = gidx < M * B
        W[(gidx[keep] // B), torch.nonzero(keep).reshape(-1)] = 1.0 / B
        # vectors pushed per vmapped pass: 8 for large models, more for small ones
        vec_chunk = int(min(256, max(8, 1e7 // (P + 8 * probe.n_local))))
        ops = {
            "ggn": CurvatureOperator(probe, "ggn"),
            "hessian": CurvatureOperator(probe, "hessian"),
        }
        return cls(probe, n, M, B, P, W.to(device), dtype, device, gen, vec_chunk, ops)

    def batch_proj(self, A: Tensor) -> Tensor:
        """``(n_local, q)`` per-sample values -> ``(M, q)`` batch means, all ranks."""
        return distributed.all_reduce_sum(self.W @ A.to(self.dtype))

    def matmat(self, kind: str, V: Tensor) -> Tensor:
        """``H V`` for ``kind`` in ``"ggn"``, ``"hessian"``, ``vec_chunk`` at a time."""
        op, dtype, c = self.ops[kind], self.dtype, self.vec_chunk
        cols = [op.matmat(V[:, s].to(dtype)) for s in chunks(V.shape[1], c)]
        return torch.cat(cols, 1)

    def tangents(self, V: Tensor) -> OutputTangents:
        """The per-sample output tangents ``J_i V``, ``vec_chunk`` at a time."""
        parts = [
            self.probe.tangents(V[:, s]) for s in chunks(V.shape[1], self.vec_chunk)
        ]
        out = parts[0]
        for t in parts[1:]:
            out = out.cat(t)
        return out

    def hutchinson_hessian(self, st: Traces, num_probes: int) -> None:
        """Set ``st.tr_c`` and ``st.fro2_c`` of the Hessian by Hutchinson.

        Their per-probe terms ``z_t^T H z_t`` and ``||H z_t||^2`` go to
        ``st.terms`` (for the jackknife); the products are global, so the
        terms are the same on every rank.
        """
        # Rademacher probes, drawn a chunk of columns at a time (int8: P-sized)
        tr = fro2 = 0.0
        terms_tr, terms_fro2 = [], []
        for sl in chunks(num_probes, self.vec_chunk):
            shape = (self.P, sl.stop - sl.start)
            Z = torch.randint(
                0, 2, shape, generator=self.gen, dtype=torch.int8, device="cpu"
            )
            Z = (Z.to(self.dtype) * 2 - 1).to(self.device)
            HZ = self.matmat("hessian", Z)
            ZHZ, HZ2 = Z * HZ, HZ * HZ
            tr += float(ZHZ.sum())
            fro2 += float(HZ2.sum())
            terms_tr.append(ZHZ.sum(0).double().cpu())
            terms_fro2.append(HZ2.sum(0).double().cpu())
        st.tr_c, st.fro2_c = tr / num_probes, fro2 / num_probes
        st.terms["tr_c"] = torch.cat(terms_tr)
        st.terms["fro2_c"] = torch.cat(terms_fro2)


@dataclass
class Traces:
    """Traces and norms for one curvature matrix ``H`` (NaN where not computed).

    Attributes:
        tr_s1c: ``Tr(Sigma_1 H)``.
        tr_s2c: ``Tr(Sigma_2 H)``.
        fro2_c: ``||H||_F^2``.
        tr_c: ``Tr H``.
        tr_sc_direct: ``Tr(Sigma H)`` estimated directly (sketch route, GGN).
        chi: ``chi_i = Tr(M_i G)`` ``(n,)`` (GGN only).
        terms: For the estimates that are means over ``s`` probes (the
            Hessian's ``tr_s1c``, ``tr_c``, ``fro2_c``), their ``(s,)`` float64
            per-probe terms by attribute name, in probe order (for the
            jackknife); empty where not estimated so.
    """

    tr_s1c: float = math.nan
    tr_s2c: float = math.nan
    fro2_c: float = math.nan
    tr_c: float = math.nan
    tr_sc_direct: float = math.nan
    chi: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def tr_sc(self) -> float:
        """``Tr(Sigma H) = Tr(Sigma_1 H) - Tr(Sigma_2 H)``."""
        return self.tr_s1c - self.tr_s2c


def ratio_metrics(
    st: Traces, tr_s: float, fro2_s: float, L: float, P: int
) -> dict[str, float]:
    """``alpha``, ``beta``, the ``mu`` family and the ``Tr(H Sigma)`` metrics."""
    fro_c = math.sqrt(st.fro2_c) if st.fro2_c >= 0 else math.nan
    fro_s = math.sqrt(fro2_s) if fro2_s >= 0 else math.nan
    den = 2 * L * st.fro2_c
    return {
        "alpha": div(st.tr_sc, fro_c * fro_s),
        "beta": div(fro_s, 2 * L * fro_c),
        "mu": div(st.tr_sc, den),
        "mu1": div(st.tr_s1c, den),
        "mu2": div(st.tr_s2c, den),
        "loss_alignment": div(st.tr_s1c, den),
        "tr_h_sigma": st.tr_sc,
        "tr_h_sigma_iso": div(st.tr_c * tr_s, P),
    }
