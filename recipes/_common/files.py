"""What a run writes and reads back: strict JSON and checkpoints, both atomic.

Every file is written to a temporary name and renamed into place
(:func:`atomic_write`), so a killed run leaves the previous file or the new one,
never half of one. A checkpoint carries the global RNG states
(:func:`rng_state`) and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "atomic_write",
    "load_checkpoint",
    "read_json",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_json",
]


def rng_state() -> dict[str, Any]:
    """Return the global RNG states (torch CPU and CUDA, Python, NumPy).

    The result holds only tensors, lists, ints and strings, so it loads with
    ``torch.load(weights_only=True)``.
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(
            (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_floats(obj: Any) -> Any:
    """Replace NaN/inf by None so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` through ``write(fh)`` on a temporary file, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON, atomically (temp file + rename).

    Tensors and NumPy arrays become lists; NaN and infinities become ``null``.

    Args:
        path: Destination.
        obj: A JSON-ready structure.

    Returns:
        The path written.
    """
    path = Path(path)
    text = json.dumps(
        _clean_floats(json.loads(json.dumps(obj, default=_json_default))),
        indent=1,
        allow_nan=False,
    )
    atomic_write(path, lambda fh: fh.write(text.encode() + b"\n"))
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    with open(path) as fh:
        return json.load(fh)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save a checkpoint atomically, adding the global RNG states.

    Args:
        path: Destination (``checkpoint.pt``).
        state: Tensors, state dicts, lists, numbers and strings only (so it loads
            with ``weights_only=True``), e.g. ``{"step": t, "model": ...,
            "optimizer": ..., "config": ..., "arrays": ...}``.

    Returns:
        The path written.
    """
    path = Path(path)
    payload = dict(state, rng=rng_state())
    atomic_write(path, lambda fh: torch.save(payload, fh))
    return path


def load_checkpoint(
    path: str | os.PathLike, *, config: dict[str, Any] | None = None, restore_rng=True
) -> dict[str, Any] | None:
    """Load a checkpoint written by :func:`save_checkpoint`, if there is one.

    Args:
        path: The checkpoint file.
        config: The current run's config dict; if given, it must equal the saved
            one except for ``resume``, ``device`` and ``out_dir``.
        restore_rng: Restore the saved global RNG states.

    Returns:
        The saved dict, or ``None`` if ``path`` does not exist.

    Raises:
        ValueError: If ``config`` differs from the checkpoint's.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if config is not None and "config" in state:
        ignore = {"resume", "device", "out_dir"}
        diff = sorted(
            k
            for k in set(config) | set(state["config"])
            if k not in ignore and config.get(k) != state["config"].get(k)
        )
        if diff:
            raise ValueError(
                f"--resume: the checkpoint {str(path)!r} was written with a different "
                f"config (fields {', '.join(map(repr, diff))}); rerun with the same "
                "config, or without --resume to start over."
            )
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state
