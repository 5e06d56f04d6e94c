"""The statistics :class:`~geoopt_sgd.NoisyGD` draws its noise from.

A :class:`NoiseSource` is the curvature source of a noise kind (``model``,
``loss_fn``, ``data``) and computes what the samplers of
:mod:`geoopt_sgd.optim.noise` need: the ``M`` mini-batch gradients and, from them,
``Tr C``, ``diag C`` or the top eigenpairs of ``C``; the top eigenpairs of the
curvature, the loss and ``Tr H``; and, every step, the reweighted gradient of
``"sgd_matched"``. Per-sample losses follow :mod:`geoopt_sgd._losses`.

Every random choice (the mini-batch partition, the eigensolver's start vector,
Hutchinson's probes, the reweighting draws) comes from its own stream of
:func:`~geoopt_sgd.optim.noise.make_generator`, indexed below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import _model, distributed
from .._losses import per_sample_losses
from .._model import (
    FunctionalModel,
    detect_reduction,
    local_batches,
    map_inputs,
    to_device,
)
from ..curvature import GGNOperator, HessianOperator, hutchinson_trace, top_eigenpairs
from . import noise as _noise

__all__ = [
    "STREAM_NOISE",
    "STREAM_WEIGHTS",
    "USES_C",
    "USES_CURVATURE",
    "NoiseSource",
    "needs_minibatches",
]

# sub-stream indices for make_generator (per step); ranks offset the last one
STREAM_NOISE, STREAM_PARTITION, STREAM_EIG, STREAM_TRACE, STREAM_WEIGHTS = range(5)

# kinds whose statistics come from M mini-batch gradients (the covariance C)
USES_C = ("isotropic_matched", "diagonal", "sgd_leading")
# kinds whose statistics come from the top-k eigenpairs of the curvature
USES_CURVATURE = (
    "hessian",
    "top_eigvec",
    "geometry_aware",
    "geometry_aware_isotropic",
)


def needs_minibatches(kind: str, magnitude: str) -> bool:
    """Whether ``kind`` refreshes ``Tr C`` (or more) from mini-batch gradients.

    Args:
        kind: A noise kind.
        magnitude: The ``magnitude`` option.

    Returns:
        True for the ``C`` kinds, and for ``"hessian"``/``"top_eigvec"`` matched
        to the SGD magnitude ``Tr C``.
    """
    return kind in USES_C or (kind in ("hessian", "top_eigvec") and magnitude == "sgd")


def _all_finite(tensors: Any) -> bool:
    """Whether every tensor holds only finite values (one reduction each)."""
    for x in tensors:
        if not x.is_floating_point():
            continue
        # a NaN/Inf always makes the sum non-finite; an overflowing finite
        # sum falls through to the exact check
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            return False
    return True


def _nonfinite_error(kind: str, t: int, what: str) -> FloatingPointError:
    return FloatingPointError(
        f"NoisyGD cannot refresh the noise={kind!r} statistics at step {t}: {what} "
        "non-finite, so the noise is undefined. The step was not applied. "
        "Check the loss and the data, or lower the learning rate."
    )


def _index(inputs: Any, idx: Tensor) -> Any:
    return map_inputs(inputs, lambda t: t[idx.to(t.device)])


class NoiseSource:
    """A model, loss and data, and the noise statistics computed from them.

    Costs are added to the ``stats`` dict each method is given (NoisyGD's
    :attr:`~geoopt_sgd.NoisyGD.stats`): ``n_backward``, ``n_hvp`` and the
    clamped-eigenvalue counts.

    Args:
        model: The model; ``params`` must be parameters of it.
        loss_fn: The loss (reduction ``"mean"`` or ``"sum"``).
        data: One ``(inputs, targets)`` batch or an iterable of them (this rank's
            shard under ``torch.distributed``).
        params: The optimizer's parameters, in order.
        mode: ``"eval"`` or ``"train"`` (see :mod:`geoopt_sgd._model`).
        loss_reduction: ``"mean"``, ``"sum"`` or ``None`` (read from ``loss_fn``).
    batch_fn: ``None`` or a callable mapping one batch of ``data`` (as a
            loader yields it, e.g. a dict) to ``(inputs, targets)``; inputs may
            be a tensor, a tuple/list (``model(*inputs)``) or a dict
            (``model(**inputs)``). See :mod:`geoopt_sgd._model`.

    Raises:
        ValueError: If ``params`` are not parameters of ``model``, or ``data`` is
            empty on every process.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        params: list[Tensor],
        *,
        mode: str,
        loss_reduction: str | None,
        batch_fn: Callable[[Any], Any] | None = None,
    ) -> None:
        self.fm = FunctionalModel(model, params, mode=mode)  # type: ignore[arg-type]
        self.model, self.loss_fn, self.data, self.params = model, loss_fn, data, params
        self.mode, self.loss_reduction = mode, loss_reduction
        self.batch_fn = batch_fn
        self.reduction = detect_reduction(loss_fn, loss_reduction)
        # an empty shard on one rank joins every reduction with zeros;
        # data empty on every rank is an error, raised on all of them
        self.batches = list(local_batches(data, batch_fn))
        self.n_local = sum(_model.batch_size(t) for _, t in self.batches)
        self.n_total = self.fm.total_count(self.batches)
        if self.n_total == 0:
            raise ValueError(
                "`data` is empty on every process: the noise needs at least one sample."
            )

    def loss_factor(self) -> float:
        """``1`` for ``L = mean L_i``, ``n`` for ``L = sum L_i``.

        Returns:
            The factor that turns a mean over a batch into the loss's convention.
        """
        return 1.0 if self.reduction == "mean" else float(self.n_total)

    def weighted_gradient(
        self, inputs: Any, targets: Tensor, w: Tensor, stats: dict
    ) -> Tensor:
        """Flat gradient of ``Σ_i w_i L_i`` over one batch (one backward).

        Args:
            inputs: The batch's inputs.
            targets: Its targets ``(b, ...)``.
            w: The weights ``(b,)``.
            stats: Its ``"n_backward"`` is incremented.

        Returns:
            The gradient, shape ``(P,)``; zeros for unused parameters.
        """
        fm = self.fm
        params = [p.detach().requires_grad_(True) for p in fm.params]
        with torch.enable_grad(), fm.policy():
            out = fm(params, inputs)
            losses = per_sample_losses(self.loss_fn, out, targets)
            total = (losses * w.to(losses)).sum()
            grads = torch.autograd.grad(total, params, allow_unused=True)
        stats["n_backward"] += 1
        return torch.cat(
            [
                torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                for g, p in zip(grads, params, strict=True)
            ]
        )

    def minibatch_gradients(
        self,
        generator: torch.Generator,
        batch_size: int,
        num_batches: int | None,
        stats: dict,
    ) -> Tensor:
        """Rows ``g_b`` (M, P): gradients on disjoint random batches of size ``B``.

        Each data batch is partitioned by a permutation from ``generator`` (a
        trailing partial batch is dropped); the rows of all ranks are gathered.

        Args:
            generator: The partition's stream (CPU).
            batch_size: ``B``.
            num_batches: At most this many rows on this rank (``None``: all).
            stats: Its ``"n_backward"`` counts the backward passes.

        Returns:
            ``(M, P)``, the same on every rank.
        """
        fm = self.fm
        B = batch_size
        factor = self.loss_factor()
        rows: list[Tensor] = []
        for inputs, targets in self.batches:
            inputs, targets = (
                to_device(inputs, fm.device),
                to_device(targets, fm.device),
            )
            n = _model.batch_size(targets)
            perm = torch.randperm(n, generator=generator, device=generator.device)
            for c in range(n // B):
                if num_batches is not None and len(rows) >= num_batches:
                    break
                idx = perm[c * B : (c + 1) * B]
                w = torch.full((B,), factor / B, dtype=fm.dtype, device=fm.device)
                rows.append(
                    self.weighted_gradient(_index(inputs, idx), targets[idx], w, stats)
                )
        local = torch.stack(rows) if rows else fm.params[0].new_zeros((0, fm.numel))
        if not distributed.is_distributed():
            return local
        counts = torch.zeros(
            distributed.world_size(), dtype=torch.long, device=fm.device
        )
        counts[distributed.rank()] = local.shape[0]
        distributed.all_reduce_sum(counts)
        start = int(counts[: distributed.rank()].sum())
        full = local.new_zeros((int(counts.sum()), fm.numel))
        full[start : start + local.shape[0]] = local
        return distributed.all_reduce_sum(full)

    def sgd_matched_noise(
        self, generator: torch.Generator, batch_size: int, stats: dict
    ) -> Tensor:
        """``ξ = Σ_i w_i ∇L_i`` with the reweighting weights (Cov = Σ/B).

        One backward pass per data batch; the weights come from
        :func:`~geoopt_sgd.optim.noise.reweighting_weights` of ``n`` normals
        (this rank's from ``generator``), and ``ξ`` is summed over ranks.

        Args:
            generator: This rank's weight stream, on the model's device.
            batch_size: ``B``.
            stats: Its ``"n_backward"`` counts the backward passes.

        Returns:
            ``ξ``, shape ``(P,)``.
        """
        fm = self.fm
        z = _noise.standard_normal(
            self.n_local, generator=generator, dtype=fm.dtype, device=fm.device
        )
        zsum = distributed.all_reduce_sum(z.sum().reshape(1))
        w_all = _noise.reweighting_weights(
            z, batch_size, total=self.n_total, z_mean=zsum[0] / self.n_total
        )
        w_all = w_all * self.loss_factor()
        xi = fm.params[0].new_zeros(fm.numel)
        i = 0
        for inputs, targets in self.batches:
            inputs, targets = (
                to_device(inputs, fm.device),
                to_device(targets, fm.device),
            )
            b = _model.batch_size(targets)
            xi += self.weighted_gradient(inputs, targets, w_all[i : i + b], stats)
            i += b
        return distributed.all_reduce_sum(xi)

    # ------------------------------------------------------------ refresh
    def refresh(
        self,
        kind: str,
        t: int,
        *,
        seed: int,
        magnitude: str,
        batch_size: int | None,
        k: int,
        num_batches: int | None,
        curvature: str,
        tol: float,
        previous: dict[str, Tensor],
        stats: dict,
    ) -> dict[str, Tensor]:
        """Compute the statistics ``kind`` draws from at step ``t``.

        Args:
            kind: The noise kind (one that needs statistics).
            t: The step count (indexes the streams).
            seed: The run's seed.
            magnitude: The ``magnitude`` option.
            batch_size: ``B``.
            k: Number of eigenpairs.
            num_batches: At most this many mini-batch gradients.
            curvature: ``"hessian"`` or ``"ggn"``.
            tol: The eigensolver's relative tolerance.
            previous: The last refresh's statistics (warm start).
            stats: Costs and ``reference_sq_norm`` are written here.

        Returns:
            The statistics, keyed ``"trace_c"``, ``"variance"``, ``"eigenvalues"``,
            ``"eigenvectors"``, ``"guard_vectors"`` (the next refresh's warm
            start), ``"loss"``, ``"trace_h"`` (those ``kind`` needs).

        Raises:
            ValueError: If ``data`` holds fewer than two mini-batches of size ``B``.
            FloatingPointError: If the parameters, the mini-batch gradients or
                the curvature operator's output are non-finite.
        """
        if not _all_finite(self.params):
            raise _nonfinite_error(kind, t, "the parameters are")
        cache: dict[str, Tensor] = {}
        if needs_minibatches(kind, magnitude):
            assert batch_size is not None
            gen = _noise.make_generator(
                seed, t, "cpu", stream=STREAM_PARTITION + distributed.rank()
            )
            G = self.minibatch_gradients(gen, batch_size, num_batches, stats)
            if not _all_finite([G]):
                raise _nonfinite_error(
                    kind, t, "the mini-batch gradients of `loss_fn` on `data` are"
                )
            if G.shape[0] < 2:
                raise ValueError(
                    f"noise={kind!r} estimates C from mini-batches of size "
                    f"batch_size={batch_size}, but `data` holds only {G.shape[0]} "
                    "of them; pass more data or a smaller batch_size."
                )
            _, diag, trace = _noise.minibatch_statistics(G)
            cache["trace_c"] = trace
            if kind == "diagonal":
                cache["variance"] = diag
            if kind == "sgd_leading":
                cache["eigenvalues"], cache["eigenvectors"] = (
                    _noise.minibatch_eigenpairs(G, k)
                )
            stats["reference_sq_norm"] = float(trace)
        if kind in USES_CURVATURE:
            what = f"the {curvature} operator's output (on `data`) is"
            try:
                curv = self._curvature_statistics(
                    kind,
                    t,
                    seed=seed,
                    k=k,
                    curvature=curvature,
                    tol=tol,
                    previous=previous,
                    stats=stats,
                )
            except ValueError as err:
                # the eigensolver rejects a NaN product as a non-finite vector
                if "finite" in str(err):
                    raise _nonfinite_error(kind, t, what) from err
                raise
            if "loss" in curv and not _all_finite([curv["loss"]]):
                raise _nonfinite_error(kind, t, "the loss of `loss_fn` on `data` is")
            if not _all_finite(curv.values()):
                raise _nonfinite_error(kind, t, what)
            cache.update(curv)
            if kind == "geometry_aware_isotropic":
                assert batch_size is not None
                var = _noise.geometry_aware_isotropic_variance(
                    cache, batch_size, self.fm.numel
                )
                stats["reference_sq_norm"] = var * self.fm.numel
        return cache

    def _curvature_statistics(
        self,
        kind: str,
        t: int,
        *,
        seed: int,
        k: int,
        curvature: str,
        tol: float,
        previous: dict[str, Tensor],
        stats: dict,
    ) -> dict[str, Tensor]:
        """Top-``k`` curvature eigenpairs, ``L`` and ``Tr H``, as ``kind`` needs."""
        fm = self.fm
        cls = HessianOperator if curvature == "hessian" else GGNOperator
        op = cls(
            self.model,
            self.loss_fn,
            self.data,
            params=self.params,
            mode=self.mode,
            loss_reduction=self.loss_reduction,
            batch_fn=self.batch_fn,
        )
        cache: dict[str, Tensor] = {}
        k = 1 if kind == "top_eigvec" else min(k, fm.numel)
        # warm start from the last refresh: its eigenvectors and the guards'
        # Ritz vectors (with them a subspace that moved little opens the block
        # start at once; see top_eigenpairs)
        v0 = previous.get("eigenvectors")
        if v0 is not None and v0.shape[1] > k:
            v0 = v0[:, :k]
        guards = previous.get("guard_vectors")
        if v0 is not None and guards is not None and v0.shape[1] == k:
            v0 = torch.cat([v0, guards.to(v0.dtype)], dim=1)
        if kind != "geometry_aware_isotropic":
            # a periodic refresh: no skip check (a swap inside a cluster as
            # tight as tol moves the noise's directions by ~tol)
            res = top_eigenpairs(
                op,
                k,
                tol=tol,
                v0=v0,
                seed=_noise.step_seed(seed, t, STREAM_EIG),
                verify=False,
            )
            lam, n_clamped = _noise.clamp_eigenvalues(res.eigenvalues)
            cache["eigenvalues"] = lam.to(fm.dtype)
            cache["eigenvectors"] = res.eigenvectors.to(fm.dtype)
            if res.next_eigenvectors is not None and res.next_eigenvectors.numel():
                cache["guard_vectors"] = res.next_eigenvectors.to(fm.dtype)
            stats["clamped_negative"] = n_clamped
            stats["clamped_negative_total"] += n_clamped
        if kind in ("geometry_aware", "geometry_aware_isotropic"):
            # scalars are read with float(): kept on the CPU (as load_state_dict does)
            cache["loss"] = torch.tensor(float(op.loss()), dtype=fm.dtype, device="cpu")
        if kind == "geometry_aware_isotropic":
            est = hutchinson_trace(op, seed=_noise.step_seed(seed, t, STREAM_TRACE))
            cache["trace_h"] = torch.tensor(
                float(est.value), dtype=fm.dtype, device="cpu"
            )
        stats["n_hvp"] += int(op.n_matvec)
        op.release()  # free the cached per-batch graphs now
        return cache
