"""Streaming primitives for the noise-geometry metrics; no ``P x P`` matrix.

Everything here works on a *probe set*: the batches of one process (a shard of the
probe batch under ``torch.distributed``), held in memory, evaluated through a
:class:`~geoopt_sgd._model.FunctionalModel` under the package's mode policy.

Conventions (``docs/science/conventions.md``):

* Per-sample loss ``L_i = loss_fn(f(x_i)[None], y_i[None])``, the user's loss on a
  batch of one, exactly as passed (:mod:`geoopt_sgd._losses`): ``nn.MSELoss()``
  gives ``(1/K) ||f(x_i) - y_i||^2``, :class:`~geoopt_sgd.HalfSquaredError` the
  papers' ``1/2 ||f(x_i) - y_i||^2``.
* ``L = (1/n) sum_i L_i`` over all ``n`` probe samples (all ranks).
* ``G = (1/n) sum_i J_i^T Lambda_i J_i`` with ``Lambda_i`` the Hessian of ``L_i`` with
  respect to the outputs (``c I`` for a square loss, see
  :func:`~geoopt_sgd._losses.square_loss_scale`): the (generalised) Gauss-Newton
  matrix. ``H`` is the Hessian of ``L``; its products are those of the curvature
  package (:func:`~geoopt_sgd.curvature.hvp.make_hvp`, reverse-over-reverse).

Costs are counted in :attr:`ProbeSet.cost`: ``n_forward`` (batch forward passes),
``n_backward`` (batch backward passes, a vjp counts one), ``n_jvp`` (tangent
directions pushed forward, each about one forward pass), ``n_hvp`` and
``n_ggnvp`` (operator products), ``n_per_sample_grad`` (samples whose gradient was
materialised).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap

from .. import distributed
from .._linalg import CHUNK, row_gram64
from .._losses import (
    SampleLoss,
    check_per_sample_batches,
    per_sample_loss,
    plain_loss,
    square_loss_scale,
)
from .._model import FunctionalModel, map_inputs, sample_dims
from ..curvature.hvp import make_hvp, math_sdpa
from ..curvature.linop import LinearOperator

__all__ = [
    "CurvatureOperator",
    "OutputCurvature",
    "OutputTangents",
    "ProbeSet",
    "per_sample_loss_gradients",
]


def _unsqueeze(x: Any) -> Any:
    return map_inputs(x, lambda t: t.unsqueeze(0))


def _slice(x: Any, i: int, j: int) -> Any:
    return map_inputs(x, lambda t: t[i:j])


class ProbeSet:
    """The probe batches of this process, with the streaming primitives of the metrics.

    Args:
        fmodel: The functional model (mode policy, selected parameters).
        loss_fn: The user's loss, measured as passed (module docstring).
        batches: ``(inputs, targets)`` batches held by this process. In train mode
            each batch is one forward unit (its BatchNorm statistics); in eval mode
            samples are independent.
        chunk_size: Samples per ``vmap`` chunk when per-sample gradients or
            Jacobians are materialised (``None``: a whole batch at once).

    Attributes:
        n_local: Samples on this process.
        n: Samples over all processes.
        offset: Global index of this process's first sample.
        cost: Counters, see the module docstring.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        loss_fn: Callable[..., Tensor],
        batches: list[tuple[Any, Tensor]],
        *,
        chunk_size: int | None = None,
    ) -> None:
        self.fm = fmodel
        self.loss_fn = loss_fn
        check_per_sample_batches(loss_fn, batches, device=fmodel.device)
        self.sample_loss = per_sample_loss(loss_fn)
        self.batches = batches
        self.chunk_size = chunk_size
        self.params = [p.detach() for p in fmodel.params]
        self.P = fmodel.numel
        self.dtype, self.device = fmodel.dtype, fmodel.device
        self.sizes = [int(y.shape[0]) for _, y in batches]
        self.n_local = sum(self.sizes)
        counts = torch.zeros(distributed.world_size(), dtype=torch.long, device="cpu")
        counts[distributed.rank()] = self.n_local
        counts = distributed.all_reduce_sum(counts.to(self.device)).cpu()
        self.n = int(counts.sum())
        self.offset = int(counts[: distributed.rank()].sum())
        self.cost: dict[str, float] = {
            "n_forward": 0,
            "n_backward": 0,
            "n_jvp": 0,
            "n_hvp": 0,
            "n_ggnvp": 0,
            "n_per_sample_grad": 0,
        }
        self._lam: list[OutputCurvature] | None = None
        self._gout: list[Tensor] | None = None
        self._graphs: list[tuple[Tensor, Callable[[Tensor], Any]]] | None = None
        self._outs: list[Tensor] | None = None
        self._record: _Record | None = None
        self._keep: _Record | None = None
        self.span_residual = math.nan
        # diag(p) - p p^T is the output Hessian of an unweighted CE whose target
        # weights sum to 1 (class indices, label smoothing); class weights or
        # probability targets take the dense route
        self.is_softmax_ce = (
            plain_loss(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None
        )

    @contextlib.contextmanager
    def _policy(self) -> Iterator[None]:
        # the mode policy, and SDPA's math backend: the fused attention kernels
        # have no forward-mode AD (jvp) and no double backward (timm ViTs)
        with self.fm.policy(), math_sdpa():
            yield

    # --- flat <-> per-parameter ------------------------------------------------
    def unflat(self, v: Tensor) -> list[Tensor]:
        """Split a flat ``(P,)`` (or ``(q, P)``) tensor into per-parameter tensors."""
        out, i = [], 0
        lead = v.shape[:-1]
        for s, dtype in zip(self.fm.shapes, self.fm.dtypes, strict=True):
            m = s.numel()
            out.append(v[..., i : i + m].reshape(*lead, *s).to(dtype))
            i += m
        return out

    def flat(self, ts: Sequence[Tensor], lead: int = 0) -> Tensor:
        """Concatenate per-parameter tensors flat (``lead`` batch dims)."""
        return torch.cat([t.reshape(*t.shape[:lead], -1) for t in ts], dim=-1)

    # --- functions of the parameters --------------------------------------------
    def loss_and_out(
        self, params: Sequence[Tensor], x: Any, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-sample losses ``(b,)`` and flattened outputs ``(b, K)`` of one batch."""
        out = self.fm(params, x)
        losses = vmap(self.sample_loss)(out, y)
        return losses, out.reshape(out.shape[0], -1)

    # --- primitives ---------------------------------------------------------------
    def keep_graph(self) -> None:
        """Run the forward pass once and keep its graph for every later product.

        One forward per batch, with the autograd graph of the outputs kept until
        :meth:`release`: each :meth:`weighted_gradient` and :meth:`ggn_matmat`
        is then a backward through it (and a ``jvp``), with no forward of its
        own. On a timm resnet18 (CPU, 128 samples) that took a GGN-vector
        product from 1.9 to 1.4 gradients of the batch. Memory: the
        activations of the probe set, as in one training step on it.
        :meth:`losses`, :meth:`output_hessians` and :meth:`output_gradients`
        are read off the same outputs.
        """
        if self._graphs is not None:
            return
        graphs = []
        with torch.enable_grad(), self._policy():
            for x, _ in self.batches:
                out, f_vjp = vjp(lambda p, x=x: self.fm(p, x), self.params)
                graphs.append((out.detach(), f_vjp))
        self.cost["n_forward"] += len(self.batches)
        self._graphs = graphs

    def _outputs(self) -> list[Tensor]:
        """Each batch's outputs (no graph): the kept ones, else a forward pass."""
        if self._graphs is not None:
            return [out for out, _ in self._graphs]
        if self._outs is None:
            with torch.no_grad(), self._policy():
                self._outs = [self.fm(self.params, x).detach() for x, _ in self.batches]
            self.cost["n_forward"] += len(self.batches)
        return self._outs

    def losses(self) -> Tensor:
        """Per-sample losses of this process, ``(n_local,)``.

        Read off the kept forward pass (:meth:`keep_graph`), else one forward per
        batch.
        """
        with torch.no_grad():
            out = [
                vmap(self.sample_loss)(o, y)
                for o, (_, y) in zip(self._outputs(), self.batches, strict=True)
            ]
        return (
            torch.cat(out)
            if out
            else torch.zeros(0, dtype=self.dtype, device=self.device)
        )

    def output_hessians(self) -> list[OutputCurvature]:
        """Per-batch output curvature ``Lambda_i`` (see :class:`OutputCurvature`).

        Square loss (:func:`~geoopt_sgd._losses.square_loss_scale`): ``c I``,
        never stored. Softmax cross-entropy with ``K``-vector outputs: the
        closed form ``diag(p) - p p^T``, never stored. Other losses:
        ``torch.func.hessian`` of the per-sample loss with respect to the outputs,
        stored ``(b, K, K)`` with a PSD square root (negative eigenvalues clipped).
        The same outputs give :meth:`output_gradients`.
        """
        if self._lam is None:
            lam, gout = [], []
            with torch.no_grad():
                for out, (_, y) in zip(self._outputs(), self.batches, strict=True):
                    b, K = out.shape[0], out[0].numel()
                    gout.append(vmap(grad(self.sample_loss))(out, y).reshape(b, K))
                    scale = square_loss_scale(self.loss_fn, K)
                    if scale is not None:
                        lam.append(OutputCurvature("identity", K, scale=scale))
                    elif (
                        self.is_softmax_ce
                        and out.dim() == 2
                        and not y.is_floating_point()
                    ):
                        lam.append(OutputCurvature("softmax", K, out.softmax(-1)))
                    else:
                        L = vmap(hessian(self.sample_loss))(out, y).reshape(b, K, K)
                        lam.append(OutputCurvature("dense", K, L))
            self._lam, self._gout = lam, gout
        return self._lam

    def output_gradients(self) -> Tensor:
        """``d L_i / d f_i`` of this process's samples, ``(n_local, K)``.

        Every per-sample loss depends on the parameters only through its own
        outputs (``L_i = loss(f_i, y_i)``, also in train mode, where ``f_i``
        depends on the whole batch), so ``grad L_i . v = (d L_i / d f_i) . J_i v``.
        """
        self.output_hessians()
        assert self._gout is not None
        return (
            torch.cat(self._gout)
            if self._gout
            else torch.zeros(0, 1, dtype=self.dtype, device=self.device)
        )

    def _push(self, x: Any, tangents: list[Tensor]) -> Tensor:
        """Output tangents ``J v`` of one batch ``(q, b, K)`` for ``(q, ...)`` tangents.

        One plain ``jvp`` for a single direction (the eigensolver's case: a
        vmapped one cost more there), vmapped otherwise.
        """

        def outs(p: list[Tensor]) -> Tensor:
            out = self.fm(p, x)
            return out.reshape(out.shape[0], -1)

        with self._policy():
            if tangents[0].shape[0] == 1:
                t = [v[0] for v in tangents]
                return jvp(outs, (self.params,), (t,))[1].detach().unsqueeze(0)

            def push(t: list[Tensor]) -> Tensor:
                return jvp(outs, (self.params,), (t,))[1]

            return vmap(push)(tangents).detach()

    def tangents(self, V: Tensor) -> OutputTangents:
        """Per-sample output tangents ``J_i v`` along the columns of ``V``.

        One ``jvp`` of the outputs per direction (``q`` tangent passes for ``V``
        of shape ``(P, q)``, vmapped); nothing of size ``n x P``.

        Args:
            V: Directions, ``(P, q)``.

        Returns:
            The :class:`OutputTangents` of this process's samples.
        """
        lam = self.output_hessians()
        tangents = self.unflat(V.T.to(self.dtype))
        T, LT = [], []
        for (x, _), L in zip(self.batches, lam, strict=True):
            du = self._push(x, tangents)  # (q, b, K)
            T.append(du.permute(1, 2, 0))
            LT.append(L.apply(du).permute(1, 2, 0))
        self.cost["n_jvp"] += V.shape[1]
        return self._wrap_tangents(T, LT, V.shape[1])

    def _wrap_tangents(
        self, T: list[Tensor], LT: list[Tensor], q: int
    ) -> OutputTangents:
        K = self.output_hessians()[0].K if self.batches else 1
        if not T:
            empty = torch.zeros(0, K, q, dtype=self.dtype, device=self.device)
            return OutputTangents(empty, empty.clone(), self)
        return OutputTangents(torch.cat(T), torch.cat(LT), self)

    def _output_vjp(self, ct: list[Tensor], q: int) -> Tensor:
        """``sum_i J_i^T c_i`` for per-batch cotangents ``(q, b, K)``: ``(q, P)``.

        One backward per cotangent through the kept graph (:meth:`keep_graph`,
        built here if needed); not reduced over processes (zeros on a process
        without samples).
        """
        self.keep_graph()
        assert self._graphs is not None
        out = torch.zeros(q, self.P, dtype=self.dtype, device=self.device)
        for (o, f_vjp), c in zip(self._graphs, ct, strict=True):
            out += _backward(f_vjp, c.reshape(q, *o.shape).to(o.dtype))
        return out

    def weighted_gradient(self, c: Tensor) -> Tensor:
        """``grad sum_i c_i L_i`` over all processes (one backward per weighting).

        ``L_i`` depends on the parameters only through ``f_i``, so this is
        ``sum_i J_i^T (c_i dL_i/df_i)``: a backward through the kept outputs'
        graph with no forward pass.

        Args:
            c: Weights of this process's samples, ``(n_local,)`` or ``(n_local, s)``
                for ``s`` weightings (``s`` backward passes).

        Returns:
            ``(P,)`` or ``(s, P)``, summed over processes.
        """
        single = c.dim() == 1
        C = (c.unsqueeze(1) if c.dim() == 1 else c).to(self.dtype)
        self.output_hessians()
        assert self._gout is not None
        ct, i = [], 0
        for g in self._gout:
            b = g.shape[0]
            ct.append(C[i : i + b].T.unsqueeze(-1) * g.to(self.dtype))  # (s, b, K)
            i += b
        out = self._output_vjp(ct, C.shape[1])
        self.cost["n_backward"] += C.shape[1]
        distributed.all_reduce_sum(out)
        return out[0] if single else out

    def release(self) -> None:
        """Drop the kept forward graph and any recorded products."""
        self._graphs = self._outs = None
        self._record = self._keep = None

    def ggn_matmat(self, V: Tensor) -> Tensor:
        """``G V`` for ``V`` ``(P, q)``: one jvp and one backward per column.

        The backward goes through the kept forward graph (:meth:`keep_graph`).
        While :meth:`recording`, the columns and their output tangents ``J_i v``
        (a by-product of the jvp) are kept for :meth:`span_tangents`. The same
        matrix as :class:`~geoopt_sgd.GGNOperator` by another route: the
        operator gets ``J v`` by the double-vjp trick on a graph of its own and
        ``Lambda`` by autograd; here ``J v`` is kept and ``Lambda`` has closed
        forms (:class:`OutputCurvature`).
        """
        lam = self.output_hessians()
        q = V.shape[1]
        tangents = self.unflat(V.T.to(self.dtype))
        rec = self._record
        T, LT, CT = [], [], []
        for (x, _), L in zip(self.batches, lam, strict=True):
            du = self._push(x, tangents)  # (q, b, K)
            ct = L.apply(du)
            CT.append(ct)
            if rec is not None:
                T.append(du.permute(1, 2, 0))
                LT.append(ct.permute(1, 2, 0))
        out = self._output_vjp(CT, q)
        self.cost["n_ggnvp"] += q
        if rec is not None:
            rec.add(V, self._wrap_tangents(T, LT, q))
        distributed.all_reduce_sum(out)
        return (out / self.n).T

    @contextlib.contextmanager
    def recording(self, max_vectors: int) -> Iterator[None]:
        """Keep the GGN products' inputs and output tangents for :meth:`span_tangents`.

        At most ``max_vectors`` of them (memory ``max_vectors x P``); more products
        stop the recording.
        """
        self._record = _Record(max_vectors)
        try:
            yield
        finally:
            self._keep, self._record = self._record, None

    def span_tangents(self, U: Tensor) -> OutputTangents | None:
        """Output tangents ``J_i u`` of vectors in the span of the recorded products.

        Lanczos' Ritz vectors are combinations of the vectors it multiplied, so
        their tangents are the same combinations of the recorded ``J_i v``: a
        least-squares fit ``U = X C`` (Gram matrix in float64) and no jvp.
        Cost: about ``(m + k)^2 P`` flops for ``m`` recorded vectors, no copy of
        them.

        Args:
            U: ``(P, k)``, e.g. the eigenvectors.

        Returns:
            The tangents, or ``None`` when nothing usable was recorded or the fit's
            relative residual ``||U - X C||_F / ||U||_F`` exceeds ``1000 eps``
            (then compute them with :meth:`tangents`).
        """
        rec = self._keep
        self._keep = None
        if rec is None or rec.overflow or not rec.X:
            return None
        rows = rec.X + [U.T.to(self.dtype).contiguous()]
        m = sum(r.shape[0] for r in rec.X)
        gram = row_gram64(rows)  # float64 (m + k, m + k)
        e, Q = torch.linalg.eigh(gram[:m, :m])
        keep = e > e.max() * 1e-12
        C = (Q[:, keep] / e[keep]) @ (Q[:, keep].T @ gram[:m, m:])  # (m, k)
        r2 = _residual2(rec.X, rows[-1], C.T.to(self.dtype))
        u2 = float(torch.diagonal(gram[m:, m:]).sum())
        rec.X = []
        self.span_residual = math.sqrt(r2 / max(u2, 1e-300))
        if not self.span_residual <= 1e3 * torch.finfo(self.dtype).eps:
            return None
        return rec.tangents().combine(C)

    def hess_matmat(self, V: Tensor) -> Tensor:
        """``H V`` for ``V`` ``(P, q)``, reverse-over-reverse (2-3 backwards each).

        Per batch, :func:`~geoopt_sgd.curvature.hvp.make_hvp` of the summed
        per-sample losses (route ``"rev_rev"``, the ``q`` columns vectorised).
        """
        tangents = self.unflat(V.T.to(self.dtype))
        out = torch.zeros(V.shape[1], self.P, dtype=self.dtype, device=self.device)
        with self._policy():
            for x, y in self.batches:

                def total(p: list[Tensor], x: Any = x, y: Tensor = y) -> Tensor:
                    return self.loss_and_out(p, x, y)[0].sum()

                hvp = make_hvp(total, self.params, method="rev_rev", batched=True)
                out += self.flat(hvp(tangents), lead=1)
        self.cost["n_hvp"] += V.shape[1]
        distributed.all_reduce_sum(out)
        return (out / self.n).T

    # --- materialised per-sample quantities (exact route) ------------------------
    def per_sample_rows(self) -> Tensor:
        """Per-sample loss gradients of this process, ``(n_local, P)``."""
        rows = [
            per_sample_loss_gradients(
                self.fm, self.sample_loss, x, y, chunk_size=self.chunk_size
            )
            for x, y in self.batches
        ]
        self.cost["n_per_sample_grad"] += self.n_local
        return torch.cat(rows)

    def jacobian_rows(self) -> Tensor:
        """``M_i = Lambda_i^{1/2} J_i`` for local samples, ``(n_local, K, P)``."""
        lam = self.output_hessians()
        rows = []
        with self._policy():
            for (x, y), S in zip(self.batches, lam, strict=True):
                if self.fm.batch_coupled:
                    J = jacrev(
                        lambda p, x=x, y=y: self.loss_and_out(p, x, y)[1],
                        chunk_size=self.chunk_size,
                    )(self.params)
                    # rows of the batch Jacobian: (b, K, P)
                    J = self.flat(J, lead=2)
                else:
                    J = _chunked(
                        lambda xc, yc: vmap(
                            jacrev(
                                lambda p, xi, yi: self.fm(p, _unsqueeze(xi))[0].reshape(
                                    -1
                                )
                            ),
                            in_dims=(None, sample_dims(x), 0),  # noqa: B023 - used at once
                        )(self.params, xc, yc),
                        x,
                        y,
                        self.chunk_size,
                        lambda g: self.flat(g, lead=2),
                    )
                rows.append(S.factor(J.detach()))
        self.cost["n_backward"] += self.n_local
        return torch.cat(rows)


def _residual2(X: Sequence[Tensor], Ut: Tensor, Ct: Tensor) -> float:
    """``||Ut - Ct X||_F^2`` for row blocks ``X`` ``(m, P)``, chunked, float64 sum."""
    total = 0.0
    for s in range(0, Ut.shape[1], CHUNK):
        Xs = torch.cat([r[:, s : s + CHUNK] for r in X], 0)
        R = Ut[:, s : s + CHUNK] - Ct @ Xs
        total += float((R.double() ** 2).sum())
    return total


def _backward(f_vjp: Callable[[Tensor], Any], ct: Tensor) -> Tensor:
    """Flat ``(q, P)`` vjps of the cotangents ``ct[j]``, one backward each.

    One plain backward per cotangent through the same graph: on CPU a loop of 8
    cost 7.1 gradients of the batch and a vmapped backward 9.3 (timm resnet18).
    """
    rows = []
    for c in ct:
        g = f_vjp(c.contiguous())[0]
        rows.append(torch.cat([t.reshape(-1) for t in g]).detach())
    return torch.stack(rows)


def _chunked(
    fn: Callable[[Any, Tensor], Any],
    x: Any,
    y: Tensor,
    chunk_size: int | None,
    to_flat: Callable[[Any], Tensor],
) -> Tensor:
    b = int(y.shape[0])
    c = b if chunk_size is None else max(1, min(chunk_size, b))
    parts = []
    for i in range(0, b, c):
        parts.append(to_flat(fn(_slice(x, i, i + c), y[i : i + c])).detach())
    return torch.cat(parts)


def per_sample_loss_gradients(
    fm: FunctionalModel,
    sample_loss: SampleLoss,
    x: Any,
    y: Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Rows ``grad L_i`` of one batch, ``(b, P)``, under ``fm``'s mode policy.

    Eval mode: ``vmap(grad)`` over single samples, ``chunk_size`` at a time (memory
    ``chunk_size x`` one sample's backward). Train mode: the rows of the Jacobian of
    the batch's per-sample-loss vector (``jacrev`` with ``chunk_size``), so that
    BatchNorm's batch statistics couple the samples exactly as in the batch loss;
    also in eval mode when a BatchNorm keeps no running statistics
    (:attr:`~geoopt_sgd._model.FunctionalModel.batch_coupled`).

    Args:
        fm: The functional model.
        sample_loss: ``(out_i, y_i) -> L_i``.
        x: Inputs of the batch.
        y: Targets of the batch.
        chunk_size: Samples per vmapped chunk (``None``: all at once).

    Returns:
        ``(b, P)`` tensor in the parameters' dtype and device.
    """
    params = [p.detach() for p in fm.params]

    def flat(g: Sequence[Tensor], lead: int) -> Tensor:
        return torch.cat([t.reshape(*t.shape[:lead], -1) for t in g], dim=-1)

    with fm.policy(), math_sdpa():
        if fm.batch_coupled:

            def lv(p: list[Tensor]) -> Tensor:
                return vmap(sample_loss)(fm(p, x), y)

            return flat(jacrev(lv, chunk_size=chunk_size)(params), 1).detach()

        def single(p: list[Tensor], xi: Any, yi: Tensor) -> Tensor:
            return sample_loss(fm(p, _unsqueeze(xi))[0], yi)

        g_fn = vmap(grad(single), in_dims=(None, sample_dims(x), 0))
        return _chunked(
            lambda xc, yc: g_fn(params, xc, yc), x, y, chunk_size, lambda g: flat(g, 1)
        )


class CurvatureOperator(LinearOperator):
    """The probe set's Hessian or GGN (this module's convention) as an operator.

    Args:
        probe: The probe set.
        kind: ``"hessian"`` or ``"ggn"``.
    """

    def __init__(self, probe: ProbeSet, kind: str) -> None:
        super().__init__(probe.P, probe.dtype, probe.device, probe.fm.shapes)
        self.probe = probe
        self.kind = kind

    def _matmat(self, V: Tensor) -> Tensor:
        if self.kind == "hessian":
            return self.probe.hess_matmat(V)
        return self.probe.ggn_matmat(V)


class OutputCurvature:
    """The Hessians ``Lambda_i`` of the per-sample losses w.r.t. the outputs, one batch.

    Applied, never inverted; ``factor`` is any ``A_i`` with ``A_i^T A_i =
    Lambda_i``, enough for ``G = (1/n) sum J_i^T A_i^T A_i J_i`` and its Gram
    blocks. Memory: nothing (identity), ``(b, K)`` (softmax) or ``(b, K, K)``
    (dense).

    Args:
        kind: ``"identity"`` (``Lambda = scale I``, ``A = sqrt(scale) I``),
            ``"softmax"`` (``Lambda = diag(p) - p p^T``, ``A = diag(sqrt p) -
            sqrt(p) p^T``) or ``"dense"`` (symmetric PSD root).
        K: Outputs per sample.
        data: ``None``, the probabilities ``(b, K)``, or ``Lambda`` ``(b, K, K)``.
        scale: The multiple of the identity (``"identity"`` only).
    """

    def __init__(
        self, kind: str, K: int, data: Tensor | None = None, scale: float = 1.0
    ) -> None:
        self.kind, self.K, self.data, self.scale = kind, K, data, scale
        if kind == "dense":
            assert data is not None
            L = 0.5 * (data + data.transpose(1, 2))
            e, Q = torch.linalg.eigh(L)
            self.data = L
            self.root = (Q * e.clamp_min(0).sqrt().unsqueeze(1)) @ Q.transpose(1, 2)
        elif kind == "softmax":
            assert data is not None
            self.sqrt_p = data.sqrt()

    def apply(self, U: Tensor) -> Tensor:
        """``Lambda_i u`` for ``U`` ``(..., b, K)``."""
        if self.kind == "identity":
            return U if self.scale == 1.0 else self.scale * U
        if self.kind == "softmax":
            p = self.data
            return p * U - p * (U * p).sum(-1, keepdim=True)
        return torch.einsum("bkl,...bl->...bk", self.data, U)

    def factor(self, J: Tensor) -> Tensor:
        """``A_i J_i`` for ``J`` ``(b, K, P)``."""
        if self.kind == "identity":
            return J if self.scale == 1.0 else math.sqrt(self.scale) * J
        if self.kind == "softmax":
            p, s = self.data, self.sqrt_p
            return s.unsqueeze(-1) * J - s.unsqueeze(-1) * (p.unsqueeze(-1) * J).sum(
                1, keepdim=True
            )
        return torch.einsum("bkl,blp->bkp", self.root, J)


class OutputTangents:
    """Per-sample output tangents ``J_i v`` along ``q`` directions, with ``Lambda_i``.

    Everything the metrics need along a direction follows from these ``(n, K)``
    numbers, with no ``P``-sized data: ``grad L_i . v = (dL_i/df_i) . J_i v``
    (:meth:`loss`), ``v^T G w = (1/n) sum_i (J_i v)^T Lambda_i J_i w``
    (:meth:`ggn_forms`). Linear in the directions (:meth:`combine`).

    Args:
        T: ``(n_local, K, q)`` tangents ``J_i v_j``.
        LT: ``(n_local, K, q)``, ``Lambda_i J_i v_j``.
        probe: The :class:`ProbeSet` (output gradients, sample counts).
    """

    def __init__(self, T: Tensor, LT: Tensor, probe: ProbeSet) -> None:
        self.T, self.LT, self.probe = T, LT, probe

    @property
    def q(self) -> int:
        """Number of directions."""
        return int(self.T.shape[2])

    def loss(self) -> Tensor:
        """``grad L_i . v_j``, ``(n_local, q)``."""
        g = self.probe.output_gradients().to(self.T)
        return torch.einsum("nk,nkq->nq", g, self.T)

    def ggn_quad(self) -> Tensor:
        """``(J_i v_j)^T Lambda_i (J_i v_j)``, ``(n_local, q)``."""
        return (self.T * self.LT).sum(1)

    def ggn_forms(self, other: OutputTangents) -> Tensor:
        """Per-sample ``(J_i v_a)^T Lambda_i (J_i w_b)``, ``(n_local, q, q')``."""
        return torch.einsum("nka,nkb->nab", self.T, other.LT)

    def combine(self, C: Tensor) -> OutputTangents:
        """Tangents of the directions ``V C`` for ``C`` ``(q, q')``."""
        C = C.to(self.T)
        return OutputTangents(self.T @ C, self.LT @ C, self.probe)

    def cat(self, other: OutputTangents) -> OutputTangents:
        """Directions of ``self`` then ``other``."""
        return OutputTangents(
            torch.cat([self.T, other.T], 2),
            torch.cat([self.LT, other.LT], 2),
            self.probe,
        )

    def select(self, cols: slice) -> OutputTangents:
        """A subset of the directions."""
        return OutputTangents(self.T[..., cols], self.LT[..., cols], self.probe)


class _Record:
    """GGN products' inputs and output tangents, kept while Lanczos runs."""

    def __init__(self, max_vectors: int) -> None:
        self.max_vectors = max_vectors
        self.X: list[Tensor] = []
        self.parts: list[OutputTangents] = []
        self.count = 0
        self.overflow = False

    def add(self, V: Tensor, t: OutputTangents) -> None:
        if self.overflow:
            return
        self.count += V.shape[1]
        if self.count > self.max_vectors:
            self.overflow = True
            self.X, self.parts = [], []
            return
        self.X.append(V.detach().T.contiguous())  # rows (q, P)
        self.parts.append(t)

    def tangents(self) -> OutputTangents:
        out = self.parts[0]
        for t in self.parts[1:]:
            out = out.cat(t)
        return out
