"""Dense Hessian and GGN references, formed explicitly with ``torch.func``.

Meant for small models (``P`` up to a few thousand) in float64. They follow the
same conventions as :class:`~geoopt_sgd.curvature.HessianOperator` and
:class:`~geoopt_sgd.curvature.GGNOperator` (mode policy, batch weights ``n_b/N``
for the mean or ``1`` for the sum, parameter order) but share none of their
code paths: the Hessian is ``torch.autograd.functional.hessian`` of the loss as
a function of the flat parameter vector (one double backward per row), the GGN
is ``J^T Lambda J`` from ``torch.autograd.functional.jacobian`` of the outputs
and ``torch.autograd.functional.hessian`` of the loss w.r.t. the outputs.

Why not ``torch.func.hessian``: with torch 2.14 its vmapped rows give a wrong,
non-symmetric Hessian through train-mode BatchNorm (``jacrev(jacrev(f))`` too;
e.g. a nonzero mixed derivative with a conv bias that BatchNorm cancels). In
eval mode both agree to rounding; the tests check that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._model import FunctionalModel, as_batches, batch_size, detect_reduction
from ..curvature.hvp import math_sdpa

__all__ = ["assert_close_report", "dense_ggn", "dense_hessian", "flat_params"]


def flat_params(
    model: nn.Module, params: Iterable[Tensor] | Iterable[str] | None = None
) -> Tensor:
    """Concatenate the selected parameters of ``model`` into one flat vector.

    Args:
        model: The model.
        params: Selection as in :class:`~geoopt_sgd.curvature.HessianOperator`;
            default all parameters with ``requires_grad``.

    Returns:
        A detached copy, shape ``(P,)``, in the parameters' dtype.

    Raises:
        ValueError: If the selection is empty or invalid.
    """
    fm = FunctionalModel(model, params)
    return torch.cat([p.detach().reshape(-1) for p in fm.params]).clone()


def _split(theta: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    out, i = [], 0
    for s in shapes:
        out.append(theta[i : i + s.numel()].view(s))
        i += s.numel()
    return out


def _weights(
    data: Any, reduction: str, batch_fn: Callable[[Any], Any] | None
) -> list[tuple[Any, Tensor, float]]:
    batches = list(as_batches(data, batch_fn))
    n = sum(batch_size(y) for _, y in batches)
    if n == 0:
        raise ValueError("`data` is empty: it yields no samples.")
    return [
        (x, y, 1.0 if reduction == "sum" else batch_size(y) / n) for x, y in batches
    ]


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    params: Iterable[Tensor] | Iterable[str] | None = None,
    mode: str = "eval",
    loss_reduction: str | None = None,
    batch_fn: Callable[[Any], Any] | None = None,
) -> Tensor:
    """Form the Hessian of the full-data loss explicitly.

    Args:
        model: The model (not modified).
        loss_fn: ``loss_fn(outputs, targets)``, mean or sum reduction.
        data: One ``(inputs, targets)`` batch or an iterable of batches.
        params: Parameter selection; default all with ``requires_grad``.
        mode: ``"eval"`` or ``"train"`` (the package's mode policy).
        loss_reduction: ``"mean"``, ``"sum"`` or ``None`` (read from ``loss_fn``).
        batch_fn: ``None`` or a callable mapping one batch of ``data`` to
            ``(inputs, targets)``, as for the operators (dict batches).

    Returns:
        ``H``, shape ``(P, P)``, summed over batches with weights ``n_b/N``
        (mean) or ``1`` (sum).

    Raises:
        ValueError: If the data is empty or an argument is invalid.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> X = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
        >>> dense_hessian(model, torch.nn.MSELoss(reduction="sum"), (X, X))
        tensor([[20.]], dtype=torch.float64)
    """
    fm = FunctionalModel(model, params, mode=mode)  # type: ignore[arg-type]
    reduction = detect_reduction(loss_fn, loss_reduction)
    theta = torch.cat([p.detach().reshape(-1) for p in fm.params])
    H = theta.new_zeros(theta.numel(), theta.numel())
    with fm.policy(), math_sdpa():
        for x, y, w in _weights(data, reduction, batch_fn):

            def f(t: Tensor, x: Any = x, y: Tensor = y) -> Tensor:
                return loss_fn(fm(_split(t, fm.shapes), x), y)

            H += w * torch.autograd.functional.hessian(f, theta).detach()
    return H


def dense_ggn(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    params: Iterable[Tensor] | Iterable[str] | None = None,
    mode: str = "eval",
    loss_reduction: str | None = None,
    batch_fn: Callable[[Any], Any] | None = None,
) -> Tensor:
    """Form the generalised Gauss-Newton matrix ``sum_b w_b J_b^T Lambda_b J_b``.

    Args:
        model: The model (not modified).
        loss_fn: ``loss_fn(outputs, targets)``, mean or sum reduction.
        data: One ``(inputs, targets)`` batch or an iterable of batches.
        params: Parameter selection; default all with ``requires_grad``.
        mode: ``"eval"`` or ``"train"``.
        loss_reduction: ``"mean"``, ``"sum"`` or ``None`` (read from ``loss_fn``).
        batch_fn: ``None`` or a callable mapping one batch of ``data`` to
            ``(inputs, targets)``, as for the operators (dict batches).

    Returns:
        ``G``, shape ``(P, P)``.

    Raises:
        ValueError: If the data is empty or an argument is invalid.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> X = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
        >>> dense_ggn(model, torch.nn.MSELoss(reduction="sum"), (X, X))
        tensor([[20.]], dtype=torch.float64)
    """
    fm = FunctionalModel(model, params, mode=mode)  # type: ignore[arg-type]
    reduction = detect_reduction(loss_fn, loss_reduction)
    theta = torch.cat([p.detach().reshape(-1) for p in fm.params])
    P = theta.numel()
    G = theta.new_zeros(P, P)
    with fm.policy(), math_sdpa():
        for x, y, w in _weights(data, reduction, batch_fn):

            def out_fn(t: Tensor, x: Any = x) -> Tensor:
                return fm(_split(t, fm.shapes), x)

            out = out_fn(theta).detach()
            J = torch.autograd.functional.jacobian(out_fn, theta).detach()
            J = J.reshape(-1, P)

            def loss_of_out(o: Tensor, y: Tensor = y) -> Tensor:
                return loss_fn(o, y)

            Lam = torch.autograd.functional.hessian(loss_of_out, out).detach()
            Lam = Lam.reshape(out.numel(), out.numel())
            G += w * (J.T @ Lam @ J)
    return G


def assert_close_report(
    actual: Tensor, expected: Tensor, rtol: float, atol: float, *, worst: int = 5
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` entrywise.

    On failure the message lists the ``worst`` entries (index, actual, expected,
    ratio of the error to its allowance) and the maximal relative error.

    Args:
        actual: The tensor under test.
        expected: The reference, same shape.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        worst: How many of the worst entries to list.

    Raises:
        AssertionError: If the shapes differ or any entry is out of tolerance.
    """
    if actual.shape != expected.shape:
        raise AssertionError(
            f"shape mismatch: actual {tuple(actual.shape)}, "
            f"expected {tuple(expected.shape)}."
        )
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    err = (a - e).abs()
    allowance = atol + rtol * e.abs()
    ratio = err / allowance
    bad = ~(err <= allowance)
    if not bool(bad.any()):
        return
    flat = torch.nan_to_num(ratio, nan=float("inf")).reshape(-1)
    idx = torch.argsort(flat, descending=True)[:worst]
    lines = [
        f"{int(bad.sum())} of {a.numel()} entries out of tolerance "
        f"(rtol={rtol}, atol={atol}); max |a-e|/|e|_max = "
        f"{float(err.max() / e.abs().max().clamp_min(1e-300)):.3e}. Worst:"
    ]
    for i in idx.tolist():
        pos = (
            tuple(torch.unravel_index(torch.tensor(i, device="cpu"), a.shape))
            if a.dim()
            else ()
        )
        pos = tuple(int(p) for p in pos)
        lines.append(
            f"  {pos}: actual {a.reshape(-1)[i].item():.10e}, "
            f"expected {e.reshape(-1)[i].item():.10e}, "
            f"err/allowance {flat[i].item():.3e}"
        )
    raise AssertionError("\n".join(lines))
