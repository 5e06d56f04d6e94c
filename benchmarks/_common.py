"""Shared pieces of the benchmark scripts: the environment record, a timer and
the command lines' checks.

Imported as ``_common`` by the scripts in this folder (run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

import geoopt_sgd


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def git_sha() -> str:
    """Short commit of the checkout holding this folder, ``""`` if unknown."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=False,
        ).stdout.strip()
    except OSError:
        return ""


def environment(device: str = "cpu") -> dict[str, Any]:
    """The one environment record every benchmark writes beside its numbers.

    Keys: package versions (``timm`` is ``None`` when it is not installed), the
    machine, the thread count, the device (and the GPU's name on CUDA), the load
    average at the start and the git commit. Scripts add ``load_average_end``
    (:func:`load_average`) when they finish.
    """
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    env: dict[str, Any] = {
        "geoopt_sgd": geoopt_sgd.__version__,
        "torch": torch.__version__,
        "timm": timm_version,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": load_average(),
        "git_sha": git_sha(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def synchronize(device: str | torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], Any],
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device = "cpu",
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    On CUDA each call is timed from and to a :func:`synchronize`, so the time is
    that of the kernels, not of queueing them.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def positive(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type``: ``cast(text)``, which must be > 0 (else exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def timm_model(name: str) -> str:
    """An argparse ``type``: the name of a model timm can build (else exit 2)."""
    import timm

    if not timm.is_model(name):
        raise argparse.ArgumentTypeError(f"timm has no model {name!r}")
    return name


def usable_device(text: str) -> str:
    """An argparse ``type``: ``"cpu"`` or a CUDA device present here (else exit 2)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only 'cpu' and 'cuda' are timed")
    return text


def build_timm(name: str, device: str | torch.device = "cpu", num_classes: int = 10):
    """A timm model (no pretrained weights) built on the CPU from the global RNG,
    then moved to ``device``: the same initialisation on every device."""
    import timm

    with torch.device("cpu"):
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    return model.to(device)


def add_device_argument(
    parser: argparse.ArgumentParser,
    help: str = "'cpu' (measured) or 'cuda' (the same script on a GPU; not measured "
    "in benchmarks/README.md)",
) -> None:
    """The scripts' ``--device`` option (default ``cpu``; see :func:`usable_device`)."""
    parser.add_argument("--device", type=usable_device, default="cpu", help=help)
