"""What a run writes and reads back: strict JSON and checkpoints, both atomic.

Every file is written to a temporary name and renamed into place
(:func:`atomic_write`), so a killed run leaves the previous file or the new one,
never half of one (and at most a hidden temporary file, which
:func:`remove_stale_temp_files` deletes when the next run starts). Files get the
mode a plain ``open()`` would give them (``0o666`` less the umask). A checkpoint
carries the global RNG states (:func:`rng_state`) and loads with
``torch.load(weights_only=True)``; a damaged one is reported as such.
:class:`DirLock` keeps two runs from writing one output folder at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DirLock",
    "OutDirBusy",
    "atomic_write",
    "load_checkpoint",
    "read_json",
    "remove_stale_temp_files",
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


# The temporary names of atomic_write: ".<name>.<8 characters of mkstemp>.tmp".
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    # read by setting it; 0o077 in between, so a file another thread creates
    # meanwhile is at worst private, never world-writable
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` through ``write(fh)`` on a temporary file, then rename it.

    The file gets mode ``0o666`` less the umask, as with a plain ``open()``
    (``mkstemp`` alone would leave it ``0o600``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        else:  # Windows: only the read-only bit exists
            os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder``.

    A run killed during a write (``SIGKILL``, power loss) leaves its hidden
    ``.<name>.<random>.tmp`` behind. Call this only while holding the folder's
    :class:`DirLock`, so that no live run's temporary file is removed.

    Args:
        folder: The output folder (not searched recursively).

    Returns:
        The paths removed.
    """
    removed = []
    for p in sorted(Path(folder).glob(".*.tmp")):
        if _TEMP_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class OutDirBusy(RuntimeError):
    """Another run holds the output folder's lock."""


class DirLock:
    """An exclusive lock on a folder, held by one process at a time.

    The lock is an OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on
    ``<folder>/.lock``, which holds the owner's pid for the message. The OS
    releases it when the owner exits, however it exits, so a lock file left by a
    killed run is no obstacle: the next run takes it over.

    Args:
        folder: The folder to lock (it must exist).
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self._fh: Any = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fh is not None

    def acquire(self) -> None:
        """Take the lock, or raise at once if another run holds it.

        Raises:
            OutDirBusy: If the lock is held (by another process, or by another
                :class:`DirLock` of this one).
        """
        if self._fh is not None:
            return
        fh = open(self.path, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            _lock(fh)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            who = f"the run with pid {holder}" if holder.isdigit() else "another run"
            raise OutDirBusy(
                f"--out-dir: {str(self.path.parent)!r} is in use by {who} (lock "
                f"{str(self.path)!r}); wait for that run to finish, or pass another "
                "--out-dir."
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        """Release the lock (the file stays; it is reused by the next run)."""
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            _unlock(fh)
        finally:
            fh.close()


if os.name == "nt":  # pragma: no cover - not exercised on the CI's Linux
    import msvcrt

    def _lock(fh: Any) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(fh: Any) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(fh: Any) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fh: Any) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


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
        ValueError: If ``config`` differs from the checkpoint's, or the file is
            not a readable checkpoint (truncated, empty, another file, a dict
            without the config or with invalid RNG states); the message names
            the file and what to do. Nothing (the RNG states included) has
            changed then.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means a damaged file
        raise ValueError(
            _damaged(path, f"it cannot be read: {type(err).__name__}")
        ) from None
    if not isinstance(state, dict):
        raise ValueError(_damaged(path, f"it holds a {type(state).__name__}"))
    if config is not None and not isinstance(state.get("config"), dict):
        raise ValueError(_damaged(path, "it has no config"))
    if config is not None:
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
        before = rng_state()
        try:
            set_rng_state(state["rng"])
        except Exception:  # noqa: BLE001 - malformed states: leave the RNGs as they were
            set_rng_state(before)
            raise ValueError(_damaged(path, "its RNG states are invalid")) from None
    return state


def _damaged(path: Path, why: str) -> str:
    return (
        f"--resume: the checkpoint {str(path)!r} is damaged or not a checkpoint of "
        f"this recipe ({why}). Delete it, or rerun without --resume to start over."
    )
