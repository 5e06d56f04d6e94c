r"""Noise-geometry metrics of WWS22, WW23, Z19 and ZYT, no ``P x P`` matrix.

Notation (``docs/science/conventions.md``): ``n`` probe samples with per-sample
losses ``L_i`` (the loss as passed, on a batch of one: :mod:`geoopt_sgd._losses`),
``L`` their mean,
``Sigma = Sigma_1 - Sigma_2`` the per-sample gradient covariance (``1/n``), or with
``cov="minibatch"`` the covariance ``C ~ Sigma / B`` of the means of ``M = n // B``
consecutive disjoint batches (then every ``Sigma`` below means ``C``). ``H`` is the
curvature matrix chosen by ``curvature``: the GGN ``G = (1/n) sum J_i^T Lambda_i J_i``
(default; PSD, equals the WWS22 Fisher for square loss) or the Hessian. With
cross-entropy the mu-type metrics are the GGN extension of WWS22's
square-loss definitions (our extension, not the papers').

Routes (``route=``):

* ``"exact"``: per-sample gradients ``D`` ``(n, P)`` and ``M_i = Lambda_i^{1/2} J_i``
  ``(nK, P)`` are materialised (chunked ``vmap``) and every trace/norm comes from
  Gram identities (``Tr(AB)`` of Gram matrices of the rows), exactly. Cost: ``n``
  per-sample gradients, ``nK`` per-sample output-Jacobian rows, and for
  ``curvature="hessian"`` ``n`` HVPs plus ``P`` HVPs for ``||H||_F`` and ``Tr H``
  when ``P <= 4096`` (else Hutchinson with ``num_probes``). Memory ``n (K + 1) P``.
* ``"sketch"``: nothing of size ``n x P``; only jvps (one per direction) besides the
  eigensolver's products. Every quadratic form along a direction ``v`` follows
  from the per-sample output tangents ``J_i v``:
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
  errors about ``sqrt(2 / s)`` there. Their jackknife leaves out natural probe
  ``t`` and Rademacher probe ``t`` with isotropic probe ``t`` (``Tr(Sigma_2 H)``
  is exact and stays): the three families are independent, so the ``s``
  triples are independent draws and every metric gets a standard error as
  with the GGN. Over 60 seeds of a 57-parameter MLP (``s = 8``) the mean
  standard error was 0.89-1.15 times the spread of the estimates.
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

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import distributed
from .._checks import (
    check_choice,
    check_finite_tensor,
    check_int,
    check_number,
    check_vector_shape,
)
from .._model import (
    FunctionalModel,
    batch_size,
    check_batch,
    detect_reduction,
    full_precision,
    local_batches,
    map_inputs,
    preserve_global_rng,
    to_device,
)
from ._context import ProbeContext, Traces, ratio_metrics
from ._eigenbasis import eigen_metrics, eigenbasis, escape_metrics
from ._exact import exact_traces
from ._sketch import Sketch, sketch_standard_errors, sketch_traces
from .primitives import ProbeSet

__all__ = ["DEFAULT_METRICS", "METRICS", "NoiseGeometry", "noise_geometry"]

# Every metric by name: (family, "scalar" or "array"). The family says what is
# computed for it (see noise_geometry for the costs):
#   loss               the forward pass only
#   traces             traces and norms of Sigma and the `curvature` matrix
#   ggn_traces         the same with the GGN, whatever `curvature` is
#   hessian_traces     the same with the Hessian, whatever `curvature` is
#   eigenbasis         the top-k eigenpairs and the derivatives along them
#   traces+eigenbasis  both
#   escape             the eigenbasis and a `displacement`
_TABLE: dict[str, tuple[str, str]] = {
    "loss": ("loss", "scalar"),
    "alpha": ("traces", "scalar"),
    "beta": ("traces", "scalar"),
    "mu": ("traces", "scalar"),
    "mu1": ("traces", "scalar"),
    "mu2": ("traces", "scalar"),
    "mu_hessian": ("hessian_traces", "scalar"),
    "loss_alignment": ("traces", "scalar"),
    "gradient_uniformity": ("ggn_traces", "scalar"),
    "tr_sigma": ("traces", "scalar"),
    "tr_h_sigma": ("traces", "scalar"),
    "tr_h_sigma_iso": ("traces", "scalar"),
    "projection_coefficient": ("traces+eigenbasis", "scalar"),
    "directional_alignment": ("eigenbasis", "array"),
    "directional_alignment_random": ("eigenbasis", "scalar"),
    "noise_energies": ("eigenbasis", "array"),
    "power_law_exponent": ("eigenbasis", "scalar"),
    "power_law_r2": ("eigenbasis", "scalar"),
    "spearman": ("eigenbasis", "scalar"),
    "eigen_alignment": ("eigenbasis", "scalar"),
    "commutativity_error": ("eigenbasis", "scalar"),
    "commutativity_baseline": ("eigenbasis", "scalar"),
    "sharp_fraction": ("escape", "scalar"),
    "loss_energy_fraction": ("escape", "scalar"),
}


def _names(*families: str) -> frozenset[str]:
    return frozenset(m for m, (fam, _) in _TABLE.items() if fam in families)


METRICS: tuple[str, ...] = tuple(_TABLE)
"""Every metric name :func:`noise_geometry` accepts (``docs/science/metrics.md``)."""

DEFAULT_METRICS: tuple[str, ...] = tuple(
    m for m in METRICS if _TABLE[m][0] not in ("hessian_traces", "escape")
)
"""The default set: 21 names, everything but ``mu_hessian`` (Hessian products) and
the escape metrics (which need ``displacement`` and are added when it is given).
Both families (see :func:`noise_geometry`) cost about what one of them does, so no
smaller set is much cheaper: on a timm resnet18 with a 128-sample probe batch the
default probe costs 83-158 gradients of that batch, almost all of it the top-``k``
eigensolve (``benchmarks/README.md``)."""

_TRACES = _names("traces", "traces+eigenbasis")
_EIGEN = _names("eigenbasis", "traces+eigenbasis", "escape")
_ESCAPE = _names("escape")
_GGN_TRACES = _names("ggn_traces")
_HESSIAN_TRACES = _names("hessian_traces")
_SCALARS = frozenset(m for m, (_, shape) in _TABLE.items() if shape == "scalar")
# what _measure returns: values, arrays, standard errors, timings
_Measured = tuple[
    dict[str, float], dict[str, Tensor], dict[str, float], dict[str, float]
]
# route="auto" takes the exact route up to n (K + 1) P entries and (n K)^2 P flops
_EXACT_MAX = 2e7
_EXACT_GRAM_FLOPS = 2e10


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
            estimates by metric name, with either ``curvature`` (empty on the
            exact route and with ``num_probes < 3``).
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
        # the (k,) arrays, in field order; the (P, k) eigenvectors stay out
        for f in fields(self):
            t = getattr(self, f.name)
            if isinstance(t, Tensor) and f.name != "eigenvectors":
                out[f.name] = [float(x) for x in t.detach().cpu().reshape(-1)]
        for k, v in self.standard_errors.items():
            out[f"se_{k}"] = float(v)
        for k, v in self.cost.items():
            out[f"cost_{k}"] = float(v)
        out["num_samples"] = int(self.num_samples)
        out["route"] = self.route
        return out


# --- arguments and data -------------------------------------------------------------
def _wanted(
    metrics: Sequence[str] | str | None, displacement: object | None
) -> set[str]:
    """The metric names asked for (the defaults when ``metrics`` is ``None``)."""
    if metrics is None:
        return set(DEFAULT_METRICS) | (_ESCAPE if displacement is not None else set())
    if isinstance(metrics, str):
        metrics = [metrics]
    for m in metrics:
        check_choice("metrics", m, METRICS)
    return set(metrics)


def _check_arguments(
    wanted: set[str],
    *,
    k: int,
    curvature: str,
    cov: str,
    batch_size: int | None,
    max_samples: int,
    displacement: object | None,
    seed: int | None,
    route: str,
    num_probes: int,
    num_random_directions: int,
    tol: float,
    chunk_size: int | None,
) -> None:
    """Validate the arguments of :func:`noise_geometry` that need no model."""
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


def _collect(
    data: Any,
    device: torch.device,
    max_samples: int,
    batch_fn: Callable[[Any], Any] | None = None,
) -> list[tuple[Any, Tensor]]:
    out, count = [], 0
    # an empty shard joins with zeros; all ranks empty fails the sample count.
    # A shuffling DataLoader draws its sampler's seed from the global RNG: the
    # measurement must not move it.
    with preserve_global_rng():
        for i, (x, y) in enumerate(local_batches(data, batch_fn)):
            check_batch(x, y, index=i)
            b = batch_size(y)
            if b == 0:
                continue
            take = min(b, max_samples - count)
            if take <= 0:
                break
            if take < b:
                x = map_inputs(x, lambda t: t[:take])  # noqa: B023 - used at once
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
        out = torch.cat([t.reshape(-1) for t in displacement]).to(fm.device, fm.dtype)
        check_finite_tensor("displacement", out)
        return out
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
    out = displacement.to(fm.device, fm.dtype)
    check_finite_tensor("displacement", out)
    return out


@full_precision
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
    batch_fn: Callable[[Any], Any] | None = None,
) -> NoiseGeometry:
    r"""Measure the geometry of SGD noise at the model's current parameters.

    Definitions (``docs/science/metrics.md``; ``H`` is the ``curvature`` matrix,
    ``Sigma`` the noise covariance chosen by ``cov``). Cost on the sketch route, in two
    families that share their passes (module docstring): the *eigenbasis* (Lanczos to
    ``tol``, about ``2k`` GGN-vector products for ``k = 10`` at ``tol = 1e-2``, plus ``r
    = num_random_directions`` jvps) and the *sketch traces* (on top of the eigenbasis:
    one backward, one jvp and ``max(0, s - r)`` jvps, ``s = num_probes``). Asking for
    any metric of a family pays for the whole family; the sketch traces always include
    the eigenbasis (their deflation).

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
      These are top-``k`` quantities of the measured parameters (by default the
      whole network, on ``k = 10`` GGN eigenpairs, the commutativity restricted to
      the top-``k`` subspace): a different quantity from ZYT's per-layer form,
      which takes one layer's full Hessian and mini-batch covariance (the top
      ``N`` of up to thousands of eigenvalues, the commutativity of the full
      matrices). ``recipes/power_law.py`` computes the per-layer form
      (``docs/recipes/power_law.md``).
    * With ``displacement`` ``delta``: ``sharp_fraction = ||U^T delta||^2 /
      ||delta||^2``, ``loss_energy_fraction = sum_i lambda_i (u_i^T delta)^2 /
      delta^T H delta``, and the arrays ``direction_shares``, ``loss_shares``
      [eigenbasis + 1 product].

    The model is not changed (parameters, ``.grad``, buffers, modes, global RNG: a
    private generator seeded by ``seed`` draws all random numbers). Non-finite
    losses or gradients never raise: the values are NaN and
    ``values["n_nonfinite"]`` counts them.

    Args:
        model: The model (DDP wrappers are unwrapped).
        loss_fn: The loss, applied to batches of one as given (``nn.MSELoss``:
            ``(1/K) ||r||^2``; the papers' ``1/2 ||r||^2`` is
            :class:`~geoopt_sgd.HalfSquaredError`). The metrics are per-sample
            averages, the same for ``reduction="mean"`` and ``"sum"``; a
            class-weighted (or ``ignore_index``-hit) cross-entropy with
            ``reduction="mean"`` is refused (``docs/science/conventions.md``).
        data: The probe batch ``(inputs, targets)`` or an iterable of batches (see
            :mod:`geoopt_sgd._model` for the batch structure); under
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
        batch_fn: ``None`` or a callable mapping one batch of ``data`` (as a
            loader yields it, e.g. a dict) to ``(inputs, targets)``; inputs may
            be a tensor, a tuple/list (``model(*inputs)``) or a dict
            (``model(**inputs)``). See :mod:`geoopt_sgd._model`.

    Returns:
        The :class:`NoiseGeometry`.

    Raises:
        ValueError: On an unknown metric, curvature, cov, mode or route; ``k < 1``
            or ``k > P``; fewer than 2 samples (or batches) for a covariance;
            ``cov="minibatch"`` without ``batch_size``; ``route="exact"`` under
            ``torch.distributed``; a displacement or ``v0`` of the wrong shape or
            with non-finite entries; a parameter selected twice; a ``loss_fn``
            whose ``reduction`` is not ``"mean"`` or ``"sum"``, or a
            cross-entropy/NLL loss with ``reduction="mean"`` and class
            ``weight`` (or targets equal to its ``ignore_index``); a model
            without parameters; a batch whose inputs and targets differ in
            length.
        TypeError: On non-integer counts, a displacement of the wrong type, a
            complex ``v0``, a ``loss_fn`` or ``batch_fn`` that is not callable, a
            ``model`` that is not a module, or ``data`` (after ``batch_fn``) that is not
            ``(inputs, targets)`` batches.

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
    wanted = _wanted(metrics, displacement)
    _check_arguments(
        wanted,
        k=k,
        curvature=curvature,
        cov=cov,
        batch_size=batch_size,
        max_samples=max_samples,
        displacement=displacement,
        seed=seed,
        route=route,
        num_probes=num_probes,
        num_random_directions=num_random_directions,
        tol=tol,
        chunk_size=chunk_size,
    )
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable; got {type(loss_fn).__name__}.")
    detect_reduction(loss_fn, None)  # one rule: reduction='none' is refused
    fm = FunctionalModel(model, params, mode=mode)
    P = fm.numel
    if wanted & _EIGEN and k > P:
        raise ValueError(f"`k` must be <= P = {P}; got {k}.")
    if v0 is not None:
        if isinstance(v0, Tensor) and v0.shape[:1] != (P,):
            # the eigensolver's message for a wrong length, raised now
            raise ValueError(
                f"`v0`: expected shape ({P},) or ({P}, m); got {tuple(v0.shape)}."
            )
        check_vector_shape("v0", v0, P)
        check_finite_tensor("v0", v0)
    delta = None if displacement is None else _flatten_displacement(displacement, fm)
    # ranks given different seeds draw rank 0's probes (their products are
    # summed over ranks)
    seed = distributed.rank0_seed(0 if seed is None else seed, fm.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)  # draws on the CPU
    B = 1 if cov == "per_sample" else int(batch_size)  # type: ignore[arg-type]
    probe, L = _probe_and_loss(
        fm, loss_fn, data, wanted, cov, B, max_samples, chunk_size, batch_fn
    )
    if not math.isfinite(L):
        return _nan_result(wanted, probe, t0)

    route = _choose_route(route, probe)
    ctx = ProbeContext.create(probe, B, P, fm.dtype, fm.device, gen)
    with torch.enable_grad():
        measured = _measure(
            ctx,
            wanted,
            L,
            delta,
            route=route,
            curvature=curvature,
            k=k,
            v0=v0,
            seed=seed,
            tol=tol,
            num_probes=num_probes,
            num_random_directions=num_random_directions,
        )
    if measured is None:  # non-finite gradients
        return _nan_result(wanted, probe, t0)
    return _result(probe, route, t0, *measured)


def _probe_and_loss(
    fm: FunctionalModel,
    loss_fn: Callable[..., Tensor],
    data: Any,
    wanted: set[str],
    cov: str,
    B: int,
    max_samples: int,
    chunk_size: int | None,
    batch_fn: Callable[[Any], Any] | None = None,
) -> tuple[ProbeSet, float]:
    """The probe set of ``data`` and the mean loss ``L``, from one forward pass."""
    with torch.enable_grad():
        probe = ProbeSet(
            fm,
            loss_fn,
            _collect(data, fm.device, max_samples, batch_fn),
            chunk_size=chunk_size,
        )
    n = probe.n
    if n // B < 2:
        what = "samples" if cov == "per_sample" else f"batches of {B}"
        raise ValueError(
            f"`data` must hold at least 2 {what} for a covariance; got {n} samples."
        )
    with torch.enable_grad():
        if wanted - {"loss"}:
            # one forward for the whole call: every later backward reuses its graph
            probe.keep_graph()
        losses = probe.losses()
    return probe, float(distributed.all_reduce_sum(losses.sum().reshape(1))) / n


def _result(
    probe: ProbeSet,
    route: str,
    t0: float,
    values: dict[str, float],
    arrays: dict[str, Tensor],
    ses: dict[str, float],
    timings: dict[str, float],
) -> NoiseGeometry:
    """The :class:`NoiseGeometry`, non-finite values set to NaN and counted."""
    n_bad = 0
    for key, val in values.items():
        if not math.isfinite(val):
            values[key] = math.nan
            n_bad += 1
    values["n_nonfinite"] = float(n_bad)
    cost = dict(probe.cost)
    cost.update(timings)
    cost["seconds"] = time.perf_counter() - t0
    return NoiseGeometry(
        values=values,
        **arrays,
        cost=cost,
        num_samples=probe.n,
        route=route,
        standard_errors=ses,
    )


def _choose_route(route: str, probe: ProbeSet) -> str:
    """Resolve ``route="auto"`` (module docstring)."""
    n, P = probe.n, probe.P
    K = probe.output_hessians()[0].K if probe.batches else 1
    if route != "auto":
        return route
    return "exact" if auto_picks_exact(n, K, P) else "sketch"


def auto_picks_exact(n: int, K: int, P: int) -> bool:
    """Whether ``route="auto"`` takes the exact route (module docstring).

    For ``n`` samples of ``K`` outputs each and ``P`` parameters.
    """
    return (
        not distributed.is_distributed()
        and n * (K + 1) * P <= _EXACT_MAX
        and (n * K) ** 2 * P <= _EXACT_GRAM_FLOPS
    )


def _nan_result(wanted: set[str], probe: ProbeSet, t0: float) -> NoiseGeometry:
    """All scalars NaN, after a non-finite loss or gradient."""
    names = sorted(
        wanted | ({"power_law_r2"} if "power_law_exponent" in wanted else set())
    )
    vals = {m: math.nan for m in names if m in _SCALARS}
    vals["n_nonfinite"] = float(len(vals))
    probe.release()
    cost = dict(probe.cost)
    cost["seconds"] = time.perf_counter() - t0
    return NoiseGeometry(values=vals, cost=cost, num_samples=probe.n, route="none")


def _measure(
    ctx: ProbeContext,
    wanted: set[str],
    L: float,
    delta: Tensor | None,
    *,
    route: str,
    curvature: str,
    k: int,
    v0: Tensor | None,
    seed: int | None,
    tol: float,
    num_probes: int,
    num_random_directions: int,
) -> _Measured | None:
    """Run the families ``wanted`` needs on ``route`` and assemble the metrics.

    Returns:
        ``(values, arrays, standard_errors, timings)``, or ``None`` when the mean
        gradient is not finite.
    """
    probe = ctx.probe
    need_traces = bool(wanted & _TRACES)
    need_ggn = (need_traces and curvature == "ggn") or bool(wanted & _GGN_TRACES)
    need_hess = (need_traces and curvature == "hessian") or bool(
        wanted & _HESSIAN_TRACES
    )
    need_any = need_traces or need_ggn or need_hess
    sketch = need_any and route == "sketch"
    traces: dict[str, Traces] = {}
    tr_sigma = fro2_sigma = math.nan
    timings: dict[str, float] = {}
    if wanted - {"loss"}:
        # one backward: non-finite gradients give NaN metrics, never an error
        c = torch.full(
            (probe.n_local,), 1.0 / ctx.n, dtype=ctx.dtype, device=ctx.device
        )
        grad_L = probe.weighted_gradient(c)
        if not bool(torch.isfinite(grad_L).all()):
            return None
    if need_any and route == "exact":
        tr_sigma, fro2_sigma, traces = exact_traces(
            ctx, need_ggn, need_hess, num_probes
        )
    eig = None
    # the sketch route is deflated by the top-k eigenbasis (module docstring)
    if wanted & _EIGEN or sketch:
        t_eig = time.perf_counter()
        eig = eigenbasis(
            ctx,
            curvature,
            k,
            v0,
            seed,
            tol,
            num_random_directions,
            rotations="commutativity_baseline" in wanted,
        )
        timings["seconds_eigen"] = time.perf_counter() - t_eig
    sk: Sketch | None = None
    if sketch:
        t_sk = time.perf_counter()
        assert eig is not None
        sk, tr_sigma, fro2_sigma, traces = sketch_traces(
            ctx, eig, grad_L, num_probes, need_ggn, need_hess
        )
        timings["seconds_sketch"] = time.perf_counter() - t_sk
    probe.release()

    values = _trace_values(ctx, wanted, L, curvature, traces, tr_sigma, fro2_sigma)
    arrays: dict[str, Tensor] = {}
    proj = math.nan
    if eig is not None:
        arrays, proj = eigen_metrics(
            ctx, eig, curvature, L, wanted, traces, tr_sigma, values
        )
        if delta is not None and wanted & _ESCAPE:
            escape_metrics(ctx, eig, curvature, delta, wanted, values, arrays)
    ses: dict[str, float] = {}
    if sk is not None and num_probes >= 3:
        # jackknife over the isotropic probes (leave one out)
        ses = sketch_standard_errors(sk, traces, curvature, proj, L, ctx.P)
        ses = {key: v for key, v in ses.items() if key in values}
    return values, arrays, ses, timings


def _trace_values(
    ctx: ProbeContext,
    wanted: set[str],
    L: float,
    curvature: str,
    traces: dict[str, Traces],
    tr_sigma: float,
    fro2_sigma: float,
) -> dict[str, float]:
    """``loss`` and the metrics of the traces in ``wanted``, in the table's order."""
    values: dict[str, float] = {}
    if "loss" in wanted:
        values["loss"] = L
    if "tr_sigma" in wanted:
        values["tr_sigma"] = tr_sigma
    if wanted & _TRACES:
        ratios = ratio_metrics(traces[curvature], tr_sigma, fro2_sigma, L, ctx.P)
        for key, val in ratios.items():
            if key in wanted:
                values[key] = val
    if "mu_hessian" in wanted:
        ratios = ratio_metrics(traces["hessian"], tr_sigma, fro2_sigma, L, ctx.P)
        values["mu_hessian"] = ratios["mu"]
    if "gradient_uniformity" in wanted:
        chi = traces["ggn"].chi
        assert chi is not None
        values["gradient_uniformity"] = float(chi.min() / chi.mean())
    return values
