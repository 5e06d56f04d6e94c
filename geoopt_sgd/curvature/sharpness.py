"""Sharpness measures of a model at its current parameters.

:func:`sharpness` gathers the Hessian-based measures in one call (top
eigenvalues, ``lambda_min``, trace, Frobenius norm, the GD stability ratio and the
cost) on a :class:`~geoopt_sgd.HessianOperator`; :func:`expected_sharpness` is the
zeroth-order measure of Zhu et al. (2019), from loss evaluations only.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from .._checks import (
    check_finite_tensor,
    check_int,
    check_number,
    check_vector_shape,
)
from .._linalg import coldot64
from .._model import (
    FunctionalModel,
    batch_size,
    detect_reduction,
    full_precision,
    local_batches,
    preserve_global_rng,
    scalar_loss,
    to_device,
)
from .hessian import HessianOperator
from .lanczos import (
    EigenResult,
    check_operator_output,
    thick_restart_lanczos,
    warm_start_columns,
)
from .trace import Estimate, mean_stderr, rademacher_probes

__all__ = ["SharpnessReport", "expected_sharpness", "sharpness"]


@dataclass(frozen=True)
class SharpnessReport:
    """Hessian sharpness measures of one point, with their cost.

    Attributes:
        lambda_max: Largest algebraic Hessian eigenvalue.
        lambda_min: Smallest algebraic eigenvalue (accurate to ``tol * |lambda_max|``
            in absolute terms).
        top_eigenvalues: ``(k,)`` float64, the ``k`` largest, descending.
        trace: Hutchinson estimate of ``tr H`` (``None`` when ``trace_probes=0``).
        trace_stderr: Its standard error.
        frobenius: Estimate of ``||H||_F = sqrt(E ||H z||^2)`` from the same probes.
        frobenius_stderr: Its standard error (delta method).
        stability_ratio: ``lr * lambda_max / 2`` (GD is linearly stable below 1),
            or ``None`` without ``lr``.
        converged: Whether the eigenvalues reached ``tol`` (and, with
            ``verify=True``, the skip check passed).
        n_hvp: Hessian-vector products used.
        seconds: Wall time of the call.
        eigenvectors: ``(P, k)`` top eigenvectors (left out of :meth:`as_dict`).
        next_eigenvectors: ``(P, g)``, the solve's other Ritz vectors (the
            ``lambda_min`` end and the guards beyond the ``k``), which with
            ``eigenvectors`` make the next call's warm start (left out of
            :meth:`as_dict`); ``None`` on the dense path.
        verified: Whether the skip check of
            :func:`~geoopt_sgd.top_eigenpairs` ran and passed (``verify=True``;
            ``True`` on the dense path).
    """

    lambda_max: float
    lambda_min: float
    top_eigenvalues: Tensor
    trace: float | None
    trace_stderr: float | None
    frobenius: float | None
    frobenius_stderr: float | None
    stability_ratio: float | None
    converged: bool
    n_hvp: int
    seconds: float
    eigenvectors: Tensor = field(repr=False)
    next_eigenvectors: Tensor | None = field(default=None, repr=False)
    verified: bool = False

    def warm_start(self) -> Tensor:
        """The ``v0`` for the next call: ``eigenvectors`` and ``next_eigenvectors``.

        Passing the report itself as ``v0`` does the same. With every Ritz vector
        the solve converged, a Hessian that moved little opens the block warm
        start of :func:`~geoopt_sgd.top_eigenpairs`.

        Returns:
            ``(P, k + g)``.
        """
        return warm_start_columns(self.eigenvectors, self.next_eigenvectors)

    def as_dict(self) -> dict[str, Any]:
        """Return a flat, JSON-ready dict of the measures (no eigenvectors).

        Returns:
            Floats, ints, bools and ``None``; ``top_eigenvalues`` as a list.
        """
        return {
            "lambda_max": self.lambda_max,
            "lambda_min": self.lambda_min,
            "top_eigenvalues": [float(x) for x in self.top_eigenvalues],
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "frobenius": self.frobenius,
            "frobenius_stderr": self.frobenius_stderr,
            "stability_ratio": self.stability_ratio,
            "converged": self.converged,
            "verified": self.verified,
            "n_hvp": self.n_hvp,
            "seconds": self.seconds,
        }


@full_precision
def sharpness(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    k: int = 1,
    lr: float | None = None,
    tol: float = 1e-3,
    trace_probes: int = 10,
    seed: int | None = None,
    method: str = "auto",
    mode: str = "eval",
    params: Iterable[Tensor] | Iterable[str] | None = None,
    v0: Tensor | SharpnessReport | EigenResult | None = None,
    loss_reduction: str | None = None,
    max_matvecs: int | None = None,
    batch_fn: Callable[[Any], Any] | None = None,
    verify: bool = False,
) -> SharpnessReport:
    """Measure the Hessian sharpness of ``model`` on ``data`` in one call.

    One thick-restart Lanczos run (:mod:`.lanczos`) gives the ``k`` largest
    algebraic eigenvalues and ``lambda_min`` together; ``trace_probes`` Rademacher
    probes then give both ``tr H`` (``z^T H z``) and ``||H||_F^2`` (``||H z||^2``).
    The model, its buffers, ``.grad`` and the global RNG are left unchanged.

    Args:
        model: The model (DDP wrappers are unwrapped).
        loss_fn: The loss, ``loss_fn(outputs, targets)`` with reduction
            ``"mean"`` or ``"sum"``.
        data: One ``(inputs, targets)`` batch or an iterable of batches (see
            :mod:`geoopt_sgd._model` for the batch structure).
        k: Number of top eigenvalues, ``>= 1``.
        lr: Learning rate for the stability ratio ``lr * lambda_max / 2``.
        tol: Relative residual tolerance of the eigenvalues, ``> 0``.
        trace_probes: Probes for trace and Frobenius norm (``0`` skips them).
        seed: Seed of the private generators; ``None`` means ``0``.
        method: HVP route of :class:`~geoopt_sgd.HessianOperator`.
        mode: ``"eval"`` or ``"train"`` (the package's mode policy).
        params: Parameters (or names) to differentiate; default all trainable.
        v0: Warm start for the eigensolver: ``(P,)``, ``(P, m)``, or the
            previous :class:`SharpnessReport` (its :meth:`~SharpnessReport.warm_start`,
            every Ritz vector of its solve) or
            :class:`~geoopt_sgd.EigenResult`; see ``v0`` of
            :func:`~geoopt_sgd.top_eigenpairs` for the block warm start.
        loss_reduction: ``"mean"`` or ``"sum"`` for a loss without a
            ``reduction`` attribute; default read from ``loss_fn.reduction``,
            which it must match where present.
        max_matvecs: Budget of the eigensolver (see
            :func:`~geoopt_sgd.top_eigenpairs`), at least ``k + 1``.
        batch_fn: ``None`` or a callable mapping one batch of ``data`` (as a
            loader yields it, e.g. a dict) to ``(inputs, targets)``; inputs may
            be a tensor, a tuple/list (``model(*inputs)``) or a dict
            (``model(**inputs)``). See :mod:`geoopt_sgd._model`.
        verify: Run the eigensolver's skip check (see
            :func:`~geoopt_sgd.top_eigenpairs`, where it is the default):
            6-26 more products at ``k`` = 5-20 on the benchmarks' workloads,
            worth it for several eigenvalues in a tight cluster. Off by default
            here: ``lambda_max`` is this function's headline, measured often
            during training, and Lanczos finds an extreme eigenvalue first, so
            a skip mostly concerns the interior of a large ``k``.

    Returns:
        A :class:`SharpnessReport`.

    Raises:
        TypeError: If an integer argument is not an integer, ``v0`` is not a
            tensor or ``data`` (after ``batch_fn``) is not ``(inputs, targets)``
            batches.
        ValueError: If ``k < 1`` or ``k > P``, ``lr <= 0``, ``tol <= 0``,
            ``trace_probes < 0``, ``seed < 0``, ``max_matvecs <= k`` (with
            ``k + 1 < P``) or ``v0`` has the wrong shape or
            non-finite entries (as in :func:`~geoopt_sgd.top_eigenpairs`; and
            the operator's own errors, e.g. an unknown ``method``).
    """
    t0 = time.perf_counter()
    if isinstance(v0, (SharpnessReport, EigenResult)):
        v0 = v0.warm_start()
    if not isinstance(verify, bool):
        raise TypeError(f"`verify` must be True or False; got {verify!r}.")
    check_int("k", k, ge=1)
    check_number("lr", lr, gt=0, allow_none=True)
    check_number("tol", tol, gt=0)
    check_int("trace_probes", trace_probes, ge=0)
    check_int("seed", seed, ge=0, allow_none=True)
    check_int("max_matvecs", max_matvecs, ge=1, allow_none=True)
    op = HessianOperator(
        model,
        loss_fn,
        data,
        params=params,
        method=method,
        mode=mode,
        loss_reduction=loss_reduction,
        batch_fn=batch_fn,
    )
    try:
        P = op.shape[0]
        if k > P:
            raise ValueError(f"`k` must be <= P = {P} (the parameter count); got {k}.")
        if max_matvecs is not None and k + 1 < P and max_matvecs <= k:
            raise ValueError(
                f"`max_matvecs` must be >= k + 1 = {k + 1} (the k top eigenvalues "
                f"and lambda_min are k + 1 Ritz values); got {max_matvecs}."
            )
        if v0 is not None:
            check_vector_shape("v0", v0, P)
            check_finite_tensor("v0", v0)
        n0 = op.n_matvec
        if k + 1 >= P:
            A = op.to_dense()
            check_operator_output(A)
            A = A.double()
            lam, U = torch.linalg.eigh((A + A.T) / 2)
            top = lam.flip(0)[:k].cpu()
            vecs = U.flip(1)[:, :k].to(op.dtype)
            lam_min, ok, verified = float(lam[0]), True, True
            rest: Tensor | None = None  # every eigenvector known: no guards
        else:
            sol = thick_restart_lanczos(
                op,
                k,
                1,
                magnitude=False,
                tol=tol,
                max_matvecs=max_matvecs,
                max_basis=None,
                seed=seed,
                v0=v0,
                bottom_absolute=True,
                verify=verify,
            )
            vals, ok, verified = sol.theta, sol.ok, sol.verified
            top, vecs, lam_min = vals[:k], sol.Y[:, :k], float(vals[k])
            # the lambda_min end and the guards: the rest of the next warm start
            rest = torch.cat([sol.Y[:, k:], sol.G], dim=1)
            if not ok:
                what = sol.shortfall() or f"did not reach tol={tol}"
                warnings.warn(
                    f"sharpness: the eigensolver {what} within "
                    f"{op.n_matvec - n0} Hessian-vector products.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        trace = trace_se = fro = fro_se = None
        if trace_probes:
            t_s, f_s = [], []
            for Z, HZ in rademacher_probes(op, trace_probes, 10, None, seed):
                t_s.append(coldot64(Z, HZ).cpu())
                f_s.append(coldot64(HZ, HZ).cpu())
            trace, trace_se = mean_stderr(torch.cat(t_s))
            f2, f2_se = mean_stderr(torch.cat(f_s))
            fro = math.sqrt(max(f2, 0.0))
            fro_se = f2_se / (2 * fro) if fro > 0 else f2_se
        lam_max = float(top[0])
        return SharpnessReport(
            lambda_max=lam_max,
            lambda_min=lam_min,
            top_eigenvalues=top,
            trace=trace,
            trace_stderr=trace_se,
            frobenius=fro,
            frobenius_stderr=fro_se,
            stability_ratio=None if lr is None else float(lr) * lam_max / 2,
            converged=ok,
            n_hvp=op.n_matvec - n0,
            seconds=time.perf_counter() - t0,
            eigenvectors=vecs,
            next_eigenvectors=rest,
            verified=verified,
        )
    finally:
        op.release()


def _full_loss(
    fm: FunctionalModel,
    loss_fn: Callable[..., Tensor],
    data: Any,
    reduction: str,
    params: list[Tensor],
) -> float:
    """Full-data loss at ``params``: mean weighted by batch sizes, or sum.

    ``data`` is the output of :func:`~geoopt_sgd._model.local_batches`.
    """
    total = torch.zeros(2, dtype=torch.float64, device=fm.device)
    with preserve_global_rng(), torch.no_grad(), fm.policy():
        for inputs, targets in data:
            inputs = to_device(inputs, fm.device)
            targets = to_device(targets, fm.device)
            n = batch_size(targets)
            if n == 0:  # its mean loss is NaN; it holds nothing (as in the operators)
                continue
            loss = scalar_loss(loss_fn, fm(params, inputs), targets).double()
            total[0] += loss * n if reduction == "mean" else loss
            total[1] += n
    distributed.all_reduce_sum(total)
    if total[1] == 0:  # after the reduction: the same error on every rank
        where = " on every rank" if distributed.is_distributed() else ""
        raise ValueError(f"`data` is empty{where}: it yields no samples.")
    if reduction == "mean":
        return float(total[0] / total[1])
    return float(total[0])


@full_precision
def expected_sharpness(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    sigma: float = 0.01,
    num_samples: int = 100,
    antithetic: bool = True,
    absolute: bool = False,
    seed: int | None = None,
    mode: str = "eval",
    params: Iterable[Tensor] | Iterable[str] | None = None,
    loss_reduction: str | None = None,
    batch_fn: Callable[[Any], Any] | None = None,
) -> Estimate:
    """Estimate the expected sharpness ``E[L(theta + nu)] - L(theta)``.

    ``nu ~ N(0, sigma^2 I)`` over the selected parameters (Zhu et al. 2019,
    arXiv:1803.00195; defaults ``sigma=0.01``). For small ``sigma`` it is about
    ``sigma^2 / 2 * tr H`` where the loss is twice differentiable; kinks (ReLU)
    add a term of the same order that the Hessian misses. Antithetic pairs
    ``+-nu`` cancel the first-order term exactly (each sample is
    ``(L(theta+nu) + L(theta-nu)) / 2 - L(theta)``).
    ``absolute=True`` averages ``|L(theta + nu) - L(theta)|`` instead, as the
    authors' code does. Perturbed losses are evaluated functionally: the model's
    parameters, buffers and the global RNG are never changed.

    Args:
        model: The model.
        loss_fn: The loss, reduction ``"mean"`` or ``"sum"``.
        data: One ``(inputs, targets)`` batch or an iterable of batches (see
            :mod:`geoopt_sgd._model` for the batch structure). Under
            ``torch.distributed``, this rank's shard (it may be empty): the
            losses are summed over ranks.
        sigma: Standard deviation of the perturbation, ``> 0``.
        num_samples: Draws of ``nu`` (each costs two full-data losses when
            antithetic, else one).
        antithetic: Use ``+-nu`` pairs.
        absolute: Average absolute loss changes.
        seed: Seed of the private generator; ``None`` means ``0``.
        mode: ``"eval"`` or ``"train"`` (the package's mode policy).
        params: Parameters (or names) to perturb; default all trainable.
        loss_reduction: ``"mean"`` or ``"sum"`` for a loss without a
            ``reduction`` attribute; default read from ``loss_fn.reduction``,
            which it must match where present.
        batch_fn: ``None`` or a callable mapping one batch of ``data`` (as a
            loader yields it, e.g. a dict) to ``(inputs, targets)``; inputs may
            be a tensor, a tuple/list (``model(*inputs)``) or a dict
            (``model(**inputs)``). See :mod:`geoopt_sgd._model`.

    Returns:
        An :class:`~geoopt_sgd.Estimate` (``n_matvec = 0``, ``num_probes`` =
        ``num_samples``).

    Raises:
        TypeError: If ``sigma`` is not a number, ``num_samples`` / ``seed`` not
            an integer, or ``data`` (after ``batch_fn``) is not
            ``(inputs, targets)`` batches.
        ValueError: If ``sigma <= 0``, ``num_samples < 1`` or ``seed < 0``; if
            ``data`` holds no sample (on every rank, under ``torch.distributed``);
            and :class:`~geoopt_sgd._model.FunctionalModel` errors for ``mode``
            and ``params``.
    """
    check_number("sigma", sigma, gt=0)
    check_int("num_samples", num_samples, ge=1)
    check_int("seed", seed, ge=0, allow_none=True)
    fm = FunctionalModel(model, params, mode=mode)
    reduction = detect_reduction(loss_fn, loss_reduction)
    # an empty shard joins the reductions with zeros (raising on one rank alone
    # would leave the others waiting in the first all-reduce)
    data = local_batches(data, batch_fn)
    gen = torch.Generator(device=fm.device).manual_seed(0 if seed is None else seed)
    theta = fm.params
    base = _full_loss(fm, loss_fn, data, reduction, theta)
    samples = []
    for _ in range(num_samples):
        nu = [
            sigma
            * torch.randn(
                p.shape, generator=gen, device=p.device, dtype=torch.float32
            ).to(p.dtype)
            for p in theta
        ]
        if len(nu) and distributed.is_distributed():
            for t in nu:
                distributed.broadcast(t)
        signs = (1.0, -1.0) if antithetic else (1.0,)
        diffs = [
            _full_loss(
                fm,
                loss_fn,
                data,
                reduction,
                [p + s * n for p, n in zip(theta, nu, strict=True)],
            )
            - base
            for s in signs
        ]
        if absolute:
            diffs = [abs(d) for d in diffs]
        samples.append(sum(diffs) / len(diffs))
    mean, se = mean_stderr(torch.tensor(samples, dtype=torch.float64, device="cpu"))
    return Estimate(mean, se, 0, num_samples)
