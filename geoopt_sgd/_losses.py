"""The package's one per-sample loss convention.

Every tool (the curvature operators, the probes, :class:`~geoopt_sgd.NoisyGD`'s
noise sources, :func:`~geoopt_sgd.per_sample_gradients`) measures the loss exactly
as the user passes it:

* the loss of sample ``i`` is ``L_i = loss_fn(f(x_i)[None], y_i[None])``, the user's
  loss on a batch of one;
* with ``reduction="mean"`` the batch loss is ``(1/n) sum_i L_i`` and with
  ``reduction="sum"`` it is ``sum_i L_i``, which is what ``loss_fn`` itself returns
  on the batch for every loss whose reduction runs over samples and, for
  :class:`torch.nn.MSELoss`, over outputs too.

So for a ``K``-output model :class:`torch.nn.MSELoss` gives ``L_i = (1/K) ||f(x_i) -
y_i||^2``, whose Hessian is ``2/K`` times that of the papers' square loss. The
papers' convention ``L_i = 1/2 ||f(x_i) - y_i||^2`` (Wu, Wang & Su 2022; Wang & Wu
2023) is the loss :class:`HalfSquaredError`, which a user (or a recipe) passes
explicitly: nothing here converts one loss into another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from . import distributed
from ._checks import check_choice

__all__ = [
    "HalfSquaredError",
    "PerSampleLossError",
    "SampleLoss",
    "check_per_sample_batches",
    "check_per_sample_loss",
    "per_sample_loss",
    "per_sample_losses",
    "plain_loss",
    "square_loss_scale",
]

SampleLoss = Callable[[Tensor, Tensor], Tensor]


class HalfSquaredError(nn.Module):
    r"""The papers' square loss: ``1/2 ||f(x_i) - y_i||^2`` per sample.

    .. math::

        L = \frac{1}{n} \sum_{i=1}^n \tfrac12 \lVert f(x_i) - y_i \rVert^2
        \quad (\text{``reduction="mean"``}),

    summed over every output of a sample, averaged (or summed) over samples. Its
    Hessian with respect to the outputs is the identity, so the Gauss-Newton
    matrix is ``(1/n) sum_i J_i^T J_i`` with no constant (Wu, Wang & Su 2022,
    arXiv:2207.02628; Wang & Wu 2023, arXiv:2310.00692). Compare
    :class:`torch.nn.MSELoss`, which averages over outputs too and has no ``1/2``.

    Args:
        reduction: ``"mean"`` (default) or ``"sum"`` over samples.

    Raises:
        ValueError: If ``reduction`` is not ``"mean"`` or ``"sum"``.

    Example:
        >>> import torch
        >>> out = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
        >>> HalfSquaredError()(out, torch.zeros(2, 2))  # (2.5 + 0) / 2
        tensor(1.2500)
        >>> torch.nn.MSELoss()(out, torch.zeros(2, 2))  # (1 + 4) / 4
        tensor(1.2500)
        >>> HalfSquaredError(reduction="sum")(out, torch.zeros(2, 2))
        tensor(2.5000)
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """Return the mean (or sum) over samples of ``1/2 ||output_i - target_i||^2``.

        Args:
            output: ``(n, ...)`` model outputs.
            target: Targets with ``output.numel()`` entries (reshaped to it).

        Returns:
            A scalar tensor.
        """
        r = output - target.reshape(output.shape).to(output.dtype)
        per_sample = 0.5 * r.pow(2).reshape(r.shape[0], -1).sum(-1)
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


def per_sample_loss(loss_fn: Callable[..., Tensor]) -> SampleLoss:
    """Return ``(out_i, y_i) -> L_i``: the user's loss on a batch of one, a scalar.

    Args:
        loss_fn: The user's loss (a module or a function of ``(outputs, targets)``).

    Returns:
        A function of one sample's output and target (no batch dimension),
        suitable for :func:`torch.func.vmap` and :func:`torch.func.grad`.
    """

    def sample_loss(out: Tensor, y: Tensor) -> Tensor:
        return loss_fn(out.unsqueeze(0), y.unsqueeze(0)).reshape(())

    return sample_loss


class PerSampleLossError(ValueError):
    """A loss whose ``"mean"`` is not the mean of its per-sample losses.

    Raised by :func:`check_per_sample_loss`; a :class:`ValueError`, told apart
    so that a caller that turns non-finite measurements into NaN records
    (:class:`~geoopt_sgd.NoiseProbe`) still raises it: a batch whose targets
    all equal ``ignore_index`` has a NaN loss, and its refusal is not a
    diverged run.
    """


def check_per_sample_loss(
    loss_fn: Any, targets: Tensor, *, name: str = "loss_fn"
) -> None:
    """Raise where the mean of the per-sample losses is not ``loss_fn``'s mean.

    :class:`torch.nn.CrossEntropyLoss` and :class:`torch.nn.NLLLoss` with
    ``reduction="mean"`` and class-index targets divide by the summed class
    weights of the batch's targets, not by the number of samples: with
    ``weight`` the weight cancels on a batch of one (``L_i`` is the unweighted
    loss), and a target equal to ``ignore_index`` gives ``L_i = 0/0``. The
    per-sample tools would then measure another loss than the user trains with
    (or NaN), so they refuse it. (Probability targets are averaged over samples
    and pass.)

    Args:
        loss_fn: The user's loss.
        targets: A batch's targets.
        name: The argument's name in the message.

    Raises:
        ValueError: Naming the attribute and the fix (``reduction="sum"``,
            under which every sample carries its weight and an ignored one
            contributes 0).
    """
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return
    if getattr(loss_fn, "reduction", None) != "mean" or targets.is_floating_point():
        return
    kind = type(loss_fn).__name__
    fix = (
        "pass the loss with reduction='sum' (every sample then carries its "
        "weight, and an ignored one contributes 0)"
    )
    if getattr(loss_fn, "weight", None) is not None:
        raise PerSampleLossError(
            f"`{name}` ({kind} with `weight` and reduction='mean') divides by the "
            "batch's summed class weights, so its batch loss is not the mean of "
            "per-sample losses, and on one sample the weight cancels: the "
            "per-sample measurements cannot use it. To measure the weighted "
            f"loss, {fix}; else drop `weight`."
        )
    ignore = getattr(loss_fn, "ignore_index", None)
    if ignore is not None and bool((targets == ignore).any()):
        raise PerSampleLossError(
            f"`{name}` ({kind}, reduction='mean') ignores targets equal to "
            f"ignore_index={ignore}, and the data holds "
            f"{int((targets == ignore).sum())} such targets: their per-sample "
            "losses are 0/0 and the batch loss is not the mean over samples. "
            f"Leave them out of the data, or {fix}."
        )


def check_per_sample_batches(
    loss_fn: Any,
    batches: Iterable[tuple[Any, Tensor]],
    *,
    device: torch.device | str,
    name: str = "loss_fn",
) -> None:
    """:func:`check_per_sample_loss` on every batch, with one verdict on all ranks.

    Under ``torch.distributed`` an ``ignore_index`` target may sit on one
    rank's shard only: raising there alone would leave the other ranks waiting
    in the measurement's next collective, so the verdict is summed over ranks
    (one all-reduce, only for a cross-entropy/NLL loss with
    ``reduction="mean"``) and every rank raises.

    Args:
        loss_fn: The user's loss.
        batches: This rank's ``(inputs, targets)`` batches (possibly none).
        device: Where the all-reduce runs (the model's device).
        name: The argument's name in the message.

    Raises:
        ValueError: As :func:`check_per_sample_loss`, on every rank.
    """
    error: PerSampleLossError | None = None
    try:
        for _, targets in batches:
            check_per_sample_loss(loss_fn, targets, name=name)
    except PerSampleLossError as exc:
        error = exc
    collective = (
        distributed.is_distributed()
        and isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss))
        and getattr(loss_fn, "reduction", None) == "mean"
    )
    if collective:
        flag = torch.tensor([float(error is not None)], device=device)
        if float(distributed.all_reduce_sum(flag)[0]) > 0 and error is None:
            error = PerSampleLossError(
                f"`{name}` ({type(loss_fn).__name__}, reduction='mean') is refused "
                "on another rank's data (see that rank's message: class `weight` "
                "or targets equal to ignore_index); pass the loss with "
                "reduction='sum', or leave those targets out of the data."
            )
    if error is not None:
        raise error


def per_sample_losses(
    loss_fn: Callable[..., Tensor], outputs: Tensor, targets: Tensor
) -> Tensor:
    """Return the ``(n,)`` per-sample losses ``L_i`` of a batch (see the module doc).

    Args:
        loss_fn: The user's loss.
        outputs: ``(n, ...)`` model outputs.
        targets: ``(n, ...)`` targets.

    Returns:
        ``(n,)`` tensor; its mean (``reduction="mean"``) or sum (``"sum"``) is
        ``loss_fn(outputs, targets)``.
    """
    return vmap(per_sample_loss(loss_fn))(outputs, targets)


def plain_loss(loss_fn: Any, cls: type[nn.Module]) -> bool:
    """Whether ``loss_fn`` is a ``cls`` that computes ``cls``'s own loss.

    That is an instance whose ``forward`` is ``cls.forward``.

    A subclass that overrides ``forward`` (a masked or rescaled loss) computes
    something else, so the closed-form output curvatures of ``cls`` do not apply.
    """
    return isinstance(loss_fn, cls) and type(loss_fn).forward is cls.forward


def square_loss_scale(loss_fn: Any, outputs_per_sample: int) -> float | None:
    """Return ``c`` when ``L_i = c/2 ||f(x_i) - y_i||^2`` for this loss, else ``None``.

    Then the output Hessian of every sample is ``c I``: the probes use it instead
    of differentiating the loss twice.

    Args:
        loss_fn: The user's loss.
        outputs_per_sample: ``K``, the number of outputs of one sample.

    Returns:
        ``1`` for :class:`HalfSquaredError`, ``2/K`` for :class:`torch.nn.MSELoss`
        with ``reduction="mean"``, ``2`` with ``"sum"``; ``None`` for any other loss
        (a subclass overriding ``forward`` included, see :func:`plain_loss`).
    """
    if plain_loss(loss_fn, HalfSquaredError):
        return 1.0
    if plain_loss(loss_fn, nn.MSELoss):
        if loss_fn.reduction == "mean":
            return 2.0 / outputs_per_sample
        if loss_fn.reduction == "sum":
            return 2.0
    return None
