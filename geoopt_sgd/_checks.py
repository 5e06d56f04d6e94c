"""Validators that produce the package's standard error messages.

Every public entry point validates its arguments here, at construction or call
entry, so that messages are uniform: the argument's name, the value received,
and the allowed values (and the fix, where one is known).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "check_choice",
    "check_finite_tensor",
    "check_floating_params",
    "check_int",
    "check_number",
    "check_param_group",
    "check_state_dict",
    "check_unique_params",
    "check_vector_shape",
    "integer_value",
]


def _fmt_choices(choices: Iterable[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Check that ``value`` is one of ``choices``.

    Args:
        name: The argument's name, used in the message.
        value: The value received.
        choices: The allowed values.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: If ``value`` is not among ``choices``.
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {_fmt_choices(choices)}; got {value!r}."
        )
    return value


def check_number(
    name: str,
    value: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    allow_none: bool = False,
    allow_tensor: bool = False,
) -> Any:
    """Check that ``value`` is a finite real number within the given bounds.

    Args:
        name: The argument's name, used in the message.
        value: The value received.
        ge: Inclusive lower bound.
        gt: Exclusive lower bound.
        le: Inclusive upper bound.
        lt: Exclusive upper bound.
        allow_none: Accept ``None`` (returned unchanged).
        allow_tensor: Accept a one-element tensor (checked by its value).

    Returns:
        ``value`` unchanged.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If ``value`` is not finite or violates a bound.
    """
    if value is None and allow_none:
        return value
    if isinstance(value, torch.Tensor) and allow_tensor:
        if value.numel() != 1:
            raise ValueError(
                f"`{name}` must be a number or a one-element tensor; "
                f"got a tensor of shape {tuple(value.shape)}."
            )
        x = float(value.detach().reshape(()).item())
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number; got {type(value).__name__}.")
    else:
        x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"`{name}` must be finite; got {value!r}.")
    if ge is not None and not x >= ge:
        raise ValueError(f"`{name}` must be >= {ge}; got {value!r}.")
    if gt is not None and not x > gt:
        raise ValueError(f"`{name}` must be > {gt}; got {value!r}.")
    if le is not None and not x <= le:
        raise ValueError(f"`{name}` must be <= {le}; got {value!r}.")
    if lt is not None and not x < lt:
        raise ValueError(f"`{name}` must be < {lt}; got {value!r}.")
    return value


def check_int(
    name: str,
    value: Any,
    *,
    ge: int | None = None,
    le: int | None = None,
    allow_none: bool = False,
) -> Any:
    """Check that ``value`` is an integer within the given bounds.

    Args:
        name: The argument's name, used in the message.
        value: The value received.
        ge: Inclusive lower bound.
        le: Inclusive upper bound.
        allow_none: Accept ``None`` (returned unchanged).

    Returns:
        ``value`` unchanged.

    Raises:
        TypeError: If ``value`` is not an integer.
        ValueError: If ``value`` violates a bound.
    """
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer; got {type(value).__name__}.")
    if ge is not None and value < ge:
        raise ValueError(f"`{name}` must be >= {ge}; got {value}.")
    if le is not None and value > le:
        raise ValueError(f"`{name}` must be <= {le}; got {value}.")
    return value


def integer_value(value: Any) -> Any:
    """``value``, or the Python int a one-element integer tensor holds.

    For counters read from a state dict, checked afterwards with
    :func:`check_int` (which then names a float, a string, ... as not an
    integer instead of converting it).
    """
    if (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    ):
        return int(value.item())
    return value


def check_vector_shape(name: str, v: Any, size: int) -> None:
    """Check that ``v`` is one vector ``(size,)`` or a block of them ``(size, m)``.

    Args:
        name: The argument's name, used in the message.
        v: The value received.
        size: The vectors' length (e.g. the parameter count ``P``).

    Raises:
        TypeError: If ``v`` is not a tensor, or is complex.
        ValueError: If its shape is neither ``(size,)`` nor ``(size, m)``, or it
            is on the meta device.
    """
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(v).__name__}.")
    if v.is_complex():
        raise TypeError(f"`{name}` must be real; got dtype {v.dtype}.")
    if v.is_meta:
        raise ValueError(f"`{name}` is on the meta device (it has no data).")
    if v.dim() not in (1, 2) or v.shape[0] != size:
        raise ValueError(
            f"`{name}`: expected shape ({size},) or ({size}, m), got {tuple(v.shape)}."
        )


def check_finite_tensor(name: str, v: torch.Tensor) -> None:
    """Check that a tensor holds only finite values.

    Args:
        name: The argument's name, used in the message.
        v: The tensor received.

    Raises:
        ValueError: If ``v`` holds NaN or infinite entries.
    """
    # Fast path: one reduction instead of a P-sized boolean mask (the mask cost
    # ~28 ms on an 11M-entry vector on CPU, a tenth of a resnet18 HVP). A NaN or
    # Inf entry always makes the sum non-finite; a finite sum that overflows only
    # sends us to the exact check below.
    if v.is_floating_point() and bool(torch.isfinite(v.sum())):
        return
    if not bool(torch.isfinite(v).all()):
        n_bad = int((~torch.isfinite(v)).sum())
        raise ValueError(f"`{name}` must be finite; it has {n_bad} non-finite entries.")


def _group_tensors(params: Any) -> list[Any]:
    """The tensors of a param group's ``params`` entry (names stripped)."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (set, dict)) or not isinstance(params, Iterable):
        return []  # torch's own check reports these
    return [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]


def check_unique_params(
    name: str, params: Any, existing: Iterable[dict[str, Any]] = ()
) -> None:
    """Check that a param group repeats no tensor, within itself or across groups.

    A tensor listed twice would be updated twice per step. Identity is the
    tensor object, as in torch's own cross-group check.

    Args:
        name: The argument's name, used in the message.
        params: The new group's ``params`` (tensors or ``(name, tensor)`` pairs).
        existing: The param groups already held.

    Raises:
        ValueError: If a tensor appears twice in ``params`` or is already in
            one of ``existing``.
    """
    seen: set[int] = set()
    for group in existing:
        seen.update(id(p) for p in _group_tensors(group["params"]))
    new: set[int] = set()
    for i, p in enumerate(_group_tensors(params)):
        if id(p) in new:
            raise ValueError(
                f"`{name}` lists the same tensor twice (entry {i}, shape "
                f"{tuple(getattr(p, 'shape', ()))}); it would be updated twice per "
                "step. Pass each parameter once."
            )
        if id(p) in seen:
            raise ValueError(
                f"`{name}`: entry {i} (shape {tuple(getattr(p, 'shape', ()))}) is "
                "already in another param group; each parameter may belong to "
                "one group only."
            )
        new.add(id(p))


def check_floating_params(name: str, params: Any) -> None:
    """Check that every tensor of a param group is floating point.

    Args:
        name: The argument's name, used in the message.
        params: The group's ``params`` (tensors or ``(name, tensor)`` pairs).

    Raises:
        TypeError: If a tensor has an integer, boolean or complex dtype.
    """
    for i, p in enumerate(_group_tensors(params)):
        if isinstance(p, torch.Tensor) and not p.is_floating_point():
            raise TypeError(
                f"`{name}` must be floating point tensors; entry {i} has dtype "
                f"{p.dtype}."
            )


def check_param_group(
    param_group: Any,
    existing: Iterable[dict[str, Any]],
    *,
    name: str = "params",
    floating: bool = False,
) -> None:
    """Check a param group before an optimizer adds it (duplicates, dtype).

    A one-shot iterator in ``param_group["params"]`` (e.g. ``model.parameters()``)
    is replaced by a list first, so the check does not consume it.

    Args:
        param_group: The group dict about to be added.
        existing: The optimizer's current param groups.
        name: The argument's name, used in the messages.
        floating: Also require floating-point tensors.

    Raises:
        ValueError: If a tensor is repeated (see :func:`check_unique_params`).
        TypeError: If ``floating`` and a tensor is not floating point.
    """
    if not isinstance(param_group, dict) or "params" not in param_group:
        return  # torch's add_param_group reports these
    params = param_group["params"]
    if not isinstance(params, (torch.Tensor, set, list, tuple)) and isinstance(
        params, Iterable
    ):
        param_group["params"] = params = list(params)
    check_unique_params(name, params, existing)
    if floating:
        check_floating_params(name, params)


def check_state_dict(name: str, state_dict: Any) -> None:
    """Check that ``state_dict`` looks like a torch optimizer state dict.

    Args:
        name: The argument's name, used in the messages.
        state_dict: The value received.

    Raises:
        TypeError: If it is not a dict.
        ValueError: If it lacks the ``"state"`` or ``"param_groups"`` entry.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(
            f"`{name}` must be a dict returned by an optimizer's state_dict(); got "
            f"{type(state_dict).__name__}."
        )
    missing = [k for k in ("state", "param_groups") if k not in state_dict]
    if missing:
        raise ValueError(
            f"`{name}` has no {' or '.join(repr(k) for k in missing)} entry; pass "
            "a dict returned by an optimizer's state_dict()."
        )
