"""Functional evaluation of a user's model under the package's mode policy.

Shared by the curvature operators, the probes and the optimizers' curvature
sources. The policy (documented once here, referenced everywhere):

* ``mode="eval"`` (default): every module in eval mode, so BatchNorm uses its
  running statistics and dropout is off. The function of the parameters is then
  deterministic and the same for every call.
* ``mode="train"``: normalisation layers use batch statistics (fixed per batch),
  dropout-like modules (``*Dropout*``, ``DropPath``, ``DropBlock``) stay off so the
  operator is a fixed symmetric matrix.

Whatever autocast context the caller is in (``torch.autocast`` on the CPU, CUDA or
the parameters' device), autocast is disabled for the evaluation and for the
package's curvature and probe computations, so they run in the parameters' dtype:
a measurement taken inside a mixed-precision training step equals the one taken
outside it, bit for bit.

Either way the model is evaluated with :func:`torch.func.functional_call` on
*cloned* buffers, so its running statistics (``num_batches_tracked`` included),
its ``training`` flags and its ``.grad`` fields are untouched afterwards, and no
global RNG is consumed. The model is never modified (no
``replace_all_batch_norm_modules_``).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

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
    "autocast_off",
    "full_precision",
    "as_batches",
    "batch_size",
    "check_batch",
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


def check_batch(
    inputs: Any, targets: Any, *, name: str = "data", index: int | None = None
) -> None:
    """Check that every input tensor has as many samples as ``targets``.

    Args:
        inputs: A tensor, or a tuple/list of tensors (multi-input models).
        targets: The targets tensor.
        name: The argument named in the message.
        index: The batch's position in ``name``, shown in the message.

    Raises:
        TypeError: If ``targets`` is not a tensor.
        ValueError: If an input tensor's leading size differs from the targets'.
    """
    where = f"`{name}`" if index is None else f"`{name}` (batch {index})"
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"{where}: the targets must be a tensor; got {type(targets).__name__}."
        )
    if targets.dim() == 0:
        raise ValueError(
            f"{where}: the targets must have a leading batch dimension; got a "
            "0-dimensional tensor."
        )
    n = int(targets.shape[0])
    tensors = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    for t in tensors:
        if isinstance(t, Tensor) and t.dim() >= 1 and int(t.shape[0]) != n:
            raise ValueError(
                f"{where}: the inputs have {int(t.shape[0])} samples but the "
                f"targets {n}; inputs and targets must have the same leading size."
            )


def as_batches(data: Any) -> list[Batch] | Iterable[Batch]:
    """Normalise ``data`` to an iterable of ``(inputs, targets)`` batches.

    Args:
        data: One ``(inputs, targets)`` batch (inputs a tensor, targets a tensor)
            or any re-iterable of such batches (a list, a ``DataLoader``).

    Returns:
        A re-iterable of batches.

    Raises:
        TypeError: If ``data`` is neither a batch nor an iterable of batches.
        ValueError: If ``data`` is a single empty batch or an empty sequence, or
            a batch's inputs and targets differ in length (checked for a batch
            or a list/tuple of batches; a loader's batches are checked as they
            are used).
    """
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(d, Tensor) for d in data)
    ):
        if data[1].dim() >= 1 and batch_size(data[1]) == 0:
            raise ValueError("`data` is empty: the batch has 0 samples.")
        check_batch(data[0], data[1])
        return [(data[0], data[1])]
    if isinstance(data, (list, tuple)) and len(data) == 0:
        raise ValueError("`data` is empty: got an empty sequence of batches.")
    if isinstance(data, (list, tuple)):
        for i, batch in enumerate(data):
            if (
                isinstance(batch, (tuple, list))
                and len(batch) == 2
                and isinstance(batch[1], Tensor)
                and batch[1].dim() >= 1
            ):
                check_batch(batch[0], batch[1], index=i)
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
def autocast_off(*device_types: str) -> Iterator[None]:
    """Disable ``torch.autocast`` for the CPU, CUDA and ``device_types``.

    Curvature and probes compute in the parameters' dtype whatever autocast
    context they are called from (the module docstring).
    """
    kinds = {"cpu", *device_types}
    if torch.cuda.is_available():
        kinds.add("cuda")
    with contextlib.ExitStack() as stack:
        for kind in sorted(kinds):
            if kind != "meta" and torch.amp.is_autocast_available(kind):
                stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


_F = TypeVar("_F", bound=Callable[..., Any])


def _autocast_enabled() -> bool:
    return torch.is_autocast_enabled("cpu") or (
        torch.cuda.is_available() and torch.is_autocast_enabled("cuda")
    )


def full_precision(fn: _F) -> _F:
    """Decorate a public function so it runs under :func:`autocast_off`.

    The wrapper keeps ``fn``'s name, docstring, signature and module globals (so
    doctest still finds its examples).
    """
    off, enabled = autocast_off, _autocast_enabled

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not enabled():
            return fn(*args, **kwargs)
        with off():
            return fn(*args, **kwargs)

    out = types.FunctionType(
        wrapper.__code__, fn.__globals__, fn.__name__, None, wrapper.__closure__
    )
    functools.update_wrapper(out, fn)
    return out  # type: ignore[return-value]


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
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If ``mode`` is unknown, ``model`` has no parameters, the
            selection is empty or names a tensor that is not a parameter of
            ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[str] | None = None,
        *,
        mode: Mode = "eval",
    ) -> None:
        check_choice("mode", mode, ("eval", "train"))
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module; got {type(model).__name__}."
            )
        self.model = unwrap_model(model)
        self.mode = mode
        named = dict(self.model.named_parameters(remove_duplicate=True))
        if not named:
            raise ValueError(
                f"`model` ({type(self.model).__name__}) has no parameters to "
                "measure or differentiate."
            )
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
        """Apply the mode policy to the model for the duration of the block.

        Autocast is disabled inside (see :func:`autocast_off`): the model is
        evaluated in its parameters' dtype.
        """
        with _mode_policy(self.model, self.mode), autocast_off(self.device.type):
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
