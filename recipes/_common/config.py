"""A recipe's ``Config`` dataclass: its fields, its command line, its checks.

A recipe declares each field with :func:`option`, which keeps the ``--help`` text
in the field's metadata::

    @dataclass(frozen=True)
    class Config:
        seed: int = option(0, "seed of the initialisation")

:func:`parse_config` turns that dataclass into an argparse CLI (``--field-name``),
with ``--quick`` (start from ``Config.quick()``) and ``--config f.json`` (file
values override the defaults; the command line overrides the file). The checks
here (:func:`check_config_basics`, :func:`check_choice`, :func:`check_min`) run on
the config alone, before any data is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .data import check_dataset
from .models import LOSSES, check_model_name

DEVICES = ("cpu", "cuda")

__all__ = [
    "DEVICES",
    "RunOptions",
    "check_choice",
    "check_config_basics",
    "check_device",
    "check_min",
    "config_from_dict",
    "config_to_dict",
    "option",
    "parse_config",
    "resolve_device",
]


def option(default: Any, help: str) -> Any:  # noqa: A002 - argparse's name
    """Declare a config field with its ``--help`` text.

    Args:
        default: The field's default (immutable: configs are frozen).
        help: One line for ``--help``; the default is appended.

    Returns:
        A :func:`dataclasses.field` with ``metadata={"help": help}``.
    """
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The fields every recipe's ``Config`` starts with (what :class:`Run` reads).

    A recipe subclasses it; redeclaring ``seed`` there changes its help text, not
    its place on the command line.
    """

    seed: int = option(0, "seed of the data split, the initialisation and every run")
    device: str = option("cpu", "'cpu' or 'cuda'")
    out_dir: str = option("runs", "outputs go to <out_dir>/<recipe>/")
    resume: bool = option(False, "continue from <out_dir>/<recipe>/checkpoint.pt")


# --------------------------------------------------------------------------------------
# Config <-> dict / JSON
# --------------------------------------------------------------------------------------


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _split_items(text: str) -> list[str]:
    """Split a CLI tuple on commas and whitespace outside brackets and quotes.

    ``"a=1,b=(8, 8),c='x y'"`` gives ``["a=1", "b=(8, 8)", "c='x y'"]``, so
    ``--model-kwargs`` can pass tuples, lists and quoted strings.
    """
    items, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if cur:
        items.append("".join(cur))
    return items


def _convert(name: str, tp: Any, value: Any) -> Any:
    """Coerce a JSON or CLI value to the field's annotated type."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and value in ("none", "None", "null")):
        if optional:
            return None
        raise ValueError(f"`{name}` must not be None.")
    origin = typing.get_origin(base)
    if origin is tuple or base is tuple:
        args = typing.get_args(base)
        item = args[0] if args else str
        if isinstance(value, str):
            value = _split_items(value)
        return tuple(_convert(name, item, v) for v in value)
    if base is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"`{name}` must be a boolean; got {value!r}.")
        return bool(value)
    if base in (int, float, str):
        try:
            out = base(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"`{name}` must be of type {base.__name__}; got {value!r}."
            ) from None
        if base is int and isinstance(value, float) and value != out:
            raise ValueError(f"`{name}` must be an integer; got {value!r}.")
        return out
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return a config dataclass as a JSON-ready dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def config_from_dict(cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """Build ``cls`` from ``values`` on top of ``base`` (default ``cls()``).

    Args:
        cls: A dataclass type.
        values: Field values (e.g. from JSON); converted to the annotated types.
        base: The instance whose values fill the fields not in ``values``.

    Returns:
        A new ``cls`` instance.

    Raises:
        ValueError: If ``values`` names an unknown field or a value has the wrong
            type.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(map(repr, unknown))}; the fields "
            f"are {', '.join(map(repr, names))}."
        )
    base = cls() if base is None else base
    conv = {k: _convert(k, hints[k], v) for k, v in values.items()}
    return dataclasses.replace(base, **conv)


def parse_config(
    cls: type, argv: Sequence[str] | None = None, description: str | None = None
) -> Any:
    """Parse a recipe's command line into its ``Config``.

    Precedence (lowest first): ``cls()`` or ``cls.quick()`` with ``--quick``; the
    values in ``--config f.json``; the ``--field-name`` options given. Booleans take
    ``--flag`` / ``--no-flag``; tuples take comma- or space-separated values;
    optional fields take ``none``. Each option's help is the field's
    ``metadata["help"]`` (see :func:`option`) and its default.

    Args:
        cls: The recipe's frozen ``Config`` dataclass (with a ``quick()``
            classmethod).
        argv: The arguments (default ``sys.argv[1:]``).
        description: The ``--help`` text (e.g. the recipe's docstring).

    Returns:
        The config instance.

    Raises:
        SystemExit: On ``--help`` or an invalid command line (argparse's
            behaviour), or a config file that cannot be read or names an unknown
            field.
    """
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="start from Config.quick() (CI setting)"
    )
    parser.add_argument(
        "--config", metavar="FILE", help="JSON file of field values (CLI overrides)"
    )
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        tp, _ = _strip_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        help_ = f"{text} (default: {getattr(defaults, f.name)!r})"
        if tp is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_,
            )
        else:
            parser.add_argument(
                flag, dest=f.name, default=argparse.SUPPRESS, metavar="X", help=help_
            )
    ns = vars(parser.parse_args(argv))
    quick, config_file = ns.pop("quick"), ns.pop("config")
    base = cls.quick() if quick else cls()
    try:
        if config_file is not None:
            with open(config_file) as fh:
                values = json.load(fh)
            if not isinstance(values, dict):
                raise ValueError(
                    f"--config: {config_file!r} must hold a JSON object of field "
                    f'values ({{"field": value, ...}}); got a {type(values).__name__}.'
                )
            base = config_from_dict(cls, values, base)
        return config_from_dict(cls, ns, base)
    except (OSError, ValueError) as err:
        parser.error(str(err))


# --------------------------------------------------------------------------------------
# Checks on the config alone (before any data is loaded)
# --------------------------------------------------------------------------------------


def check_choice(cfg: Any, name: str, choices: Iterable[str]) -> None:
    """Check that field ``name`` is one of ``choices``.

    Raises:
        ValueError: ``"`name` must be one of 'a', 'b'; got 'c'."``
    """
    choices = tuple(choices)
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}."
        )


def check_min(cfg: Any, names: Iterable[str], minimum: int) -> None:
    """Check that every field in ``names`` is ``>= minimum``.

    Raises:
        ValueError: On the first field below ``minimum``.
    """
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ValueError(f"`{name}` must be >= {minimum}; got {value!r}.")


def check_device(name: str) -> str:
    """Check a device name, and that CUDA is there when asked for.

    Args:
        name: ``"cpu"`` or ``"cuda"`` (optionally ``"cuda:N"``).

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: If the name is unknown or malformed, CUDA is not available,
            or the CUDA index is not below the device count.
    """
    if name.split(":")[0] not in DEVICES:
        raise ValueError(
            f"`device` must be one of {', '.join(map(repr, DEVICES))}; got {name!r}."
        )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"`device` {name!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1')."
        ) from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"`device` is {name!r} but CUDA is not available here; pass --device cpu."
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(
                f"`device` {name!r}: this machine has {count} CUDA device(s), "
                f"'cuda:0' to 'cuda:{count - 1}'."
            )
    return name


def resolve_device(name: str) -> torch.device:
    """Return the :class:`torch.device` for a checked device name.

    Raises:
        ValueError: See :func:`check_device`.
    """
    return torch.device(check_device(name))


def check_config_basics(cfg: Any) -> None:
    """Validate the fields most recipes share, where present.

    Checks ``model``, ``dataset``, ``device``, ``loss``, every field whose name
    ends in ``lr`` (> 0) and ``seed`` (>= 0).

    Args:
        cfg: A recipe config.

    Raises:
        ValueError: On the first invalid field.
    """
    if hasattr(cfg, "model"):
        check_model_name(cfg.model)
    if hasattr(cfg, "dataset"):
        check_dataset(cfg.dataset)
    if hasattr(cfg, "device"):
        check_device(cfg.device)
    if hasattr(cfg, "loss"):
        check_choice(cfg, "loss", LOSSES)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name.endswith("lr") and v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"`{f.name}` must be > 0; got {v!r}.")
        if f.name == "seed" and v < 0:
            raise ValueError(f"`seed` must be >= 0; got {v!r}.")
