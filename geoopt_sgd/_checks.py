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
    "check_int",
    "check_number",
    "check_vector_shape",
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


def check_vector_shape(name: str, v: Any, size: int) -> None:
    """Check that ``v`` is one vector ``(size,)`` or a block of them ``(size, m)``.

    Args:
        name: The argument's name, used in the message.
        v: The value received.
        size: The vectors' length (e.g. the parameter count ``P``).

    Raises:
        TypeError: If ``v`` is not a tensor.
        ValueError: If its shape is neither ``(size,)`` nor ``(size, m)``.
    """
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(v).__name__}.")
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
