"""A recipe run from its config to its ``results.json``, written once for all recipes.

Every recipe's ``main`` follows the same protocol::

    validate(cfg)                            # the config alone
    with Run(RECIPE, cfg) as run:            # device, seeds (and CPU threads)
        ...                                  # data and model, checks that need them
        state = run.open()                   # out dir, config.json, --resume
        stages = Stages(state, run.save)     # resumable stages, checkpointed
        ...
        return run.finish(metrics, arrays, verdict, plot)

and its ``__main__`` is :func:`cli`. Nothing is written before :meth:`Run.open`, so
a config that fails a check leaves no output folder behind. From :meth:`Run.open`
to the end of the ``with`` block the run holds its output folder's lock
(:class:`~_common.files.DirLock`): a second run on the same folder stops at once
with a message instead of interleaving its files with the first's.

Interruptions for the resume tests: a recipe calls :func:`maybe_interrupt` at every
unit of work (a step, a run); a test sets :data:`STOP_AT` (with pytest's
``monkeypatch``) and the run raises :class:`Interrupted` at that unit, after the
checkpoint of the previous units has been written.
"""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch

from .config import config_to_dict, parse_config, resolve_device
from .files import (
    DirLock,
    OutDirBusy,
    load_checkpoint,
    read_json,
    remove_stale_temp_files,
    save_checkpoint,
    write_json,
)
from .verdict import verdict_table

SCHEMA_VERSION = 1  # bump when results.json changes incompatibly

_REPO_ROOT = Path(__file__).resolve().parents[2]  # where `git rev-parse` runs

STOP_AT: int | None = None  # the unit of work a test stops a run at (None: never)

__all__ = [
    "SCHEMA_VERSION",
    "STOP_AT",
    "Diverged",
    "Interrupted",
    "Run",
    "Stages",
    "cli",
    "environment",
    "maybe_interrupt",
    "progress_bar",
    "results_payload",
    "seed_everything",
]


class Diverged(RuntimeError):
    """A training stage's loss became non-finite; the message names the lr to lower."""


class Interrupted(RuntimeError):
    """Raised by :func:`maybe_interrupt` to simulate a killed run (tests only)."""


def maybe_interrupt(step: int) -> None:
    """Raise :class:`Interrupted` when ``step`` is :data:`STOP_AT` (test hook).

    Args:
        step: The unit of work about to run.

    Raises:
        Interrupted: If ``step == STOP_AT``.
    """
    if STOP_AT is not None and step == STOP_AT:
        raise Interrupted(f"interrupted at step {step} (test hook)")


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """Return a tqdm progress bar; silent when stderr is not a terminal.

    Args:
        iterable: What to iterate over (or ``None`` with ``total=``).
        **kwargs: Passed to :class:`tqdm.tqdm` (``total``, ``desc``, ``initial``).

    Returns:
        The bar.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


# --------------------------------------------------------------------------------------
# Environment and seeds
# --------------------------------------------------------------------------------------


def _git_sha() -> dict[str, Any]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"git_sha": sha or None, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Capture what a result depends on: versions, device, threads, git SHA.

    Args:
        device: The device the recipe runs on.

    Returns:
        A JSON-ready dict.
    """
    device = torch.device(device)
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    for mod in ("timm", "torchvision", "numpy", "sklearn", "geoopt_sgd"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded
            env[mod] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    env.update(_git_sha())
    return env


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (if installed) and torch's global RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def results_payload(
    recipe: str,
    cfg: Any,
    *,
    env: dict[str, Any],
    metrics: dict[str, Any],
    arrays: dict[str, Any],
    verdict: list[dict[str, Any]],
) -> dict[str, Any]:
    """Assemble the common ``results.json`` layout.

    Keys: ``schema_version``, ``recipe``, ``config``, ``seed``, ``env``,
    ``metrics`` (summary numbers), ``arrays`` (per-step lists), ``verdict`` (rows
    from :func:`~_common.verdict.claim`) and ``passed`` (all rows passed).

    Args:
        recipe: The recipe's name.
        cfg: Its config dataclass.
        env: From :func:`environment`.
        metrics: Summary metrics.
        arrays: Per-step arrays.
        verdict: Verdict rows.

    Returns:
        The dict to pass to :func:`~_common.files.write_json`.
    """
    cfg_d = config_to_dict(cfg)
    return {
        "schema_version": SCHEMA_VERSION,
        "recipe": recipe,
        "config": cfg_d,
        "seed": cfg_d.get("seed"),
        "env": env,
        "metrics": metrics,
        "arrays": arrays,
        "verdict": verdict,
        "passed": bool(verdict) and all(row["passed"] for row in verdict),
    }


# --------------------------------------------------------------------------------------
# The run and its resumable stages
# --------------------------------------------------------------------------------------


class Run:
    """One run of a recipe: device, seeds, output folder, checkpoint, results.

    Used as a context manager: entering seeds the global RNGs with ``cfg.seed``
    and, with ``threads``, sets torch's CPU thread count (restored on exit);
    leaving releases the output folder's lock taken by :meth:`open`.

    Args:
        recipe: The recipe's name; outputs go to ``<cfg.out_dir>/<recipe>/``.
        cfg: The recipe's config, a :class:`~_common.config.RunOptions` (fields
            ``seed``, ``device``, ``out_dir``, ``resume``).
        threads: Torch CPU threads during the run (``None``: leave as is).

    Attributes:
        device: The checked :class:`torch.device`.
        out: The output folder (created by :meth:`open`).
        state: The resumable state, saved by :meth:`save` into
            ``checkpoint.pt``; tensors, lists, numbers and strings only.
    """

    def __init__(self, recipe: str, cfg: Any, *, threads: int | None = None):
        self.recipe = recipe
        self.cfg = cfg
        self.config = config_to_dict(cfg)
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.out_dir) / recipe
        self.state: dict[str, Any] = {}
        self._threads = threads
        self._threads_before: int | None = None
        self._lock = DirLock(self.out)
        self._start = time.perf_counter()

    def __enter__(self) -> Run:
        if self._threads is not None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self._threads)
        seed_everything(self.cfg.seed)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)

    def open(self) -> dict[str, Any]:
        """Lock the output folder, write ``config.json``, load ``--resume`` state.

        Creates the folder, takes its lock (held until the ``with`` block ends)
        and deletes the temporary files of writes a killed run left there.
        ``config.json`` is written once the checkpoint has been accepted, so a
        refused ``--resume`` leaves the folder's files as they were.

        Returns:
            :attr:`state`: the checkpoint's state with ``cfg.resume`` and a
            checkpoint there (the global RNG states restored), else ``{}``.

        Raises:
            OutDirBusy: If another run holds the folder's lock.
            ValueError: If the folder cannot be created or written, or the
                checkpoint was written with another config, by an older layout
                of the recipes (no ``state`` in it), or is damaged.
        """
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"--out-dir: cannot create {str(self.out)!r} ({err.strerror or err}); "
                "pass another --out-dir."
            ) from None
        try:
            self._lock.acquire()
        except OSError as err:  # the lock file cannot be written there
            raise ValueError(
                f"--out-dir: cannot write to {str(self.out)!r} "
                f"({err.strerror or err}); pass another --out-dir."
            ) from None
        remove_stale_temp_files(self.out)
        if self.cfg.resume:
            path = self.out / "checkpoint.pt"
            saved = load_checkpoint(path, config=self.config)
            if saved is not None and "state" not in saved:
                raise ValueError(
                    f"--resume: the checkpoint {str(path)!r} was written by an older "
                    "version of the recipes; rerun without --resume to start over."
                )
            if saved is not None and not isinstance(saved["state"], dict):
                raise ValueError(
                    f"--resume: the checkpoint {str(path)!r} is damaged or not a "
                    "checkpoint of this recipe (its state is not a dict). Delete it, "
                    "or rerun without --resume to start over."
                )
            if saved is not None:
                self.state = saved["state"]
        # after the checks: a refused --resume leaves the folder's config.json
        write_json(self.out / "config.json", self.config)
        return self.state

    def save(self) -> None:
        """Write :attr:`state` (and the global RNG states) to ``checkpoint.pt``."""
        save_checkpoint(
            self.out / "checkpoint.pt", {"config": self.config, "state": self.state}
        )

    def finish(
        self,
        metrics: dict[str, Any],
        arrays: dict[str, Any],
        verdict: list[dict[str, Any]],
        plot: Callable[[Path], Any],
    ) -> dict[str, Any]:
        """Write ``results.json``, draw the figures from it, return it as written.

        Args:
            metrics: Summary numbers; ``seconds`` (the run's wall time) is added.
            arrays: Per-step and per-run lists.
            verdict: Verdict rows.
            plot: The recipe's ``plot(results_path)``.

        Returns:
            The results as read back from the file (NaN and infinities are
            ``None``, tuples are lists), so a resumed run compares equal.
        """
        metrics["seconds"] = time.perf_counter() - self._start
        results = results_payload(
            self.recipe,
            self.cfg,
            env=environment(self.device),
            metrics=metrics,
            arrays=arrays,
            verdict=verdict,
        )
        path = write_json(self.out / "results.json", results)
        plot(path)
        return read_json(path)


class Stages:
    """Named stages run once each, in order, resumable inside a stage.

    ``state`` (a dict inside the run's checkpoint) keeps ``done`` (stage name →
    its result) and ``current`` (the unfinished stage's last snapshot, or
    ``None``). :meth:`run` skips a finished stage, hands a stage its own last
    snapshot on resume, and saves after every stage and every snapshot (or, with
    ``min_interval``, at most that often within a stage).

    Args:
        state: The dict to keep the stages in (created keys: ``done``,
            ``current``).
        save: Writes the checkpoint (:meth:`Run.save`).
    """

    def __init__(self, state: dict[str, Any], save: Callable[[], None]):
        self.state = state
        self.save = save
        self.done: dict[str, Any] = state.setdefault("done", {})
        state.setdefault("current", None)

    def run(
        self,
        name: str,
        stage: Callable[[Any, Callable[[Any], None]], Any],
        *,
        min_interval: float = 0.0,
    ) -> Any:
        """Return stage ``name``'s result, running ``stage`` unless it is done.

        Args:
            name: The stage's name (unique within ``state``).
            stage: ``stage(resume, snapshot)``: ``resume`` is the stage's last
                snapshot (``None`` on a fresh start); ``snapshot(value)`` saves
                ``value`` as that snapshot. Returns the stage's result.
            min_interval: Seconds between checkpoint writes within the stage
                (``0``: write at every snapshot). A snapshot that comes sooner is
                kept in :attr:`state` and written with the next one, at the end of
                the stage, or when the stage raises (an interrupt included), so
                only a killed process loses it. For stages whose snapshots are
                cheap to redo and whose checkpoint is large; the value must be
                complete whenever the stage can raise (e.g. a list that only
                grows by finished items).

        Returns:
            The result (from the checkpoint when the stage was done before).
        """
        if name in self.done:
            return self.done[name]
        current = self.state["current"]
        resume = current["snapshot"] if current and current["stage"] == name else None
        last_write = time.perf_counter()
        pending = False

        def snapshot(value: Any) -> None:
            nonlocal last_write, pending
            self.state["current"] = {"stage": name, "snapshot": value}
            now = time.perf_counter()
            if now - last_write >= min_interval:
                self.save()
                last_write, pending = now, False
            else:
                pending = True

        try:
            result = stage(resume, snapshot)
        except BaseException:
            if pending:
                self.save()
            raise
        self.done[name] = result
        self.state["current"] = None
        self.save()
        return result


def _mtime(path: Path) -> int | None:
    """``path``'s modification time in ns, ``None`` if it does not exist."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def cli(
    recipe: str,
    config_cls: type,
    main: Callable[[Any], dict[str, Any]],
    doc: str | None,
    report: Callable[[dict[str, Any]], str] | None = None,
) -> NoReturn:
    """The ``__main__`` of every recipe: parse the command line, run, print, exit.

    Prints ``report(results)`` (if given), the verdict table and the results
    path. Exit status: 0 when every verdict row passes, 1 when one fails, 2 when
    the run stops on an error its message tells the user how to fix (a bad
    config, a missing dataset, a diverged training, a damaged checkpoint, an
    output folder in use by another run), printed without a traceback, and 130
    on Ctrl-C (with how to continue: ``--resume`` where a checkpoint was saved).

    Args:
        recipe: The recipe's name.
        config_cls: Its ``Config``.
        main: Its ``main(cfg)``.
        doc: The ``--help`` description (the recipe's docstring).
        report: A Markdown table of the measures, printed before the verdict.

    Raises:
        SystemExit: Always.
    """
    cfg = parse_config(config_cls, description=doc)
    checkpoint = Path(cfg.out_dir) / recipe / "checkpoint.pt"
    before = _mtime(checkpoint)  # a checkpoint an earlier run left in the folder
    try:
        results = main(cfg)
    except (ValueError, FileNotFoundError, Diverged, OutDirBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl-C: the running stage saved its progress on the way out
        # a checkpoint this run wrote, or the one it resumed from
        now = _mtime(checkpoint)
        saved = now is not None and (now != before or getattr(cfg, "resume", False))
        hint = (
            f"its progress is in {checkpoint}: run the same command with --resume "
            "to continue"
            if saved
            else "nothing was saved yet"
        )
        print(f"interrupted: {hint}.", file=sys.stderr)
        sys.exit(130)
    if report is not None:
        print(report(results))
    print(verdict_table(results["verdict"]))
    print(f"results: {Path(cfg.out_dir) / recipe / 'results.json'}")
    sys.exit(0 if results["passed"] else 1)
