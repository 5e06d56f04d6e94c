"""Functional evaluation of a user's model under the package's mode policy.

Shared by the curvature operators, the probes and the optimizers' curvature
sources. The policy (documented once here, referenced everywhere):

* ``mode="eval"`` (default): every module in eval mode, so BatchNorm uses its
  running statistics and dropout is off. The function of the parameters is then
  deterministic and the same for every call.
* ``mode="train"``: normalisation layers use batch statistics (fixed per batch),
  dropout-like modules (``*Dropout*``, ``DropPath``, ``DropBlock``) and
  :class:`torch.nn.MultiheadAttention` (whose train mode only adds its attention
  dropout) stay in eval mode, and dropout drawn by a function call is off too:
  ``F.dropout`` and its variants in a ``forward`` (as timm's classifier heads
  call it with ``training=self.training``) return their input, and recurrent
  kernels (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) run without dropout between
  layers, and ``F.scaled_dot_product_attention`` without attention dropout
  (timm's attention passes ``dropout_p`` while ``self.training``). So the
  operator is a fixed symmetric matrix. (Other random draws in a ``forward``,
  e.g. a hand-written ``torch.bernoulli`` mask, are not switched off.)

Whatever autocast context the caller is in (``torch.autocast`` on the CPU, CUDA or
the parameters' device), autocast is disabled for the evaluation and for the
package's curvature and probe computations, so they run in the parameters' dtype:
a measurement taken inside a mixed-precision training step equals the one taken
outside it, bit for bit.

Parameters of mixed floating dtypes (say a float32 body and a float64 head) are
taken as they are: each layer computes in its own parameters' dtype, and the flat
``(P,)`` vectors the package returns (eigenvectors, gradients, per-sample rows,
operator outputs) are in the widest of them (``torch.promote_types``), so they hold
every parameter exactly; an operator's ``dtype`` is that one.

Weight normalisation (``torch.nn.utils.weight_norm`` or
``torch.nn.utils.parametrizations.weight_norm``) is evaluated as
``v * (g / ||v||)`` inside the policy: torch's fused ``_weight_norm`` kernel has a
wrong second derivative (a non-symmetric Hessian in the direction ``v``; torch
2.14.1) and no forward-mode AD. The values are the same to rounding.

Either way the model is evaluated with :func:`torch.func.functional_call` on
*cloned* buffers, so its running statistics (``num_batches_tracked`` included),
its ``training`` flags and its ``.grad`` fields are untouched afterwards, and no
global RNG is consumed. The model is never modified (no
``replace_all_batch_norm_modules_``).

Batches and ``batch_fn`` (documented once here, referenced by every entry point
that takes data): ``data`` is one batch or a re-iterable of batches (a list, a
``DataLoader``). A batch is a pair ``(inputs, targets)``: ``targets`` a tensor with
a leading batch dimension, ``inputs`` one of

* a tensor: the model is called as ``model(inputs)``;
* a tuple or list of tensors (a multi-input model): ``model(*inputs)``;
* a dict of tensors (keyword arguments, HF-style): ``model(**inputs)``.

Every input tensor has as many samples (leading size) as ``targets``. A loader
that yields any other structure (a dict with the label among the inputs, a
triple, ...) is used through ``batch_fn``: a callable mapping one batch *as the
loader yields it* to such a pair ``(inputs, targets)``, e.g.
``batch_fn=lambda b: ({"input_ids": b["input_ids"], "mask": b["mask"]},
b["label"])``. With ``batch_fn``, ``data`` is a re-iterable of batches, or a
single batch given as a dict. Without it, a batch that is not an
``(inputs, targets)`` pair raises a ``TypeError`` naming ``data`` as the batch is
read (a list's batches when the entry point is called or built).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.weight_norm import WeightNorm as _WeightNormHook
from torch.overrides import TorchFunctionMode

from . import distributed
from ._checks import check_choice

Mode = Literal["eval", "train"]
Reduction = Literal["mean", "sum"]
Batch = tuple[Any, Tensor]

__all__ = [
    "FunctionalModel",
    "preserve_global_rng",
    "autocast_off",
    "map_inputs",
    "sample_dims",
    "full_precision",
    "as_batches",
    "batch_size",
    "check_batch",
    "detect_reduction",
    "scalar_loss",
    "to_device",
    "outside_inference",
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


def outside_inference(x: Any) -> Any:
    """Clone the tensors of ``x`` made under :func:`torch.inference_mode`.

    Tensors nested in tuples/lists/dicts too; call under
    ``torch.inference_mode(False)`` so the clones are ordinary tensors.
    Autograd cannot save an inference tensor for backward, so inputs made in
    inference mode (a Lightning validation loop) are copied once; every other
    entry is returned as it is.
    """
    if isinstance(x, Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, (list, tuple)):
        return type(x)(outside_inference(t) for t in x)
    if isinstance(x, dict):
        return {k: outside_inference(v) for k, v in x.items()}
    return x


def batch_size(targets: Tensor) -> int:
    """Return the number of samples in a batch (the leading size of ``targets``)."""
    return int(targets.shape[0])


def check_batch(
    inputs: Any, targets: Any, *, name: str = "data", index: int | None = None
) -> None:
    """Check that every input tensor has as many samples as ``targets``.

    Args:
        inputs: A tensor, a tuple/list of tensors (multi-input models) or a dict
            of tensors (keyword inputs); see the module docstring.
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
            f"{_BATCH_FN_HINT if name != 'targets' else ''}"
        )
    if targets.dim() == 0:
        raise ValueError(
            f"{where}: the targets must have a leading batch dimension; got a "
            "0-dimensional tensor."
        )
    n = int(targets.shape[0])
    if isinstance(inputs, Mapping):
        tensors: Any = list(inputs.values())
    else:
        tensors = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    for t in tensors:
        if isinstance(t, Tensor) and t.dim() >= 1 and int(t.shape[0]) != n:
            raise ValueError(
                f"{where}: the inputs have {int(t.shape[0])} samples but the "
                f"targets {n}; inputs and targets must have the same leading size."
            )


_BATCH_FN_HINT = (
    " A batch must be an (inputs, targets) pair; for any other structure pass "
    "`batch_fn=` mapping one batch to (inputs, targets) (see geoopt_sgd._model)."
)


def _per_sample(x: Any) -> bool:
    """Whether an entry of the inputs has a leading sample dimension."""
    return isinstance(x, Tensor) and x.dim() >= 1


def map_inputs(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every per-sample tensor of ``inputs`` (tensor, tuple/list, dict).

    Entries of a tuple/list/dict that are not tensors, or are 0-dimensional
    tensors (no sample dimension, e.g. a scale), are kept as they are.
    """
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(fn(x) if _per_sample(x) else x for x in inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) if _per_sample(v) else v for k, v in inputs.items()}
    raise TypeError(
        "inputs must be a tensor, a tuple/list of tensors or a dict of tensors; "
        f"got {type(inputs).__name__}."
    )


def sample_dims(inputs: Any) -> Any:
    """The ``in_dims`` of ``inputs`` for a :func:`torch.func.vmap` over samples.

    ``0`` for each per-sample tensor, ``None`` for the entries :func:`map_inputs`
    keeps (non-tensors such as ``None`` or a flag, 0-dimensional tensors), in
    the structure of ``inputs``.
    """
    if isinstance(inputs, Tensor):
        return 0
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(0 if _per_sample(x) else None for x in inputs)
    if isinstance(inputs, Mapping):
        return {k: 0 if _per_sample(v) else None for k, v in inputs.items()}
    return None


def _pair(batch: Any, name: str, index: int | None, mapped: bool) -> tuple[Any, Tensor]:
    """Check that ``batch`` is an ``(inputs, targets)`` pair and return it."""
    where = f"`{name}`" if index is None else f"`{name}` (batch {index})"
    source = "`batch_fn` returned" if mapped else "got"
    hint = "" if mapped else _BATCH_FN_HINT
    if isinstance(batch, Mapping):
        raise TypeError(
            f"{where}: {source} a dict with keys {sorted(map(str, batch))}, not an "
            f"(inputs, targets) pair.{hint}"
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = (
            f"a {type(batch).__name__} of length {len(batch)}"
            if isinstance(batch, (tuple, list))
            else f"a {type(batch).__name__}"
        )
        raise TypeError(
            f"{where}: {source} {what}, not an (inputs, targets) pair.{hint}"
        )
    inputs, targets = batch
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"{where}: {source} targets of type {type(targets).__name__}; the "
            f"targets must be a tensor.{hint}"
        )
    if not isinstance(inputs, (Tensor, tuple, list, Mapping)):
        raise TypeError(
            f"{where}: {source} inputs of type {type(inputs).__name__}; the inputs "
            f"must be a tensor, a tuple/list of tensors or a dict of tensors.{hint}"
        )
    return inputs, targets


class _CheckedBatches:
    """A re-iterable view of ``data`` yielding checked ``(inputs, targets)`` pairs."""

    def __init__(
        self, data: Iterable[Any], batch_fn: Callable[[Any], Any] | None, name: str
    ) -> None:
        self.data, self.batch_fn, self.name = data, batch_fn, name

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.data):
            if self.batch_fn is not None:
                batch = self.batch_fn(batch)
            yield _pair(batch, self.name, i, self.batch_fn is not None)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]


def _check_batch_fn(batch_fn: Any) -> None:
    if batch_fn is not None and not callable(batch_fn):
        raise TypeError(
            f"`batch_fn` must be callable or None; got {type(batch_fn).__name__}."
        )


class EmptyData(ValueError):
    """``data`` holds no sample (a ``ValueError``; see :func:`local_batches`)."""


def as_batches(
    data: Any,
    batch_fn: Callable[[Any], Any] | None = None,
    *,
    name: str = "data",
) -> list[Batch] | Iterable[Batch]:
    """Normalise ``data`` to an iterable of ``(inputs, targets)`` batches.

    Args:
        data: One ``(inputs, targets)`` batch or any re-iterable of batches (a
            list, a ``DataLoader``); the batch structure and ``batch_fn`` are
            described in the module docstring.
        batch_fn: ``None`` or a callable mapping one batch of ``data`` to
            ``(inputs, targets)``.
        name: The argument named in messages.

    Returns:
        A re-iterable of ``(inputs, targets)`` batches: a list when ``data`` is a
        batch or a list/tuple of batches (checked now), else a view checking each
        batch as it is read.

    Raises:
        TypeError: If ``data`` is neither a batch nor an iterable of batches, a
            batch (after ``batch_fn``) is not an ``(inputs, targets)`` pair, or
            ``batch_fn`` is not callable.
        ValueError: If ``data`` is a single empty batch or an empty sequence, or
            a batch's inputs and targets differ in length (checked for a batch
            or a list/tuple of batches; a loader's batches are checked as they
            are used).
    """
    _check_batch_fn(batch_fn)
    if batch_fn is not None and isinstance(data, Mapping):
        data = [data]  # one batch given as a dict
    elif (
        batch_fn is None
        and isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
    ):
        # one (inputs, targets) batch: a list of batches never has a tensor
        # as its second entry
        inputs, targets = _pair(data, name, None, False)
        if targets.dim() >= 1 and batch_size(targets) == 0:
            raise EmptyData(f"`{name}` is empty: the batch has 0 samples.")
        check_batch(inputs, targets, name=name)
        return [(inputs, targets)]
    if isinstance(data, (list, tuple)) and len(data) == 0:
        raise EmptyData(f"`{name}` is empty: got an empty sequence of batches.")
    if isinstance(data, (list, tuple)):
        out = []
        for i, batch in enumerate(data):
            if batch_fn is not None:
                batch = batch_fn(batch)
            inputs, targets = _pair(batch, name, i, batch_fn is not None)
            if targets.dim() >= 1:
                check_batch(inputs, targets, name=name, index=i)
            out.append((inputs, targets))
        return out
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        hint = _BATCH_FN_HINT if isinstance(data, Mapping) else ""
        raise TypeError(
            f"`{name}` must be an (inputs, targets) batch or an iterable of such "
            f"batches (e.g. a DataLoader); got {type(data).__name__}.{hint}"
        )
    return _CheckedBatches(data, batch_fn, name)


def local_batches(
    data: Any, batch_fn: Callable[[Any], Any] | None = None
) -> list[Batch] | Iterable[Batch]:
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
        return as_batches(data, batch_fn)
    except EmptyData:  # not a malformed batch: that is an error on any rank
        if not distributed.is_distributed():
            raise
        return []


@contextlib.contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Restore torch's global RNG state (CPU, and CUDA if initialised) on exit.

    Iterating over user data may draw from the global generator (a shuffling
    ``DataLoader`` draws its sampler's seed there); the package's measurements and
    NoisyGD's statistics promise never to move it.

    Yields:
        Nothing; the state is restored when the block exits, even on error.
    """
    devices = (
        list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        yield


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
        ValueError: If the reduction is not ``"mean"`` or ``"sum"``,
            ``loss_fn.reduction`` is ``"none"`` (whatever ``reduction`` says), or
            ``reduction`` contradicts ``loss_fn.reduction`` (``"mean"`` against
            ``"sum"``: the batches would be weighted for the other one).
    """
    attribute = getattr(loss_fn, "reduction", "mean")
    # an explicit ``loss_reduction`` cannot make a per-sample loss scalar
    if attribute == "none" or (reduction is None and attribute not in ("mean", "sum")):
        raise ValueError(
            f"`loss_fn` has reduction={attribute!r}; curvature needs a scalar "
            "loss: use reduction 'mean' or 'sum'."
        )
    if reduction is None:
        reduction = attribute
    check_choice("loss_reduction", reduction, ("mean", "sum"))
    # (a loss without the attribute, or with another one such as KLDivLoss's
    # "batchmean", is taken as ``reduction`` says)
    if (
        hasattr(loss_fn, "reduction")
        and attribute in ("mean", "sum")
        and reduction != attribute
    ):
        raise ValueError(
            f"`loss_reduction`={reduction!r} contradicts the loss_fn's "
            f"reduction={attribute!r}: pass loss_reduction={attribute!r} or None "
            "(read from `loss_fn`); `loss_reduction` is for a loss without a "
            "`reduction` attribute."
        )
    return reduction  # type: ignore[return-value]


def scalar_loss(loss_fn: Callable[..., Tensor], outputs: Any, targets: Any) -> Tensor:
    """Return ``loss_fn(outputs, targets)``, checked to be one number, 0-dimensional.

    Raises:
        TypeError: If ``loss_fn`` does not return a tensor.
        ValueError: If it returns more (or fewer) than one number, e.g. one loss
            per sample.
    """
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"`loss_fn` must return a scalar tensor; got {type(loss).__name__}."
        )
    if loss.numel() != 1:
        raise ValueError(
            "`loss_fn` must return a scalar (the batch loss, its mean or sum over "
            f"samples); got a tensor of shape {tuple(loss.shape)}."
        )
    return loss.reshape(())


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


# Dropout drawn by a function call, not a Dropout module: ``F.dropout(x, p,
# training=self.training)`` in a forward (timm's classifier heads), and the
# ``torch.*dropout*`` functions it calls. Inside the train-mode policy each one
# is the identity, as a Dropout module in eval mode is.
_DROPOUT_FUNCTIONS = frozenset(
    {
        torch.nn.functional.dropout,
        torch.nn.functional.dropout1d,
        torch.nn.functional.dropout2d,
        torch.nn.functional.dropout3d,
        torch.nn.functional.alpha_dropout,
        torch.nn.functional.feature_alpha_dropout,
        torch.dropout,
        torch.dropout_,
        torch.alpha_dropout,
        torch.alpha_dropout_,
        torch.feature_dropout,
        torch.feature_dropout_,
        torch.feature_alpha_dropout,
        torch.feature_alpha_dropout_,
    }
)
# The recurrent kernels take the dropout between layers as an argument: index 5
# of ``(input, hx, params, has_biases, num_layers, dropout, train, ...)``, 6 of
# the packed-sequence overload ``(data, batch_sizes, hx, params, has_biases,
# num_layers, dropout, train, ...)``.
_RNN_FUNCTIONS = frozenset({torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu})
# Attention dropout drawn inside the kernel: ``dropout_p`` (index 4) of
# ``scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, ...)``,
# passed as ``p if self.training else 0`` by timm's and Hugging Face's attention.
_SDPA = torch.nn.functional.scaled_dot_product_attention


class _PolicyFunctions(TorchFunctionMode):
    """The function-level part of the mode policy (see the module docstring).

    With ``weight_norm``: ``torch._weight_norm`` is evaluated as
    ``v * (g / norm_except_dim(v, 2, dim))``, the definition torch's own
    composite path uses; the fused kernel ``_weight_norm_interface`` it
    dispatches to has a wrong double backward (the Hessian in ``v`` is not even
    symmetric) and no forward-mode AD. With ``no_dropout``: functional dropout
    returns its input, recurrent kernels run without dropout between layers and
    ``scaled_dot_product_attention`` without attention dropout.
    """

    def __init__(self, *, weight_norm: bool, no_dropout: bool) -> None:
        super().__init__()
        special: set[Callable[..., Any]] = set()
        if weight_norm:
            special.add(torch._weight_norm)
        if no_dropout:
            special |= _DROPOUT_FUNCTIONS | _RNN_FUNCTIONS | {_SDPA}
        # one set lookup per torch call of the forward: the common path is cheap
        self._special = frozenset(special)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func not in self._special:
            return func(*args, **kwargs)
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        if func in _DROPOUT_FUNCTIONS:
            return args[0] if args else kwargs["input"]
        if func is _SDPA:  # no attention dropout
            if "dropout_p" in kwargs:
                kwargs = {**kwargs, "dropout_p": 0.0}
            elif len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            return func(*args, **kwargs)
        if len(args) > 6:  # a recurrent kernel: no dropout between layers
            args = list(args)
            args[5 if isinstance(args[3], bool) else 6] = 0.0
        return func(*args, **kwargs)


def _uses_weight_norm(model: nn.Module) -> bool:
    """Whether a module of ``model`` is weight-normalised (either torch API).

    One pass over the modules: the ``parametrizations`` API registers a
    ``_WeightNorm`` module, the older one a forward pre-hook.
    """
    for m in model.modules():
        if type(m).__name__ == "_WeightNorm":
            return True
        hooks = m._forward_pre_hooks
        if hooks and any(isinstance(h, _WeightNormHook) for h in hooks.values()):
            return True
    return False


@contextlib.contextmanager
def _policy_functions(model: nn.Module, mode: Mode) -> Iterator[None]:
    """:class:`_PolicyFunctions` where needed: weight norm, or train mode.

    In eval mode a forward's ``F.dropout(..., training=self.training)`` is
    already off and nothing is intercepted (no per-call overhead).
    """
    weight_norm = _uses_weight_norm(model)
    no_dropout = mode == "train"
    if not (weight_norm or no_dropout):
        yield
        return
    with _PolicyFunctions(weight_norm=weight_norm, no_dropout=no_dropout):
        yield


@contextlib.contextmanager
def _mode_policy(model: nn.Module, mode: Mode) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        else:
            model.train()
            for m in model.modules():
                if isinstance(m, nn.MultiheadAttention) or any(
                    s in type(m).__name__ for s in _DROPOUT_NAMES
                ):
                    m.eval()
        yield
    finally:
        for m, f in flags:
            m.training = f


# What torch.func says when a forward cannot run under its transforms: vmap's
# own refusals (``.item()``, data-dependent control flow, random draws) and a
# kernel reading the raw storage of a transformed tensor (packed sequences under
# ``grad``/``jvp``; torch 2.14.1).
_TRANSFORM_MARKERS = ("vmap: ", "doesn't have storage")
_UNTRANSFORMABLE = (
    "The model's forward cannot run under torch.func's transforms (grad, jvp, "
    "vmap), which this computation needs (per-sample gradients, the probes, and "
    "the 'fwd_rev'/'rev_rev' HVP routes). Known causes: a packed sequence "
    "(`nn.utils.rnn.pack_padded_sequence`: pad the batch instead), `.item()` or "
    "data-dependent control flow on a tensor, a random draw in `forward`. "
    "HessianOperator and GGNOperator with method='double_backward' (the "
    "default) need no transform. torch said: {err}"
)


class UntransformableModelError(RuntimeError):
    """The model's forward cannot run under torch.func's transforms."""


def _untransformable(err: RuntimeError, params: Sequence[Tensor]) -> bool:
    """Whether ``err`` is torch.func refusing the forward (not a user error)."""
    msg = str(err)
    if not any(m in msg for m in _TRANSFORM_MARKERS):
        return False
    if msg.startswith("vmap: "):
        # only inside a transform of the package: a plain forward raising it is
        # the model's own vmap (its bug, under the transform-free route too)
        return torch._C._functorch.maybe_current_level() is not None
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return is_wrapped is None or any(is_wrapped(p) for p in params)


class FunctionalModel:
    """A model seen as a pure function of (a subset of) its parameters.

    Args:
        model: The user's model (DDP/DataParallel wrappers are unwrapped).
        params: Which parameters to differentiate: ``None`` (all with
            ``requires_grad``), or an iterable of parameter tensors of the model, or
            of their names (a wrapper's ``"module."``-prefixed names too).
            Parameters outside the selection are held fixed.
        mode: ``"eval"`` or ``"train"``; see the module docstring.

    Attributes:
        names: Names of the selected parameters, in order.
        params: The selected parameters, detached (views of the model's data).
        shapes: Their shapes.
        numel: Total number of selected entries, ``P``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, or ``params`` is a single
            tensor or name instead of an iterable of them.
        ValueError: If ``mode`` is unknown, ``model`` has no parameters, the
            selection is empty, names a tensor that is not a parameter of
            ``model``, or selects a parameter twice.
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
            if isinstance(params, (Tensor, str)):
                # list() would split it into rows or characters
                raise TypeError(
                    "`params` must be an iterable of parameters or of their names; "
                    f"got a single {type(params).__name__}: wrap it in a list."
                )
            params = list(params)
            by_id = {id(p): n for n, p in named.items()}
            names = []
            for p in params:
                if isinstance(p, str):
                    if (
                        p not in named
                        and self.model is not model
                        and p.startswith("module.")
                        and p[len("module.") :] in named
                    ):
                        # a wrapper's name (``ddp.named_parameters()``)
                        p = p[len("module.") :]
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
        repeated = sorted(n for n, c in collections.Counter(names).items() if c > 1)
        if repeated:
            raise ValueError(
                f"`params` selects {repeated[0]!r} more than once (a tensor or name "
                "given twice, or two tied weights, which are one parameter); "
                "select each parameter once."
            )
        self.names: list[str] = names
        self.params: list[Tensor] = [named[n].detach() for n in names]
        self.shapes: list[torch.Size] = [p.shape for p in self.params]
        self.numel: int = sum(p.numel() for p in self.params)
        self._fixed = {n: p.detach() for n, p in named.items() if n not in set(names)}
        self.device = self.params[0].device
        # flat vectors hold every parameter exactly: the widest floating dtype
        # (float32 and float64 parameters give float64 vectors)
        self.dtype = functools.reduce(
            torch.promote_types, (p.dtype for p in self.params)
        )
        self.dtypes: list[torch.dtype] = [p.dtype for p in self.params]

    @property
    def batch_coupled(self) -> bool:
        """Whether a sample's outputs depend on the other samples of its batch.

        True in train mode (batch statistics), and in eval mode when a BatchNorm
        keeps no running statistics (``track_running_stats=False``), so that it
        normalises with the batch's statistics in eval mode too. Per-sample
        gradients are then rows of the batch's Jacobian, not gradients on
        batches of one.
        """
        if self.mode == "train":
            return True
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is None
            and m.running_var is None
            for m in self.model.modules()
        )

    def buffers(self) -> dict[str, Tensor]:
        """Return the model's current buffers (not cloned)."""
        return dict(self.model.named_buffers())

    @contextlib.contextmanager
    def policy(self) -> Iterator[None]:
        """Apply the mode policy to the model for the duration of the block.

        Autocast is disabled inside (see :func:`autocast_off`): the model is
        evaluated in its parameters' dtype. Weight normalisation is evaluated
        by its composite definition (see the module docstring).
        """
        with (
            _mode_policy(self.model, self.mode),
            autocast_off(self.device.type),
            _policy_functions(self.model, self.mode),
        ):
            yield

    def __call__(self, params: Sequence[Tensor], inputs: Any) -> Tensor:
        """Evaluate the model at ``params`` (one per selected name) on ``inputs``.

        Call inside :meth:`policy`. Buffers are cloned in train mode so the
        model's running statistics are never updated. ``inputs`` is a tensor
        (``model(inputs)``), a tuple/list (``model(*inputs)``) or a dict
        (``model(**inputs)``).
        """
        values = dict(zip(self.names, params, strict=True))
        values.update(self._fixed)
        bufs = self.buffers()
        if self.mode == "train":
            bufs = {k: b.clone() for k, b in bufs.items()}
        values.update(bufs)
        kwargs: dict[str, Any] = {}
        if isinstance(inputs, (tuple, list)):
            args = tuple(inputs)
        elif isinstance(inputs, Mapping):
            args, kwargs = (), dict(inputs)
        else:
            args = (inputs,)
        try:
            return functional_call(
                self.model, values, args, kwargs, tie_weights=True, strict=False
            )
        except RuntimeError as e:
            if _untransformable(e, params):
                raise UntransformableModelError(_UNTRANSFORMABLE.format(err=e)) from e
            raise

    def total_count(self, batches: Iterable[Batch]) -> int:
        """Number of samples in ``batches``, summed over ranks when distributed."""
        n = sum(batch_size(t) for _, t in batches)
        if distributed.is_distributed():
            t = torch.tensor([n], dtype=torch.long, device=self.device)
            n = int(distributed.all_reduce_sum(t).item())
        return n
