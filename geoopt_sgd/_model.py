"""Functional evaluation of a user's model under the package's mode policy.

Shared by the curvature operators, the probes and the optimizers' curvature
sources. The policy (documented once here, referenced everywhere):

* ``mode="eval"`` (default): every module in eval mode, so BatchNorm uses its
  running statistics and dropout is off. The function of the parameters is then
  deterministic and the same for every call.
* ``mode="train"``: normalisation layers use batch statistics (fixed per batch),
  dropout-like modules (``*Dropout*``, ``DropPath``, ``DropBlock``) stay off so the
  operator is a fixed symmetric matrix.

Either way the model is evaluated with :func:`torch.func.functional_call` on
*cloned* buffers, so its running statistics (``num_batches_tracked`` included),
its ``training`` flags and its ``.grad`` fields are untouched afterwards, and no
global RNG is consumed. The model is never modified (no
``replace_all_batch_norm_modules_``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import distributed
from ._checks import check_choice

Mode = Literal["eval", "train"]
Reduction = Literal["mean", "sum"]
Batch = tuple[Any, Tensor]

__all__ = [
    "FunctionalModel",
    "as_batches",
    "batch_size",
    "detect_reduction",
    "to_device",
    "unwrap_model",
]

_DROPOUT_NAMES = ("Dropout", "DropPath", "DropBlock")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return ``model.module`` for DDP/DataParallel wrappers, else ``model``."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def to_device(x: Any, device: torch.device) -> Any:
    """Move a tensor, or tensors nested in tuples/lists/dicts, to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(t, device) for t in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def batch_size(targets: Tensor) -> int:
    """Return the number of samples in a batch (the leading size of ``targets``)."""
    return int(targets.shape[0])


def as_batches(data: Any) -> list[Batch] | Iterable[Batch]:
    """Normalise ``data`` to an iterable of ``(inputs, targets)`` batches.

    Args:
        data: One ``(inputs, targets)`` batch (inputs a tensor, targets a tensor)
            or any re-iterable of such batches (a list, a ``DataLoader``).

    Returns:
        A re-iterable of batches.

    Raises:
        TypeError: If ``data`` is neither a batch nor an iterable of batches.
        ValueError: If ``data`` is a single empty batch or an empty sequence.
    """
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(d, Tensor) for d in data)
    ):
        if batch_size(data[1]) == 0:
            raise ValueError("`data` is empty: the batch has 0 samples.")
        return [(data[0], data[1])]
    if isinstance(data, (list, tuple)) and len(data) == 0:
        raise ValueError("`data` is empty: got an empty sequence of batches.")
    if not isinstance(data, Iterable):
        raise TypeError(
            "`data` must be an (inputs, targets) batch of tensors or an iterable of "
            f"such batches (e.g. a DataLoader); got {type(data).__name__}."
        )
    return data


def local_batches(data: Any) -> list[Batch] | Iterable[Batch]:
    """:func:`as_batches`, allowing an empty shard under ``torch.distributed``.

    There an empty shard gives no batches: the rank joins every reduction with
    zeros, and the emptiness is an error only when all ranks are empty (the
    caller checks the total count); raising on one rank alone would leave the
    others hanging.

    Raises:
        TypeError, ValueError: As :func:`as_batches` (``ValueError`` for empty
            data only outside ``torch.distributed``).
    """
    try:
        return as_batches(data)
    except ValueError:
        if not distributed.is_distributed():
            raise
        return []


def detect_reduction(
    loss_fn: Callable[..., Tensor], reduction: str | None
) -> Reduction:
    """Resolve the reduction of ``loss_fn``: explicit argument, else its attribute.

    Args:
        loss_fn: The loss, e.g. ``nn.CrossEntropyLoss()`` or a function.
        reduction: ``"mean"``, ``"sum"`` or ``None`` (read ``loss_fn.reduction``,
            defaulting to ``"mean"``).

    Returns:
        ``"mean"`` or ``"sum"``.

    Raises:
        ValueError: If the reduction is not ``"mean"`` or ``"sum"``.
    """
    if reduction is None:
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"`loss_fn` has reduction={reduction!r}; curvature needs a scalar "
                "loss: use reduction 'mean' or 'sum'."
            )
    check_choice("loss_reduction", reduction, ("mean", "sum"))
    return reduction  # type: ignore[return-value]


@contextlib.contextmanager
def _mode_policy(model: nn.Module, mode: Mode) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        else:
            model.train()
            for m in model.modules():
                if any(s in type(m).__name__ for s in _DROPOUT_NAMES):
                    m.eval()
        yield
    finally:
        for m, f in flags:
            m.training = f


class FunctionalModel:
    """A model seen as a pure function of (a subset of) its parameters.

    Args:
        model: The user's model (DDP/DataParallel wrappers are unwrapped).
        params: Which parameters to differentiate: ``None`` (all with
            ``requires_grad``), or an iterable of parameter tensors of the model, or
            of their names. Parameters outside the selection are held fixed.
        mode: ``"eval"`` or ``"train"``; see the module docstring.

    Attributes:
        names: Names of the selected parameters, in order.
        params: The selected parameters, detached (views of the model's data).
        shapes: Their shapes.
        numel: Total number of selected entries, ``P``.

    Raises:
        ValueError: If ``mode`` is unknown, the selection is empty or names a
            tensor that is not a parameter of ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[str] | None = None,
        *,
        mode: Mode = "eval",
    ) -> None:
        check_choice("mode", mode, ("eval", "train"))
        self.model = unwrap_model(model)
        self.mode = mode
        named = dict(self.model.named_parameters(remove_duplicate=True))
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            params = list(params)
            by_id = {id(p): n for n, p in named.items()}
            names = []
            for p in params:
                if isinstance(p, str):
                    if p not in named:
                        raise ValueError(
                            f"`params`: {p!r} is not a parameter name of the model."
                        )
                    names.append(p)
                elif isinstance(p, Tensor):
                    if id(p) not in by_id:
                        raise ValueError(
                            "`params` must hold parameters of `model` (or their "
                            f"names); got a tensor of shape {tuple(p.shape)} that "
                            "is not one."
                        )
                    names.append(by_id[id(p)])
                else:
                    raise TypeError(
                        f"`params` must hold tensors or names; got {type(p).__name__}."
                    )
        if not names:
            raise ValueError(
                "`params` selects no parameter: the model has none with "
                "requires_grad=True. Pass `params=` explicitly."
            )
        self.names: list[str] = names
        self.params: list[Tensor] = [named[n].detach() for n in names]
        self.shapes: list[torch.Size] = [p.shape for p in self.params]
        self.numel: int = sum(p.numel() for p in self.params)
        self._fixed = {n: p.detach() for n, p in named.items() if n not in set(names)}
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype

    def buffers(self) -> dict[str, Tensor]:
        """Return the model's current buffers (not cloned)."""
        return dict(self.model.named_buffers())

    @contextlib.contextmanager
    def policy(self) -> Iterator[None]:
        """Apply the mode policy to the model for the duration of the block."""
        with _mode_policy(self.model, self.mode):
            yield

    def __call__(self, params: Sequence[Tensor], inputs: Any) -> Tensor:
        """Evaluate the model at ``params`` (one per selected name) on ``inputs``.

        Call inside :meth:`policy`. Buffers are cloned in train mode so the
        model's running statistics are never updated.
        """
        values = dict(zip(self.names, params, strict=True))
        values.update(self._fixed)
        bufs = self.buffers()
        if self.mode == "train":
            bufs = {k: b.clone() for k, b in bufs.items()}
        values.update(bufs)
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return functional_call(self.model, values, args, tie_weights=True, strict=False)

    def total_count(self, batches: Iterable[Batch]) -> int:
        """Number of samples in ``batches``, summed over ranks when distributed."""
        n = sum(batch_size(t) for _, t in batches)
        if distributed.is_distributed():
            t = torch.tensor([n], dtype=torch.long, device=self.device)
            n = int(distributed.all_reduce_sum(t).item())
        return n
