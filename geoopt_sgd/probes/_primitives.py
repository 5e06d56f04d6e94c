"""Streaming primitives for the noise-geometry metrics (SPEC §2.0); no ``P x P`` matrix.

Everything here works on a *probe set*: the batches of one process (a shard of the
probe batch under ``torch.distributed``), held in memory, evaluated through a
:class:`~geoopt_sgd._model.FunctionalModel` under the package's mode policy.

Conventions (SPEC §1):

* Per-sample loss ``L_i``: for :class:`torch.nn.MSELoss` (any reduction) the
  square-loss convention ``L_i = 1/2 ||f(x_i) - y_i||^2`` summed over outputs; for
  any other ``loss_fn`` the value ``loss_fn(f(x_i)[None], y_i[None])`` on a batch of
  one, taken as given (cross-entropy metrics are then the GGN extension).
* ``L = (1/n) sum_i L_i`` over all ``n`` probe samples (all ranks).
* ``G = (1/n) sum_i J_i^T Lambda_i J_i`` with ``Lambda_i`` the Hessian of ``L_i`` with
  respect to the outputs (identity for square loss): the (generalised) Gauss-Newton
  matrix. ``H`` is the Hessian of ``L``.

Costs are counted in :attr:`ProbeSet.cost`: ``n_forward`` (batch forward passes),
``n_backward`` (batch backward passes, a vjp counts one), ``n_jvp`` (tangent
directions pushed forward, each about one forward pass), ``n_hvp`` and
``n_ggnvp`` (operator products), ``n_per_sample_grad`` (samples whose gradient was
materialised).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap

from .. import distributed
from .._model import FunctionalModel
from ..curvature.hvp import math_sdpa
from ..curvature.linop import LinearOperator

__all__ = ["CurvatureOperator", "OutputCurvature", "ProbeSet", "sample_loss_fn"]

SampleLoss = Callable[[Tensor, Tensor], Tensor]


def sample_loss_fn(loss_fn: Callable[..., Tensor]) -> tuple[SampleLoss, bool]:
    """Return the per-sample loss ``(out_i, y_i) -> L_i`` and whether it is square loss.

    Args:
        loss_fn: The user's loss (a module or a function of ``(outputs, targets)``).

    Returns:
        ``(fn, is_square)``: ``fn`` maps one sample's output (without batch
        dimension) and target to a scalar; ``is_square`` is ``True`` for
        :class:`torch.nn.MSELoss`, converted to ``1/2 ||r||^2`` summed over outputs.
    """
    if isinstance(loss_fn, nn.MSELoss):

        def square(out: Tensor, y: Tensor) -> Tensor:
            r = out - y.reshape(out.shape).to(out.dtype)
            return 0.5 * (r * r).sum()

        return square, True

    def generic(out: Tensor, y: Tensor) -> Tensor:
        return loss_fn(out.unsqueeze(0), y.unsqueeze(0)).reshape(())

    return generic, False


def _unsqueeze(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(t.unsqueeze(0) for t in x)
    return x.unsqueeze(0)


def _slice(x: Any, i: int, j: int) -> Any:
    if isinstance(x, tuple):
        return tuple(t[i:j] for t in x)
    return x[i:j]


def _cat_inputs(xs: Sequence[Any]) -> Any:
    if isinstance(xs[0], tuple):
        return tuple(torch.cat([x[t] for x in xs]) for t in range(len(xs[0])))
    return torch.cat(list(xs))


class ProbeSet:
    """The probe batches of this process, with the streaming primitives of SPEC §2.0.

    Args:
        fmodel: The functional model (mode policy, selected parameters).
        loss_fn: The user's loss; see :func:`sample_loss_fn`.
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
        self.sample_loss, self.is_square = sample_loss_fn(loss_fn)
        self.batches = batches
        self.chunk_size = chunk_size
        self.params = [p.detach() for p in fmodel.params]
        self.P = fmodel.numel
        self.dtype, self.device = fmodel.dtype, fmodel.device
        self.sizes = [int(y.shape[0]) for _, y in batches]
        self.n_local = sum(self.sizes)
        counts = torch.zeros(distributed.world_size(), dtype=torch.long)
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
        self.is_softmax_ce = isinstance(loss_fn, nn.CrossEntropyLoss) and (
            loss_fn.weight is None or loss_fn.reduction == "mean"
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
        for s in self.fm.shapes:
            m = s.numel()
            out.append(v[..., i : i + m].reshape(*lead, *s))
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

    def _sample_fn(self, x: Any, y: Tensor) -> Callable[[list[Tensor]], Tensor]:
        def f(params: list[Tensor]) -> Tensor:
            return self.sample_loss(self.fm(params, _unsqueeze(x))[0], y)

        return f

    # --- primitives ---------------------------------------------------------------
    def losses(self) -> Tensor:
        """Per-sample losses of this process, ``(n_local,)`` (one forward per batch)."""
        with torch.no_grad(), self._policy():
            out = [self.loss_and_out(self.params, x, y)[0] for x, y in self.batches]
        self.cost["n_forward"] += len(self.batches)
        return torch.cat(out)

    def output_hessians(self) -> list[OutputCurvature]:
        """Per-batch output curvature ``Lambda_i`` (see :class:`OutputCurvature`).

        Square loss: the identity. Softmax cross-entropy with ``K``-vector
        outputs: the closed form ``diag(p) - p p^T``, never stored. Other losses:
        ``torch.func.hessian`` of the per-sample loss with respect to the outputs,
        stored ``(b, K, K)`` with a PSD square root (negative eigenvalues clipped).
        """
        if self._lam is None:
            lam = []
            with torch.no_grad(), self._policy():
                for x, y in self.batches:
                    out = self.fm(self.params, x)
                    b, K = out.shape[0], out[0].numel()
                    if self.is_square:
                        lam.append(OutputCurvature("identity", K))
                    elif self.is_softmax_ce and out.dim() == 2:
                        lam.append(OutputCurvature("softmax", K, out.softmax(-1)))
                    else:
                        L = vmap(hessian(self.sample_loss))(out, y).reshape(b, K, K)
                        lam.append(OutputCurvature("dense", K, L))
            self.cost["n_forward"] += len(self.batches)
            self._lam = lam
        return self._lam

    def directional(self, V: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample directional derivatives and GGN quadratic forms (primitive 2).

        One ``jvp`` of the per-sample losses and outputs per direction: cost ``q``
        tangent passes for ``V`` of shape ``(P, q)``; nothing of size ``n x P``.

        Args:
            V: Directions, ``(P, q)``.

        Returns:
            ``(A, Q)``, both ``(n_local, q)``: ``A[i, j] = grad L_i . v_j`` and
            ``Q[i, j] = (J_i v_j)^T Lambda_i (J_i v_j)``, so that
            ``v_j^T G v_j = (1/n) sum_i Q[i, j]`` (summed over all processes).
        """
        lam = self.output_hessians()
        tangents = self.unflat(V.T.to(self.dtype))
        A, Q = [], []
        with self._policy():
            for (x, y), L in zip(self.batches, lam, strict=True):

                def push(t: list[Tensor], x: Any = x, y: Tensor = y) -> Any:
                    return jvp(
                        lambda p: self.loss_and_out(p, x, y), (self.params,), (t,)
                    )[1]

                da, dout = vmap(push)(tangents)  # (q, b), (q, b, K)
                A.append(da.T.detach())
                Q.append((dout * L.apply(dout)).sum(-1).T.detach())
        self.cost["n_jvp"] += V.shape[1]
        return torch.cat(A), torch.cat(Q)

    def weighted_gradient(self, c: Tensor) -> Tensor:
        """``grad sum_i c_i L_i`` over all processes (one backward per batch).

        Args:
            c: Weights of this process's samples, ``(n_local,)`` or ``(n_local, s)``
                for ``s`` weightings at once (a vmapped backward).

        Returns:
            ``(P,)`` or ``(s, P)``, summed over processes.
        """
        single = c.dim() == 1
        C = c.reshape(c.shape[0], -1).to(self.dtype)
        out = torch.zeros(C.shape[1], self.P, dtype=self.dtype, device=self.device)
        i = 0
        with self._policy():
            for x, y in self.batches:
                b = int(y.shape[0])
                _, f_vjp = vjp(
                    lambda p, x=x, y=y: self.loss_and_out(p, x, y)[0], self.params
                )
                g = vmap(f_vjp)(C[i : i + b].T.contiguous())[0]
                out += self.flat(g, lead=1).detach()
                i += b
        self.cost["n_backward"] += C.shape[1]
        distributed.all_reduce_sum(out)
        return out[0] if single else out

    def ggn_sample(self, Z: Tensor) -> Tensor:
        """``w = n^{-1/2} sum_i J_i^T Lambda_i^{1/2} z_i`` for each probe (primitive 6).

        ``Cov(w) = G`` when ``z_i ~ N(0, I_K)``. One vjp of the outputs per probe.

        Args:
            Z: Cotangents of this process's samples, ``(s, n_local, K)``.

        Returns:
            ``(s, P)``, summed over processes.
        """
        lam = self.output_hessians()
        out = torch.zeros(Z.shape[0], self.P, dtype=self.dtype, device=self.device)
        i = 0
        with self._policy():
            for (x, y), S in zip(self.batches, lam, strict=True):
                b = int(y.shape[0])
                _, f_vjp = vjp(
                    lambda p, x=x, y=y: self.loss_and_out(p, x, y)[1], self.params
                )
                ct = S.factor_t(Z[:, i : i + b].to(self.dtype))
                g = vmap(f_vjp)(ct.contiguous())[0]
                out += self.flat(g, lead=1).detach()
                i += b
        self.cost["n_backward"] += Z.shape[0]
        distributed.all_reduce_sum(out)
        return out / self.n**0.5

    def ggn_matmat(self, V: Tensor) -> Tensor:
        """``G V`` for ``V`` ``(P, q)``: one jvp and one vjp per column."""
        lam = self.output_hessians()
        tangents = self.unflat(V.T.to(self.dtype))
        out = torch.zeros(V.shape[1], self.P, dtype=self.dtype, device=self.device)
        with self._policy():
            for (x, y), L in zip(self.batches, lam, strict=True):

                def outs(p: list[Tensor], x: Any = x, y: Tensor = y) -> Tensor:
                    return self.loss_and_out(p, x, y)[1]

                _, f_vjp = vjp(outs, self.params)

                def push(t: list[Tensor], outs: Callable = outs) -> Tensor:
                    return jvp(outs, (self.params,), (t,))[1]

                du = vmap(push)(tangents)  # (q, b, K)
                ct = L.apply(du)
                out += self.flat(vmap(f_vjp)(ct.contiguous())[0], lead=1).detach()
        self.cost["n_ggnvp"] += V.shape[1]
        distributed.all_reduce_sum(out)
        return (out / self.n).T

    def hess_matmat(self, V: Tensor) -> Tensor:
        """``H V`` for ``V`` ``(P, q)``, reverse-over-reverse (2-3 backwards each)."""
        tangents = self.unflat(V.T.to(self.dtype))
        out = torch.zeros(V.shape[1], self.P, dtype=self.dtype, device=self.device)
        with self._policy():
            for x, y in self.batches:

                def total(p: list[Tensor], x: Any = x, y: Tensor = y) -> Tensor:
                    return self.loss_and_out(p, x, y)[0].sum()

                _, f_vjp = vjp(grad(total), self.params)
                out += self.flat(vmap(f_vjp)(tangents)[0], lead=1).detach()
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
                if self.fm.mode == "train":
                    b = int(y.shape[0])
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
                            in_dims=(None, 0, 0),
                        )(self.params, xc, yc),
                        x,
                        y,
                        self.chunk_size,
                        lambda g: self.flat(g, lead=2),
                    )
                    b = J.shape[0]
                rows.append(S.factor(J.detach()))
                del b
        self.cost["n_backward"] += self.n_local
        return torch.cat(rows)


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
    BatchNorm's batch statistics couple the samples exactly as in the batch loss.

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
        if fm.mode == "train":

            def lv(p: list[Tensor]) -> Tensor:
                return vmap(sample_loss)(fm(p, x), y)

            return flat(jacrev(lv, chunk_size=chunk_size)(params), 1).detach()

        def single(p: list[Tensor], xi: Any, yi: Tensor) -> Tensor:
            return sample_loss(fm(p, _unsqueeze(xi))[0], yi)

        g_fn = vmap(grad(single), in_dims=(None, 0, 0))
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
        kind: ``"identity"``, ``"softmax"`` (``Lambda = diag(p) - p p^T``, ``A =
            diag(sqrt p) - sqrt(p) p^T``) or ``"dense"`` (symmetric PSD root).
        K: Outputs per sample.
        data: ``None``, the probabilities ``(b, K)``, or ``Lambda`` ``(b, K, K)``.
    """

    def __init__(self, kind: str, K: int, data: Tensor | None = None) -> None:
        self.kind, self.K, self.data = kind, K, data
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
            return U
        if self.kind == "softmax":
            p = self.data
            return p * U - p * (U * p).sum(-1, keepdim=True)
        return torch.einsum("bkl,...bl->...bk", self.data, U)

    def factor_t(self, Z: Tensor) -> Tensor:
        """``A_i^T z`` for ``Z`` ``(..., b, K)``."""
        if self.kind == "identity":
            return Z
        if self.kind == "softmax":
            p, s = self.data, self.sqrt_p
            return s * Z - p * (Z * s).sum(-1, keepdim=True)
        return torch.einsum("blk,...bl->...bk", self.root, Z)

    def factor(self, J: Tensor) -> Tensor:
        """``A_i J_i`` for ``J`` ``(b, K, P)``."""
        if self.kind == "identity":
            return J
        if self.kind == "softmax":
            p, s = self.data, self.sqrt_p
            return s.unsqueeze(-1) * J - s.unsqueeze(-1) * (p.unsqueeze(-1) * J).sum(
                1, keepdim=True
            )
        return torch.einsum("bkl,blp->bkp", self.root, J)
