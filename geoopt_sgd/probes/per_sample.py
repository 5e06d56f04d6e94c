"""Per-sample gradients with ``torch.func`` under the package's mode policy."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import check_int
from .._losses import check_per_sample_loss, per_sample_loss
from .._model import FunctionalModel, check_batch, full_precision, to_device
from .primitives import per_sample_loss_gradients

__all__ = ["per_sample_gradients"]


@full_precision
def per_sample_gradients(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Any,
    targets: Tensor,
    *,
    params: Iterable[Tensor] | Iterable[str] | None = None,
    mode: Literal["eval", "train"] = "eval",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Compute the gradient of each sample's loss, as an ``(N, P)`` matrix.

    Row ``i`` is :math:`\nabla_\theta \ell_i` with
    :math:`\ell_i = \text{loss\_fn}(f(x_i)[\text{None}], y_i[\text{None}])`, the
    loss on a batch of one, *as ``loss_fn`` defines it* (so ``nn.MSELoss()`` gives
    the mean over outputs; :class:`~geoopt_sgd.HalfSquaredError` is the papers'
    ``1/2 ||f(x_i) - y_i||^2``), the convention of every tool in the package
    (:mod:`geoopt_sgd._losses`). The column order is that of the selected
    parameters (``model.named_parameters()``), each flattened.

    Routes and costs:

    * ``mode="eval"`` (default): ``vmap(grad(...))`` over single samples via
      ``functional_call``, ``chunk_size`` samples at a time. Memory is about
      ``chunk_size`` single-sample backward passes plus the ``N x P`` result; on
      small models the whole batch costs about 1.3 batch gradients, on an 11M
      parameter ResNet-18 about 45 for 64 ImageNet-size samples (CPU), and 8.6
      for 32 CIFAR-size samples with ``chunk_size=8`` (measured here, CPU).
    * ``mode="train"``: BatchNorm uses the statistics of the whole batch, which
      couples the samples, so row ``i`` is the gradient of sample ``i``'s loss in
      the batch forward pass (a row of the Jacobian of the per-sample-loss vector,
      ``jacrev`` with ``chunk_size``): one forward and ``N`` vector-Jacobian
      products of the batch. Dropout stays off in both modes (modules and
      functional dropout; see :mod:`geoopt_sgd._model`). A
      BatchNorm with ``track_running_stats=False`` normalises with the batch's
      statistics in eval mode too, so it takes this route in both modes.

    The model is untouched (parameters, ``.grad``, buffers, training flags, global
    RNG). Forward-mode is not used, so attention kernels without a JVP are fine. A
    forward that ``vmap`` cannot transform (a packed sequence, ``.item()`` control
    flow, a random draw) raises a ``RuntimeError`` that names the cause.

    For large ``P`` do not materialise this matrix: :func:`noise_geometry` gets
    every directional quantity from one ``jvp`` of the per-sample losses instead.

    Args:
        model: The model (DDP/DataParallel wrappers are unwrapped).
        loss_fn: The loss, called as ``loss_fn(outputs, targets)`` on a batch of one.
        inputs: The batch inputs with leading dimension ``N``: a tensor
            (``model(inputs)``), a tuple/list of tensors (``model(*inputs)``) or a
            dict of tensors (``model(**inputs)``); see :mod:`geoopt_sgd._model`.
        targets: The batch targets, leading dimension ``N``.
        params: Parameters to differentiate (tensors or names); ``None``: all with
            ``requires_grad``.
        mode: ``"eval"`` or ``"train"``, the package's mode policy.
        chunk_size: Samples per vectorised chunk, bounding memory; ``None`` means
            the whole batch in one chunk.

    Returns:
        ``(N, P)`` tensor in the parameters' dtype (the widest, for mixed
        dtypes), on their device.

    Raises:
        ValueError: If ``mode`` is unknown, ``chunk_size < 1``, the batch is empty
            or ``inputs`` and ``targets`` differ in length.
        TypeError: If ``chunk_size`` is not an integer, ``targets`` is not a
            tensor, ``inputs`` is not a tensor, tuple/list or dict, or ``loss_fn``
            is not callable.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[1.0, 0.0]]))
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> per_sample_gradients(lin, torch.nn.MSELoss(), X, y)  # 2 r_i x_i
        tensor([[ 2.,  4.],
                [18., 24.]], dtype=torch.float64)
    """
    check_int("chunk_size", chunk_size, ge=1, allow_none=True)
    fm = FunctionalModel(model, params, mode=mode)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable; got {type(loss_fn).__name__}.")
    if not isinstance(inputs, (Tensor, tuple, list, Mapping)):
        raise TypeError(
            "`inputs` must be a tensor, a tuple/list of tensors or a dict of "
            f"tensors; got {type(inputs).__name__}."
        )
    check_batch(inputs, targets, name="targets")
    if int(targets.shape[0]) == 0:
        raise ValueError("`targets` is empty: the batch has 0 samples.")
    check_per_sample_loss(loss_fn, targets)
    inputs = to_device(inputs, fm.device)
    targets = to_device(targets, fm.device)
    with torch.enable_grad():
        return per_sample_loss_gradients(
            fm, per_sample_loss(loss_fn), inputs, targets, chunk_size=chunk_size
        )
