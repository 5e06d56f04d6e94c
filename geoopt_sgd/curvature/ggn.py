"""The generalised Gauss-Newton matrix of the full-data loss as a linear operator."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._model import scalar_loss
from .hvp import BatchTerm, DataOperator

__all__ = ["GGNOperator"]


class _GGNTerm(BatchTerm):
    """``J^T Lambda J`` for one batch, from graphs built once and reused.

    ``J v`` comes from the double-vjp trick: ``u -> J^T u`` is linear in ``u``,
    so the vjp of that map along ``v`` is ``J v``. This needs no forward-mode AD,
    and the graph serves every column of every product.
    """

    needs_context = False  # products are backward passes through kept graphs

    def __init__(self, op: GGNOperator, x: Any, y: Tensor) -> None:
        self.leaves = [
            p.detach().clone().requires_grad_(True) for p in op.fmodel.params
        ]
        out = op.fmodel(self.leaves, x)
        self.out = out
        o = out.detach().requires_grad_(True)
        self.o = o
        loss = scalar_loss(op.loss_fn, o, y)
        (self.dloss,) = torch.autograd.grad(loss, o, create_graph=True)
        self.u = torch.zeros_like(out, requires_grad=True)
        self.jtu: tuple[Tensor, ...] = ()
        if out.requires_grad:
            self.jtu = torch.autograd.grad(
                out, self.leaves, self.u, create_graph=True, materialize_grads=True
            )
        self.live = [i for i, t in enumerate(self.jtu) if t.requires_grad]

    def apply(self, vs: list[Tensor]) -> list[Tensor]:
        return self._apply(vs, batched=False)

    def apply_block(self, vs: list[Tensor]) -> list[Tensor]:
        # the same three backward passes, each vectorised over the q columns
        return self._apply(vs, batched=True)

    def _apply(self, vs: list[Tensor], batched: bool) -> list[Tensor]:
        if not self.live:  # the outputs do not depend on the selected parameters
            return [
                v.new_zeros(v.shape, dtype=p.dtype)
                for v, p in zip(vs, self.leaves, strict=True)
            ]
        (Jv,) = torch.autograd.grad(
            [self.jtu[i] for i in self.live],
            self.u,
            [vs[i] for i in self.live],
            retain_graph=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )
        if self.dloss.requires_grad:
            (LJv,) = torch.autograd.grad(
                self.dloss,
                self.o,
                Jv,
                retain_graph=True,
                materialize_grads=True,
                is_grads_batched=batched,
            )
        else:  # loss linear in the outputs: Lambda = 0
            LJv = torch.zeros_like(Jv)
        out = torch.autograd.grad(
            self.out,
            self.leaves,
            LJv,
            retain_graph=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )
        return [t.detach() for t in out]


class GGNOperator(DataOperator):
    r"""Generalised Gauss-Newton matrix of the loss over all of ``data``.

    .. math::
        G = \sum_b w_b\, J_b^\top \Lambda_b J_b, \qquad
        \Lambda_b = \nabla^2_f \ell_b(f), \quad
        w_b = n_b / N \ (\text{mean}) \text{ or } 1 \ (\text{sum}),

    where :math:`J_b` is the Jacobian of the model outputs of batch :math:`b`
    w.r.t. the selected parameters and :math:`\Lambda_b` the Hessian of
    ``loss_fn`` w.r.t. those outputs, exact for any loss (``MSELoss``: a multiple
    of the identity; ``CrossEntropyLoss``: :math:`\mathrm{diag}(p) - pp^\top`
    per sample, divided by :math:`n_b` for the mean). For a model linear in its
    parameters with MSE, :math:`G = H`. Weights, data handling, caching,
    distributed reduction and the mode policy are as in
    :class:`~geoopt_sgd.curvature.HessianOperator`.

    Each product costs, per batch, about two backward passes (``J v`` by the
    double-vjp trick, then :math:`J^\top`); the first-order graph is built once
    per batch and reused by all columns (and across products when cached).

    Args:
        model: The model (a DDP/DataParallel wrapper is unwrapped).
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar, mean or sum.
        data: One ``(inputs, targets)`` batch or a re-iterable of batches (see
            :mod:`geoopt_sgd._model` for the batch structure).
        params: Parameters to differentiate (tensors or names); default all with
            ``requires_grad``.
        mode: ``"eval"`` (default) or ``"train"``.
        loss_reduction: ``"mean"`` or ``"sum"``; default read from ``loss_fn``.
        max_cached_batches: Keep per-batch graphs across products when ``data`` is
            one batch or a list of at most this many batches. Default: ``4``.
        batch_fn: ``None`` or a callable mapping one batch of ``data`` (as a
            loader yields it, e.g. a dict) to ``(inputs, targets)``; inputs may
            be a tensor, a tuple/list (``model(*inputs)``) or a dict
            (``model(**inputs)``). See :mod:`geoopt_sgd._model`.
        block: ``"auto"`` (default: ``"loop"``), ``"loop"`` or ``"batched"``:
            how :meth:`matmat` applies a block of columns, as in
            :class:`~geoopt_sgd.curvature.HessianOperator`; ``"batched"`` runs
            the three backward passes of a product with
            ``is_grads_batched=True``, ``max_block`` columns at a time
            (measured on a digits MLP, CPU, 8 columns: 4.15 against 1.34
            gradients per column on a loaded machine).
        max_block: The most columns per batched pass. Default: ``8``.

    Attributes:
        fmodel: The :class:`~geoopt_sgd._model.FunctionalModel`.
        num_samples: Total number of samples ``N`` (all ranks).
        param_shapes: Shapes of the selected parameters.
        n_matvec: Products applied so far.
        block_used: The block route in use, ``"loop"`` or ``"batched"``.

    Raises:
        ValueError: If ``mode``, ``loss_reduction`` or ``block`` is unknown,
            the data is empty, the parameter selection is invalid,
            ``max_cached_batches`` < 0 or ``max_block`` < 1.
        TypeError: If ``loss_fn`` or ``batch_fn`` is not callable, or ``data``
            (after ``batch_fn``) is not ``(inputs, targets)`` batches.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> G = GGNOperator(model, torch.nn.MSELoss(), (X, torch.zeros(2, 1)))
        >>> G.to_dense()  # (2/N) X^T X, equal to the Hessian
        tensor([[1., 0.],
                [0., 4.]], dtype=torch.float64)
    """

    def _make_term(self, x: Any, y: Tensor) -> BatchTerm:
        return _GGNTerm(self, x, y)
