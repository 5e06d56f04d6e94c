r"""Noise-geometry metrics of WWS22, WW23, Z19 and ZYT (SPEC §2), no ``P x P`` matrix.

Notation (SPEC §1): ``n`` probe samples with per-sample losses ``L_i`` (the loss as
passed, on a batch of one: :mod:`geoopt_sgd._losses`), ``L`` their mean,
``Sigma = Sigma_1 - Sigma_2`` the per-sample gradient covariance (``1/n``), or with
``cov="minibatch"`` the covariance ``C ~ Sigma / B`` of the means of ``M = n // B``
consecutive disjoint batches (then every ``Sigma`` below means ``C``). ``H`` is the
curvature matrix chosen by ``curvature``: the GGN ``G = (1/n) sum J_i^T Lambda_i J_i``
(default; PSD, equals the WWS22 Fisher for square loss) or the Hessian. With
cross-entropy the mu-type metrics are the GGN extension [SPEC §2.1, PROPOSED].

Routes (``route=``):

* ``"exact"``: per-sample gradients ``D`` ``(n, P)`` and ``M_i = Lambda_i^{1/2} J_i``
  ``(nK, P)`` are materialised (chunked ``vmap``) and every trace/norm comes from
  the Gram identities of SPEC §2.0.3, exactly. Cost: ``n`` per-sample gradients,
  ``nK`` per-sample output-Jacobian rows, and for ``curvature="hessian"``
  ``n`` HVPs plus ``P`` HVPs for ``||H||_F`` and ``Tr H`` when ``P <= 4096``
  (else Hutchinson with ``num_probes``). Memory ``n (K + 1) P``.
* ``"sketch"``: nothing of size ``n x P``; only jvps (one per direction, SPEC
  §2.0.2) besides the eigensolver's products. Every quadratic form along a
  direction ``v`` follows from the per-sample output tangents ``J_i v``:
  ``v^T Sigma w`` is the covariance of ``grad L_i . v = (dL_i/df_i) . J_i v`` and
  ``grad L_i . w`` over samples (or batch means), ``v^T G w = (1/n) sum_i
  (J_i v)^T Lambda_i J_i w`` and ``v^T M_i w`` with ``M_i = J_i^T Lambda_i J_i``
  its per-sample term. The traces are *deflated isotropic* estimates: with the
  orthonormal top-``k`` eigenbasis ``Q`` of ``H`` (``U (U^T U)^{-1/2}``, always
  computed on this route) and ``s = num_probes`` isotropic probes ``z_t``
  (``sqrt(P)`` times unit random directions, ``E z z^T = I``), deflated to
  ``y_t = (I - Q Q^T) z_t``,

  .. math::

      \operatorname{Tr} A &\approx \operatorname{Tr}(Q^T A Q)
          + \tfrac{1}{s} \textstyle\sum_t y_t^T A y_t, \\
      \operatorname{Tr}(A B) &\approx \operatorname{Tr}(Q^T A Q\, Q^T B Q)
          + \tfrac{2}{s} \textstyle\sum_t (Q^T A y_t) \cdot (Q^T B y_t)
          + \tfrac{1}{s(s-1)} \textstyle\sum_{t \ne t'} (y_t^T A y_{t'})
            (y_t^T B y_{t'}),

  exact on ``span Q`` and unbiased for any ``Q`` (split ``I = QQ^T + (I - QQ^T)``;
  ``E y y^T = I - QQ^T``, and independent probes give the pair term ``Tr(A
  (I - QQ^T) B (I - QQ^T))``). ``Tr Sigma``, ``Tr G``, ``||Sigma||_F^2``,
  ``||G||_F^2``, ``Tr(Sigma G)`` and ``chi_i = Tr(M_i G)`` are these with
  ``A, B`` in ``{Sigma, G, M_i}``; ``Tr(Sigma_2 G) = grad L^T G grad L`` is
  exact (one jvp) and ``Tr(Sigma_1 G) = Tr(Sigma G) + Tr(Sigma_2 G)``. Where
  ``Q`` holds most of ``G`` and ``Sigma`` (the alignment these metrics measure),
  the remainder is small and so is the error: on a trained timm ``test_resnet``
  (P = 374k, n = 128, k = 10) ``s = 8`` gave ``alpha``, ``beta``, ``mu``,
  ``mu1``, ``mu2`` within 0.1-0.2% of the exact route, ``tr_sigma`` 1%,
  ``tr_h_sigma_iso`` 2% (without deflation: 3-55%). ``gradient_uniformity`` is
  a minimum over estimates and biased low (-6% there). Standard errors: the
  leave-one-probe-out jackknife (``s >= 3``), in
  :attr:`NoiseGeometry.standard_errors`. Cost: the eigenbasis (below) plus
  ``max(0, s - r)`` jvps (``r = num_random_directions``: the random directions
  are the first probes) and one for ``Tr(Sigma_2 G)``. With
  ``curvature="hessian"``, ``Tr(Sigma_1 H)`` uses ``s`` uncentred natural probes
  ``xi_1 ~ (0, Sigma_1)`` (one backward each) and ``s`` HVPs, ``Tr H`` and
  ``||H||_F`` Hutchinson with ``s`` Rademacher probes (``s`` HVPs); relative
  errors about ``sqrt(2 / s)`` there.
* ``"auto"`` (default): ``"exact"`` when ``n (K + 1) P <= 2e7`` (160 MB of float64),
  the Gram products cost ``(n K)^2 P <= 2e10`` flops, and not distributed; else
  ``"sketch"``.

The eigenbasis metrics are exact on either route, given the eigenvectors: the
top-``k`` eigenpairs of ``H`` by Lanczos (``top_eigenpairs`` to the relative
residual ``tol``), then the per-sample derivatives ``a_i = grad L_i . v`` along
the ``k + r`` directions ``[U_k, random]``, hence ``v^T Sigma v`` and the
projected covariance ``U_k^T Sigma U_k``. With the GGN the tangents along the
eigenvectors are free: each GGN product ``G v`` computes ``J_i v`` on the way, the
Ritz vectors are combinations of the multiplied vectors, and a least-squares fit
``U = X C`` (checked: residual ``<= 1000 eps``, else ``k`` jvps) gives
``J_i U = (J_i X) C``. Memory: the multiplied vectors, at most 64 ``P``-vectors.
``r`` jvps for the random directions; with the Hessian ``k`` jvps more and
``k + r`` HVPs for ``v^T H v``. ``tol = 1e-2`` (default): on the trained
``test_resnet`` above the eigenvalues agree with a ``tol = 1e-7`` solve to
``3e-5`` relative, the noise energies and directional alignments to ``1e-3``
(cold start; ``1e-4`` warm), the scalar eigenbasis metrics to ``5e-4``
absolute, with 18-19 products instead of 25-27 at ``tol = 1e-4``.

Memory: every call runs the forward pass once and keeps its autograd graph for
all later backward passes, so the activations of *all* probe samples (up to
``max_samples``, over every batch of ``data``) are held at once, as in one
training step on them; pass fewer samples (``max_samples``) where that does not
fit.

Distributed: each rank holds a shard of the probe batch; only ``(n, q)`` projections,
``(q, q)`` quadratic forms, aggregated ``P``-vectors, operator products and scalars
are reduced (the probes and the eigenvectors are the same on every rank), so
the values equal those of one process holding all samples. The Gram identities would
need per-sample ``P``-vectors to travel, so ``route="exact"`` is refused there.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import distributed
from .._checks import check_choice, check_int, check_number
from .._linalg import gram64
from .._model import FunctionalModel, batch_size, local_batches, to_device
from ..curvature.lanczos import top_eigenpairs
from .primitives import CurvatureOperator, OutputTangents, ProbeSet

__all__ = ["DEFAULT_METRICS", "METRICS", "NoiseGeometry", "noise_geometry"]

METRICS: tuple[str, ...] = (
    "loss",
    "alpha",
    "beta",
    "mu",
    "mu1",
    "mu2",
    "mu_hessian",
    "loss_alignment",
    "gradient_uniformity",
    "tr_sigma",
    "tr_h_sigma",
    "tr_h_sigma_iso",
    "projection_coefficient",
    "directional_alignment",
    "directional_alignment_random",
    "noise_energies",
    "power_law_exponent",
    "power_law_r2",
    "spearman",
    "eigen_alignment",
    "commutativity_error",
    "commutativity_baseline",
    "sharp_fraction",
    "loss_energy_fraction",
)
"""Every metric name :func:`noise_geometry` accepts (SPEC §2.1-2.7)."""

DEFAULT_METRICS: tuple[str, ...] = tuple(
    m
    for m in METRICS
    if m not in ("mu_hessian", "sharp_fraction", "loss_energy_fraction")
)
"""The default set: 21 names, everything but ``mu_hessian`` (Hessian products) and
the escape metrics (which need ``displacement`` and are added when it is given).
Both families (see :func:`noise_geometry`) cost about what one of them does, so no
smaller set is much cheaper: on a timm resnet18 with a 128-sample probe batch the
default probe costs 83-158 gradients of that batch, almost all of it the top-``k``
eigensolve (``benchmarks/README.md``)."""

_STATS = {
    "alpha",
    "beta",
    "mu",
    "mu1",
    "mu2",
    "loss_alignment",
    "tr_h_sigma",
    "tr_h_sigma_iso",
    "projection_coefficient",
}
_EIGEN = {
    "projection_coefficient",
    "directional_alignment",
    "directional_alignment_random",
    "noise_energies",
    "power_law_exponent",
    "power_law_r2",
    "spearman",
    "eigen_alignment",
    "commutativity_error",
    "commutativity_baseline",
    "sharp_fraction",
    "loss_energy_fraction",
}
_ESCAPE = {"sharp_fraction", "loss_energy_fraction"}
_ARRAYS = (
    "eigenvalues",
    "noise_energies",
    "directional_alignment",
    "direction_shares",
    "loss_shares",
)
_EXACT_MAX = 2e7
_EXACT_GRAM_FLOPS = 2e10
_GRAM_CHUNK = 4e6
_DENSE_HESSIAN_MAX = 4096
_NUM_ROTATIONS = 8
# most GGN products whose inputs are kept for the eigenvectors' tangents (memory
# _RECORD_MAX x P); a Lanczos run that needs more falls back to k jvps
_RECORD_MAX = 64


@dataclass(frozen=True)
class NoiseGeometry:
    """Result of :func:`noise_geometry`.

    Attributes:
        values: Scalar metrics by name (see :data:`METRICS`), NaN where not finite;
            ``"n_nonfinite"`` counts the NaNs.
        eigenvalues: Top-``k`` curvature eigenvalues ``(k,)``, descending, or ``None``
            (also given when only the sketch route's deflation needed them).
        eigenvectors: Matching eigenvectors ``(P, k)`` (reuse as the next ``v0``).
        noise_energies: ``u_i^T Sigma u_i`` ``(k,)``.
        directional_alignment: ``g(theta; u_i)`` ``(k,)`` (WW23).
        direction_shares: ``(u_i^T delta)^2 / ||delta||^2`` ``(k,)`` (displacement).
        loss_shares: ``lambda_i (u_i^T delta)^2 / sum_j lambda_j (u_j^T delta)^2``.
        cost: Counters (``n_forward``, ``n_backward``, ``n_jvp``, ``n_hvp``,
            ``n_ggnvp``, ``n_per_sample_grad``, ``seconds``, and the families'
            ``seconds_eigen``, ``seconds_sketch`` when they ran).
        num_samples: Probe samples used (over all ranks).
        route: ``"exact"`` or ``"sketch"``.
        standard_errors: Jackknife standard errors of the sketch route's
            estimates by metric name (empty on the exact route; with
            ``curvature="hessian"`` only ``tr_sigma``).
    """

    values: dict[str, float]
    eigenvalues: Tensor | None = None
    eigenvectors: Tensor | None = None
    noise_energies: Tensor | None = None
    directional_alignment: Tensor | None = None
    direction_shares: Tensor | None = None
    loss_shares: Tensor | None = None
    cost: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0
    route: str = "exact"
    standard_errors: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return a flat, JSON-ready dict (floats, lists, strings; no ``P``-sized data).

        Returns:
            Scalars by name, arrays as lists, ``se_<name>`` standard errors,
            ``cost_<counter>`` entries, ``num_samples`` and ``route``.
        """
        out: dict[str, Any] = {k: float(v) for k, v in self.values.items()}
        for name in _ARRAYS:
            t = getattr(self, name)
            if t is not None:
                out[name] = [float(x) for x in t.detach().cpu().reshape(-1)]
        for k, v in self.standard_errors.items():
            out[f"se_{k}"] = float(v)
        for k, v in self.cost.items():
            out[f"cost_{k}"] = float(v)
        out["num_samples"] = int(self.num_samples)
        out["route"] = self.route
        return out


# --- small statistics in torch (no scipy in the library) ----------------------------
def _linregress(x: Tensor, y: Tensor) -> tuple[float, float]:
    """Least-squares slope of ``y`` on ``x`` and ``R^2`` (NaN when undefined)."""
    xm, ym = x - x.mean(), y - y.mean()
    sxx, syy, sxy = (xm * xm).sum(), (ym * ym).sum(), (xm * ym).sum()
    if x.numel() < 2 or float(sxx) == 0.0:
        return math.nan, math.nan
    r2 = float(sxy * sxy / (sxx * syy)) if float(syy) > 0 else math.nan
    return float(sxy / sxx), r2


def _rank(x: Tensor) -> Tensor:
    """Ranks with ties averaged (as ``scipy.stats.rankdata``)."""
    order = torch.argsort(x)
    xs = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    if x.numel() < 2:
        return math.nan
    rx, ry = _rank(x) - (x.numel() + 1) / 2, _rank(y) - (y.numel() + 1) / 2
    den = float(((rx * rx).sum() * (ry * ry).sum()).sqrt())
    return float((rx * ry).sum()) / den if den > 0 else math.nan


def _fro(A: Tensor) -> Tensor:
    return (A * A).sum().sqrt()


def _haar(k: int, draws: int, gen: torch.Generator) -> list[Tensor]:
    """Haar-distributed orthogonal ``(k, k)`` matrices (QR of Gaussians, sign-fixed)."""
    out = []
    for _ in range(draws):
        Q, R = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
        out.append(Q * torch.sign(torch.diagonal(R)).unsqueeze(0))
    return out


def _random_directions(
    P: int, r: int, gen: torch.Generator, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``r`` unit Gaussian directions ``(P, r)`` on the CPU, drawn column by column."""
    R = torch.empty(P, r, dtype=dtype)
    for j in range(r):
        v = torch.randn(P, generator=gen, dtype=dtype)
        R[:, j] = v / v.double().norm().to(dtype)
    return R


# --- eigenpairs -----------------------------------------------------------------
def _top_eigenpairs(
    op: CurvatureOperator, k: int, v0: Tensor | None, seed: int, tol: float
) -> tuple[Tensor, Tensor]:
    res = top_eigenpairs(op, k, tol=tol, seed=seed, v0=v0)
    return res.eigenvalues, res.eigenvectors


# --- helpers ----------------------------------------------------------------------
def _collect(
    data: Any, device: torch.device, max_samples: int
) -> list[tuple[Any, Tensor]]:
    out, count = [], 0
    # an empty shard joins with zeros; all ranks empty fails the sample count
    for x, y in local_batches(data):
        b = batch_size(y)
        if b == 0:
            continue
        take = min(b, max_samples - count)
        if take <= 0:
            break
        if take < b:
            x = tuple(t[:take] for t in x) if isinstance(x, tuple) else x[:take]
            y = y[:take]
        out.append((to_device(x, device), to_device(y, device)))
        count += take
    return out


def _flatten_displacement(displacement: Any, fm: FunctionalModel) -> Tensor:
    if isinstance(displacement, (list, tuple)):
        if len(displacement) != len(fm.shapes) or any(
            tuple(t.shape) != tuple(s)
            for t, s in zip(displacement, fm.shapes, strict=False)
        ):
            raise ValueError(
                "`displacement` as a list must hold one tensor per selected parameter, "
                f"shaped {[tuple(s) for s in fm.shapes]}."
            )
        return torch.cat([t.reshape(-1) for t in displacement]).to(fm.device, fm.dtype)
    if not isinstance(displacement, Tensor):
        raise TypeError(
            "`displacement` must be a (P,) tensor or a list of per-parameter tensors; "
            f"got {type(displacement).__name__}."
        )
    if tuple(displacement.shape) != (fm.numel,):
        raise ValueError(
            f"`displacement`: expected shape ({fm.numel},), "
            f"got {tuple(displacement.shape)}."
        )
    return displacement.to(fm.device, fm.dtype)


def _chunks(n: int, c: int) -> Iterable[slice]:
    for i in range(0, n, c):
        yield slice(i, min(n, i + c))


class _Stats:
    """Traces and norms for one curvature matrix (see the module docstring)."""

    def __init__(self) -> None:
        self.tr_s1c = self.tr_s2c = self.fro2_c = self.tr_c = math.nan
        self.tr_sc_direct = math.nan
        self.chi: Tensor | None = None

    @property
    def tr_sc(self) -> float:
        return self.tr_s1c - self.tr_s2c


Blocks = tuple[Tensor, Tensor, Tensor]


def _trace1(A: Blocks, loo: bool = False) -> Tensor:
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


def _trace2(A: Blocks, B: Blocks, loo: bool = False) -> Tensor:
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


class _Sketch:
    """Deflated isotropic estimates of the traces and norms (module docstring).

    Args:
        probe: The probe set.
        batch_proj: Per-sample values ``(n_local, q)`` to batch means ``(M, q)``.
        Zu: Unit probe directions ``(P, s)``; the probes are ``sqrt(P) Zu``.
        tZ: Their output tangents.
        U: Deflation directions ``(P, k)`` (the eigenvectors) or ``None``.
        tU: Their output tangents.
        need_ggn: Build the GGN blocks as well.
    """

    def __init__(
        self,
        probe: ProbeSet,
        batch_proj: Callable[[Tensor], Tensor],
        Zu: Tensor,
        tZ: OutputTangents,
        U: Tensor | None,
        tU: OutputTangents | None,
        need_ggn: bool,
    ) -> None:
        s = Zu.shape[1]
        scale = math.sqrt(probe.P)
        eye = torch.eye(s, dtype=torch.float64)
        tZ = tZ.combine(scale * eye)
        if U is not None and tU is not None:
            # Q = U S^{-1/2} (S = U^T U): orthonormal to float64 accuracy
            e, Qe = torch.linalg.eigh(gram64(U, U).cpu())
            keep = e > e.max() * 1e-12
            Sm = Qe[:, keep] / e[keep].sqrt()  # (k, k')
            C = Sm.T @ (gram64(U, Zu).cpu() * scale)  # Q^T Z0, (k', s)
            tQ = tU.combine(Sm)
            tP = tZ.cat(tQ).combine(torch.cat([eye, -C], 0))
        else:
            tQ, tP = tZ.select(slice(0, 0)), tZ
        self.probe, self.need_ggn = probe, need_ggn
        BQ, BP = (batch_proj(t.loss()).double() for t in (tQ, tP))
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
        return float(_trace1(self.sig))

    def fro2_sigma(self) -> float:
        return float(_trace2(self.sig, self.sig))

    def ggn_stats(self) -> _Stats:
        """``Tr G``, ``||G||_F^2``, ``Tr(Sigma G)`` and ``chi_i = Tr(M_i G)``."""
        p = self.probe
        st = _Stats()
        st.tr_c = float(_trace1(self.ggn))
        st.fro2_c = float(_trace2(self.ggn, self.ggn))
        st.tr_sc_direct = float(_trace2(self.sig, self.ggn))
        chi = torch.zeros(p.n, dtype=torch.float64, device=p.device)
        chi[p.offset : p.offset + p.n_local] = _trace2(self.per_sample, self.ggn)
        st.chi = distributed.all_reduce_sum(chi)
        return st

    def leave_one_out(self) -> dict[str, Tensor]:
        """The ``s`` leave-one-probe-out values of every estimate (``s >= 3``).

        Returns:
            ``(s,)`` tensors by name, ``chi`` ``(n, s)``.
        """
        out = {
            "tr_sigma": _trace1(self.sig, True).cpu(),
            "fro2_sigma": _trace2(self.sig, self.sig, True).cpu(),
        }
        if self.need_ggn:
            p = self.probe
            out["tr_c"] = _trace1(self.ggn, True).cpu()
            out["fro2_c"] = _trace2(self.ggn, self.ggn, True).cpu()
            out["tr_sc"] = _trace2(self.sig, self.ggn, True).cpu()
            s = out["tr_c"].shape[0]
            chi = torch.zeros(p.n, s, dtype=torch.float64, device=p.device)
            chi[p.offset : p.offset + p.n_local] = _trace2(
                self.per_sample, self.ggn, True
            )
            out["chi"] = distributed.all_reduce_sum(chi).cpu()
        return out


def _jackknife(replicates: list[dict[str, float]]) -> dict[str, float]:
    """Jackknife standard errors from the ``s`` leave-one-out replicates."""
    s = len(replicates)
    out = {}
    for key in replicates[0]:
        v = torch.tensor([r[key] for r in replicates], dtype=torch.float64)
        se = ((s - 1) / s * ((v - v.mean()) ** 2).sum()).sqrt()
        out[key] = float(se) if bool(torch.isfinite(se)) else math.nan
    return out


def noise_geometry(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    metrics: Sequence[str] | None = None,
    k: int = 10,
    curvature: Literal["ggn", "hessian"] = "ggn",
    cov: Literal["per_sample", "minibatch"] = "per_sample",
    batch_size: int | None = None,
    v0: Tensor | None = None,
    max_samples: int = 1024,
    displacement: Tensor | Sequence[Tensor] | None = None,
    seed: int | None = None,
    params: Iterable[Tensor] | Iterable[str] | None = None,
    mode: Literal["eval", "train"] = "eval",
    route: Literal["auto", "exact", "sketch"] = "auto",
    num_probes: int = 8,
    num_random_directions: int = 8,
    tol: float = 1e-2,
    chunk_size: int | None = None,
) -> NoiseGeometry:
    r"""Measure the geometry of SGD noise at the model's current parameters.

    Definitions (SPEC §2; ``H`` is the ``curvature`` matrix, ``Sigma`` the noise
    covariance chosen by ``cov``). Cost on the sketch route, in two families that
    share their passes (module docstring): the *eigenbasis* (Lanczos to ``tol``,
    about ``2k`` GGN-vector products for ``k = 10`` at ``tol = 1e-2``, plus ``r =
    num_random_directions`` jvps) and the *sketch traces* (on top of the
    eigenbasis: one backward, one jvp and ``max(0, s - r)`` jvps, ``s =
    num_probes``). Asking for any metric of a family pays for the whole family;
    the sketch traces always include the eigenbasis (their deflation).

    * ``loss``: ``L`` (mean per-sample loss) [1 forward].
    * ``alpha = Tr(H Sigma) / (||H||_F ||Sigma||_F)``,
      ``beta = ||Sigma||_F / (2L ||H||_F)``, ``mu = Tr(Sigma H) / (2L ||H||_F^2)``,
      ``mu1``/``mu2`` with ``Sigma_1``/``Sigma_2``
      (WWS22 §2.1); ``loss_alignment`` = ``mu1`` (the WW23 Sigma_1 form)
      [sketch traces; with the Hessian ``s`` backward and ``3s`` HVPs more].
    * ``mu_hessian``: ``mu`` with the true Hessian whatever ``curvature`` is
      [sketch traces + ``s`` backward + ``3s`` HVPs].
    * ``gradient_uniformity``: ``gamma = min_i chi_i / mean_i chi_i``,
      ``chi_i = Tr(Lambda_i J_i G J_i^T)`` (WWS22 Def. 2.1, with the GGN); on the
      sketch route each ``chi_i`` is an estimate, so the min is biased low
      [sketch traces].
    * ``tr_sigma``, ``tr_h_sigma = Tr(H Sigma)`` and
      ``tr_h_sigma_iso = Tr H Tr Sigma / P`` (Z19) [sketch traces].
    * ``projection_coefficient = u_1^T Sigma u_1 Tr H / (lambda_1 Tr Sigma)`` (Z19)
      [both families].
    * ``noise_energies`` ``u_i^T Sigma u_i``, ``directional_alignment``
      ``g(u_i) = u_i^T Sigma u_i / (2L u_i^T H u_i)`` and its mean over random unit
      directions ``directional_alignment_random`` (WW23) [eigenbasis].
    * ZYT in the top-``k`` eigenbasis, ``C~ = U^T Sigma U``: ``power_law_exponent``
      and ``power_law_r2`` (least squares of ``log10 C~_ii`` on ``log10 lambda_i``
      over entries with both positive), ``spearman`` (same entries),
      ``eigen_alignment = ||diag C~||^2 / ||C~||_F^2``, ``commutativity_error =
      ||C~ Lam - Lam C~||_F / ||C~ Lam||_F`` and its Haar-rotated baseline
      ``commutativity_baseline`` (mean of 8 rotations) [eigenbasis].
    * With ``displacement`` ``delta``: ``sharp_fraction = ||U^T delta||^2 /
      ||delta||^2``, ``loss_energy_fraction = sum_i lambda_i (u_i^T delta)^2 /
      delta^T H delta``, and the arrays ``direction_shares``, ``loss_shares``
      (SPEC §2.6) [eigenbasis + 1 product].

    The model is not changed (parameters, ``.grad``, buffers, modes, global RNG: a
    private generator seeded by ``seed`` draws all random numbers). Non-finite
    losses or gradients never raise: the values are NaN and
    ``values["n_nonfinite"]`` counts them.

    Args:
        model: The model (DDP wrappers are unwrapped).
        loss_fn: The loss, applied to batches of one as given (``nn.MSELoss``:
            ``(1/K) ||r||^2``; the papers' ``1/2 ||r||^2`` is
            :class:`~geoopt_sgd.HalfSquaredError`).
        data: The probe batch ``(inputs, targets)`` or an iterable of batches; under
            ``torch.distributed`` this rank's shard.
        metrics: Names from :data:`METRICS`; ``None`` means :data:`DEFAULT_METRICS`
            plus the escape metrics when ``displacement`` is given.
        k: Number of top curvature eigenpairs.
        curvature: ``"ggn"`` (default, PSD) or ``"hessian"``.
        cov: ``"per_sample"`` (``Sigma``, WWS22/WW23) or ``"minibatch"`` (``C``,
            Z19/ZYT; needs ``batch_size``).
        batch_size: Batch size ``B`` for ``cov="minibatch"``: ``M = n // B``
            consecutive disjoint batches, a trailing partial batch dropped.
        v0: Warm start ``(P,)`` or ``(P, m)`` for the eigensolver (e.g. the previous
            result's ``eigenvectors``).
        max_samples: Use at most this many samples (the first ones; per rank);
            their activations are held during the call (module docstring).
        displacement: ``delta = theta - theta_star``, ``(P,)`` or a list of
            per-parameter tensors.
        seed: Seed of the private generator (``None``: 0).
        params: Parameters to measure (tensors or names); ``None``: all trainable.
        mode: ``"eval"`` or ``"train"``, the package's mode policy.
        route: ``"auto"``, ``"exact"`` or ``"sketch"`` (module docstring).
        num_probes: Isotropic probes ``s >= 2`` of the sketch route (the first
            ``num_random_directions`` are the random directions; standard errors
            need ``s >= 3``), and of Hutchinson for the Hessian. Default ``8``.
        num_random_directions: Random directions for
            ``directional_alignment_random``.
        tol: Relative residual tolerance of the eigensolver. Default ``1e-2``;
            accuracy of the eigenbasis metrics in the module docstring.
        chunk_size: Samples per vmapped chunk when materialising per-sample rows
            (``None``: a batch at once); vectors are pushed 8 at a time
            (up to 256 for small models).

    Returns:
        The :class:`NoiseGeometry`.

    Raises:
        ValueError: On an unknown metric, curvature, cov, mode or route; ``k < 1``
            or ``k > P``; fewer than 2 samples (or batches) for a covariance;
            ``cov="minibatch"`` without ``batch_size``; ``route="exact"`` under
            ``torch.distributed``; a displacement of the wrong shape.
        TypeError: On non-integer counts or a displacement of the wrong type.

    Example:
        One weight, ``f = w x`` with ``w = 1``, inputs 1 and 2, targets 0, the
        papers' square loss: the per-sample gradients are ``r_i x_i = 1, 4``, so
        ``Sigma = 2.25``, ``G = mean x^2 = 2.5``, ``2L = 2.5`` and
        ``mu = 2.25 / 2.5^2 = 0.36``.

        >>> import torch
        >>> lin = torch.nn.Linear(1, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = lin.weight.fill_(1.0)
        >>> X = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> from geoopt_sgd import HalfSquaredError
        >>> res = noise_geometry(lin, HalfSquaredError(), (X, y), metrics=["mu"])
        >>> round(res.values["mu"], 12)
        0.36
    """
    t0 = time.perf_counter()
    if metrics is None:
        wanted = set(DEFAULT_METRICS) | (_ESCAPE if displacement is not None else set())
    else:
        if isinstance(metrics, str):
            metrics = [metrics]
        for m in metrics:
            check_choice("metrics", m, METRICS)
        wanted = set(metrics)
    check_int("k", k, ge=1)
    check_choice("curvature", curvature, ("ggn", "hessian"))
    check_choice("cov", cov, ("per_sample", "minibatch"))
    check_choice("route", route, ("auto", "exact", "sketch"))
    check_int("max_samples", max_samples, ge=2)
    check_int("num_probes", num_probes, ge=2)
    check_int("num_random_directions", num_random_directions, ge=1)
    check_int("chunk_size", chunk_size, ge=1, allow_none=True)
    check_int("seed", seed, ge=0, allow_none=True)
    check_number("tol", tol, gt=0)
    if cov == "minibatch":
        if batch_size is None:
            raise ValueError(
                "`batch_size` must be given with cov='minibatch' (B in C ~ Sigma/B)."
            )
        check_int("batch_size", batch_size, ge=1)
    if wanted & _ESCAPE and displacement is None:
        raise ValueError(
            "`displacement` must be given for 'sharp_fraction'/'loss_energy_fraction'."
        )
    if route == "exact" and distributed.is_distributed():
        raise ValueError(
            "`route` must be 'sketch' or 'auto' under torch.distributed; got 'exact' "
            "(the Gram identities would need per-sample P-vectors to travel)."
        )
    fm = FunctionalModel(model, params, mode=mode)
    P = fm.numel
    if wanted & _EIGEN and k > P:
        raise ValueError(f"`k` must be <= P = {P}; got {k}.")
    delta = None if displacement is None else _flatten_displacement(displacement, fm)
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    dtype, device = fm.dtype, fm.device

    with torch.enable_grad():
        probe = ProbeSet(
            fm, loss_fn, _collect(data, device, max_samples), chunk_size=chunk_size
        )
    n = probe.n
    B = 1 if cov == "per_sample" else int(batch_size)  # type: ignore[arg-type]
    M = n // B
    if M < 2:
        what = "samples" if cov == "per_sample" else f"batches of {B}"
        raise ValueError(
            f"`data` must hold at least 2 {what} for a covariance; got {n} samples."
        )
    # W: (M, n_local), row b averages the samples of batch b held by this rank
    gidx = torch.arange(probe.offset, probe.offset + probe.n_local)
    W = torch.zeros(M, probe.n_local, dtype=dtype)
    keep = gidx < M * B
    W[(gidx[keep] // B), torch.nonzero(keep).reshape(-1)] = 1.0 / B
    W = W.to(device)

    def batch_proj(A: Tensor) -> Tensor:
        """``(n_local, q)`` per-sample values -> ``(M, q)`` batch means, all ranks."""
        return distributed.all_reduce_sum(W @ A.to(dtype))

    # vectors pushed per vmapped pass: 8 for large models, more for small ones
    vec_chunk = int(min(256, max(8, 1e7 // (P + 8 * probe.n_local))))
    with torch.enable_grad():
        if wanted - {"loss"}:
            # one forward for the whole call: every later backward reuses its graph
            probe.keep_graph()
        losses = probe.losses()
    L = float(distributed.all_reduce_sum(losses.sum().reshape(1))) / n
    ctx: dict[str, Any] = {}

    def nan_result() -> NoiseGeometry:
        names = sorted(
            wanted | ({"power_law_r2"} if "power_law_exponent" in wanted else set())
        )
        vals = {
            m: math.nan
            for m in names
            if m not in ("noise_energies", "directional_alignment")
        }
        vals["n_nonfinite"] = float(len(vals))
        probe.release()
        cost = dict(probe.cost)
        cost["seconds"] = time.perf_counter() - t0
        return NoiseGeometry(values=vals, cost=cost, num_samples=n, route="none")

    if not math.isfinite(L):
        return nan_result()

    K = probe.output_hessians()[0].K if probe.batches else 1
    if route == "auto":
        exact = (
            not distributed.is_distributed()
            and n * (K + 1) * P <= _EXACT_MAX
            and (n * K) ** 2 * P <= _EXACT_GRAM_FLOPS
        )
        route = "exact" if exact else "sketch"

    need_stats = bool(wanted & (_STATS | {"tr_sigma"}))
    need_ggn = (need_stats and curvature == "ggn") or "gradient_uniformity" in wanted
    need_hess = (need_stats and curvature == "hessian") or "mu_hessian" in wanted
    need_any = need_stats or need_ggn or need_hess
    stats: dict[str, _Stats] = {}
    tr_sigma = fro2_sigma = math.nan
    op = {
        "ggn": CurvatureOperator(probe, "ggn"),
        "hessian": CurvatureOperator(probe, "hessian"),
    }

    def matmat(kind: str, V: Tensor) -> Tensor:
        cols = [
            op[kind].matmat(V[:, s].to(dtype)) for s in _chunks(V.shape[1], vec_chunk)
        ]
        return torch.cat(cols, 1)

    def tangents(V: Tensor) -> OutputTangents:
        parts = [probe.tangents(V[:, s]) for s in _chunks(V.shape[1], vec_chunk)]
        out = parts[0]
        for t in parts[1:]:
            out = out.cat(t)
        return out

    def hutchinson_hessian(st: _Stats) -> None:
        # Rademacher probes, drawn a chunk of columns at a time (int8: P-sized)
        tr = fro2 = 0.0
        for sl in _chunks(num_probes, vec_chunk):
            shape = (P, sl.stop - sl.start)
            Z = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
            Z = (Z.to(dtype) * 2 - 1).to(device)
            HZ = matmat("hessian", Z)
            tr += float((Z * HZ).sum())
            fro2 += float((HZ * HZ).sum())
        st.tr_c, st.fro2_c = tr / num_probes, fro2 / num_probes

    ses: dict[str, float] = {}
    timings: dict[str, float] = {}
    with torch.enable_grad():
        if wanted - {"loss"}:
            # one backward: non-finite gradients give NaN metrics, never an error
            grad_L = probe.weighted_gradient(
                torch.full((probe.n_local,), 1.0 / n, dtype=dtype, device=device)
            )
            if not bool(torch.isfinite(grad_L).all()):
                return nan_result()
        if need_any and route == "exact":
            D = probe.per_sample_rows()  # (n, P), here n_local == n
            R = W @ D
            rbar = R.mean(0)
            Rt = R - rbar
            tr_sigma = float((Rt * Rt).sum()) / M
            fro2_sigma = 0.0
            for sl in _chunks(M, max(1, int(_GRAM_CHUNK // M))):
                Gs = Rt[sl] @ Rt.T
                fro2_sigma += float((Gs * Gs).sum())
            fro2_sigma /= M**2
            if need_ggn:
                Mf = probe.jacobian_rows()  # (n, K, P)
                Kk = Mf.shape[1]
                Mf = Mf.reshape(n * Kk, P)
                st = _Stats()
                # Gram blocks Theta = M M^T (nK x nK) in row chunks of ~4e6 entries
                rows = max(1, int(_GRAM_CHUNK // (Kk * Kk * n)))
                fro2, chi = 0.0, torch.zeros(n, dtype=dtype, device=device)
                for sl in _chunks(n, rows):
                    Gc = Mf[sl.start * Kk : sl.stop * Kk] @ Mf.T
                    Gc = (Gc * Gc).reshape(-1, Kk, n * Kk).sum((1, 2))
                    chi[sl] = Gc / n
                    fro2 += float(Gc.sum())
                st.fro2_c = fro2 / n**2
                st.chi = chi
                st.tr_c = float((Mf * Mf).sum()) / n
                t1 = 0.0
                for sl in _chunks(M, max(1, int(_GRAM_CHUNK // (n * Kk)))):
                    RM = R[sl] @ Mf.T
                    t1 += float((RM * RM).sum())
                st.tr_s1c = t1 / (M * n)
                Mr = Mf @ rbar
                st.tr_s2c = float(Mr @ Mr) / n
                stats["ggn"] = st
            if need_hess:
                st = _Stats()
                HR = matmat("hessian", R.T)  # (P, M)
                st.tr_s1c = float((R.T * HR).sum()) / M
                st.tr_s2c = float(rbar @ HR.mean(1))
                if P <= _DENSE_HESSIAN_MAX:
                    Hd = matmat("hessian", torch.eye(P, dtype=dtype, device=device))
                    st.tr_c = float(torch.trace(Hd))
                    st.fro2_c = float((Hd * Hd).sum())
                else:
                    hutchinson_hessian(st)
                stats["hessian"] = st

        eig: dict[str, Any] = {}
        # the sketch route is deflated by the top-k eigenbasis (module docstring)
        if wanted & _EIGEN or (need_any and route == "sketch"):
            t_eig = time.perf_counter()
            v0_ = None
            if v0 is not None:
                v0_ = v0.detach().to(device, dtype)
                if v0_.dim() == 1:
                    v0_ = v0_.reshape(-1, 1)
                if v0_.shape[0] != P:
                    raise ValueError(
                        f"`v0`: expected shape ({P},) or ({P}, m); "
                        f"got {tuple(v0.shape)}."
                    )
            # GGN products keep their inputs and J v: the Ritz vectors' tangents
            # are then combinations of them (no jvp along the eigenvectors)
            record = curvature == "ggn"
            with probe.recording(_RECORD_MAX) if record else contextlib.nullcontext():
                lam, U = _top_eigenpairs(
                    op[curvature], min(k, P), v0_, 0 if seed is None else seed, tol
                )
            lam, U = lam.to(device, dtype), U.to(device, dtype)
            tU = probe.span_tangents(U) if record else None
            if tU is None:
                tU = tangents(U)
            Rnd = _random_directions(P, num_random_directions, gen, dtype).to(device)
            rots = (
                _haar(lam.numel(), _NUM_ROTATIONS, gen)
                if "commutativity_baseline" in wanted
                else []
            )
            eig = {"lam": lam, "U": U, "tU": tU, "R": Rnd, "tR": tangents(Rnd)}
            eig["rots"] = rots
            timings["seconds_eigen"] = time.perf_counter() - t_eig

        if need_any and route == "sketch":
            t_sk = time.perf_counter()
            # isotropic probes z (E z z^T = I): the random directions scaled by
            # sqrt(P), topped up to num_probes; deflated by the eigenbasis
            s = num_probes
            if eig:
                r = eig["R"].shape[1]
                Zu, tZ = eig["R"][:, :s], eig["tR"].select(slice(0, min(s, r)))
                if s > r:
                    extra = _random_directions(P, s - r, gen, dtype).to(device)
                    Zu, tZ = torch.cat([Zu, extra], 1), tZ.cat(tangents(extra))
            else:
                Zu = _random_directions(P, s, gen, dtype).to(device)
                tZ = tangents(Zu)
            sk = _Sketch(
                probe, batch_proj, Zu, tZ, eig.get("U"), eig.get("tU"), need_ggn
            )
            tr_sigma, fro2_sigma = sk.tr_sigma(), sk.fro2_sigma()
            if M * B == n:  # the mean of the batch means is grad L
                rbar = grad_L
            else:
                rbar = probe.weighted_gradient(
                    W.T @ torch.full((M,), 1.0 / M, dtype=dtype, device=device)
                )
            if need_ggn:
                st = sk.ggn_stats()
                # Tr(Sigma_2 G) = rbar^T G rbar exactly, one jvp
                q_r = tangents(rbar.reshape(P, 1)).ggn_quad()
                st.tr_s2c = float(distributed.all_reduce_sum(q_r.sum(0))) / n
                st.tr_s1c = st.tr_sc_direct + st.tr_s2c
                stats["ggn"] = st
            if need_hess:
                # uncentred xi_1 probes, Cov = Sigma_1: Tr(Sigma_1 H); Hutchinson
                st = _Stats()
                z = torch.randn(s, M, generator=gen, dtype=torch.float64)
                c1 = (W.T @ z.to(device, dtype).T) / M**0.5
                t1 = 0.0
                for sl in _chunks(s, vec_chunk):
                    xi1 = probe.weighted_gradient(c1[:, sl]).reshape(-1, P).T
                    t1 += float((xi1 * matmat("hessian", xi1)).sum())
                st.tr_s1c = t1 / s
                st.tr_s2c = float(rbar @ matmat("hessian", rbar.reshape(P, 1))[:, 0])
                hutchinson_hessian(st)
                stats["hessian"] = st
            timings["seconds_sketch"] = time.perf_counter() - t_sk
        probe.release()

        def mus(st: _Stats, tr_s: float, fro2_s: float) -> dict[str, float]:
            fro_c = math.sqrt(st.fro2_c) if st.fro2_c >= 0 else math.nan
            fro_s = math.sqrt(fro2_s) if fro2_s >= 0 else math.nan
            den = 2 * L * st.fro2_c
            return {
                "alpha": st.tr_sc / (fro_c * fro_s),
                "beta": fro_s / (2 * L * fro_c),
                "mu": st.tr_sc / den,
                "mu1": st.tr_s1c / den,
                "mu2": st.tr_s2c / den,
                "loss_alignment": st.tr_s1c / den,
                "tr_h_sigma": st.tr_sc,
                "tr_h_sigma_iso": st.tr_c * tr_s / P,
            }

        values: dict[str, float] = {}
        if "loss" in wanted:
            values["loss"] = L
        if "tr_sigma" in wanted:
            values["tr_sigma"] = tr_sigma
        if need_stats:
            for key, val in mus(stats[curvature], tr_sigma, fro2_sigma).items():
                if key in wanted:
                    values[key] = val
        if "mu_hessian" in wanted:
            values["mu_hessian"] = mus(stats["hessian"], tr_sigma, fro2_sigma)["mu"]
        if "gradient_uniformity" in wanted:
            chi = stats["ggn"].chi
            assert chi is not None
            values["gradient_uniformity"] = float(chi.min() / chi.mean())

        eig_out: dict[str, Tensor | None] = {}
        proj = math.nan
        if eig:
            lam, U, tU, tR = eig["lam"], eig["U"], eig["tU"], eig["tR"]
            kk = lam.numel()
            A = torch.cat([tU.loss(), tR.loss()], 1)
            if curvature == "ggn":
                Qd = torch.cat([tU.ggn_quad(), tR.ggn_quad()], 1)
                quad = distributed.all_reduce_sum(Qd.sum(0)) / n
            else:
                V = torch.cat([U, eig["R"]], 1)
                quad = (V * matmat("hessian", V)).sum(0)
            Bv = batch_proj(A)  # (M, k + r)
            Bc = Bv - Bv.mean(0, keepdim=True)
            energies = (Bc * Bc).mean(0)
            Ct = (Bc[:, :kk].T @ Bc[:, :kk]) / M
            diag = energies[:kk]
            lam64, diag64, Ct64 = (
                lam.double().cpu(),
                diag.double().cpu(),
                Ct.double().cpu(),
            )
            eig_out["eigenvalues"] = lam.detach()
            eig_out["eigenvectors"] = U.detach()
            eig_out["noise_energies"] = diag.detach()
            eig_out["directional_alignment"] = (diag / (2 * L * quad[:kk])).detach()
            if "directional_alignment_random" in wanted:
                values["directional_alignment_random"] = float(
                    (energies[kk:] / (2 * L * quad[kk:])).mean()
                )
            proj = float(diag64[0]) / float(lam64[0])
            if "projection_coefficient" in wanted:
                tr_c = stats[curvature].tr_c
                values["projection_coefficient"] = proj * tr_c / tr_sigma
            mask = (lam64 > 0) & (diag64 > 0)
            if wanted & {"power_law_exponent", "power_law_r2"}:
                slope, r2 = _linregress(lam64[mask].log10(), diag64[mask].log10())
                values["power_law_exponent"], values["power_law_r2"] = slope, r2
            if "spearman" in wanted:
                values["spearman"] = _spearman(lam64[mask], diag64[mask])
            if "eigen_alignment" in wanted:
                values["eigen_alignment"] = float(
                    (diag64 * diag64).sum() / (Ct64 * Ct64).sum()
                )
            Lam = torch.diag(lam64)
            if "commutativity_error" in wanted:
                values["commutativity_error"] = float(
                    _fro(Ct64 @ Lam - Lam @ Ct64) / _fro(Ct64 @ Lam)
                )
            if "commutativity_baseline" in wanted:
                vals = []
                for Qr in eig["rots"]:
                    Hq = Qr @ Lam @ Qr.T
                    vals.append(float(_fro(Ct64 @ Hq - Hq @ Ct64) / _fro(Ct64 @ Hq)))
                values["commutativity_baseline"] = sum(vals) / len(vals)
            if delta is not None and wanted & _ESCAPE:
                cvec = (U.T @ delta).double().cpu()
                dd = float(delta.double() @ delta.double())
                lc = lam64 * cvec * cvec
                eig_out["direction_shares"] = (cvec * cvec / dd).to(dtype)
                eig_out["loss_shares"] = (lc / lc.sum()).to(dtype)
                if "sharp_fraction" in wanted:
                    values["sharp_fraction"] = float((cvec * cvec).sum()) / dd
                if "loss_energy_fraction" in wanted:
                    Hd = matmat(curvature, delta.reshape(P, 1))[:, 0]
                    values["loss_energy_fraction"] = float(lc.sum()) / float(
                        delta.double() @ Hd.double()
                    )

        if need_any and route == "sketch" and num_probes >= 3:
            # jackknife over the isotropic probes (leave one out)
            loo = sk.leave_one_out()
            reps = []
            for t in range(num_probes):
                tr_s = float(loo["tr_sigma"][t])
                rep = {"tr_sigma": tr_s}
                if curvature == "ggn" and sk.need_ggn:
                    st = _Stats()
                    st.tr_c = float(loo["tr_c"][t])
                    st.fro2_c = float(loo["fro2_c"][t])
                    st.tr_s2c = stats["ggn"].tr_s2c
                    st.tr_sc_direct = float(loo["tr_sc"][t])
                    st.tr_s1c = st.tr_sc_direct + st.tr_s2c
                    rep.update(mus(st, tr_s, float(loo["fro2_sigma"][t])))
                    chi = loo["chi"][:, t]
                    rep["gradient_uniformity"] = float(chi.min() / chi.mean())
                    rep["projection_coefficient"] = proj * st.tr_c / tr_s
                reps.append(rep)
            ses = {key: v for key, v in _jackknife(reps).items() if key in values}

    n_bad = 0
    for key, val in values.items():
        if not math.isfinite(val):
            values[key] = math.nan
            n_bad += 1
    values["n_nonfinite"] = float(n_bad)
    cost = dict(probe.cost)
    cost.update(timings)
    cost["seconds"] = time.perf_counter() - t0
    del ctx
    return NoiseGeometry(
        values=values,
        eigenvalues=eig_out.get("eigenvalues"),
        eigenvectors=eig_out.get("eigenvectors"),
        noise_energies=eig_out.get("noise_energies"),
        directional_alignment=eig_out.get("directional_alignment"),
        direction_shares=eig_out.get("direction_shares"),
        loss_shares=eig_out.get("loss_shares"),
        cost=cost,
        num_samples=n,
        route=route,
        standard_errors=ses,
    )
